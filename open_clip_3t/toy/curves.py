"""Training curves of toy runs: read from training.main's run folders, drawn with matplotlib.

Two sources per run folder (`--logs LOGS --name RUN`):
- `RUN/out.log`: every logged step's samples seen, loss terms and temperatures (the lines of training/train.py);
- `RUN/checkpoints/results.jsonl`: the evaluation after each epoch (zero-shot top-1, retrieval R@k).

Each figure is saved with the exact series it draws beside it (`NAME.csv`: run, panel, series, samples seen,
value), so what a plot shows can be checked without reading pixels.
"""
import json
import re
from pathlib import Path

import pandas as pd

from ..files import write_atomic

TRAIN_STEP = re.compile(r"Train Epoch: (\d+) \[\s*(\d+)/(\d+) ")
VALUE = r"([-+\d.eE]+)"
# The 3T loss terms as training/train.py logs them (each term's own value L, unweighted) and their temperatures
# (exp(scale)).
LOSS_TERMS = {"Contrastive_loss": "L(f,g)", "Image_third_loss": "L(f_h,h_f)", "Text_third_loss": "L(g_h,h_g)"}
SCALES = {"Logit Scale": "s of L(f,g)", "Logit Scale Image Third": "s of L(f_h,h_f)",
          "Logit Scale Text Third": "s of L(g_h,h_g)"}
EVAL_SERIES = {"shape-zeroshot-top1": "shape top-1", "colour-zeroshot-top1": "colour top-1",
               "image_to_text_R@1": "I→T R@1", "text_to_image_R@1": "T→I R@1"}


def loss_weights(run_dir):
    """The run's 3T loss weights from its params.txt (1, 1, 1 unless --third-tower-loss-weights was given; runs before
    0.2 wrote three_towers_loss_weights)."""
    params = Path(run_dir) / "params.txt"
    text = params.read_text() if params.exists() else ""
    match = re.search(r"^(?:third_tower|three_towers)_loss_weights: \[([^\]]*)\]", text, flags=re.M)
    return [float(w) for w in match.group(1).split(",")] if match else [1.0, 1.0, 1.0]


def read_training_log(run_dir):
    """One row per logged step: samples seen, each logged loss term L and temperature (a term of weight 0 is none)."""
    run_dir = Path(run_dir)
    weights = dict(zip(LOSS_TERMS, loss_weights(run_dir)))
    rows = []
    for line in (run_dir / "out.log").read_text().splitlines():
        step = TRAIN_STEP.search(line)
        if not step:
            continue
        epoch, seen, per_epoch = map(int, step.groups())
        row = {"samples seen": epoch * per_epoch + seen}
        for key, name in SCALES.items():
            if match := re.search(rf"{key}: {VALUE}(?: |$)", line):
                row[name] = float(match.group(1))
        for key, name in LOSS_TERMS.items():
            if (match := re.search(rf"{key}: {VALUE} \(", line)) and weights[key]:
                row[name] = float(match.group(1))
        rows.append(row)
    return pd.DataFrame(rows)


def read_eval_log(run_dir, samples_per_epoch):
    """One row per evaluated epoch: samples seen and the metrics of EVAL_SERIES (fractions)."""
    path = Path(run_dir) / "checkpoints" / "results.jsonl"
    rows = []
    for line in path.read_text().splitlines():
        metrics = json.loads(line)
        if "epoch" in metrics:  # the retrieval half of an evaluation carries the epoch
            rows.append({"samples seen": metrics["epoch"] * samples_per_epoch,
                         **{name: metrics[key] for key, name in EVAL_SERIES.items() if key in metrics}})
    return pd.DataFrame(rows)


def samples_per_epoch(run_dir):
    for line in (Path(run_dir) / "out.log").read_text().splitlines():
        if step := TRAIN_STEP.search(line):
            return int(step.group(3))
    raise ValueError(f"{run_dir}/out.log holds no training step: is it a training.main run folder?")


def long_form(frame, run, panel, columns):
    """(run, panel, series, samples seen, value) rows of the given columns of a per-step frame."""
    present = [c for c in columns if c in frame]
    melted = frame.melt(id_vars="samples seen", value_vars=present, var_name="series", value_name="value").dropna()
    return melted.assign(run=run, panel=panel)[["run", "panel", "series", "samples seen", "value"]]


def eval_series(run_dirs: dict):
    """{label: [run folder, ...]} (one folder per seed) -> long-form series of zero-shot top-1 and mean R@1
    (percent) after every epoch; the series is the label, the run is the folder."""
    parts = []
    for label, folders in run_dirs.items():
        for run_dir in folders:
            frame = read_eval_log(run_dir, samples_per_epoch(run_dir))
            frame["mean R@1"] = (frame["I→T R@1"] + frame["T→I R@1"]) / 2
            frame[["shape top-1", "colour top-1", "mean R@1"]] *= 100
            for panel in ("shape top-1", "colour top-1", "mean R@1"):
                parts.append(long_form(frame, str(run_dir), panel, [panel]).assign(series=label))
    return pd.concat(parts, ignore_index=True)


def three_towers_series(folders):
    """3T runs' (one folder per seed) three loss terms and three temperatures over training (long form)."""
    parts = []
    for run_dir in folders:
        frame = read_training_log(run_dir)
        parts += [long_form(frame, str(run_dir), "loss term L", list(LOSS_TERMS.values())),
                  long_form(frame, str(run_dir), "temperature scale s = 1/τ", list(SCALES.values()))]
    return pd.concat(parts, ignore_index=True)


def plot(series: pd.DataFrame, path, title):
    """One panel per `panel` value, one line per `series` against samples seen, the mean over runs that share a
    series name with a min-max band; writes path (PNG) and path.csv (the plotted long-form series)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys(series["panel"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for name, group in series[series["panel"] == panel].groupby("series", sort=False):
            stats = group.groupby("samples seen")["value"].agg(["mean", "min", "max"])
            (line,) = ax.plot(stats.index, stats["mean"], marker="o" if len(stats) < 12 else None, ms=3, label=name)
            if group["run"].nunique() > 1:
                ax.fill_between(stats.index, stats["min"], stats["max"], color=line.get_color(), alpha=0.15, lw=0)
        ax.set_title(panel)
        ax.set_xlabel("training samples seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path.with_suffix(".csv"), series.to_csv(index=False))
    write_atomic(path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return path
