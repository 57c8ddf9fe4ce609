"""The README's first command, shortened (--tiny): every step runs end to end."""
import json
import re
import subprocess
import sys

import pandas as pd
import pytest
from PIL import Image

from open_clip_3t.toy import experiments
from tests.conftest import REPO, run_python


def test_tiny_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "open_clip_3t.toy.quickstart", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = re.findall(r"^\[(\d)/7", proc.stdout, flags=re.M)
    assert sorted(set(steps)) == [str(i) for i in range(1, 8)]

    table = pd.read_csv(out / "results.csv")
    assert table["model"].tolist() == ["CLIP", "LiT", "3T"]
    assert list(table.columns[1:]) == list(experiments.SUMMARY_COLUMNS.values())
    assert table.iloc[:, 1:].apply(lambda c: c.between(0, 100)).all().all()
    md = [[cell.strip() for cell in line.strip("|").split("|")] for line in (out / "results.md").read_text().splitlines()]
    assert len(md) == 2 + 3 and md[0] == list(table.columns) and [row[0] for row in md[2:]] == ["CLIP", "LiT", "3T"]

    # the export was reloaded by vanilla OpenCLIP with identical features...
    diff = float(re.search(r"largest feature difference (\S+)", proc.stdout).group(1))
    assert diff == 0.0
    # ... and loads here too, in a process that never imports open_clip_3t
    loaded = run_python(f"import sys, open_clip; m = open_clip.create_model('local-dir:{out / 'exported_3T'}'); "
                        f"print(type(m).__name__, 'open_clip_3t' in sys.modules)")
    assert loaded.split() == ["CLIP", "False"]

    # progress while building the cache and while training: samples seen and samples/s, each epoch's evaluation
    assert re.search(r"^  epoch 1/1  loss [\d.]+  heldout acc [\d.]+  \d+s, \d+ samples/s$", proc.stdout, flags=re.M)
    assert re.search(r"^    cache build \[1/1\]: built 2 shards, 256 samples \([\d.]+ samples/s\)", proc.stdout, flags=re.M)
    for kind in ("CLIP", "LiT", "3T"):
        assert re.search(rf"^    {kind}: epoch 2/2, 512/512 samples seen, \d+ samples/s$", proc.stdout, flags=re.M), kind
        assert re.search(rf"^    {kind}: after epoch 2: colour [\d.]+, shape [\d.]+, I->T_R@1", proc.stdout, flags=re.M)

    # the curves: matplotlib PNGs, each with the series it draws beside it, read from the runs' logs
    for png in ("curves.png", "curves_3T.png"):
        with Image.open(out / png) as image:
            assert image.format == "PNG" and image.size[0] > 1000 and len(image.getcolors(1 << 16)) > 20, png
    plotted = pd.read_csv(out / "curves.csv")
    assert set(plotted["series"]) == {"CLIP", "LiT", "3T"}
    assert set(plotted["panel"]) == {"shape top-1", "colour top-1", "mean R@1"}
    for kind in ("CLIP", "LiT", "3T"):
        evals = [json.loads(line) for line in (out / "runs" / kind / "checkpoints" / "results.jsonl").read_text().splitlines()]
        shape = plotted[(plotted["series"] == kind) & (plotted["panel"] == "shape top-1")]
        assert shape["samples seen"].tolist() == [256, 512]  # after each of the 2 epochs of 256 pairs
        assert shape["value"].tolist() == [100 * e["shape-zeroshot-top1"] for e in evals]
        # the last point is the model of the table
        assert shape["value"].iloc[-1] == pytest.approx(table.set_index("model").loc[kind, "shape top-1"])
    terms = pd.read_csv(out / "curves_3T.csv")
    assert set(terms["series"]) == {"L(f,g)", "L(f_h,h_f)", "L(g_h,h_g)", "s of L(f,g)", "s of L(f_h,h_f)",
                                    "s of L(g_h,h_g)"}
    assert (terms.groupby("series")["samples seen"].max() == 512).all() and (terms["value"] > 0).all()
