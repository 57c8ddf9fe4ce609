"""What an export says about itself: a machine-readable provenance record (PROVENANCE_FILE) and a model card
(README.md in the Hugging Face hub's format: YAML front matter, then how to load it and where it came from).

Both are written by `python -m open_clip_3t.export` beside the weights, from what the checkpoint and its run folder
hold (logs/RUN/params.txt, logs/RUN/out.log, logs/RUN/checkpoints/results.jsonl, any RUN/**/results.csv of
`python -m training.eval`); what cannot be found is recorded as null, never guessed. docs/release.md.
"""
import ast
import csv
import hashlib
import json
import re
from pathlib import Path

import torch

PROVENANCE_FILE, CARD_FILE = "open_clip_3t_provenance.json", "README.md"
PLACEHOLDER = "ORG/NAME"  # the card's hub id until `publish` knows the real one
PAPER = "https://arxiv.org/abs/2305.16999"


def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def run_params(run):
    """logs/RUN/params.txt (OpenCLIP's `name: value` lines) as a dict of Python values (strings where a value is
    not a literal)."""
    params = {}
    path = run / "params.txt"
    for line in (path.read_text(errors="replace").splitlines() if path.is_file() else []):
        name, sep, value = line.partition(": ")
        if sep:
            try:
                params[name.strip()] = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                params[name.strip()] = value
    return params


def checkpoint_position(checkpoint):
    """(epochs completed, batches into the next epoch or None): OpenCLIP's checkpoint dict says `epoch`, a step
    checkpoint (epoch_E_step_K.pt) also `resume.batches`; read through a memory map, so a large checkpoint is not
    read whole."""
    try:
        held = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a bare state dict in the legacy format, ...
        held = {}
    epoch = held.get("epoch") if isinstance(held, dict) else None
    resume = held.get("resume") if isinstance(held, dict) else None
    step = resume.get("batches") if isinstance(resume, dict) else None
    if epoch is None and (match := re.fullmatch(r"epoch_(\d+)\.pt", Path(checkpoint).name)):
        epoch = int(match.group(1))
    return epoch, step


DONE = re.compile(r"Train Epoch: (\d+) done on rank (\d+): \d+ steps, (\d+) samples")


def samples_seen(run, params, epochs):
    """Training samples seen before the checkpoint: the sum of every rank's `Train Epoch: E done on rank R: S steps,
    N samples` lines of out.log for epochs 0..epochs-1 (the last line of an (epoch, rank) wins: a requeued job logs
    again), else epochs x --train-num-samples, with where the figure came from; (None, None) if neither is known."""
    log = run / "out.log"
    if not epochs or not log.is_file():
        return None, None
    done = {}
    for match in DONE.finditer(log.read_text(errors="replace")):
        done[int(match.group(1)), int(match.group(2))] = int(match.group(3))
    ranks = params.get("world_size") if isinstance(params.get("world_size"), int) else 1
    if all((e, r) in done for e in range(epochs) for r in range(ranks)):
        return sum(n for (e, r), n in done.items() if e < epochs and r < ranks), "out.log (every rank's epoch ends)"
    if isinstance(params.get("train_num_samples"), int):
        return epochs * params["train_num_samples"], ("params.txt: epochs x --train-num-samples (OpenCLIP rounds each "
                                                      "epoch to whole batches)")
    return None, None


def evaluations(run):
    """The evaluation figures in the run folder: each line of checkpoints/results.jsonl (training-time evaluation,
    one per evaluation) and each results.csv under the run folder (`python -m training.eval --out RUN/...`)."""
    found = []
    jsonl = run / "checkpoints" / "results.jsonl"
    if jsonl.is_file():
        for line in jsonl.read_text(errors="replace").splitlines():
            try:
                found.append({"source": str(jsonl.relative_to(run)), "metrics": json.loads(line)})
            except ValueError:
                continue
    for table in sorted(run.glob("**/results.csv"))[:20]:
        with open(table, newline="") as f:
            for row in csv.DictReader(f):
                found.append({"source": str(table.relative_to(run)), "metrics": row})
    return found


def provenance(checkpoint, model_name, plan, exported_class, hub_id=None):
    """The provenance record of an export of `checkpoint` (a dict, JSON-ready)."""
    from . import __version__
    import open_clip
    checkpoint = Path(checkpoint).resolve()
    run = checkpoint.parent.parent  # logs/RUN/checkpoints/epoch_N.pt, when RUN has OpenCLIP's params.txt
    run = run if checkpoint.parent.name == "checkpoints" and (run / "params.txt").is_file() else None
    params = run_params(run) if run else {}
    epochs, step = checkpoint_position(checkpoint)
    seen, seen_from = samples_seen(run, params, epochs) if run else (None, None)
    batch, ranks = params.get("batch_size"), params.get("world_size", 1)
    if step and (seen is not None or not epochs) and isinstance(batch, int) and isinstance(ranks, int):
        seen = (seen or 0) + step * batch * ranks  # a step checkpoint: the batches of its unfinished epoch
        seen_from = (f"{seen_from + ' + ' if seen_from else ''}the step checkpoint's {step} batches x {batch} x "
                     f"{ranks} ranks")
    given = params.get("third_tower_weights") or []
    towers = []
    for tower in (plan.section.towers if plan.section else ()):
        weights = next((w.split("=", 1)[-1] for w in given if len(given) == 1 or w.startswith(tower.name + "=")),
                       tower.weights)
        towers.append({"name": tower.name, "timm_model": tower.timm_model_name, "weights": weights,
                       "weights_sha256": sha256_of(weights) if weights and Path(weights).is_file() else None})
    loss_weights = params.get("third_tower_loss_weights") or params.get("three_towers_loss_weights")
    return {
        "format": "open_clip_3t provenance 1",
        "hub_id": hub_id,
        "model": model_name,
        "exported_class": exported_class,
        "versions": {"open_clip_3t": __version__, "open_clip_torch": open_clip.__version__,
                     "torch": torch.__version__.split("+")[0]},
        "checkpoint": {"path": str(checkpoint), "sha256": sha256_of(checkpoint),
                       "bytes": checkpoint.stat().st_size},
        "run": {"folder": str(run) if run else None, "name": params.get("name")},
        "third_towers": towers,
        "loss": {"siglip": bool(params.get("siglip")), "weights": loss_weights or (
            list(plan.section.loss_weights) if plan.section and plan.section.loss_weights else None),
            "transfer": params.get("third_tower_transfer") or params.get("three_towers_transfer")
            or (plan.section.transfer if plan.section else None)},
        "data": {"train_data": params.get("train_data"), "train_num_samples": params.get("train_num_samples"),
                 "dataset_type": params.get("dataset_type"), "third_tower_cache": params.get("third_tower_cache")},
        "training": {"epochs_completed": epochs, "epochs_planned": params.get("epochs"),
                     "batches_into_next_epoch": step,
                     "samples_seen": seen, "samples_seen_from": seen_from, "batch_size": params.get("batch_size"),
                     "world_size": params.get("world_size"), "precision": params.get("precision"),
                     "lr": params.get("lr"), "seed": params.get("seed")},
        "evaluations": evaluations(run) if run else [],
    }


def _value(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, (list, tuple)):
        return " ".join(map(str, v))
    return "—" if v is None or v == "" else str(v)


def model_card(record, hub_id=None):
    """README.md for the hub: front matter (library_name open_clip, so the hub shows OpenCLIP's loading snippet),
    how to load the model, the provenance as a table, and the evaluation figures found."""
    hub_id = hub_id or record.get("hub_id") or PLACEHOLDER
    name = hub_id.split("/")[-1]
    towers = "; ".join(f"{t['name']}: {t['timm_model']}" + (f" ({Path(t['weights']).name}, {t['weights_sha256']})"
                                                             if t["weights_sha256"] else "")
                       for t in record["third_towers"])
    t, d = record["training"], record["data"]
    rows = [("model (3T config)", record["model"]), ("exported as", f"open_clip.{record['exported_class']}"),
            ("third tower(s) h, frozen, not in the export", towers), ("loss weights, transfer",
             f"{_value(record['loss']['weights'])}, {record['loss']['transfer']}" + (
                 " (sigmoid loss)" if record["loss"]["siglip"] else "")),
            ("training data", d["train_data"]), ("samples per epoch", d["train_num_samples"]),
            ("epochs completed (of planned)", f"{_value(t['epochs_completed'])} (of {_value(t['epochs_planned'])})"),
            ("samples seen", t["samples_seen"]), ("batch size x ranks", f"{_value(t['batch_size'])} x "
                                                                        f"{_value(t['world_size'])}"),
            ("precision, lr, seed", f"{_value(t['precision'])}, {_value(t['lr'])}, {_value(t['seed'])}"),
            ("source checkpoint", f"{Path(record['checkpoint']['path']).name} ({record['checkpoint']['sha256']})"),
            ("run", record["run"]["name"]),
            ("versions", ", ".join(f"{k} {v}" for k, v in record["versions"].items()))]
    lines = ["---", "library_name: open_clip", "license: other", "pipeline_tag: zero-shot-image-classification",
             "tags:", "- clip", "- open_clip", "- three-towers", "- zero-shot-image-classification", "---", "",
             f"# {name}", "",
             f"A CLIP model (image tower f, text tower g) trained with Three Towers ([3T]({PAPER})): contrastive "
             f"learning helped by a frozen pretrained third tower h, which is not part of this model. It is a plain "
             f"OpenCLIP `{record['exported_class']}`: OpenCLIP alone loads it, no plugin needed.", "",
             "## How to use", "", "```python", "import open_clip", "",
             f"model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms('hf-hub:{hub_id}')",
             f"tokenizer = open_clip.get_tokenizer('hf-hub:{hub_id}')", "```", "",
             "## Provenance", "", f"Also in `{PROVENANCE_FILE}`, machine-readable.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {_value(v)} |" for k, v in rows]
    lines += ["", "## Evaluation", ""]
    if not record["evaluations"]:
        lines.append("No evaluation figures were found in the run folder.")
    for entry in record["evaluations"][-8:]:  # the newest
        lines += [f"From `{entry['source']}`:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {_value(_number(v))} |" for k, v in entry["metrics"].items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def _number(v):
    try:
        return float(v) if isinstance(v, str) and "." in v else v
    except ValueError:
        return v


def release_files(checkpoint, model_name, plan, exported_class, hub_id=None):
    """{README.md: bytes, PROVENANCE_FILE: bytes} of an export."""
    record = provenance(checkpoint, model_name, plan, exported_class, hub_id)
    return {CARD_FILE: model_card(record).encode(),
            PROVENANCE_FILE: (json.dumps(record, indent=2) + "\n").encode()}
