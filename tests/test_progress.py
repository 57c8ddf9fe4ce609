"""Progress of the long loops: a tqdm bar on a terminal, one line per 10% otherwise (or with --quiet), with the total
and the time left; in the cache build (total from sizes.json) and in evaluation (batches of each task)."""
import io
import logging
import os
import re

from tqdm import tqdm

from open_clip_3t import cache, export_clip
from open_clip_3t.progress import PercentLines, progress, tracked
from open_clip_3t.toy.synthetic import write_classification_folder, write_shards
from tests.test_export import trained_checkpoint
from training import eval as standalone

LINE = re.compile(r"^(?P<desc>.+): +(?P<pct>\d+)% \((?P<n>\d+)/(?P<total>\d+)(?P<unit>[ a-z]*)\) "
                  r"\[\d\d:\d\d<\d\d:\d\d, [^\]]+\]$")


def test_one_line_per_tenth_with_the_total():
    lines = []
    for _ in tracked(range(20), 20, "zero-shot shape", emit=lines.append):
        pass
    parsed = [LINE.match(line).groupdict() for line in lines]
    assert [int(p["pct"]) for p in parsed] == [5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    assert {(p["desc"], p["total"], p["unit"]) for p in parsed} == {("zero-shot shape", "20", " batches")}
    lines.clear()
    for _ in tracked(range(3), 5, "cut short", emit=lines.append):  # a loop that ends early says where it stopped
        pass
    assert [int(LINE.match(line)["n"]) for line in lines] == [1, 2, 3, 3]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_lines_elsewhere_or_when_quiet(monkeypatch):
    monkeypatch.setattr("sys.stderr", Terminal())
    assert isinstance(progress(10, "eval"), tqdm) and not progress(10, "eval").disable
    assert isinstance(progress(10, "eval", quiet="lines"), PercentLines)  # --quiet
    assert progress(10, "eval", quiet=True).disable  # library calls: nothing at all
    monkeypatch.setattr("sys.stderr", io.StringIO())  # a SLURM log, a pipe
    assert isinstance(progress(10, "eval"), PercentLines)


def test_cache_build_shows_the_total_from_sizes_json(tmp_path, h_weights, capfd):
    spec = os.path.dirname(write_shards(str(tmp_path / "data"), num_samples=24, samples_per_shard=8, seed=0,
                                        image_size=32)[0]) + "/{00000..00002}.tar"
    cache.build(spec, "3T-tiny", str(tmp_path / "cache"), h_weights, batch_size=4, workers=0, device="cpu",
                quiet="lines")
    lines = [LINE.match(line) for line in capfd.readouterr().err.splitlines() if LINE.match(line)]
    assert lines and {(m["total"], m["unit"]) for m in lines} == {("24", " samples")}  # sizes.json: 3 x 8
    assert (lines[-1]["pct"], lines[-1]["n"]) == ("100", "24")
    assert lines[-1].string.endswith(", shards 3/3, skipped 0]")


def test_training_eval_counts_the_batches_of_each_task(tmp_path, h_weights, caplog):
    _, ckpt = trained_checkpoint(tmp_path, h_weights)
    folder = write_classification_folder(str(tmp_path / "shape"), "shape", 3, seed=0, image_size=32)
    with caplog.at_level(logging.INFO):
        standalone.main(["--model", f"local-dir:{export_clip(ckpt, tmp_path / 'released')}", "--zeroshot-data",
                         folder, "--out", str(tmp_path / "out"), "--batch-size", "4", "--workers", "0",
                         "--device", "cpu", "--quiet"])
    lines = [LINE.match(r.getMessage()) for r in caplog.records if LINE.match(r.getMessage())]
    images = sum(len(files) for _, _, files in os.walk(folder)) - 2  # classnames.txt, templates.txt
    assert lines and {(m["desc"], m["total"]) for m in lines} == {("shape-zeroshot", str(-(-images // 4)))}
    assert lines[-1]["pct"] == "100"


