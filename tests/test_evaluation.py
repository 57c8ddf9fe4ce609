"""Evaluation (training/metrics.py, training/eval_sets.py, training/train.py, training/eval.py, scripts/slurm/eval.sbatch).

Zero-shot accuracy and R@k are checked against numbers derived by hand from a stub model whose features are
the images' column brightnesses, and against an independent numpy computation from a real 3T-tiny model's
features; the standalone evaluator's table against the training-time `evaluate`; the 3T + LiT convex
combination at a = 0 / 1 against each model alone (exactly) and at a = 0.5 against numpy; the 3T model's own
third-tower pair against a hand computation from its weights.
"""
import io
import json
import math
import os
import subprocess
import sys
import tarfile
from argparse import ArgumentParser, Namespace
from types import SimpleNamespace

import numpy as np
import open_clip
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import open_clip_3t
from open_clip_3t import export_clip
from open_clip_3t.toy import synthetic
from training._open_clip_train import openclip_evaluate, openclip_get_data, openclip_parse_args
from tests.conftest import REPO
from training import eval as standalone
from training import eval_sets, metrics
from training.eval_sets import get_eval_data
from training.metrics import mix_log_probs, retrieval_metrics, topk_correct
from training import train as training_train
from training.train import evaluate

WORDS = ["zero", "one", "two", "three", "four", "five"]
TEMPLATES = ["a picture of {}.", "{} things"]


# --- a stub CLIP whose features are known by construction ---------------------------------------------------

class StubTokenizer:
    """A text's "tokens" are the counts of the six words: its text feature is that 6-d count vector."""

    def __call__(self, texts):
        return torch.tensor([[t.replace(".", " ").split().count(w) for w in WORDS] for t in texts],
                            dtype=torch.float32)


class StubCLIP(nn.Module):
    """Image feature = mean brightness of each of the image's 6 columns; text feature = word counts."""

    def __init__(self, scale=10.0):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(scale)))
        self.proj = nn.Parameter(torch.eye(6))

    def encode_image(self, images, normalize=False):
        f = images.float().mean(dim=(1, 2)) @ self.proj  # (B, 3, H, 6) -> (B, 6)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        f = tokens.float() @ self.proj
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, image=None, text=None):
        raise AssertionError("evaluation must not depend on the training forward")


def to_tensor(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def column_image(columns):
    """A 4x6 RGB image whose column j has brightness columns[j] (PNG: lossless)."""
    row = np.array(columns, dtype=np.uint8)
    return Image.fromarray(np.repeat(np.repeat(row[None, :, None], 4, axis=0), 3, axis=2))


# Two images per class; rank of the true class (ties count against), by construction:
CLASS_IMAGES = {
    0: [[200, 20, 20, 20, 20, 20],     # rank 1
        [20, 100, 100, 100, 100, 100]],  # rank 6: wrong in top-1 and top-5
    1: [[20, 200, 20, 20, 20, 20],     # rank 1
        [20, 100, 20, 20, 100, 20]],   # tie with class 4 -> rank 2: wrong in top-1, right in top-5
    2: [[20, 20, 200, 20, 20, 20], [10, 10, 90, 10, 10, 10]],
    3: [[20, 20, 20, 200, 20, 20], [0, 0, 0, 50, 0, 0]],
    4: [[20, 20, 20, 20, 200, 20], [30, 30, 30, 30, 90, 30]],
    5: [[20, 20, 20, 20, 20, 200],     # rank 1
        [100, 100, 100, 100, 20, 60]],  # rank 5: wrong in top-1, right in top-5
}
TOP1, TOP5 = 9 / 12, 11 / 12

# Retrieval pairs (image i, caption i = WORDS[i]); the last two columns are unused (no caption names them).
PAIR_IMAGES = [[100, 50, 20, 20, 0, 0], [100, 30, 10, 10, 0, 0], [20, 20, 90, 20, 0, 0], [20, 20, 20, 20, 0, 0]]
# image->text rank of caption i = number of columns j < 4 with brightness >= column i: 1, 2, 1, 4 (all tie).
# text->image: caption j scores image i by column j / |image i|: ranks 2 (image 1 is relatively brighter in
# column 0), 3 (images 3 and 0 beat image 1 in column 1), 1, 1.
I2T_RANKS, T2I_RANKS = [1, 2, 1, 4], [2, 3, 1, 1]


def write_class_folder(root, classnames=True, templates=True):
    for c, images in CLASS_IMAGES.items():
        os.makedirs(root / f"{c}_{WORDS[c]}", exist_ok=True)
        for i, columns in enumerate(images):
            column_image(columns).save(root / f"{c}_{WORDS[c]}" / f"{i}.png")
    if classnames:
        (root / "classnames.txt").write_text("\n".join(WORDS) + "\n")
    if templates:
        (root / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    return root


def stub_args(tmp_path, **kw):
    args = dict(rank=0, device="cpu", precision="fp32", batch_size=5, workers=0, epochs=4, zeroshot_frequency=1,
                val_frequency=1, save_logs=False, wandb=False, checkpoint_path=str(tmp_path), retrieval_k=[1, 2],
                model="stub", zeroshot_data=None, zeroshot_classnames=None, zeroshot_templates=None)
    args.update(kw)
    return Namespace(**args)


def stub_val_data():
    tok = StubTokenizer()
    images = torch.stack([to_tensor(column_image(c)) for c in PAIR_IMAGES])
    texts = tok(WORDS[:4])
    return SimpleNamespace(dataloader=[(images[:2], texts[:2]), (images[2:], texts[2:])])  # two batches


def expected_clip_val_loss(scale=10.0):
    """OpenCLIP's clip_val_loss: per batch, symmetric CE of scale * image @ text.T; mean over samples."""
    def cross_entropy_on_diagonal(logits):
        return np.mean([np.log(np.exp(row).sum()) - row[i] for i, row in enumerate(logits)])

    total = 0.0
    for lo, hi in ((0, 2), (2, 4)):
        img = np.array(PAIR_IMAGES[lo:hi], float)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        logits = scale * img @ np.eye(6)[lo:hi].T  # captions are one-hot word counts
        total += (cross_entropy_on_diagonal(logits) + cross_entropy_on_diagonal(logits.T)) / 2 * (hi - lo)
    return total / 4


def expected_retrieval(ks=(1, 2)):
    m = {}
    for name, ranks in (("image_to_text", I2T_RANKS), ("text_to_image", T2I_RANKS)):
        r = np.array(ranks)
        m[f"{name}_mean_rank"] = r.mean()
        m[f"{name}_median_rank"] = np.floor(np.median(r - 1)) + 1
        for k in ks:
            m[f"{name}_R@{k}"] = np.mean(r <= k)
    return m


def test_evaluate_zero_shot_and_retrieval_match_hand_computation(tmp_path):
    folder = write_class_folder(tmp_path / "digits")
    args = stub_args(tmp_path, zeroshot_data=[str(folder)], save_logs=True)
    data = get_eval_data(args, to_tensor, StubTokenizer())
    assert list(data) == ["zeroshot/digits"] and data["zeroshot/digits"].dataloader.num_samples == 12
    data["val"] = stub_val_data()

    class Writer:
        def __init__(self):
            self.calls = []

        def add_scalar(self, name, value, step):
            self.calls.append((name, value, step))

    model, writer = StubCLIP().train(), Writer()
    metrics = evaluate(model, data, 4, args, tb_writer=writer, tokenizer=StubTokenizer())
    assert not model.training  # evaluate switches to eval mode (a 3T model is then a plain CLIP)
    assert metrics["digits-zeroshot-top1"] == TOP1 and metrics["digits-zeroshot-top5"] == TOP5
    for key, value in expected_retrieval().items():
        assert metrics[key] == pytest.approx(value, abs=1e-12), key
    assert metrics["clip_val_loss"] == pytest.approx(expected_clip_val_loss(), rel=1e-5)
    assert metrics["epoch"] == 4 and metrics["num_samples"] == 4
    assert "image_to_text_R@5" not in metrics  # --retrieval-k 1 2

    # Logged like OpenCLIP: one results.jsonl line and one TensorBoard scalar per metric under val/.
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0]) == pytest.approx(metrics)
    assert sorted(writer.calls) == sorted(("val/" + k, v, 4) for k, v in metrics.items())


def test_evaluate_schedule_rank_and_ddp(tmp_path):
    folder = write_class_folder(tmp_path / "digits")
    args = stub_args(tmp_path, zeroshot_data=[str(folder)], zeroshot_frequency=2, epochs=5)
    data = {**get_eval_data(args, to_tensor, StubTokenizer()), "val": stub_val_data()}
    tok = StubTokenizer()
    # Epoch 3: not a zero-shot epoch (every 2, or the last = 5); retrieval runs every epoch.
    metrics = evaluate(StubCLIP(), data, 3, args, tokenizer=tok)
    assert "digits-zeroshot-top1" not in metrics and metrics["image_to_text_R@1"] == 0.5
    assert evaluate(StubCLIP(), data, 5, args, tokenizer=tok)["digits-zeroshot-top1"] == TOP1
    # Only rank 0 evaluates and writes.
    args_rank1 = stub_args(tmp_path, zeroshot_data=[str(folder)], rank=1, save_logs=True)
    assert evaluate(StubCLIP(), data, 1, args_rank1, tokenizer=tok) == {}
    assert not (tmp_path / "results.jsonl").exists()

    # A DDP-wrapped model gives the same numbers (evaluated unwrapped).
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(StubCLIP())
        assert evaluate(ddp, data, 4, stub_args(tmp_path, zeroshot_data=[str(folder)]), tokenizer=tok) == \
            evaluate(StubCLIP(), data, 4, stub_args(tmp_path, zeroshot_data=[str(folder)]), tokenizer=tok)
    finally:
        torch.distributed.destroy_process_group()


def test_imagenet_val_path_uses_torch_accuracy(tmp_path, monkeypatch):
    """OpenCLIP's --imagenet-val / --imagenet-v2 entries, with ImageNet's 1000 names swapped for our 6 classes."""
    folder = write_class_folder(tmp_path / "imagenet_val", classnames=False, templates=False)
    monkeypatch.setattr(training_train, "IMAGENET_CLASSNAMES", WORDS)
    monkeypatch.setattr(training_train, "OPENAI_IMAGENET_TEMPLATES", [lambda c: f"a picture of {c}."])
    from torchvision.datasets import ImageFolder
    loader = torch.utils.data.DataLoader(ImageFolder(str(folder), transform=to_tensor), batch_size=5)
    data = {"imagenet-val": SimpleNamespace(dataloader=loader), "imagenet-v2": SimpleNamespace(dataloader=loader)}
    metrics = evaluate(StubCLIP(), data, 1, stub_args(tmp_path), tokenizer=StubTokenizer())
    assert metrics == {"imagenet-zeroshot-val-top1": TOP1, "imagenet-zeroshot-val-top5": TOP5,
                       "imagenetv2-zeroshot-val-top1": TOP1, "imagenetv2-zeroshot-val-top5": TOP5}


def test_accuracy_and_recall_helpers_against_numpy():
    """Our torch metrics (OpenCLIP's accuracy() breaks on numpy >= 2.4) against a numpy reference, ties included."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (200, 9), generator=g).float()  # many ties
    targets = torch.randint(0, 9, (200,), generator=g)
    s, t = scores.numpy(), targets.numpy()
    rank = (s >= s[np.arange(len(t)), t][:, None]).sum(1)
    assert topk_correct(scores, targets, (1, 3, 5)) == [int((rank <= k).sum()) for k in (1, 3, 5)]
    scores[3, 0] = float("nan")  # a NaN row counts as wrong, never as a hit
    targets[3] = 0
    assert metrics.ranks(scores, targets)[3] == 10

    sim = torch.randn(30, 30, generator=g, dtype=torch.float64)
    m = retrieval_metrics(sim, ks=(1, 5, 10))
    r_i2t = (sim.numpy() >= np.diag(sim.numpy())[:, None]).sum(1)
    r_t2i = (sim.numpy().T >= np.diag(sim.numpy())[:, None]).sum(1)
    for name, r in (("image_to_text", r_i2t), ("text_to_image", r_t2i)):
        assert m[f"{name}_mean_rank"] == pytest.approx(r.mean())
        assert m[f"{name}_median_rank"] == np.floor(np.median(r - 1)) + 1
        for k in (1, 5, 10):
            assert m[f"{name}_R@{k}"] == np.mean(r <= k)


def test_mix_log_probs_is_the_convex_combination():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(7, 5, generator=g) * 30, torch.randn(7, 5, generator=g) * 30
    pa, pb = torch.softmax(a.double(), 1), torch.softmax(b.double(), 1)
    assert torch.equal(mix_log_probs(a, b, 1.0), torch.log_softmax(a.double(), 1))
    assert torch.equal(mix_log_probs(a, b, 0.0), torch.log_softmax(b.double(), 1))
    torch.testing.assert_close(mix_log_probs(a, b, 0.3).exp(), 0.3 * pa + 0.7 * pb)
    torch.testing.assert_close(mix_log_probs(a, b, 0.3, dim=0).exp(),
                               0.3 * torch.softmax(a.double(), 0) + 0.7 * torch.softmax(b.double(), 0))
    with pytest.raises(ValueError, match="0 <= alpha <= 1"):
        mix_log_probs(a, b, 1.5)


def test_folder_errors_are_one_line_and_early(tmp_path):
    parser = eval_sets.add_eval_args(ArgumentParser())
    folder = write_class_folder(tmp_path / "digits", classnames=False)
    args = parser.parse_args(["--zeroshot-data", str(folder)])
    with pytest.raises(FileNotFoundError) as e:
        eval_sets.check_eval_args(args)
    message = str(e.value)
    assert "\n" not in message and str(folder / "classnames.txt") in message and "--zeroshot-classnames" in message

    names = tmp_path / "names.txt"
    names.write_text("\n".join(WORDS[:5]) + "\n")  # one name short
    args = parser.parse_args(["--zeroshot-data", str(folder), "--zeroshot-classnames", str(names)])
    with pytest.raises(ValueError, match="lists 5 class names but .* has 6 class sub-folders"):
        eval_sets.check_eval_args(args)
    names.write_text("\n".join(WORDS) + "\n")
    assert eval_sets.check_eval_args(args)[0].classnames == WORDS  # the override file is used

    (folder / "templates.txt").write_text("a photo of a {c}.\n")  # CLIP_benchmark's {c} style
    with pytest.raises(ValueError, match="with {} where the class name goes .found 'a photo of a {c}.'"):
        eval_sets.check_eval_args(args)


# --- real models: 3T-tiny checkpoint and an exported folder (the LiT stand-in) ---------------------------------

@pytest.fixture(scope="module")
def eval_setup(tmp_path_factory, h_weights):
    root = tmp_path_factory.mktemp("eval")
    synthetic.write_classification_folder(str(root / "colour_test"), "colour", 2, seed=0, image_size=32)
    synthetic.write_shards(str(root / "val"), 12, samples_per_shard=6, seed=0, split="val", image_size=32)
    torch.manual_seed(0)
    three_t = open_clip.create_model("3T-tiny", third_tower_weights=h_weights, output_dict=True)
    run = root / "run3t"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text("model: 3T-tiny\nprecision: fp32\n")
    ckpt = run / "checkpoints" / "epoch_1.pt"  # as open_clip_train saves it: DDP prefixes, h's weights included
    torch.save({"epoch": 1, "state_dict": {"module." + k: v for k, v in three_t.state_dict().items()}}, ckpt)
    torch.manual_seed(1)
    other = open_clip.create_model("3T-tiny", third_tower=False)
    torch.save(other.state_dict(), root / "other.pt")
    lit_dir = export_clip(root / "other.pt", root / "lit", model_name="3T-tiny")
    return SimpleNamespace(root=root, ckpt=str(ckpt), lit=str(lit_dir), three_t=three_t.eval(),
                           folder=str(root / "colour_test"), shards=f"{root}/val/{{00000..00001}}.tar")


def cli_argv(s, out, *extra):
    return ["--zeroshot-data", s.folder, "--val-data", s.shards, "--out", str(out), "--device", "cpu",
            "--precision", "fp32", "--workers", "0", "--batch-size", "8", *extra]


def read_val_pairs(shards):
    pairs = []
    for shard in sorted(shards):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for key in sorted({n.split(".")[0] for n in files}):
            pairs.append((Image.open(io.BytesIO(files[key + ".jpg"])).convert("RGB"), files[key + ".txt"].decode()))
    return pairs


def numpy_scores(model, preprocess, tokenizer, folder, pairs):
    """Zero-shot scores, targets and the retrieval score matrix, recomputed from the model's features."""
    classnames = open(os.path.join(folder, "classnames.txt")).read().split()
    templates = open(os.path.join(folder, "templates.txt")).read().splitlines()
    classes = sorted(d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d)))
    files = [(os.path.join(folder, c, f), i) for i, c in enumerate(classes) for f in sorted(os.listdir(os.path.join(folder, c)))]
    scale = model.logit_scale.exp().item()
    with torch.no_grad():
        images = torch.stack([preprocess(Image.open(f).convert("RGB")) for f, _ in files])
        img = model.encode_image(images, normalize=True).numpy().astype(np.float64)
        W = []
        for c in classnames:
            e = model.encode_text(tokenizer([t.format(c) for t in templates]), normalize=True).numpy().mean(0)
            W.append(e / np.linalg.norm(e))
        pimg = model.encode_image(torch.stack([preprocess(im) for im, _ in pairs]), normalize=True).numpy()
        ptxt = model.encode_text(tokenizer([t for _, t in pairs]), normalize=True).numpy()
    return scale * img @ np.array(W).T, np.array([t for _, t in files]), scale * pimg.astype(np.float64) @ ptxt.T


def np_softmax(x, axis):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_ranks(scores, targets):
    return (scores >= scores[np.arange(len(targets)), targets][:, None]).sum(1)


@pytest.fixture(scope="module")
def training_metrics(eval_setup):
    """`evaluate` as the trainer runs it on the 3T checkpoint: OpenCLIP's val pipeline, our zero-shot folders."""
    s = eval_setup
    model, _, preprocess = open_clip.create_model_and_transforms("3T-tiny", pretrained=s.ckpt, output_dict=True)
    tokenizer = open_clip.get_tokenizer("3T-tiny")
    model.train()
    args = openclip_parse_args(["--model", "3T-tiny", "--val-data", s.shards, "--dataset-type", "webdataset",
                                "--batch-size", "8", "--workers", "0", "--device", "cpu", "--precision", "fp32",
                                "--zeroshot-frequency", "1"])
    args.world_size, args.rank, args.distributed, args.save_logs, args.wandb = 1, 0, False, False, False
    args.zeroshot_data, args.zeroshot_classnames, args.zeroshot_templates, args.retrieval_k = [s.folder], None, None, [1, 5, 10]
    data = openclip_get_data(args, (preprocess, preprocess), tokenizer=tokenizer)  # OpenCLIP's val pipeline
    data.update(get_eval_data(args, preprocess, tokenizer))
    assert model.training
    metrics = evaluate(model, data, 1, args, tokenizer=tokenizer)
    assert not model.training
    # OpenCLIP's own evaluate on the 3T model (a plain CLIP in eval mode) gives the same retrieval numbers.
    theirs = openclip_evaluate(model.train(), {"val": data["val"]}, 1, args, tokenizer=tokenizer)
    assert {k: metrics[k] for k in theirs if k != "clip_val_loss"} == {k: v for k, v in theirs.items() if k != "clip_val_loss"}
    assert metrics["clip_val_loss"] == pytest.approx(theirs["clip_val_loss"], rel=1e-6)
    return metrics, preprocess, tokenizer


def test_3t_model_in_training_evaluate_matches_numpy(eval_setup, training_metrics):
    s = eval_setup
    metrics, preprocess, tokenizer = training_metrics
    zs, targets, ret = numpy_scores(s.three_t, preprocess, tokenizer, s.folder, read_val_pairs(
        [f"{s.root}/val/00000.tar", f"{s.root}/val/00001.tar"]))
    r = np_ranks(zs, targets)
    assert metrics["colour_test-zeroshot-top1"] == np.mean(r <= 1)
    assert metrics["colour_test-zeroshot-top5"] == np.mean(r <= 5)
    assert metrics["num_samples"] == 12
    for name, m in (("image_to_text", ret), ("text_to_image", ret.T)):
        rr = np_ranks(m, np.arange(12))
        for k in (1, 5, 10):
            assert metrics[f"{name}_R@{k}"] == np.mean(rr <= k), (name, k)
        assert metrics[f"{name}_mean_rank"] == pytest.approx(rr.mean())


def test_standalone_evaluator_and_convex_combination(eval_setup, training_metrics, tmp_path):
    s = eval_setup
    metrics = training_metrics[0]
    # The 3T checkpoint alone (model name read from the run's params.txt): the training-time numbers, exactly.
    alone = standalone.main(cli_argv(s, tmp_path / "3t", "--pretrained", s.ckpt))
    assert len(alone) == 1
    row = alone.iloc[0]
    for key, value in metrics.items():
        if key not in ("clip_val_loss", "epoch", "num_samples"):
            assert row[key] == value, key
    lit = standalone.main(cli_argv(s, tmp_path / "lit", "--model", f"local-dir:{s.lit}")).iloc[0]

    # The convex combination, through the real command line.
    out = tmp_path / "mix"
    proc = subprocess.run([sys.executable, "-m", "training.eval", "--pretrained", s.ckpt, "--combine-with", s.lit,
                           "--alphas", "0", "0.5", "1", *cli_argv(s, out)], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(out / "results.csv")
    metric_cols = [c for c in alone.columns if c != "model"]
    assert list(table.columns) == ["model", "alpha", *metric_cols]
    assert table["alpha"].tolist() == [0.0, 0.5, 1.0]
    for c in metric_cols:
        assert table[c][0] == lit[c], c    # a = 0: the LiT model's scores
        assert table[c][2] == row[c], c    # a = 1: the 3T model's scores

    # a = 0.5 against numpy: p = 0.5 * softmax(3T scores) + 0.5 * softmax(LiT scores).
    pairs = read_val_pairs([f"{s.root}/val/00000.tar", f"{s.root}/val/00001.tar"])
    tokenizer = open_clip.get_tokenizer("3T-tiny")
    lit_model, _, lit_pre = open_clip.create_model_and_transforms(f"local-dir:{s.lit}")
    _, _, pre = open_clip.create_model_and_transforms("3T-tiny", third_tower=False)
    zs_a, targets, ret_a = numpy_scores(s.three_t, pre, tokenizer, s.folder, pairs)
    zs_b, _, ret_b = numpy_scores(lit_model.eval(), lit_pre, tokenizer, s.folder, pairs)
    r = np_ranks(0.5 * np_softmax(zs_a, 1) + 0.5 * np_softmax(zs_b, 1), targets)
    assert table["colour_test-zeroshot-top1"][1] == np.mean(r <= 1)
    assert table["colour_test-zeroshot-top5"][1] == np.mean(r <= 5)
    i2t = 0.5 * np_softmax(ret_a, 1) + 0.5 * np_softmax(ret_b, 1)
    t2i = (0.5 * np_softmax(ret_a, 0) + 0.5 * np_softmax(ret_b, 0)).T
    for name, m in (("image_to_text", i2t), ("text_to_image", t2i)):
        rr = np_ranks(m, np.arange(12))
        for k in (1, 5, 10):
            assert table[f"{name}_R@{k}"][1] == np.mean(rr <= k), (name, k)

    # results.md: the same table in GitHub Markdown (pandas' writer), floats to 4 decimals
    md = [[cell.strip() for cell in line.strip("|").split("|")] for line in (out / "results.md").read_text().splitlines()]
    assert len(md) == 2 + 3 and md[0] == list(table.columns)
    for i in range(3):
        assert md[2 + i] == [table["model"][i]] + [f"{v:.4f}" for v in table.iloc[i, 1:]]


def test_third_tower_pair_against_hand_computation(eval_setup, h_weights, tmp_path):
    """--third-tower-pair: a = 0 is the pair h_g(h(I)) . g_h(g(T)) computed here by hand from the weights, a = 1 the
    plain 3T scores, a = 0.5 their convex combination with the L(g_h, h_g) temperature; a checkpoint trained from
    a cache (no h inside) gives the same table with --third-tower-weights."""
    s = eval_setup
    state = {k: v.clone() for k, v in s.three_t.state_dict().items()}
    state["logit_scale_text_third"].fill_(math.log(3.0))    # the pair's temperature...
    state["logit_scale_image_third"].fill_(math.log(50.0))  # ...not this one (L(f_h, h_f)'s)
    model = open_clip.create_model("3T-tiny", third_tower_weights=h_weights)
    model.load_state_dict(state)
    model.eval()
    run = tmp_path / "run" / "checkpoints"
    run.mkdir(parents=True)
    (run.parent / "params.txt").write_text("model: 3T-tiny\n")
    online, cached = run / "epoch_1.pt", run / "epoch_2.pt"
    torch.save({"state_dict": state}, online)
    torch.save({"state_dict": {k: v for k, v in state.items() if not k.startswith("third_tower.")}}, cached)

    table = standalone.main(cli_argv(s, tmp_path / "pair", "--pretrained", str(online), "--third-tower-pair",
                                     "--alphas", "0", "0.5", "1"))
    assert table["model"][0].endswith("+ third-tower pair") and table["alpha"].tolist() == [0.0, 0.5, 1.0]
    alone = standalone.main(cli_argv(s, tmp_path / "alone", "--pretrained", str(online))).iloc[0]
    for c in alone.index[1:]:
        assert table[c][2] == alone[c], c  # a = 1: the plain 3T scores, exactly

    # By hand: h is timm's test_vit read at its pre-logits, on f's input with f's normalisation undone and h's
    # (timm test models: mean = std = 0.5) applied; the heads are affine maps of the unnormalised embeddings.
    pairs = read_val_pairs([f"{s.root}/val/00000.tar", f"{s.root}/val/00001.tar"])
    tokenizer = open_clip.get_tokenizer("3T-tiny")
    _, _, pre = open_clip.create_model_and_transforms("3T-tiny", third_tower=False)
    f_mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    f_std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    timm_h = timm.create_model("test_vit", pretrained=True, num_classes=0, img_size=32,
                               pretrained_cfg_overlay=dict(file=h_weights)).eval()
    W_hg, b_hg = state["h_g.weight"].double().numpy(), state["h_g.bias"].double().numpy()
    W_gh, b_gh = state["g_h.weight"].double().numpy(), state["g_h.bias"].double().numpy()

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def image_side(images):
        with torch.no_grad():
            h = timm_h(((torch.stack(images) * f_std + f_mean) - 0.5) / 0.5).double().numpy()
        return unit(h @ W_hg.T + b_hg)

    def text_side(texts):
        with torch.no_grad():
            g = model.encode_text(tokenizer(texts)).double().numpy()
        return unit(g @ W_gh.T + b_gh)

    classnames = open(os.path.join(s.folder, "classnames.txt")).read().split()
    templates = open(os.path.join(s.folder, "templates.txt")).read().splitlines()
    classes = sorted(d for d in os.listdir(s.folder) if os.path.isdir(os.path.join(s.folder, d)))
    files = [(os.path.join(s.folder, c, f), i) for i, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(s.folder, c)))]
    targets = np.array([t for _, t in files])
    classifier = unit(np.stack([text_side([t.format(c) for t in templates]).mean(0) for c in classnames]))
    zs_pair = 3.0 * image_side([pre(Image.open(f).convert("RGB")) for f, _ in files]) @ classifier.T
    ret_pair = 3.0 * image_side([pre(im) for im, _ in pairs]) @ text_side([t for _, t in pairs]).T
    zs_main, _, ret_main = numpy_scores(model, pre, tokenizer, s.folder, pairs)

    for i, alpha in ((0, 0.0), (1, 0.5)):
        zs = alpha * np_softmax(zs_main, 1) + (1 - alpha) * np_softmax(zs_pair, 1)
        r = np_ranks(zs, targets)
        assert table["colour_test-zeroshot-top1"][i] == np.mean(r <= 1), alpha
        assert table["colour_test-zeroshot-top5"][i] == np.mean(r <= 5), alpha
        i2t = alpha * np_softmax(ret_main, 1) + (1 - alpha) * np_softmax(ret_pair, 1)
        t2i = (alpha * np_softmax(ret_main, 0) + (1 - alpha) * np_softmax(ret_pair, 0)).T
        for name, m in (("image_to_text", i2t), ("text_to_image", t2i)):
            rr = np_ranks(m, np.arange(12))
            assert table[f"{name}_mean_rank"][i] == pytest.approx(rr.mean()), (name, alpha)
            for k in (1, 5, 10):
                assert table[f"{name}_R@{k}"][i] == np.mean(rr <= k), (name, k, alpha)
    assert not np.allclose(table["image_to_text_mean_rank"][0], table["image_to_text_mean_rank"][2])

    from_cache = standalone.main(cli_argv(s, tmp_path / "cached", "--pretrained", str(cached), "--third-tower-pair",
                                          "--third-tower-weights", h_weights, "--alphas", "0", "0.5", "1"))
    pd.testing.assert_frame_equal(from_cache.drop(columns="model"), table.drop(columns="model"))


def test_checkpoint_with_mlp_heads(eval_setup, h_weights, tmp_path):
    """A run trained with --third-tower-head mlp: its config says linear, its checkpoint holds MLP heads."""
    s = eval_setup
    torch.manual_seed(3)
    model = open_clip.create_model("3T-tiny", third_tower=False, three_towers={
        **open_clip_3t._openclip.read_three_towers_section("3T-tiny"), "head_type": "mlp"})
    ckpt = tmp_path / "run" / "checkpoints" / "epoch_1.pt"
    ckpt.parent.mkdir(parents=True)
    (tmp_path / "run" / "params.txt").write_text("model: 3T-tiny\n")
    torch.save({"state_dict": model.state_dict()}, ckpt)
    alone = standalone.main(cli_argv(s, tmp_path / "alone", "--pretrained", str(ckpt))).iloc[0]
    pair = standalone.main(cli_argv(s, tmp_path / "pair", "--pretrained", str(ckpt), "--third-tower-pair",
                                    "--third-tower-weights", h_weights, "--alphas", "1"))
    assert (pair.iloc[0, 2:] == alone.iloc[1:]).all()


def test_standalone_errors_before_loading(eval_setup, tmp_path, capsys):
    s = eval_setup
    bare = tmp_path / "bare.pt"
    torch.save(s.three_t.state_dict(), bare)
    truncated = tmp_path / "run" / "checkpoints" / "epoch_2.pt"  # issue 10, items 6 and 8: tracebacks before
    truncated.parent.mkdir(parents=True)
    truncated.write_bytes(open(s.ckpt, "rb").read()[:4000])
    (tmp_path / "val").mkdir()
    cut = tmp_path / "val" / "00000.tar"
    cut.write_bytes(open(f"{s.root}/val/00000.tar", "rb").read())
    with tarfile.open(cut) as t:
        member = t.getmember("000000003.jpg")
    with open(cut, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)
    no_h = tmp_path / "run" / "checkpoints" / "epoch_1.pt"  # trained from a cache: no h inside
    no_h.parent.mkdir(parents=True, exist_ok=True)
    (no_h.parent.parent / "params.txt").write_text("model: 3T-tiny\n")
    torch.save({k: v for k, v in s.three_t.state_dict().items() if not k.startswith("third_tower.")}, no_h)
    for argv, message in (
        (["--pretrained", str(truncated), "--model", "3T-tiny"],
         f"--pretrained {truncated} does not load (RuntimeError: PytorchStreamReader failed reading zip archive: "
         f"failed finding central directory): it is truncated or not a checkpoint"),
        (["--pretrained", s.ckpt, "--val-data", str(cut)],
         f"--val-data shard {cut} is truncated or not a tar file (ReadError: member 000000003.jpg ends after the end "
         f"of the file): replace it, or leave it out of --val-data"),
        (["--pretrained", str(bare)], "pass --model NAME"),
        (["--pretrained", s.ckpt, "--combine-with", s.lit, "--alphas", "1.5"], "outside [0, 1]"),
        (["--model", "3T-tiny"], "nothing to evaluate"),
        (["--pretrained", s.ckpt, "--val-data", str(tmp_path / "{0..1}.tar")], "0.tar not found"),
        (["--pretrained", s.ckpt, "--zeroshot-data", str(tmp_path)], "classnames.txt not found"),
        (["--model", f"local-dir:{s.lit}", "--third-tower-pair"], "needs a 3T training checkpoint"),
        (["--pretrained", str(no_h), "--third-tower-pair"], "pass --third-tower-weights FILE"),
        (["--pretrained", s.ckpt, "--third-tower-weights", s.ckpt], "pass --third-tower-pair too"),
        (["--pretrained", s.ckpt, "--third-tower-pair", "--combine-with", s.lit], "pass one of them"),
    ):
        with pytest.raises(SystemExit) as e:
            standalone.main([*cli_argv(s, tmp_path / "x"), *argv])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x").exists()


def test_eval_sbatch_runs_on_cpu(eval_setup, tmp_path):
    s = eval_setup
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(CHECKPOINT=s.ckpt, COMBINE_WITH=f"local-dir:{s.lit}", ALPHAS="0 1", ZEROSHOT_DATA=s.folder,
               VAL_DATA=s.shards, RETRIEVAL_K="1 5", OUT=str(tmp_path / "out"), DEVICE="cpu", PRECISION="fp32",
               WORKERS="0", BATCH_SIZE="8", PYTHON=sys.executable)
    proc = subprocess.run(["bash", "scripts/slurm/eval.sbatch"], capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    assert table["alpha"].tolist() == [0.0, 1.0]
    assert "image_to_text_R@5" in table and "image_to_text_R@10" not in table
    alone = standalone.main(cli_argv(s, tmp_path / "3t", "--pretrained", s.ckpt, "--retrieval-k", "1", "5"))
    for c in alone.columns[1:]:
        assert table[c][1] == alone[c][0], c


def test_eval_sbatch_under_slurm(slurm_cluster, eval_setup, tmp_path):
    """The launcher as a real batch job (local cluster; --gpus-per-node=0 overrides the header's GPU request)."""
    s = eval_setup
    env = dict(CHECKPOINT=s.ckpt, ZEROSHOT_DATA=s.folder, OUT=str(tmp_path / "out"), DEVICE="cpu", PRECISION="fp32",
               WORKERS="0", BATCH_SIZE="8", PYTHON=sys.executable)
    job_id, rc = slurm_cluster.sbatch_wait("scripts/slurm/eval.sbatch", "--gpus-per-node=0", "--cpus-per-task=1",
                                           f"--output={tmp_path}/slurm-%j.out", env_extra=env, cwd=REPO, timeout=180)
    log = (tmp_path / f"slurm-{job_id}.out").read_text() if (tmp_path / f"slurm-{job_id}.out").exists() else ""
    assert rc == 0, (slurm_cluster.job_info(job_id), log[-3000:])
    assert f"eval.sbatch: job {job_id}, python -m training.eval" in log
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    expected = standalone.main(["--zeroshot-data", s.folder, "--pretrained", s.ckpt, "--out", str(tmp_path / "ref"),
                                "--device", "cpu", "--workers", "0", "--batch-size", "8"])
    assert list(table.columns) == list(expected.columns) == ["model", "colour_test-zeroshot-top1",
                                                               "colour_test-zeroshot-top5"]
    assert table.iloc[0, 1:].tolist() == expected.iloc[0, 1:].tolist()
