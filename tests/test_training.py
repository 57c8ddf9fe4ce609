"""`python -m training.main`: 3T, CLIP and LiT train on generated LAION-style shards; resume is exact; 3T's
gradient accumulation equals the full batch; torchrun with 2 CPU processes keeps h out of DDP."""
import copy
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import open_clip
import pytest
import torch

from open_clip_3t import ThreeTowersLoss, ThreeTowersSigLipLoss
from open_clip_3t.toy.synthetic import draw_sample, write_classification_folder, write_shards
from tests.conftest import REPO
from training import eval as standalone

STEP_LINE = re.compile(r"Train Epoch: (\d+) \[")
TORCH_STATS = re.compile(r"^.*(?:torch/_dynamo|torch/_subclasses|TorchDynamo|FakeTensor).*$", re.M)
NUMBER = r"([-+0-9.eE]+|nan|inf)"


def run(cmd, cwd, env=None, timeout=240):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return proc


def train(tmp_path, name, *flags, env=None):
    """One `python -m training.main` run on CPU; returns its run folder. Its output never holds torch's own INFO
    statistics (dynamo, fake tensors), which OpenCLIP's logging set-up would turn on."""
    logs = tmp_path / "logs"
    proc = run([sys.executable, "-m", "training.main", "--logs", str(logs), "--name", name, "--device", "cpu",
                "--precision", "fp32", "--workers", "0", "--log-every-n-steps", "1", "--seed", "0", *flags],
               cwd=tmp_path, env=env)
    leaked = TORCH_STATS.findall(proc.stdout + proc.stderr)
    assert not leaked, f"torch's statistics in the training output: {leaked[:3]}"
    return logs / name


def step_logs(log_text):
    """Per-step values of every 'Name: value' pair of the 'Train Epoch' lines (losses: current value)."""
    steps = []
    for line in log_text.splitlines():
        if not STEP_LINE.search(line):
            continue
        values = {"epoch": int(STEP_LINE.search(line).group(1))}
        for key, val in re.findall(r"((?:Logit (?:Scale|Bias)[A-Za-z ]*)|[A-Z][a-z_]*loss|Loss): " + NUMBER, line):
            values[key.strip()] = float(val)
        steps.append(values)
    return steps


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two LAION-style shards of 16 samples (32 px jpg + txt + json) and sizes.json."""
    out = tmp_path_factory.mktemp("shards")
    paths = write_shards(str(out), num_samples=32, samples_per_shard=16, seed=0, image_size=32)
    assert [os.path.basename(p) for p in paths] == ["00000.tar", "00001.tar"]
    return out


# One 16-sample shard, 8 steps of the same 16 samples: an overfit run.
OVERFIT = ["--train-num-samples", "128", "--batch-size", "16", "--epochs", "1", "--lr", "2e-3", "--warmup", "1",
           "--wd", "0"]


def check_overfit(steps, terms, weights=None):
    """8 logged steps, each term and the total falling; the total is the sum of the logged terms (OpenCLIP's
    losses), or for 3T (`weights`, one per term) their weighted mean: each term is logged as its own value L."""
    assert len(steps) == 8
    for term in terms + ["Loss"]:
        values = [s[term] for s in steps]
        assert all(math.isfinite(v) for v in values), (term, values)
        assert values[-1] < 0.85 * values[0], (term, values)
    weights = weights or [len(terms)] * len(terms)
    for s in steps:  # 5 significant digits
        assert s["Loss"] == pytest.approx(sum(w * s[t] for w, t in zip(weights, terms)) / len(terms), rel=1e-3)


def test_3t_trains_logs_its_terms_and_checkpoints(shards, h_weights, tmp_path):
    run_dir = train(tmp_path, "3t", "--model", "3T-tiny", "--third-tower-weights", h_weights,
                    "--train-data", str(shards / "00000.tar"), *OVERFIT)
    steps = step_logs((run_dir / "out.log").read_text())
    check_overfit(steps, ["Contrastive_loss", "Image_third_loss", "Text_third_loss"], [1, 1, 1])
    scales = ["Logit Scale", "Logit Scale Image Third", "Logit Scale Text Third"]
    assert all(set(scales) <= set(s) for s in steps)

    ckpt = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and len(ckpt["optimizer"]["state"]) > 0
    sd = ckpt["state_dict"]
    # the logged temperatures are exp of the saved log-parameters (as of the last step's forward; the cosine
    # schedule has the learning rate near 0 at that step, so its update moves them by < 1e-3)
    for scale, key in zip(scales, ["logit_scale", "logit_scale_image_third", "logit_scale_text_third"]):
        assert sd[key].exp().item() == pytest.approx(steps[-1][scale], abs=2e-3)
        assert steps[-1][scale] != steps[0][scale]  # they are learned
    # h is frozen: its weights in the checkpoint are the file's
    h = torch.load(h_weights, map_location="cpu")
    assert torch.equal(sd["third_tower.model.blocks.0.attn.qkv.weight"], h["blocks.0.attn.qkv.weight"])
    # params.txt records the model: export needs nothing else
    assert "model: 3T-tiny\n" in (run_dir / "params.txt").read_text()
    from open_clip_3t import export_clip
    out = export_clip(run_dir / "checkpoints" / "epoch_1.pt", tmp_path / "released")
    clip = open_clip.create_model("local-dir:" + str(out))
    assert torch.equal(clip.state_dict()["visual.conv1.weight"], sd["visual.conv1.weight"])


SIGMOID_TERMS = ["Contrastive_loss", "Image_third_loss", "Text_third_loss"]
BIASES = {"Logit Bias": "logit_bias", "Logit Bias Image Third": "logit_bias_image_third",
          "Logit Bias Text Third": "logit_bias_text_third"}


def check_biases(steps, state_dict):
    """The three biases are logged at every step, learned, and the checkpoint holds the last logged values."""
    for name, key in BIASES.items():
        assert steps[0][name] == pytest.approx(-10.0, abs=1e-2)  # init_logit_bias (after the first step's update)
        assert steps[-1][name] != steps[0][name]
        assert state_dict[key].item() == pytest.approx(steps[-1][name], abs=2e-3)


def test_sigmoid_3t_trains_logs_its_terms_and_biases_evaluates_and_exports(shards, h_weights, tmp_path):
    folder = write_classification_folder(str(tmp_path / "shape"), "shape", 2, seed=0, image_size=32)
    run_dir = train(tmp_path, "sigmoid", "--model", "3T-tiny-sigmoid", "--siglip", "--third-tower-weights", h_weights,
                    "--train-data", str(shards / "00000.tar"), *OVERFIT, "--zeroshot-data", folder,
                    "--zeroshot-frequency", "1")
    steps = step_logs((run_dir / "out.log").read_text())
    check_overfit(steps, SIGMOID_TERMS, [1, 1, 1])
    sd = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    check_biases(steps, sd)
    results = [json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 1 and 0.0 <= results[0]["shape-zeroshot-top1"] <= 1.0
    from open_clip_3t import export_clip
    plain = open_clip.create_model("local-dir:" + str(export_clip(run_dir / "checkpoints" / "epoch_1.pt",
                                                                  tmp_path / "released")))
    assert type(plain) is open_clip.CustomTextCLIP and torch.equal(plain.logit_bias, sd["logit_bias"])


def test_sigmoid_3t_trains_from_the_cache(shards, h_weights, tmp_path):
    from open_clip_3t import cache
    cache.build(str(shards / "00000.tar"), "3T-tiny-sigmoid", str(tmp_path / "cache"), h_weights, batch_size=16,
                workers=0, device="cpu")
    run_dir = train(tmp_path, "cached", "--model", "3T-tiny-sigmoid", "--siglip", "--third-tower-weights", h_weights,
                    "--third-tower-cache", str(tmp_path / "cache"), "--train-data", str(shards / "00000.tar"),
                    *OVERFIT)
    log = (run_dir / "out.log").read_text()
    steps = step_logs(log)
    check_overfit(steps, SIGMOID_TERMS, [1, 1, 1])
    assert re.search(r"Third-tower cache after epoch 0 on rank 0: \d+ joined, 0 missing", log)
    sd = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any(k.startswith("third_tower.") for k in sd)  # h was never built
    check_biases(steps, sd)


def test_sigmoid_3t_with_locked_text_grad_checkpointing_and_accumulation(shards, h_weights, tmp_path):
    """OpenCLIP's --lock-text, --grad-checkpointing and --accum-freq on a CustomTextCLIP 3T model under --siglip:
    g stays as built while f, the heads, temperatures and biases train."""
    run_dir = train(tmp_path, "locked", "--model", "3T-tiny-sigmoid", "--siglip", "--third-tower-weights", h_weights,
                    "--lock-text", "--lock-text-freeze-layer-norm", "--grad-checkpointing", "--accum-freq", "2",
                    "--train-data",
                    str(shards / "00000.tar"), "--train-num-samples", "64", "--batch-size", "8", "--epochs", "2",
                    "--lr", "1e-3", "--warmup", "1")
    steps = step_logs((run_dir / "out.log").read_text())
    assert len(steps) == 8 and all(math.isfinite(s[t]) for s in steps for t in SIGMOID_TERMS)
    first, second = (torch.load(run_dir / "checkpoints" / f"epoch_{e}.pt", map_location="cpu",
                                weights_only=False)["state_dict"] for e in (1, 2))
    text = [k for k in first if k.startswith("text.")]
    assert len(text) > 5 and all(torch.equal(first[k], second[k]) for k in text)  # locked
    for k in ("visual.conv1.weight", "g_h.weight", "logit_bias_text_third"):
        assert not torch.equal(first[k], second[k]), k


def test_hugging_face_text_tower_3t_trains(shards, h_weights, hf_three_towers, tmp_path):
    """`--model local-dir:` of a 3T config whose g is a Hugging Face RoBERTa: g starts from the HF weights file and
    is trained with the three terms."""
    from safetensors.torch import load_file
    folder = write_classification_folder(str(tmp_path / "shape"), "shape", 2, seed=0, image_size=32)
    run_dir = train(tmp_path, "hf", "--model", hf_three_towers, "--third-tower-weights", h_weights,
                    "--train-data", str(shards / "00000.tar"), *OVERFIT, "--zeroshot-data", folder,
                    "--zeroshot-frequency", "1")
    steps = step_logs((run_dir / "out.log").read_text())
    terms = ["Contrastive_loss", "Image_third_loss", "Text_third_loss"]
    assert len(steps) == 8 and all(math.isfinite(s[t]) for s in steps for t in terms)
    assert steps[-1]["Loss"] < 0.95 * steps[0]["Loss"]
    sd = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    hf_dir = json.loads(open(hf_three_towers[len("local-dir:"):] + "/open_clip_config.json").read())["model_cfg"][
        "text_cfg"]["hf_model_name"]
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    key = "embeddings.word_embeddings.weight"
    trained = sd["text.transformer." + key]
    assert trained.shape == hf[key].shape and not torch.equal(trained, hf[key])  # g: the HF tower, trained
    results = json.loads((run_dir / "checkpoints" / "results.jsonl").read_text())  # zero-shot with the HF tokenizer
    assert 0.0 <= results["shape-zeroshot-top1"] <= 1.0


def test_clip_baseline_trains_and_evaluates(shards, tmp_path):
    folder = write_classification_folder(str(tmp_path / "shape"), "shape", 2, seed=0, image_size=32)
    run_dir = train(tmp_path, "clip", "--model", "3T-baseline-CLIP-tiny", "--train-data", str(shards / "00000.tar"), *OVERFIT,
                    "--zeroshot-data", folder, "--zeroshot-frequency", "1")
    steps = step_logs((run_dir / "out.log").read_text())
    check_overfit(steps, ["Contrastive_loss"])
    assert set(steps[0]) == {"epoch", "Logit Scale", "Contrastive_loss", "Loss"}
    sd = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    assert not any("third" in k or k.startswith(("f_h", "g_h")) for k in sd)
    # evaluation sets that open_clip_train.main does not know still run after each epoch (training/eval_sets.py)
    results = [json.loads(line) for line in (run_dir / "checkpoints" / "results.jsonl").read_text().splitlines()]
    assert len(results) == 1 and 0.0 <= results[0]["shape-zeroshot-top1"] <= 1.0


def test_openclip_distill_path_for_plain_clip(shards, tmp_path):
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    torch.save(open_clip.create_model("3T-baseline-CLIP-tiny").state_dict(), teacher)
    run_dir = train(tmp_path, "distill", "--model", "3T-baseline-CLIP-tiny", "--distill-model", "3T-baseline-CLIP-tiny",
                    "--distill-pretrained", str(teacher), "--train-data", str(shards / "00000.tar"), *OVERFIT)
    steps = step_logs((run_dir / "out.log").read_text())
    check_overfit(steps, ["Contrastive_loss", "Distill_loss"])


def test_lit_trains_on_h_weights(shards, h_weights, tmp_path):
    run_dir = train(tmp_path, "lit", "--model", "3T-baseline-LiT-tiny", "--lock-image", "--image-tower-weights", h_weights,
                    "--train-data", str(shards / "00000.tar"), *OVERFIT)
    log = (run_dir / "out.log").read_text()
    check_overfit(step_logs(log), ["Contrastive_loss"])
    assert "image normalisation of test_vit: mean (0.5, 0.5, 0.5), std (0.5, 0.5, 0.5)" in log
    # ... recorded in params.txt, where the evaluator and the export read it
    params = (run_dir / "params.txt").read_text()
    assert "image_mean: [0.5, 0.5, 0.5]\n" in params and "image_std: [0.5, 0.5, 0.5]\n" in params
    _, preprocess, _ = standalone.load_model(standalone.resolve_spec(
        str(run_dir / "checkpoints" / "epoch_1.pt"), None, "--pretrained", "--model"), "cpu", "fp32")
    assert tuple(preprocess.transforms[-1].mean) == (0.5, 0.5, 0.5)
    sd = torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]
    h = torch.load(h_weights, map_location="cpu")
    # the locked image tower holds h's weights, untouched by 8 steps of training
    for key in ["blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "norm.weight"]:
        assert torch.equal(sd["visual.trunk." + key], h[key]), key


def write_csv_dataset(root, n=24):
    lines = ["filepath\ttitle"]
    for i in range(n):
        image, _, caption = draw_sample(i, seed=0, split="train", image_size=32)
        path = root / f"{i:03d}.jpg"
        image.save(path)
        lines.append(f"{path}\t{caption}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root / "train.csv"


def test_resume_continues_with_identical_state(h_weights, tmp_path):
    """Stopped after epoch 1 and resumed (--resume latest) == never stopped: model (heads, temperatures) and
    optimizer state identical to the last bit. CSV data: its shuffle and crops come from the seeded RNGs."""
    csv = write_csv_dataset(tmp_path)
    flags = ["--model", "3T-tiny", "--third-tower-weights", h_weights, "--train-data", str(csv),
             "--dataset-type", "csv", "--batch-size", "8", "--lr", "1e-3", "--lr-scheduler", "const",
             "--warmup", "2"]
    straight = train(tmp_path, "straight", *flags, "--epochs", "2")
    stopped = train(tmp_path, "stopped", *flags, "--epochs", "1")
    resumed = train(tmp_path, "stopped", *flags, "--epochs", "2", "--resume", "latest")
    assert resumed == stopped
    log = (resumed / "out.log").read_text()
    assert "=> resuming checkpoint" in log and "epoch 1)" in log
    assert [s["epoch"] for s in step_logs(log)] == [0] * 3 + [1] * 3  # the resumed run trained epoch 1 only

    a = torch.load(straight / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("f_h.") for k in a["state_dict"])
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and len(sa) > 0
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)
    assert [g["lr"] for g in a["optimizer"]["param_groups"]] == [g["lr"] for g in b["optimizer"]["param_groups"]]
    # and epoch 1 really moved the weights (the comparison above is not between two untouched models)
    first = torch.load(stopped / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    assert not torch.equal(first["state_dict"]["f_h.weight"], a["state_dict"]["f_h.weight"])


class Loader(list):
    num_batches = 2
    num_samples = 16


@pytest.mark.parametrize("model_name, loss", [("3T-tiny", ThreeTowersLoss()),
                                              ("3T-tiny-sigmoid", ThreeTowersSigLipLoss())])
def test_gradient_accumulation_equals_full_batch(model_name, loss, h_weights):
    """--accum-freq 2 with batches of 8 moves every weight as one batch of 16 does (SGD, lr 0.1); the
    temperatures (and biases) get accum_freq x the full-batch gradient (each micro-step's loss uses them, as in
    OpenCLIP)."""
    from training.train import train_one_epoch
    torch.manual_seed(0)
    model = open_clip.create_model(model_name, third_tower_weights=h_weights, output_dict=True)
    images = torch.randn(16, 3, 32, 32)
    texts = open_clip.get_tokenizer(model_name)([f"{i} red circles on the left" for i in range(16)])

    reference = copy.deepcopy(model).train()
    sum(loss(**reference(images, texts), output_dict=True).values()).backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    args = SimpleNamespace(device="cpu", precision="fp32", seed=0, rank=0, world_size=1, distributed=False,
                           distill=False, accum_freq=2, skip_scheduler=True, horovod=False, grad_clip_norm=None,
                           log_every_n_steps=1, batch_size=8, wandb=False)
    data = {"train": SimpleNamespace(dataloader=Loader([(images[:8], texts[:8]), (images[8:], texts[8:])]),
                                     set_epoch=lambda epoch: None)}
    train_one_epoch(model, data, loss, 0, optimizer, None, None, None, args)

    scales = {"logit_scale", "logit_scale_image_third", "logit_scale_text_third"}
    if model.logit_bias is not None:
        scales |= {"logit_bias", "logit_bias_image_third", "logit_bias_text_third"}
    assert set(grads) > scales
    for name, p in model.named_parameters():
        if name not in grads:
            assert torch.equal(p, before[name]), name  # h: frozen
            continue
        expected = before[name] - 0.1 * grads[name] * (2 if name in scales else 1)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=name)


def test_unused_heads_and_temperatures_are_frozen(h_weights):
    from training.main import create_student
    from training.params import parse_args
    args = parse_args(["--model", "3T-tiny", "--third-tower-weights", h_weights,
                       "--third-tower-loss-weights", "1", "0", "1", "--third-tower-transfer", "l2",
                       "--third-tower-head", "mlp"])
    model = create_student(args, args.model, None, {"output_dict": True})[0]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("third_tower.")}
    assert frozen == {"f_h.0.weight", "f_h.0.bias", "f_h.2.weight", "f_h.2.bias",
                      "h_f.0.weight", "h_f.0.bias", "h_f.2.weight", "h_f.2.bias",
                      "logit_scale_image_third", "logit_scale_text_third"}
    assert model.three_towers_cfg.loss_weights == (1.0, 0.0, 1.0) and model.three_towers_cfg.head_type == "mlp"
    args.rank, args.world_size = 0, 1
    assert open_clip.create_loss(args).weights == (1.0, 0.0, 1.0)


def test_unused_temperatures_and_biases_are_frozen_under_siglip(h_weights):
    from training.main import create_student
    from training.params import parse_args
    args = parse_args(["--model", "3T-tiny-sigmoid", "--siglip", "--third-tower-weights", h_weights,
                       "--third-tower-loss-weights", "0", "1", "1", "--third-tower-transfer", "l2"])
    model = create_student(args, args.model, None, {"output_dict": True})[0]
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad and not n.startswith("third_tower.")}
    assert frozen == {"logit_scale", "logit_bias", "logit_scale_image_third", "logit_scale_text_third",
                      "logit_bias_image_third", "logit_bias_text_third"}


def test_init_image_from_third_tower(h_weights):
    from training.main import create_student
    from training.params import parse_args
    args = parse_args(["--model", "3T-tiny-timm", "--third-tower-weights", h_weights,
                       "--third-tower-init-image"])
    model = create_student(args, args.model, None, {"output_dict": True})[0]
    f, h = model.visual.trunk.state_dict(), model.third_tower.model.state_dict()
    assert f.keys() == h.keys() and len(f) > 10
    assert all(torch.equal(f[k], h[k]) for k in f)
    # f is fed as h was pretrained: h's normalisation, not OpenAI's
    assert tuple(model.visual.preprocess_cfg["mean"]) == model.third_tower.mean == (0.5, 0.5, 0.5)
    assert tuple(model.visual.preprocess_cfg["std"]) == model.third_tower.std
    assert all(p.requires_grad for p in model.visual.parameters())  # f is trained, h stays frozen
    assert not any(p.requires_grad for p in model.third_tower.parameters())


def test_init_image_from_the_named_one_of_two_towers(h_weights, tmp_path):
    """--third-tower-init-image NAME on a two-tower model (3T-tiny-timm's f and g; towers vit: test_vit like f,
    and resnet): f starts from vit's weights; both towers are built and frozen."""
    from training.main import create_student
    from training.params import parse_args
    cfg = json.loads((Path(REPO) / "open_clip_3t" / "model_configs" / "3T-tiny-timm.json").read_text())
    k2 = json.loads((Path(REPO) / "open_clip_3t" / "model_configs" / "3T-tiny-K2.json").read_text())["three_towers"]
    del k2["towers"][0]["timm_kwargs"]  # vit built as 3T-tiny-timm builds f and its one tower (timm's default size)
    cfg["three_towers"] = k2
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    args = parse_args(["--model", f"local-dir:{tmp_path}", "--third-tower-weights", f"vit={h_weights}",
                       "--third-tower-init-image", "vit", "--third-tower-random"])  # resnet: random, by name
    assert args.run_plan.init_image_from == "vit" and args.run_plan.tower("vit").cfg.weights == h_weights
    model = create_student(args, args.model, None, {"output_dict": True})[0]
    f, vit = model.visual.trunk.state_dict(), model.vit_tower.model.state_dict()
    saved = torch.load(h_weights)
    assert f.keys() == vit.keys() and len(f) > 10
    assert all(torch.equal(f[k], vit[k]) for k in f) and torch.equal(f["cls_token"], saved["cls_token"])
    assert torch.equal(f["blocks.0.attn.qkv.weight"], saved["blocks.0.attn.qkv.weight"])
    assert model.resnet_tower is not None and not any(p.requires_grad for p in model.resnet_tower.parameters())
    assert all(p.requires_grad for p in model.visual.parameters())


@pytest.mark.parametrize("argv, message", [
    (["--model", "3T-tiny-K2", "--third-tower-init-image"], "has the third towers ['vit', 'resnet']: name one"),
    (["--model", "3T-tiny-K2", "--third-tower-init-image", "places"], "there is no tower 'places'"),
    (["--model", "3T-tiny-K2", "--third-tower-init-image", "vit"], "is not the architecture of its third tower "
                                                                        "vit (test_vit)"),
    (["--model", "3T-tiny-K2", "--third-tower-loss-weights", "1", "1", "1"],
     "3 values for 5 loss terms; give one per term, in this order: contrastive_loss, image_vit_loss, text_vit_loss, "
     "image_resnet_loss, text_resnet_loss"),
    (["--model", "3T-tiny-K2", "--third-tower-cache", "/x"], "write NAME=VALUE for each"),
    (["--model", "3T-tiny-K2", "--third-tower-weights", "places=/x"], "'places' is not a third tower of this model"),
    (["--model", "3T-tiny-K2", "--third-tower-weights", "vit=/x", "vit=/y"], "tower vit is given twice"),
    (["--model", "3T-baseline-CLIP-tiny", "--third-tower-transfer", "l2"], "apply to 3T models only"),
    (["--model", "3T-tiny", "--third-tower-weights", "/nonexistent.pth"], "--third-tower-weights /nonexistent.pth"),
    (["--model", "3T-tiny", "--third-tower-loss-weights", "0", "0", "0"], "not all 0"),
    (["--model", "3T-tiny", "--third-tower-init-image"], "is not h's architecture (test_vit)"),
    (["--model", "3T-tiny", "--third-tower-cache-missing", "skip"], "needs --third-tower-cache"),
    (["--model", "3T-tiny", "--distill-model", "ViT-B-32", "--distill-pretrained", "x"], "plain CLIP models"),
    (["--model", "3T-baseline-CLIP-tiny", "--image-tower-weights", __file__], "needs a timm image tower"),
    (["--model", "3T-tiny", "--siglip"], "--siglip: 3T-tiny has no init_logit_bias"),
    (["--model", "3T-tiny", "--lock-text"], "add --lock-text-freeze-layer-norm"),
    (["--model", "3T-tiny-sigmoid", "--siglip", "--loss-dist-impl", "ring"], "--loss-dist-impl ring: OpenCLIP's"),
    (["--model", "3T-tiny-sigmoid"], "3T-tiny-sigmoid has init_logit_bias (a SigLIP config): train it with --siglip"),
])
def test_bad_flags_fail_before_any_work(argv, message, capsys):
    from training.params import parse_args
    with pytest.raises(SystemExit) as e:
        parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


SPY = """
import sys, torch, training.main as tm
out, argv = sys.argv[1], sys.argv[2:]
train_one_epoch = tm.train_one_epoch
def spy(model, data, loss, epoch, optimizer, *rest, **kw):
    train_one_epoch(model, data, loss, epoch, optimizer, *rest, **kw)
    rank = torch.distributed.get_rank()
    torch.save({"ddp": type(model).__name__, "state": model.module.state_dict(),
                "trainable": [n for n, p in model.module.named_parameters() if p.requires_grad]},
               f"{out}/rank{rank}.pt")
tm.train_one_epoch = spy
tm.main(argv)
"""


def test_torchrun_two_cpu_processes(shards, h_weights, tmp_path):
    """2 ranks on gloo: the same steps on each, identical weights after training (gradients all-reduced), h
    outside DDP's gradients and unchanged; a term with weight 0 (its heads unused) does not break DDP."""
    (tmp_path / "spy.py").write_text(SPY)
    proc = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(tmp_path / "spy.py"), "--", str(tmp_path),  # "--": torchrun would take --logs for its --logs-specs
                "--logs", str(tmp_path / "logs"), "--name", "ddp", "--model", "3T-tiny",
                "--third-tower-weights", h_weights, "--third-tower-loss-weights", "1", "0", "1",
                "--train-data", str(shards / "{00000..00001}.tar"), "--train-num-samples", "64",
                "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--device", "cpu",
                "--dist-backend", "gloo", "--precision", "fp32", "--workers", "0", "--local-loss",
                "--gather-with-grad", "--seed", "0"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    output = proc.stdout + proc.stderr
    for rank in (0, 1):
        assert f"done on rank {rank}: 4 steps, 32 samples" in output
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in (0, 1))
    assert r0["ddp"] == "_DistributedDataParallel"
    assert not any(n.startswith(("third_tower.", "f_h.", "h_f.", "logit_scale_image_third"))
                   for n in r0["trainable"])
    assert {"g_h.weight", "h_g.weight", "logit_scale", "visual.conv1.weight"} <= set(r0["trainable"])
    for k, v in r0["state"].items():
        assert torch.equal(v, r1["state"][k]), k
    h = torch.load(h_weights, map_location="cpu")
    assert torch.equal(r0["state"]["third_tower.model.blocks.0.attn.qkv.weight"], h["blocks.0.attn.qkv.weight"])
    ckpt = tmp_path / "logs" / "ddp" / "checkpoints" / "epoch_1.pt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert torch.equal(saved["module.g_h.weight"], r0["state"]["g_h.weight"])
    assert not torch.equal(saved["module.g_h.weight"], torch.zeros_like(saved["module.g_h.weight"]))



def test_3t_trains_from_the_cache_without_building_h(shards, h_weights, tmp_path):
    from open_clip_3t import cache
    cache.build(str(shards / "{00000..00001}.tar"), "3T-tiny", str(tmp_path / "cache"), h_weights, batch_size=16,
                workers=0, device="cpu")
    run_dir = train(tmp_path, "cached", "--model", "3T-tiny", "--third-tower-weights", h_weights,
                    "--third-tower-cache", str(tmp_path / "cache"), "--train-data", str(shards / "{00000..00001}.tar"),
                    "--train-num-samples", "32", "--batch-size", "8", "--epochs", "1", "--lr", "1e-3")
    log = (run_dir / "out.log").read_text()
    steps = step_logs(log)
    assert len(steps) == 4 and all(math.isfinite(s["Image_third_loss"]) for s in steps)
    joined = int(re.search(r"Third-tower cache after epoch 0 on rank 0: (\d+) joined, 0 missing", log).group(1))
    assert joined >= 32  # every sample of the epoch came with its cached embedding (plus read-ahead)
    state = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=False)["state_dict"]
    assert not any("third_tower" in k for k in state) and any(k.endswith("h_f.weight") for k in state)


def test_a_cache_for_another_third_tower_stops_the_run_before_any_model(shards, h_weights, tmp_path):
    from open_clip_3t import cache
    cache.build(str(shards / "00000.tar"), "3T-tiny", str(tmp_path / "cache"), h_weights, batch_size=16,
                workers=0, device="cpu")
    other = tmp_path / "other.pth"
    weights = torch.load(h_weights)
    weights["cls_token"] = weights["cls_token"] + 1
    torch.save(weights, other)
    proc = subprocess.run([sys.executable, "-m", "training.main", "--model", "3T-tiny", "--third-tower-weights",
                           str(other), "--third-tower-cache", str(tmp_path / "cache"), "--train-data",
                           str(shards / "00000.tar"), "--train-num-samples", "16", "--device", "cpu",
                           "--logs", str(tmp_path / "logs")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("training.main: error: third-tower cache")
    assert not (tmp_path / "logs").exists()  # stopped before OpenCLIP created the run


def test_openclip_logging_leaves_torch_loggers_to_torch():
    """OpenCLIP's setup_logging sets every logger to INFO, so torch prints its dynamo statistics at exit; ours keeps
    torch's own levels (TORCH_LOGS / torch._logging.set_logs still turn them on) and OpenCLIP's root set-up."""
    import logging

    from open_clip_train.logger import setup_logging

    from training._open_clip_train import openclip_setup_logging
    torch_stats = ("torch._dynamo.utils", "torch._dynamo.eval_frame", "torch._subclasses.fake_tensor")
    before = {n: logging.getLogger(n).level for n in list(logging.root.manager.loggerDict)}
    root = logging.root.level, list(logging.root.handlers)
    for n in torch_stats:  # as in a fresh process, whatever earlier tests in this one set
        logging.getLogger(n).setLevel(logging.NOTSET)

    def info_enabled(setup):
        """Which of torch's statistics loggers, and OpenCLIP's own logger, log INFO after `setup`."""
        setup(None, logging.INFO)
        on = [logging.getLogger(n).isEnabledFor(logging.INFO) for n in torch_stats + ("open_clip.factory",)]
        for n in logging.root.manager.loggerDict:  # undo it (torch's statistics loggers: back to NOTSET)
            logging.getLogger(n).setLevel(logging.NOTSET if n in torch_stats else before.get(n, logging.NOTSET))
        logging.root.setLevel(root[0])
        logging.root.handlers[:] = root[1]
        return on

    try:
        assert info_enabled(setup_logging) == [True, True, True, True]  # OpenCLIP 3.3's: torch's statistics on
        assert info_enabled(openclip_setup_logging) == [False, False, False, True]
        torch._logging.set_logs(dynamo=logging.INFO)  # what TORCH_LOGS=dynamo does
        assert info_enabled(openclip_setup_logging) == [True, True, False, True]
    finally:
        torch._logging.set_logs()
        for n in torch_stats:
            logging.getLogger(n).setLevel(before.get(n, logging.NOTSET))


# --- several frozen towers: 3T-tiny-K2 (towers "vit": test_vit, "resnet": test_resnet) ------------------------------

@pytest.fixture(scope="module")
def k2_caches(shards, h_weights, tmp_path_factory):
    """The two towers' weights files and a cache of each, built on both shards by today's `cache build --tower`."""
    from open_clip_3t import cache
    root = tmp_path_factory.mktemp("k2")
    torch.manual_seed(5)
    resnet = root / "test_resnet.pth"
    torch.save(__import__("timm").create_model("test_resnet").state_dict(), resnet)
    weights = {"vit": h_weights, "resnet": str(resnet)}
    for name, path in weights.items():
        cache.build(str(shards / "{00000..00001}.tar"), "3T-tiny-K2", str(root / name), path, batch_size=16,
                    workers=0, device="cpu", tower=name, quiet=True)
    return weights, {name: str(root / name) for name in weights}


K2_TERMS = ["Contrastive_loss", "Image_vit_loss", "Text_vit_loss", "Image_resnet_loss", "Text_resnet_loss"]


def k2_flags(shards, weights, caches):
    return ["--model", "3T-tiny-K2", "--third-tower-weights", *(f"{n}={p}" for n, p in weights.items()),
            "--third-tower-cache", *(f"{n}={p}" for n, p in caches.items()),
            "--train-data", str(shards / "{00000..00001}.tar"), "--train-num-samples", "32", "--batch-size", "8",
            "--epochs", "1", "--lr", "1e-3"]


def tower_tensors(run_dir):
    state = torch.load(run_dir / "checkpoints" / "epoch_1.pt", weights_only=False)["state_dict"]
    return {name: sum(k.startswith(f"{name}_tower.") for k in state) for name in ("vit", "resnet")}, state


def test_two_cached_towers_train_without_building_either_and_log_every_term_by_name(shards, k2_caches, tmp_path):
    weights, caches = k2_caches
    run_dir = train(tmp_path, "k2", *k2_flags(shards, weights, caches),
                    "--third-tower-loss-weights", "1", "1", "0.5", "1", "2")
    log = (run_dir / "out.log").read_text()
    steps = step_logs(log)
    assert len(steps) == 4 and all(set(K2_TERMS) <= set(s) for s in steps)
    for s in steps:  # every term is logged under its tower's name, unweighted; the total is their weighted mean
        assert all(math.isfinite(s[t]) and s[t] > 0 for t in K2_TERMS)
        assert s["Loss"] == pytest.approx(sum(w * s[t] for w, t in zip((1, 1, 0.5, 1, 2), K2_TERMS)) / 5, rel=1e-3)
    scales = {f"Logit Scale {side} {name}" for side in ("Image", "Text") for name in ("Vit", "Resnet")}
    assert all(scales <= set(s) for s in steps)
    assert int(re.search(r"Third-tower cache after epoch 0 on rank 0: (\d+) joined, 0 missing", log).group(1)) >= 32
    built, state = tower_tensors(run_dir)
    assert built == {"vit": 0, "resnet": 0}  # neither tower was built (a built tower is saved with the model)
    assert {"f_vit.weight", "resnet_g.weight", "logit_scale_text_resnet"} <= set(state)
    assert "third_tower_loss_weights: [1.0, 1.0, 0.5, 1.0, 2.0]\n" in (run_dir / "params.txt").read_text()


def test_one_cached_and_one_online_tower_builds_exactly_the_online_one(shards, k2_caches, tmp_path):
    weights, caches = k2_caches
    run_dir = train(tmp_path, "k2half", *k2_flags(shards, weights, {"resnet": caches["resnet"]}))
    steps = step_logs((run_dir / "out.log").read_text())
    assert len(steps) == 4 and all(math.isfinite(s[t]) for s in steps for t in K2_TERMS)
    built, state = tower_tensors(run_dir)
    assert built["resnet"] == 0 and built["vit"] == 78  # test_vit's 78 tensors: vit ran online, resnet from its cache
    vit = torch.load(weights["vit"])
    assert torch.equal(state["vit_tower.model.blocks.0.attn.qkv.weight"], vit["blocks.0.attn.qkv.weight"])


def test_swapped_caches_are_refused_before_any_model(shards, k2_caches, tmp_path):
    weights, caches = k2_caches
    swapped = {"vit": caches["resnet"], "resnet": caches["vit"]}
    proc = subprocess.run([sys.executable, "-m", "training.main", *k2_flags(shards, weights, swapped), "--device",
                           "cpu", "--logs", str(tmp_path / "logs")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"training.main: error: --third-tower-cache vit={caches['resnet']} holds the embeddings of the tower resnet, "
        f"not vit: pass resnet={caches['resnet']}")
    assert not (tmp_path / "logs").exists()  # stopped before OpenCLIP created the run (no model, no data loader)


def test_two_cached_towers_train_sigmoid_3t_with_a_bias_per_term(shards, k2_caches, tmp_path):
    """SigLIP-3T with two towers (--siglip, 3T-tiny-K2-sigmoid): five sigmoid terms, each with its own temperature
    and bias, from the two caches."""
    weights, caches = k2_caches
    flags = k2_flags(shards, weights, caches)
    flags[flags.index("--model") + 1] = "3T-tiny-K2-sigmoid"
    run_dir = train(tmp_path, "k2sig", *flags, "--siglip", "--warmup", "1")  # a learning rate the biases feel
    steps = step_logs((run_dir / "out.log").read_text())
    assert len(steps) == 4 and all(math.isfinite(s[t]) and s[t] > 0 for s in steps for t in K2_TERMS)
    assert all(f"Logit Bias {side} {name}" in s for s in steps for side in ("Image", "Text") for name in ("Vit", "Resnet"))
    built, state = tower_tensors(run_dir)
    assert built == {"vit": 0, "resnet": 0}
    biases = {f"logit_bias_{side}_{name}" for side in ("image", "text") for name in ("vit", "resnet")}
    assert biases | {"logit_bias"} <= set(state)
    for name in biases | {"logit_bias"}:  # initialised as OpenCLIP's --siglip initialises its own bias (-10), trained
        assert state[name].numel() == 1 and -10.1 < state[name].item() < -9.9 and state[name].item() != -10.0
