"""Training curves (open_clip_3t/toy/curves.py): log parsing against hand-written lines, and the plots' data."""
import json

import pandas as pd
import pytest
from PIL import Image

from open_clip_3t.toy import curves

PREFIX = "2026-01-01,00:00:00 | INFO | "
LINES_3T = [  # as training/train.py logs them: each term its own L, the total w/3-weighted; temperatures exp(scale)
    "Train Epoch: 0 [ 32/256 (12%)] Data (t): 1.6 Batch (t): 4.2, 7.5/s, 7.5/s/gpu LR: 0.000250 Logit Scale: 14.286 "
    "Logit Scale Image Third: 14.286 Logit Scale Text Third: 14.286 Contrastive_loss: 1.2500 (1.2500) "
    "Image_third_loss: 1.5000 (1.5000) Text_third_loss: 1.0000 (1.0000) Loss: 3.7500 (3.7500)",
    "Eval Epoch: 1 colour-zeroshot-top1: 0.1875",
    "Train Epoch: 1 [224/256 (88%)] Data (t): 0.0 Batch (t): 1.3, 24.2/s, 24.2/s/gpu LR: 0.000983 Logit Scale: 20.5 "
    "Logit Scale Image Third: 9.75 Logit Scale Text Third: 30.0 Contrastive_loss: 0.5000 (1.0000) "
    "Image_third_loss: 0.7500 (1.0000) Text_third_loss: 0.2500 (0.5000) Loss: 1.5000 (2.0000)",
]
LINE_CLIP = ("Train Epoch: 0 [128/256 (50%)] Data (t): 1.0 Batch (t): 3.1, 10.2/s, 10.2/s/gpu LR: 0.000250 "
             "Logit Scale: 14.286 Contrastive_loss: 3.7893 (3.7893) Loss: 3.7893 (3.7893)")


def write_run(folder, lines, params="", results=()):
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "out.log").write_text("".join(PREFIX + line + "\n" for line in lines))
    (folder / "params.txt").write_text(params)
    (folder / "checkpoints" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    return folder


def test_training_log_by_hand(tmp_path):
    frame = curves.read_training_log(write_run(tmp_path / "3t", LINES_3T))
    assert frame["samples seen"].tolist() == [32, 256 + 224]
    assert frame["L(f,g)"].tolist() == pytest.approx([1.25, 0.5])       # logged as L itself, unweighted
    assert frame["L(f_h,h_f)"].tolist() == pytest.approx([1.5, 0.75])
    assert frame["L(g_h,h_g)"].tolist() == pytest.approx([1.0, 0.25])
    assert frame["s of L(f_h,h_f)"].tolist() == [14.286, 9.75] and frame["s of L(g_h,h_g)"].tolist() == [14.286, 30.0]

    weighted = curves.read_training_log(write_run(tmp_path / "w", LINES_3T[:1],
                                                  "third_tower_loss_weights: [2.0, 0.0, 1.0]\n"))
    assert weighted["L(f,g)"].tolist() == pytest.approx([1.25])            # L, whatever its weight
    assert "L(f_h,h_f)" not in weighted                                     # weight 0: no such term
    clip = curves.read_training_log(write_run(tmp_path / "clip", [LINE_CLIP]))
    assert clip["L(f,g)"].tolist() == [3.7893] and list(clip.columns) == ["samples seen", "s of L(f,g)", "L(f,g)"]


def test_eval_and_three_towers_series_and_plot(tmp_path):
    results = [{"colour-zeroshot-top1": 0.25, "shape-zeroshot-top1": 0.5, "image_to_text_R@1": 0.1,
                "text_to_image_R@1": 0.3, "epoch": e, "num_samples": 64} for e in (1, 2)]
    results[1]["shape-zeroshot-top1"] = 0.75
    runs = {name: [write_run(tmp_path / f"{name}{seed}", LINES_3T, results=results) for seed in (0, 1)]
            for name in ("CLIP", "3T")}
    series = curves.eval_series(runs)
    assert set(series["series"]) == {"CLIP", "3T"} and set(series["panel"]) == {"shape top-1", "colour top-1", "mean R@1"}
    shape = series[(series["run"] == str(runs["3T"][1])) & (series["panel"] == "shape top-1")]
    assert shape["samples seen"].tolist() == [256, 512] and shape["value"].tolist() == [50.0, 75.0]
    assert series[series["panel"] == "mean R@1"]["value"].tolist() == pytest.approx([20.0] * 8)

    png = curves.plot(series, tmp_path / "eval.png", "title")
    assert pd.read_csv(tmp_path / "eval.csv").equals(series.reset_index(drop=True).astype({"run": str}))
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 1000 and len(image.getcolors(1 << 16)) > 20

    terms = curves.three_towers_series(runs["3T"])
    assert set(terms["series"]) == {"L(f,g)", "L(f_h,h_f)", "L(g_h,h_g)", "s of L(f,g)", "s of L(f_h,h_f)",
                                    "s of L(g_h,h_g)"}
    assert len(terms) == 2 * 6 * 2  # seeds x series x logged steps
