"""The precision paths users train with on GPUs, proven on CPU: --precision amp / amp_bf16 / pure_bf16 / fp32 with h
online and from the cache, the dtypes the heads, temperatures (and SigLIP's biases) keep, --grad-checkpointing,
--torchcompile, and a bf16 cache build. Tiny 3T (3T-tiny: 1-layer towers, 32 px, h = test_vit) and tiny SigLIP-3T
(3T-tiny-sigmoid: OpenCLIP's CustomTextCLIP, trained with --siglip) on generated shards."""
import logging
import math

import numpy as np
import open_clip
import pytest
import torch
from open_clip import get_input_dtype

import open_clip_3t
from open_clip_3t import cache
from training._open_clip_train import openclip_autocast
from open_clip_3t.loss import loss_terms
from open_clip_3t.toy.synthetic import write_shards
from tests.test_cache import tar_images
from tests.test_training import step_logs, write_csv_dataset
from training.main import main as training_main

MODEL = "3T-tiny"
SIGLIP = "3T-tiny-sigmoid"
FLAGS = {MODEL: [], SIGLIP: ["--siglip"]}  # the training flags of each family
LOSSES = {MODEL: open_clip_3t.ThreeTowersLoss, SIGLIP: open_clip_3t.ThreeTowersSigLipLoss}
PRECISIONS = ("amp", "amp_bf16", "pure_bf16", "fp32")
CASES = [(model, precision) for model in FLAGS for precision in PRECISIONS]
# Largest relative L2 error, over samples, of h's embedding (as the heads h_f, h_g receive it) against h in fp32:
# fp16 keeps 11 significant bits, bf16 8; online, the error is h's forward in that precision; from the cache, it is
# the fp16 storage of an fp32 build (plus the cast to bf16 under pure_bf16). Measured on 3T-tiny (h = test_vit):
# online amp 8e-4, amp_bf16 7e-3, pure_bf16 1e-2; cached 2e-4 (fp16 rows), pure_bf16 2e-3.
H_TOLERANCE = {"fp32": 1e-6, "amp": 3e-3, "amp_bf16": 2.5e-2, "pure_bf16": 2.5e-2}
CACHED_FP16_TOLERANCE = 1e-3  # fp16 storage: half an fp16 ulp is 2**-12 = 2.4e-4 of each element
LOSS_TERMS = ["Contrastive_loss", "Image_third_loss", "Text_third_loss", "Loss"]


@pytest.fixture(scope="module")
def data(tmp_path_factory, h_weights):
    """Two shards of 16 samples (32 px) and an fp32 cache of them (fp16 rows, the default storage)."""
    root = tmp_path_factory.mktemp("precision")
    write_shards(str(root / "shards"), num_samples=32, samples_per_shard=16, seed=0, image_size=32)
    spec = str(root / "shards" / "{00000..00001}.tar")
    cache.build(spec, MODEL, str(root / "cache"), h_weights, batch_size=8, workers=0, split=(0, 1), quiet=True)
    return {"spec": spec, "cache": str(root / "cache")}


def train(tmp_path, name, *flags, model=MODEL):
    """One in-process `python -m training.main` run (4 steps of 8 samples, CPU); returns its run folder."""
    handlers = list(logging.root.handlers)
    try:
        training_main(["--logs", str(tmp_path / "logs"), "--name", name, "--model", model, *FLAGS[model],
                       "--device", "cpu",
                       "--workers", "0", "--log-every-n-steps", "1", "--seed", "0", "--train-num-samples", "32",
                       "--batch-size", "8", "--epochs", "1", "--lr", "1e-3", "--warmup", "1", *flags])
    finally:  # OpenCLIP's setup_logging adds handlers on every call: drop this run's
        for handler in logging.root.handlers[len(handlers):]:
            handler.close()
            logging.root.removeHandler(handler)
    return tmp_path / "logs" / name


def temperatures_and_biases(model_name):
    """The names of the model's temperatures (and, for SigLIP, biases): one per loss term."""
    return [name for term in loss_terms() for name in (term.scale, term.bias) if name != term.bias or model_name == SIGLIP]


def checkpoint_state(run_dir):
    return torch.load(run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]


def relative_error(x, ref):
    """Largest relative L2 error over rows."""
    x, ref = x.float(), ref.float()
    return ((x - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def head_inputs(model, images, texts, precision, third=None):
    """What h_f receives in one training forward under `precision` (autocast and input dtype as the trainer sets)."""
    seen = []
    hook = model.h_f.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    input_dtype = get_input_dtype(precision)
    model.train()
    with openclip_autocast(precision, "cpu")():
        out = model(images.to(input_dtype or images.dtype), texts, third_embeddings=third)
    hook.remove()
    assert all(torch.isfinite(v).all() for v in out.values())
    return seen[0]


# Every OpenCLIP precision; not fp16/bf16 for SigLIP-3T: OpenCLIP 3.3's own conversion fails on its text tower's
# projection (proj_bias), plain SigLIP's too (see docs/training.md).
DTYPE_CASES = [(model, precision) for model in FLAGS
               for precision in ("amp", "amp_bf16", "fp16", "bf16", "pure_fp16", "pure_bf16", "fp32")
               if not (model == SIGLIP and precision in ("fp16", "bf16"))]


@pytest.mark.parametrize("model_name, precision", DTYPE_CASES)
def test_heads_and_temperatures_keep_the_dtype_of_openclips_logit_scale(model_name, precision, h_weights):
    """OpenCLIP keeps its logit_scale (and logit_bias) fp32 except under pure_*: our heads, temperatures and biases
    follow it (under bf16 / fp16 OpenCLIP casts every Linear of CLIP to half; the heads are Linears, yet stay fp32)."""
    expected = {"pure_fp16": torch.float16, "pure_bf16": torch.bfloat16}.get(precision, torch.float32)
    if model_name == MODEL:  # OpenCLIP's own CLIP keeps its logit_scale in that dtype
        clip = open_clip.create_model("3T-baseline-CLIP-tiny", precision=precision)
        assert clip.logit_scale.dtype == expected
    model = open_clip.create_model(model_name, third_tower_weights=h_weights, precision=precision, output_dict=True)
    for name in ("f_h", "h_f", "g_h", "h_g"):
        assert {p.dtype for p in getattr(model, name).parameters()} == {expected}, name
    for name in temperatures_and_biases(model_name):
        assert getattr(model, name).dtype == expected, name
    if model_name == MODEL and precision in ("fp16", "bf16"):  # f and g are half, as in OpenCLIP's CLIP
        assert model.visual.conv1.weight.dtype == clip.visual.conv1.weight.dtype != torch.float32
    torch.manual_seed(0)
    head_inputs(model, torch.randn(4, 3, 32, 32), torch.randint(1, 49000, (4, 32)), precision)  # runs, finite


@pytest.mark.parametrize("model_name, precision", CASES)
def test_h_embeddings_under_each_precision_are_within_tolerance_of_fp32(model_name, precision, data, h_weights):
    # online: h runs inside the step, in the step's precision
    torch.manual_seed(0)
    images, texts = torch.randn(16, 3, 32, 32).clamp(-2, 2), torch.randint(1, 49000, (16, 32))
    fp32 = open_clip.create_model(model_name, third_tower_weights=h_weights, precision="fp32", output_dict=True)
    model = open_clip.create_model(model_name, third_tower_weights=h_weights, precision=precision, output_dict=True)
    reference = head_inputs(fp32, images, texts, "fp32")
    online = relative_error(head_inputs(model, images, texts, precision), reference)
    assert online <= H_TOLERANCE[precision], online

    # cached: fp16 rows of an fp32 build, against h in fp32 on the same images (h's eval view)
    shard = cache.expand_shards(data["spec"])[0]
    rows, keys, _, _ = cache.load_sidecar(cache.sidecar_path(data["cache"], shard))
    h = open_clip_3t.ThirdTower(cache.cached_tower(MODEL, h_weights))
    pictures = tar_images(shard)
    exact = h(torch.stack([h.eval_transform()(pictures[k]) for k in keys]))
    model = open_clip.create_model(model_name, third_tower=False, precision=precision, output_dict=True)
    n = len(keys)  # 16: the rows come with the batch; f's images do not matter to them
    cached = relative_error(head_inputs(model, images[:n], texts[:n], precision, third=torch.from_numpy(rows)), exact)
    assert cached <= (H_TOLERANCE[precision] if precision == "pure_bf16" else CACHED_FP16_TOLERANCE), cached
    print(f"\n{model_name} {precision}: h's embedding vs fp32: online {online:.2e}, cached {cached:.2e}")


@pytest.mark.parametrize("model_name, precision", CASES)
def test_training_steps_are_finite_under_each_precision(model_name, precision, data, h_weights, tmp_path):
    expected = torch.bfloat16 if precision == "pure_bf16" else torch.float32
    for mode, flags in (("online", []), ("cached", ["--third-tower-cache", data["cache"]])):
        run_dir = train(tmp_path, mode, "--precision", precision, "--third-tower-weights", h_weights,
                        "--train-data", data["spec"], *flags, model=model_name)
        steps = step_logs((run_dir / "out.log").read_text())
        assert len(steps) == 4, (mode, steps)
        for term in LOSS_TERMS:  # (SigLIP's loss is positive too: a sum of -log sigmoid)
            assert all(math.isfinite(s[term]) and s[term] > 0 for s in steps), (mode, term, steps)
        state = checkpoint_state(run_dir)
        assert ("third_tower.model.cls_token" in state) == (mode == "online")
        for key in ["f_h.weight", "h_g.bias"] + temperatures_and_biases(model_name):
            assert state[key].dtype == expected, (mode, key)
            assert torch.isfinite(state[key]).all()


@pytest.mark.parametrize("model_name", FLAGS)
def test_grad_checkpointing_gives_the_same_loss_and_gradients(model_name, h_weights):
    """fp32, same seed and batch: every gradient equal with and without checkpointing, and the blocks really are
    recomputed in the backward (each runs twice per step)."""
    torch.manual_seed(0)
    images, texts = torch.randn(8, 3, 32, 32), torch.randint(1, 49000, (8, 32))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(1)
        model = open_clip.create_model(model_name, third_tower_weights=h_weights, output_dict=True)
        model.set_grad_checkpointing(checkpointing)
        calls = []
        text_tower = model.text if model_name == SIGLIP else model  # CustomTextCLIP keeps g under `text.`
        for block in (model.visual.transformer.resblocks[0], text_tower.transformer.resblocks[0]):
            # counted in forward itself: the backward's recomputation calls it without running module hooks
            block.forward = lambda *a, _forward=block.forward, **k: calls.append(1) or _forward(*a, **k)
        model.train()
        loss = LOSSES[model_name]()(**model(images, texts))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.item(), grads, len(calls)))
    (loss0, grads0, calls0), (loss1, grads1, calls1) = results
    assert (calls0, calls1) == (2, 4)  # f's and g's block: forward only, then forward + recomputation
    assert loss1 == loss0
    assert grads1.keys() == grads0.keys() and len(grads0) > 20
    for name, grad in grads0.items():
        assert torch.equal(grads1[name], grad), name


def csv_flags(tmp_path, h_weights):
    """fp32 on a CSV dataset: its shuffle and crops come from the seeded RNGs (OpenCLIP's webdataset pipeline shuffles
    samples with a time-seeded RNG), so two runs see the same batches."""
    (tmp_path / "csv").mkdir()
    csv = write_csv_dataset(tmp_path / "csv", n=32)
    return ["--precision", "fp32", "--third-tower-weights", h_weights, "--train-data", str(csv),
            "--dataset-type", "csv"]


@pytest.mark.parametrize("model_name", FLAGS)
def test_grad_checkpointing_flag_trains_identically(model_name, h_weights, tmp_path, monkeypatch):
    recomputed = []
    original = open_clip.transformer.checkpoint
    monkeypatch.setattr(open_clip.transformer, "checkpoint", lambda *a, **k: recomputed.append(1) or original(*a, **k))
    flags = csv_flags(tmp_path, h_weights)
    runs = [train(tmp_path, "plain", *flags, model=model_name),
            train(tmp_path, "ckpt", *flags, "--grad-checkpointing", model=model_name)]
    assert len(recomputed) == 8  # 4 steps x (f's block + g's block), only in the second run
    plain, ckpt = (step_logs((r / "out.log").read_text()) for r in runs)
    assert len(plain) == 4 and ckpt == plain
    before, after = (checkpoint_state(r) for r in runs)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    assert not torch.equal(before["f_h.weight"], open_clip.create_model(model_name, third_tower=False).f_h.weight)


@pytest.mark.parametrize("model_name", FLAGS)
def test_torchcompile_trains_3t(model_name, h_weights, tmp_path, monkeypatch):
    """--torchcompile, CPU: 4 steps with h online, one compilation (a recompile would raise), and the same losses as
    eager to fp32 rounding. 3T with inductor, OpenCLIP's default backend (minutes on 2 cores: it generates and compiles
    C++); SigLIP-3T, whose forward differs from 3T's only by its biases, with dynamo and AOTAutograd alone
    (aot_eager: the same tracing, guards and graph, no code generation), to keep the suite short."""
    import functools

    import torch._dynamo
    if model_name == SIGLIP:
        monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    flags = csv_flags(tmp_path, h_weights)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = train(tmp_path, "compiled", *flags, "--torchcompile", model=model_name)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward was compiled
    eager = train(tmp_path, "eager", *flags, model=model_name)
    torch._dynamo.reset()
    compiled_steps, eager_steps = (step_logs((r / "out.log").read_text()) for r in (compiled, eager))
    assert len(compiled_steps) == 4
    for c, e in zip(compiled_steps, eager_steps):
        for term in LOSS_TERMS:
            assert c[term] == pytest.approx(e[term], rel=1e-3), (term, c, e)
    assert "_orig_mod" not in "".join(checkpoint_state(compiled))  # OpenCLIP saves the uncompiled module's keys


def test_bf16_cache_build_is_within_tolerance_of_fp32_and_trains(data, h_weights, tmp_path):
    built = {}
    for precision in ("fp32", "bf16"):
        out = str(tmp_path / f"cache_{precision}")
        assert cache.main(["build", "--train-data", data["spec"], "--model", MODEL, "--third-tower-cache", out,
                           "--third-tower-weights", h_weights, "--precision", precision, "--dtype", "fp32",
                           "--workers", "0", "--batch-size", "8", "--device", "cpu"]) == 0
        built[precision] = [cache.load_sidecar(cache.sidecar_path(out, u)) for u in cache.expand_shards(data["spec"])]
    errors = []
    for (fp32, keys32, crc32, _), (bf16, keys16, crc16, _) in zip(built["fp32"], built["bf16"]):
        assert keys16 == keys32 and np.array_equal(crc16, crc32) and bf16.dtype == np.float32
        errors.append(relative_error(torch.from_numpy(bf16), torch.from_numpy(fp32)))
    assert 0 < max(errors) <= H_TOLERANCE["pure_bf16"], errors  # > 0: h did run in bf16
    print(f"\nbf16 cache build vs fp32 build: {max(errors):.2e}")
    assert cache.info(str(tmp_path / "cache_bf16"))["precision"] == "bf16"
    for model_name in FLAGS:  # one cache serves every 3T model with this h
        run_dir = train(tmp_path, f"{model_name}_from_bf16_cache", "--precision", "amp_bf16", "--third-tower-weights",
                        h_weights, "--train-data", data["spec"], "--third-tower-cache", str(tmp_path / "cache_bf16"),
                        model=model_name)
        steps = step_logs((run_dir / "out.log").read_text())
        assert len(steps) == 4 and all(math.isfinite(s["Image_third_loss"]) for s in steps)
        assert "third_tower.model.cls_token" not in checkpoint_state(run_dir)
