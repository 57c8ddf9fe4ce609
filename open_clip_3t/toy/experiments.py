"""Toy-scale 3T / LiT / CLIP (and their sigmoid-loss twins) experiments on generated data, shared by the quickstart and scripts/replicate.py.

Everything runs through the same doors a user takes: `python -m open_clip_3t.toy.synthetic`-style shards, a third
tower pretrained here and loaded from a file, `python -m open_clip_3t.cache build`, `python -m training.main`,
`python -m training.eval`, `python -m open_clip_3t.export`. Each step runs in its own process, like on a cluster.
"""
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .pretrain import pretrain_third_tower
from .synthetic import write_classification_folder, write_labelled_set, write_shards

# Evaluation asks about shape and colour. The matched tower was pretrained on exactly that; the mismatched one on
# background x position, a task blind to what evaluation asks (the analogue of the paper's Places365 case).
EVAL_ATTRIBUTES = ("shape", "colour")
TOWER_TASKS = {"matched": ("shape", "colour"), "mismatched": ("background", "position")}
# The sigmoid-loss rows (trained with --siglip) use CLIP-mini's towers as OpenCLIP's CustomTextCLIP with a bias.
MODELS = {"CLIP": "CLIP-mini", "LiT": "LiT-mini", "3T": "3T-mini", "SigLIP": "CLIP-mini-sigmoid",
          "SigLIP-3T": "3T-mini-sigmoid"}
H_ARCH = "test_resnet"


@dataclass(frozen=True)
class Scale:
    train_samples: int = 8000
    samples_per_shard: int = 1000
    val_samples: int = 1000
    per_class: int = 30              # zero-shot images per class
    pretrain_samples: int = 12000
    pretrain_epochs: int = 8
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-3
    image_size: int = 64             # generated images; the models see 32 px


SCALES = {
    "default": Scale(),
    # CI-sized: every step runs, on data far too small to learn from.
    "tiny": Scale(train_samples=256, samples_per_shard=128, val_samples=64, per_class=2, pretrain_samples=256,
                  pretrain_epochs=1, epochs=1, batch_size=32, image_size=32),
}


def say(message):
    print(message, flush=True)


def run(cmd, log_file, what):
    """Run a command to completion, its output into log_file; on failure show the log's tail and stop."""
    start = time.time()
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        proc = subprocess.run([str(c) for c in cmd], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = Path(log_file).read_text().splitlines()[-25:]
        raise RuntimeError(f"{what} failed (exit {proc.returncode}); last lines of {log_file}:\n" + "\n".join(tail))
    return time.time() - start


# --- data and third towers ----------------------------------------------------------------------------------------

def prepare_data(root, scale: Scale, seed=0):
    """Train and validation shards, zero-shot folders and the labelled pretraining sets (skipped if present)."""
    root = Path(root)
    data = {"train": root / "train", "val": root / "val",
            "zeroshot": [root / "zeroshot" / a for a in EVAL_ATTRIBUTES],  # column names: NAME-zeroshot-top1
            "labelled": {task: root / f"labelled_{task}" for task in TOWER_TASKS}}
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
    for task, folder in data["labelled"].items():
        if not folder.exists():
            write_labelled_set(folder, list(TOWER_TASKS[task]), scale.pretrain_samples, seed=seed,
                               split="pretrain", image_size=scale.image_size)
    n_shards = len(list(data["train"].glob("*.tar")))
    data["train_spec"] = str(data["train"] / f"{{00000..{n_shards - 1:05d}}}.tar")
    data["val_spec"] = str(data["val"] / "00000.tar")
    return data


def pretrain_towers(root, data, scale: Scale, tasks=tuple(TOWER_TASKS)):
    """The 'ImageNet-21k checkpoints' of this toy world: one file per pretraining task."""
    towers = {}
    for task in tasks:
        path = Path(root) / f"h_{task}.pth"
        if not path.exists():
            summary = pretrain_third_tower(data["labelled"][task], path, model_name=H_ARCH, image_size=32,
                                           epochs=scale.pretrain_epochs, seed=0, progress=False)
            say(f"  third tower '{task}' ({'x'.join(TOWER_TASKS[task])}): held-out accuracy "
                f"{summary['heldout_accuracy']:.3f} over {len(summary['class_names'])} classes")
        towers[task] = str(path)
    return towers


def build_cache(root, data, weights, task):
    out = Path(root) / f"cache_{task}"
    seconds = run([sys.executable, "-m", "open_clip_3t.cache", "build", "--train-data", data["train_spec"],
                   "--model", MODELS["3T"], "--out", out, "--third-tower-weights", weights, "--workers", "1",
                   "--batch-size", "256", "--device", "cpu"], Path(root) / f"cache_{task}.log", f"cache build ({task})")
    return str(out), seconds


# --- training and evaluation ----------------------------------------------------------------------------------------

def train(logs, name, kind, data, scale: Scale, seed, weights=None, cache=None, extra=()):
    """One run of python -m training.main; returns (checkpoint, seconds). Equal budgets: same data, epochs, batch."""
    checkpoint = Path(logs) / name / "checkpoints" / f"epoch_{scale.epochs}.pt"
    if checkpoint.exists():
        return str(checkpoint), None  # finished earlier in this working folder
    shutil.rmtree(Path(logs) / name, ignore_errors=True)  # an unfinished earlier attempt
    cmd = [sys.executable, "-m", "training.main", "--model", MODELS[kind], "--train-data", data["train_spec"],
           "--dataset-type", "webdataset", "--train-num-samples", scale.train_samples,
           "--batch-size", scale.batch_size, "--epochs", scale.epochs, "--lr", scale.lr, "--wd", "0.1",
           "--warmup", max(1, scale.train_samples // scale.batch_size // 2), "--workers", "1",
           "--precision", "fp32", "--device", "cpu", "--seed", seed, "--logs", logs, "--name", name,
           "--log-every-n-steps", "5", "--save-frequency", scale.epochs, "--report-to", "none", *extra]
    if kind == "LiT":
        # LiT: h's weights, locked entirely (batch-norm statistics included), only the projection and g train.
        cmd += ["--lock-image", "--lock-image-freeze-bn-stats", "--image-tower-weights", weights]
    if kind.startswith("SigLIP"):
        cmd += ["--siglip"]  # OpenCLIP's sigmoid loss, and its initialisation (temperature 10, bias -10)
    if kind in ("3T", "SigLIP-3T"):
        # With a cache, h is not built: its weights file only identifies the third tower the cache must match.
        cmd += ["--third-tower-weights", weights] + (["--third-tower-cache", cache] if cache else [])
    seconds = run(cmd, Path(logs) / f"{name}.log", f"training {name}")
    return str(checkpoint), seconds


def evaluate(out, checkpoint, kind, data, combine_with=None, alphas=None):
    """python -m training.eval on the zero-shot folders and the validation shards; returns its table."""
    cmd = [sys.executable, "-m", "training.eval", "--checkpoint", checkpoint, "--model", MODELS[kind],
           "--zeroshot-data", *data["zeroshot"], "--val-data", data["val_spec"], "--retrieval-k", "1", "5", "10",
           "--workers", "0", "--device", "cpu", "--batch-size", "256", "--out", out]
    if combine_with is not None:
        cmd += ["--combine-with", combine_with, "--combine-model", MODELS["LiT"], "--alphas", *alphas]
    run(cmd, Path(out).with_suffix(".log"), f"evaluation of {checkpoint}")
    return pd.read_csv(Path(out) / "results.csv")


SUMMARY_COLUMNS = {"shape-zeroshot-top1": "shape top-1", "colour-zeroshot-top1": "colour top-1",
                   "image_to_text_R@1": "I→T R@1", "text_to_image_R@1": "T→I R@1",
                   "image_to_text_R@5": "I→T R@5", "text_to_image_R@5": "T→I R@5"}


def summary_row(results: pd.DataFrame):
    """The headline numbers of one evaluation (first row), in percent."""
    row = results.iloc[0]
    return {label: 100 * float(row[col]) for col, label in SUMMARY_COLUMNS.items()}


# --- export, curves ----------------------------------------------------------------------------------------------

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


LOG_LINE = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) .*? Loss: ([-\d.e+]+)")


def read_curve(log_file):
    """(samples seen, total loss) pairs from a training.main log."""
    curve = []
    for line in Path(log_file).read_text().splitlines():
        match = LOG_LINE.search(line)
        if match:
            epoch, seen, per_epoch, loss = match.groups()
            curve.append((int(epoch) * int(per_epoch) + int(seen), float(loss)))
    return curve


def plot_curves(curves, path, title="training loss"):
    """A small line chart as PNG, drawn with Pillow (no plotting library needed)."""
    from PIL import Image, ImageDraw
    width, height, margin = 720, 420, 60
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    points = [p for curve in curves.values() for p in curve]
    if not points:
        raise ValueError("no training-loss lines found in the logs: nothing to plot")
    x_max = max(x for x, _ in points) or 1
    y_min, y_max = min(y for _, y in points), max(y for _, y in points)
    y_span = (y_max - y_min) or 1.0

    def xy(x, y):
        return (margin + (width - 2 * margin) * x / x_max,
                height - margin - (height - 2 * margin) * (y - y_min) / y_span)
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i in range(5):
        y = y_min + y_span * i / 4
        draw.text((8, xy(0, y)[1] - 6), f"{y:.2f}", fill="black")
        x = x_max * i / 4
        draw.text((xy(x, y_min)[0] - 10, height - margin + 8), f"{int(x)}", fill="black")
    draw.text((width // 2 - 60, height - 24), "training samples seen", fill="black")
    draw.text((margin, 20), title, fill="black")
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
    for i, (name, curve) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        if len(curve) > 1:
            draw.line([xy(x, y) for x, y in curve], fill=colour, width=2)
        y = margin + 16 + 16 * i
        draw.line([(width - margin - 130, y), (width - margin - 110, y)], fill=colour, width=3)
        draw.text((width - margin - 104, y - 6), name, fill=colour)
    tmp = Path(f"{path}.tmp.png")
    image.save(tmp)
    os.replace(tmp, path)
    return path


def save_table(df: pd.DataFrame, out_dir, stem):
    """OUT/stem.csv and OUT/stem.md (GitHub Markdown, floats to 4 decimals)."""
    out_dir = Path(out_dir)
    df.to_csv(out_dir / f"{stem}.csv", index=False)
    (out_dir / f"{stem}.md").write_text(df.to_markdown(index=False, floatfmt=".4f") + "\n")
    return out_dir / f"{stem}.csv", out_dir / f"{stem}.md"


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2) + "\n")
