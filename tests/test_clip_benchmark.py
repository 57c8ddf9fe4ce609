"""CLIP_benchmark's own command line, on an exported 3T model and on data our generator writes in its webdataset
layout, gives our evaluator's numbers. The commands are docs/evaluation.md's block, run with smaller sets."""
import json
import os
import shutil
import subprocess
import sys

import open_clip
import pandas as pd
import pytest
import torch

from open_clip_3t import ThreeTowersLoss, export_clip
from open_clip_3t.toy.synthetic import draw_sample
from tests.docs_blocks import REPO, commands, find, substitute

BLOCK = ("docs/evaluation.md", "python -m open_clip_3t.toy.synthetic classification --out data/shape_test --attribute "
                               "shape --num-per-class 50")
SMALLER = [("--num-per-class 50", "--num-per-class 6"), ("--num-samples 1000", "--num-samples 100")]


def train_and_export(h_weights, out):
    """3T-tiny trained for 10 steps on 256 synthetic pairs, exported as a plain OpenCLIP folder."""
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("3T-tiny", third_tower_weights=h_weights,
                                                                 output_dict=True)
    pairs = [draw_sample(i, seed=1, split="train", image_size=32) for i in range(256)]
    images = torch.stack([preprocess(image) for image, _, _ in pairs])
    texts = open_clip.get_tokenizer("3T-tiny")([caption for _, _, caption in pairs])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    loss, model = ThreeTowersLoss(), model.train()
    for step in range(10):
        batch = torch.randperm(len(pairs))[:64]
        optimizer.zero_grad()
        loss(**model(images[batch], texts[batch])).backward()
        optimizer.step()
        model.clamp_logit_scales_()
    torch.save(model.state_dict(), out.parent / "3t.pt")
    return export_clip(out.parent / "3t.pt", out, model_name="3T-tiny")


def test_clip_benchmark_cli_gives_our_evaluators_numbers(tmp_path, h_weights):
    clip_benchmark = shutil.which("clip_benchmark", path=os.path.dirname(sys.executable) + os.pathsep
                                  + os.environ.get("PATH", ""))
    assert clip_benchmark, "CLIP_benchmark is not installed: pip install -e '.[eval]' (the test extra includes it)"
    train_and_export(h_weights, tmp_path / "released")
    block = find(*BLOCK)
    env = {**os.environ, "PATH": os.path.dirname(clip_benchmark) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # CLIP_benchmark runs in the background while the rest goes on; PYTHONPROFILEIMPORTTIME lists every module a
    # process imports, to show that CLIP_benchmark never imports this plugin.
    background = []
    for command in commands(substitute(block.text, SMALLER, str(block))):
        if command.startswith("clip_benchmark "):
            background.append(subprocess.Popen(["bash", "-c", command], cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                                               stderr=subprocess.PIPE, env={**env, "PYTHONPROFILEIMPORTTIME": "1"}))
        else:
            proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, env=env)
            assert proc.returncode == 0, (command, proc.stderr[-3000:])
    for proc in background:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (proc.args, out[-2000:], err[-3000:])
        imported = [line.rsplit("|", 1)[1].strip() for line in err.splitlines() if line.startswith("import time:")]
        assert "open_clip" in imported and "clip_benchmark.cli" in imported
        assert not [m for m in imported if m.startswith("open_clip_3t")], "CLIP_benchmark imported the plugin"

    ours = pd.read_csv(tmp_path / "results" / "ours" / "results.csv").iloc[0]
    classification = json.loads((tmp_path / "results" / "cb_shape.json").read_text())["metrics"]
    retrieval = json.loads((tmp_path / "results" / "cb_val.json").read_text())["metrics"]
    pairs = {("acc1", "shape_test-zeroshot-top1", 7 * 6), ("acc5", "shape_test-zeroshot-top5", 7 * 6)}
    pairs |= {(f"{theirs}_retrieval_recall@{k}", f"{ours_}_R@{k}", 100) for k in (1, 5, 10)
              for theirs, ours_ in (("image", "text_to_image"), ("text", "image_to_text"))}
    report = []
    for theirs, mine, n in sorted(pairs):
        value = {**classification, **retrieval}[theirs]
        report.append(f"{theirs}={value:.4f} vs {mine}={ours[mine]:.4f} (n={n})")
        assert value * n == pytest.approx(round(value * n), abs=1e-3), f"{theirs}: not a count of {n} samples"
        assert abs(value - ours[mine]) * n <= 1 + 1e-6, "; ".join(report)
    print("CLIP_benchmark vs ours:", "; ".join(report))
