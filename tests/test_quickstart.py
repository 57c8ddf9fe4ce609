"""The README's first command, shortened (--tiny): every step runs end to end."""
import re
import subprocess
import sys

import pandas as pd
from PIL import Image

from open_clip_3t.toy import experiments
from tests.conftest import REPO, run_python


def test_tiny_quickstart_end_to_end(tmp_path):
    out = tmp_path / "qs"
    proc = subprocess.run([sys.executable, "-m", "open_clip_3t.toy.quickstart", "--tiny", "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
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

    # the three training curves were read from the logs and drawn
    for kind in ("CLIP", "LiT", "3T"):
        assert len(experiments.read_curve(out / "runs" / kind / "out.log")) >= 2, kind
    with Image.open(out / "training_curves.png") as png:
        assert png.size == (720, 420) and len(png.getcolors(10000)) > 5
