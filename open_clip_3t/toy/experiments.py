"""Toy-scale 3T / LiT / CLIP (and their sigmoid-loss twins) experiments on generated data, shared by the quickstart and scripts/replicate.py.

Everything runs through the same doors a user takes: `python -m open_clip_3t.toy.synthetic`-style shards, third
towers pretrained here and loaded from a file, `python -m open_clip_3t.cache build`, `python -m training.main`,
`python -m training.eval`, `python -m open_clip_3t.export`. Each step runs in its own process, like on a cluster,
and each step's output is kept, so a rerun in the same folder redoes only what is missing.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from ..files import write_atomic
from .pretrain import pretrain_third_tower
from .synthetic import ATTRIBUTES, write_classification_folder, write_labelled_set, write_shards

EVAL_ATTRIBUTES = ("shape", "colour")  # what zero-shot evaluation asks about
# The sigmoid-loss rows (trained with --siglip) use 3T-baseline-CLIP-mini's towers as OpenCLIP's CustomTextCLIP with a bias.
MODELS = {"CLIP": "3T-baseline-CLIP-mini", "LiT": "3T-baseline-LiT-mini", "3T": "3T-mini", "SigLIP": "3T-baseline-CLIP-mini-sigmoid",
          "SigLIP-3T": "3T-mini-sigmoid"}
H_ARCH = "test_resnet"


@dataclass(frozen=True)
class Scale:
    """The protocol's sizes: data, third-tower pretraining and the training budget every run gets."""
    train_samples: int = 8000
    samples_per_shard: int = 1000
    val_samples: int = 1000
    per_class: int = 30              # zero-shot images per class
    labelled_samples: int = 30000    # the labelled set every tower is pretrained on (all attributes labelled)
    tower_epochs: int = 12
    weak_tower_samples: int = 12000  # the weak tower: fewer images, fewer epochs
    weak_tower_epochs: int = 8
    epochs: int = 4
    batch_size: int = 128
    lr: float = 1e-3
    image_size: int = 64             # generated images; the models see 32 px


SCALES = {
    "default": Scale(),
    # CI-sized: every step runs, on data far too small to learn from.
    "tiny": Scale(train_samples=256, samples_per_shard=128, val_samples=64, per_class=2, labelled_samples=256,
                  tower_epochs=1, weak_tower_samples=128, weak_tower_epochs=1, epochs=2, batch_size=32,
                  image_size=32),
}


@dataclass(frozen=True)
class Tower:
    """A third tower pretrained here: timm's test_resnet on the labelled set's `attributes` (one class per
    combination, or one classifier per attribute with multitask); weak = the small pretraining budget."""
    attributes: tuple
    multitask: bool = False
    weak: bool = False
    about: str = ""


TOWERS = {
    "weak": Tower(("shape", "colour"), weak=True, about="shape x colour, small budget: today's weak tower"),
    "matched": Tower(("shape", "colour"), about="shape x colour: what evaluation asks about"),
    "broad": Tower(tuple(ATTRIBUTES), multitask=True, about="every attribute the captions name (ImageNet-21k analogue)"),
    "mismatched": Tower(("background", "position"), about="background x position: blind to shape and colour "
                                                          "(Places365 analogue)"),
    "shape": Tower(("shape",), about="shape only"),
    "colour": Tower(("colour",), about="colour only"),
}


def say(message):
    print(message, flush=True)


TRAIN_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*?Batch \(t\): [\d.]+, ([\d.]+)/s")
EVAL_LINE = re.compile(r"Eval Epoch: (\d+) (.*)")


def training_progress(label, epochs, every_s=15.0):
    """A line filter for training.main's output: prints samples seen and samples/s at most every `every_s`
    seconds, and each epoch's evaluation, so a training step is never minutes of silence."""
    last = [0.0]

    def on_line(line):
        if match := TRAIN_LINE.search(line):
            epoch, seen, per_epoch, rate = match.groups()
            now = time.time()
            if now - last[0] >= every_s or seen == per_epoch:
                last[0] = now
                total = int(epoch) * int(per_epoch) + int(seen)
                say(f"    {label}: epoch {int(epoch) + 1}/{epochs}, {total:,}/{epochs * int(per_epoch):,} samples "
                    f"seen, {float(rate):.0f} samples/s")
        elif match := EVAL_LINE.search(line):
            metrics = dict(re.findall(r"(\S+): ([-\d.]+)", match.group(2)))
            shown = [f"{k.split('-')[0]} {100 * float(v):.1f}" for k, v in metrics.items() if k.endswith("zeroshot-top1")]
            shown += [f"{k.replace('image_to_text', 'I->T').replace('text_to_image', 'T->I')} {100 * float(v):.1f}"
                      for k, v in metrics.items() if k.endswith("_R@1")]
            say(f"    {label}: after epoch {match.group(1)}: " + ", ".join(shown))
    return on_line


def run(cmd, log_file, what, on_line=None):
    """Run a command to completion, its output into log_file (each line also to on_line); on failure show the
    log's tail and stop. Returns the seconds it took."""
    start = time.time()
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in proc.stdout:
            log.write(line)
            if on_line is not None:
                on_line(line)
        returncode = proc.wait()
    if returncode != 0:
        tail = Path(log_file).read_text().splitlines()[-25:]
        raise RuntimeError(f"{what} failed (exit {returncode}); last lines of {log_file}:\n" + "\n".join(tail))
    return time.time() - start


# --- data and third towers ----------------------------------------------------------------------------------------

def labelled_samples(scale: Scale, towers):
    return max(scale.weak_tower_samples if TOWERS[t].weak else scale.labelled_samples for t in towers)


def prepare_data(root, scale: Scale, towers=tuple(TOWERS), seed=0):
    """Train and validation shards, zero-shot folders and the labelled pretraining set (each skipped if present).
    The labelled set labels every attribute; its first N images are the same for any N."""
    root = Path(root)
    n_labelled = labelled_samples(scale, towers)
    data = {"train": root / "train", "val": root / "val",
            "zeroshot": [root / "zeroshot" / a for a in EVAL_ATTRIBUTES],  # column names: NAME-zeroshot-top1
            "labelled": root / f"labelled_{n_labelled}"}
    if not (data["train"] / "sizes.json").exists():
        write_shards(data["train"], scale.train_samples, scale.samples_per_shard, seed=seed, split="train",
                     image_size=scale.image_size)
    if not (data["val"] / "sizes.json").exists():
        write_shards(data["val"], scale.val_samples, scale.val_samples, seed=seed, split="val",
                     image_size=scale.image_size)
    for attribute, folder in zip(EVAL_ATTRIBUTES, data["zeroshot"]):
        if not (folder / "templates.txt").exists():
            write_classification_folder(folder, attribute, scale.per_class, seed=seed, split="test",
                                        image_size=scale.image_size)
    if not data["labelled"].exists():
        write_labelled_set(data["labelled"], list(ATTRIBUTES), n_labelled, seed=seed, split="pretrain",
                           image_size=scale.image_size)
    n_shards = len(list(data["train"].glob("*.tar")))
    data["train_spec"] = str(data["train"] / f"{{00000..{n_shards - 1:05d}}}.tar")
    data["val_spec"] = str(data["val"] / "00000.tar")
    return data


def pretrain_towers(root, data, scale: Scale, towers=tuple(TOWERS), progress=False):
    """The 'ImageNet-21k checkpoints' of this toy world: root/h_NAME.pth (+ .json with held-out accuracies)."""
    paths = {}
    for name in towers:
        tower, path = TOWERS[name], Path(root) / f"h_{name}.pth"
        if not path.exists():
            samples, epochs = ((scale.weak_tower_samples, scale.weak_tower_epochs) if tower.weak
                               else (scale.labelled_samples, scale.tower_epochs))
            say(f"  third tower '{name}' ({tower.about}): {H_ARCH}, {samples} labelled images, {epochs} epochs")
            summary = pretrain_third_tower(data["labelled"], path, model_name=H_ARCH, image_size=32, epochs=epochs,
                                           seed=0, progress=progress, attributes=list(tower.attributes),
                                           multitask=tower.multitask, num_samples=samples)
            say(f"  third tower '{name}': {describe_tower(summary)}")
        paths[name] = str(path)
    return paths


def describe_tower(summary):
    """'held-out accuracy 0.912 (shape 0.93, colour 1.00)' from a tower's .json summary."""
    per_attribute = ", ".join(f"{a} {v:.3f}" for a, v in summary["heldout_accuracy_per_attribute"].items())
    what = "every attribute right" if len(summary["attributes"]) > 1 else "accuracy"
    return f"held-out {what} {summary['heldout_accuracy']:.3f} ({per_attribute})"


def tower_summary(weights):
    return json.loads(Path(f"{weights}.json").read_text())


def build_cache(root, data, weights, name):
    """h's embeddings of every training sample; returns (cache folder, seconds, None when built earlier here).
    An interrupted build is resumed by the builder; root/cache_NAME.log ends with its summary once complete."""
    out, log = Path(root) / f"cache_{name}", Path(root) / f"cache_{name}.log"
    if log.exists() and out.exists() and "build complete" in log.read_text():
        return str(out), None
    seconds = run([sys.executable, "-m", "open_clip_3t.cache", "build", "--train-data", data["train_spec"],
                   "--model", MODELS["3T"], "--third-tower-cache", out, "--third-tower-weights", weights,
                   "--workers", "1", "--batch-size", "256", "--device", "cpu"], log, f"cache build ({name})",
                  on_line=lambda line: say(f"    {line.strip()}") if "samples/s" in line else None)
    with open(log, "a") as f:
        f.write("build complete\n")
    return str(out), seconds


# --- training and evaluation ----------------------------------------------------------------------------------------

def train_command(logs, name, kind, data, scale: Scale, seed, weights=None, cache=None, extra=(), model=None,
                  lock_image=True):
    """The python -m training.main command of one run (see `train`); for 3T with several towers, weights and cache
    are {tower name: path}."""
    cmd = [sys.executable, "-m", "training.main", "--model", model or MODELS[kind], "--train-data", data["train_spec"],
           "--dataset-type", "webdataset", "--train-num-samples", scale.train_samples,
           "--batch-size", scale.batch_size, "--epochs", scale.epochs, "--lr", scale.lr, "--wd", "0.1",
           "--warmup", max(1, scale.train_samples // scale.batch_size // 2), "--workers", "1",
           "--precision", "fp32", "--device", "cpu", "--seed", seed, "--logs", logs, "--name", name,
           "--log-every-n-steps", "5", "--save-frequency", scale.epochs, "--report-to", "none",
           "--zeroshot-data", *data["zeroshot"], "--val-data", data["val_spec"], "--retrieval-k", "1", "5",
           "--zeroshot-frequency", "1", "--val-frequency", "1", *extra]
    if kind == "LiT":
        # LiT: h's weights as the image tower, locked entirely (batch-norm statistics included): only the
        # projection and g train. Unlocked, it is "LiT finetune".
        cmd += ["--image-tower-weights", weights] + (["--lock-image", "--lock-image-freeze-bn-stats"] if lock_image else [])
    if kind.startswith("SigLIP"):
        cmd += ["--siglip"]  # OpenCLIP's sigmoid loss, and its initialisation (temperature 10, bias -10)
    if kind in ("3T", "SigLIP-3T"):
        # With a cache, h is not built: its weights file only identifies the third tower the cache must match.
        # Several towers ({name: path}, e.g. 3T-mini-K2's shape and colour): NAME=PATH words, one per tower.
        def words(paths):
            return [f"{name}={path}" for name, path in paths.items()] if isinstance(paths, dict) else [paths]
        cmd += ["--third-tower-weights", *words(weights)] + (["--third-tower-cache", *words(cache)] if cache else [])
    return [str(c) for c in cmd]


def train(logs, name, kind, data, scale: Scale, seed, weights=None, cache=None, extra=(), model=None, label=None,
          lock_image=True):
    """One run of python -m training.main, evaluated after every epoch (zero-shot and retrieval, written to
    RUN/checkpoints/results.jsonl); returns (checkpoint, seconds). Equal budgets: same data, epochs, batch.
    kind: CLIP, LiT (image tower = h's weights, locked unless lock_image=False) or 3T (h's embeddings from
    `cache`, or h run online without one)."""
    checkpoint = Path(logs) / name / "checkpoints" / f"epoch_{scale.epochs}.pt"
    if checkpoint.exists():
        return str(checkpoint), None  # finished earlier in this working folder
    shutil.rmtree(Path(logs) / name, ignore_errors=True)  # an unfinished earlier attempt
    cmd = train_command(logs, name, kind, data, scale, seed, weights, cache, extra, model, lock_image)
    seconds = run(cmd, Path(logs) / f"{name}.log", f"training {name}", on_line=training_progress(label or name, scale.epochs))
    return str(checkpoint), seconds


def evaluate(out, checkpoint, model, data, combine_with=None, combine_model=None, third_tower_weights=None,
             alphas=None, batch_size=256):
    """python -m training.eval on the zero-shot folders and the validation shards; returns its table. With
    combine_with (the paper's 3T + LiT) or third_tower_weights (the 3T model + its own third-tower pair), one row
    per alpha."""
    cmd = [sys.executable, "-m", "training.eval", "--pretrained", checkpoint, "--model", model,
           "--zeroshot-data", *data["zeroshot"], "--val-data", data["val_spec"], "--retrieval-k", "1", "5", "10",
           "--workers", "0", "--device", "cpu", "--batch-size", batch_size, "--out", out]
    if combine_with is not None:
        cmd += ["--combine-with", combine_with, "--combine-model", combine_model, "--alphas", *alphas]
    elif third_tower_weights is not None:
        cmd += ["--third-tower-pair", "--third-tower-weights", third_tower_weights, "--alphas", *alphas]
    run(cmd, Path(out).with_suffix(".log"), f"evaluation of {checkpoint}")
    return pd.read_csv(Path(out) / "results.csv")


SUMMARY_COLUMNS = {"shape-zeroshot-top1": "shape top-1", "colour-zeroshot-top1": "colour top-1",
                   "image_to_text_R@1": "I→T R@1", "text_to_image_R@1": "T→I R@1",
                   "image_to_text_R@5": "I→T R@5", "text_to_image_R@5": "T→I R@5"}


def summary_row(results: pd.DataFrame):
    """The headline numbers of one evaluation (first row), in percent."""
    row = results.iloc[0]
    return {label: 100 * float(row[col]) for col, label in SUMMARY_COLUMNS.items()}


def last_evaluation(checkpoint):
    """The evaluation training.main ran after the last epoch (RUN/checkpoints/results.jsonl), as a one-row table:
    the same numbers `python -m training.eval` gives for that checkpoint at the training batch size."""
    lines = (Path(checkpoint).parent / "results.jsonl").read_text().splitlines()
    return pd.DataFrame([json.loads(lines[-1])])


# --- export, tables -----------------------------------------------------------------------------------------------

def export_and_reload(checkpoint, out_dir, model_name):
    """Export the 3T run to a plain OpenCLIP folder and reload it in a process that never imports open_clip_3t;
    returns the largest difference between the two models' image and text features (0.0 = identical)."""
    import open_clip
    import torch
    subprocess.run([sys.executable, "-m", "open_clip_3t.export", checkpoint, "--out", out_dir, "--model", model_name,
                    "--overwrite"], check=True, capture_output=True)
    probe = Path(out_dir).parent / "reload_probe.pt"
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    texts = open_clip.get_tokenizer(model_name)(["a red circle", "two blue squares", "a star", "three dots"])
    torch.save({"images": images, "texts": texts}, probe)
    code = (f"import sys, torch, open_clip\n"
            f"m = open_clip.create_model('local-dir:{out_dir}').eval()\n"
            f"x = torch.load('{probe}')\n"
            f"assert 'open_clip_3t' not in sys.modules\n"
            f"with torch.no_grad():\n"
            f"    torch.save([m.encode_image(x['images'], normalize=True), "
            f"m.encode_text(x['texts'], normalize=True)], '{probe}.out')\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    vanilla = torch.load(f"{probe}.out")
    model = open_clip.create_model(model_name, pretrained=checkpoint, third_tower=False).eval()
    with torch.no_grad():
        ours = [model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)]
    return max(float((a - b).abs().max()) for a, b in zip(ours, vanilla))


def save_table(df: pd.DataFrame, out_dir, stem):
    """OUT/stem.csv and OUT/stem.md (GitHub Markdown, floats to 4 decimals)."""
    out_dir = Path(out_dir)
    write_atomic(out_dir / f"{stem}.csv", df.to_csv(index=False))
    write_atomic(out_dir / f"{stem}.md", df.to_markdown(index=False, floatfmt=".4f") + "\n")
    return out_dir / f"{stem}.csv", out_dir / f"{stem}.md"


def write_json(path, obj):
    """JSON written to a temporary name and renamed: the file exists only when complete."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(obj, indent=2) + "\n")


def check_protocol(out, scale: Scale, extra: Optional[dict] = None):
    """OUT/protocol.json records the scale (and anything else that defines the protocol); a rerun in the same
    folder must use the same protocol, so finished runs stay comparable with new ones."""
    protocol = {"scale": asdict(scale), **(extra or {})}
    path = Path(out) / "protocol.json"
    if path.exists():
        found = json.loads(path.read_text())
        if found != protocol:
            differ = sorted(k for k in set(found["scale"]) | set(protocol["scale"])
                            if found["scale"].get(k) != protocol["scale"].get(k))
            raise SystemExit(f"{out} holds runs of another protocol (scale differs in {differ or 'other keys'}): "
                             f"use a new --out folder or the same --scale")
    else:
        write_json(path, protocol)
    return protocol
