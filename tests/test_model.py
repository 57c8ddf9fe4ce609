import hashlib
import importlib
import json
import math

import open_clip
import open_clip.factory as oc_factory
import pytest
import timm
import torch
import torch.nn.functional as F

import open_clip_3t
from open_clip_3t import ThreeTowersCLIP, ThreeTowersLoss, _openclip
from tests.conftest import run_python

OUTPUT_KEYS = {"image_features", "text_features", "logit_scale", "image_third_features", "third_image_features",
               "text_third_features", "third_text_features", "logit_scale_image_third", "logit_scale_text_third"}


def batch(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 32, 32, generator=g)
    texts = open_clip.get_tokenizer("3T-tiny")([f"a photo of {i} red circles" for i in range(n)])
    return images, texts


@pytest.fixture
def model(h_weights):
    torch.manual_seed(0)
    return open_clip.create_model("3T-tiny", third_tower_weights=h_weights, output_dict=True)


def test_factory_entry_points_build_three_towers(tmp_path, h_weights):
    assert {"3T-ViT-B-32", "3T-ViT-B-16", "3T-ViT-L-16", "3T-tiny"} <= set(open_clip.list_models())
    assert isinstance(open_clip.create_model("3T-tiny"), ThreeTowersCLIP)
    assert isinstance(oc_factory.create_model("3T-tiny"), ThreeTowersCLIP)
    m, train_tf, val_tf = open_clip.create_model_and_transforms("3T-tiny")
    assert isinstance(m, ThreeTowersCLIP)
    assert val_tf.transforms[0].size == 32
    # a local-dir: folder holding a 3T config (no weights)
    cfg = json.loads((_openclip.CONFIG_DIR / "3T-tiny.json").read_text())
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    assert isinstance(open_clip.create_model(f"local-dir:{tmp_path}"), ThreeTowersCLIP)


def test_forward_contract_in_training_mode(model):
    images, texts = batch()
    model.train()
    out = model(images, texts)
    assert set(out) == OUTPUT_KEYS
    for k in OUTPUT_KEYS - {"logit_scale", "logit_scale_image_third", "logit_scale_text_third"}:
        assert out[k].shape[0] == 4
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(4))  # L2-normalised
    assert out["image_third_features"].shape[1] == 32 and out["third_image_features"].shape[1] == 32
    for k in ("logit_scale", "logit_scale_image_third", "logit_scale_text_third"):
        assert out[k].item() == pytest.approx(1 / 0.07, rel=1e-5)  # exponentiated, init log(1/0.07)


def test_tuple_output_feeds_the_loss_like_the_dict(model, h_weights):
    """OpenCLIP's default output_dict=False gives a tuple: loss(*model(...)) equals loss(**model(...))."""
    from open_clip_3t.loss import MODEL_OUTPUTS
    images, texts = batch()
    torch.manual_seed(0)
    plain = open_clip.create_model("3T-tiny", third_tower_weights=h_weights).train()  # output_dict=False
    as_dict, as_tuple = model.train()(images, texts), plain(images, texts)
    assert isinstance(as_tuple, tuple) and tuple(as_dict) == MODEL_OUTPUTS
    loss = ThreeTowersLoss()
    assert loss(*as_tuple, output_dict=True) == loss(**as_dict, output_dict=True)
    assert loss(*as_tuple).item() == pytest.approx(sum(loss(**as_dict, output_dict=True).values()).item(), rel=1e-6)
    with pytest.raises(TypeError, match=r"loss\(\*model\(images, texts\)\)"):
        loss(*as_tuple[:3])


def test_precomputed_third_embeddings_equal_online(model):
    images, texts = batch()
    model.train()
    online = model(images, texts)
    h = model.encode_third(images)
    cached = model(images, texts, third_embeddings=h.half())  # the cache stores fp16
    for k in ("third_image_features", "third_text_features"):
        torch.testing.assert_close(cached[k], online[k], atol=2e-3, rtol=0)
    torch.testing.assert_close(cached["image_features"], online["image_features"])


def test_third_tower_sees_its_own_preprocessing(model, h_weights):
    """h's input = f's normalised tensor with f's mean/std undone, resized to h's size, with h's mean/std."""
    images, _ = batch()
    pixels = images * torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1) \
        + torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    reference = timm.create_model("test_vit", pretrained=True, num_classes=0, img_size=32,
                                  pretrained_cfg_overlay=dict(file=h_weights)).eval()
    expected = reference.forward_head(reference.forward_features((pixels - 0.5) / 0.5), pre_logits=True)
    torch.testing.assert_close(model.encode_third(images), expected, atol=1e-5, rtol=1e-5)
    # a 3T config whose h runs at another size resizes f's view
    big = open_clip.create_model("3T-tiny", third_tower_weights=h_weights)
    big.third_tower.image_size = (48, 48)
    x = big.third_tower.from_f_input(images, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1))
    assert tuple(x.shape) == (4, 3, 48, 48)


def test_third_tower_weights_come_from_the_file(model, h_weights):
    saved = torch.load(h_weights)
    assert torch.equal(model.third_tower.model.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])
    assert "head.weight" in saved and not hasattr(model.third_tower.model.head, "weight")  # classifier dropped


def test_gradients_reach_f_g_heads_and_temperatures_but_never_h(model):
    images, texts = batch()
    model.train()
    assert not model.third_tower.training and not model.third_tower.model.training  # h stays in eval
    loss = ThreeTowersLoss()(**model(images, texts))
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith("third_tower."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert {"visual", "transformer", "f_h", "g_h", "h_f", "h_g", "logit_scale", "logit_scale_image_third",
            "logit_scale_text_third"} <= trainable and "third_tower" not in trainable


def test_eval_mode_is_plain_clip_and_never_runs_h(model, monkeypatch):
    images, texts = batch()
    model.eval()
    monkeypatch.setattr(model.third_tower, "forward", lambda *a: pytest.fail("h ran in eval mode"))
    out = model(image=images)
    assert out["text_features"] is None
    plain = open_clip.model.CLIP(**{k: v for k, v in json.loads(
        (_openclip.CONFIG_DIR / "3T-tiny.json").read_text()).items() if k != "three_towers"})
    plain.load_state_dict(open_clip_3t.clip_state_dict(model.state_dict()))
    plain.eval()
    torch.testing.assert_close(out["image_features"], plain.encode_image(images, normalize=True))
    torch.testing.assert_close(model.encode_text(texts, normalize=True), plain.encode_text(texts, normalize=True))
    assert set(model(images, texts)) == {"image_features", "text_features", "logit_scale"}


def test_temperatures_clamp_like_openclip(model):
    with torch.no_grad():
        model.logit_scale_image_third.fill_(10.0)
        model.logit_scale_text_third.fill_(-1.0)
    model.clamp_logit_scales_()
    assert model.logit_scale_image_third.item() == pytest.approx(math.log(100))
    assert model.logit_scale_text_third.item() == 0.0


def test_model_without_third_tower_needs_embeddings():
    m = open_clip.create_model("3T-tiny", third_tower=False)
    assert m.third_tower is None and not any(k.startswith("third_tower.") for k in m.state_dict())
    m.train()
    images, texts = batch()
    with pytest.raises(RuntimeError, match="third_embeddings"):
        m(images, texts)
    out = m(images, texts, third_embeddings=torch.randn(4, 64))
    assert out[3].shape == (4, 32)  # tuple output when output_dict is off: third_image_features


def test_mlp_heads_option():
    m = open_clip.create_model("3T-tiny", three_towers={**_tiny_section(), "head_type": "mlp"})
    assert isinstance(m.f_h, torch.nn.Sequential) and m.f_h[-1].out_features == 32


def test_bf16_casts_h_as_a_whole(h_weights):
    m = open_clip.create_model("3T-tiny", third_tower_weights=h_weights, precision="bf16")
    assert {p.dtype for p in m.third_tower.parameters()} == {torch.bfloat16}
    images, _ = batch()
    assert m.encode_third(images.bfloat16()).dtype == torch.bfloat16


def _tiny_section(**overrides):
    cfg = json.loads((_openclip.CONFIG_DIR / "3T-tiny.json").read_text())["three_towers"]
    cfg.update(overrides)
    return cfg


# --- registration -----------------------------------------------------------------------------------------------

def test_registration_is_idempotent():
    wrapped = oc_factory.create_model
    n_models, n_paths = len(open_clip.list_models()), len(oc_factory._MODEL_CONFIG_PATHS)
    importlib.reload(open_clip_3t)
    importlib.reload(_openclip)
    _openclip.register()
    assert len(open_clip.list_models()) == n_models and len(oc_factory._MODEL_CONFIG_PATHS) == n_paths
    assert oc_factory.create_model is wrapped and open_clip.create_model is wrapped
    assert isinstance(open_clip.create_model("3T-tiny"), ThreeTowersCLIP)


def test_plain_models_are_built_exactly_as_before():
    code = """
import hashlib, torch, open_clip{extra}
torch.manual_seed(0)
m = open_clip.create_model('ViT-B-32')
h = hashlib.sha256()
for k, v in m.state_dict().items():
    h.update(k.encode()); h.update(v.numpy().tobytes())
print(type(m).__module__, type(m).__name__, h.hexdigest(), open_clip.get_model_config('ViT-B-32') is not None)
"""
    before = run_python(code.format(extra=""))
    after = run_python(code.format(extra="; import open_clip_3t"))
    assert before == after and before.startswith("open_clip.model CLIP ")


# --- errors, raised before heavy work ---------------------------------------------------------------------------

def test_unknown_timm_model_is_named():
    with pytest.raises(ValueError, match=r"'vit_nope' is not a timm model"):
        open_clip.create_model("3T-tiny", three_towers=_tiny_section(timm_model_name="vit_nope"))


def test_missing_weights_file_is_named(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match=f"weights file '{missing}' does not exist"):
        open_clip.create_model("3T-tiny", third_tower_weights=str(missing))


def test_dimension_mismatch_is_named():
    with pytest.raises(ValueError, match="64-d pre-logits embedding but three_towers.embed_dim is 128: set embed_dim to 64"):
        open_clip.create_model("3T-tiny", three_towers=_tiny_section(embed_dim=128))


def test_unsupported_openclip_version_is_refused():
    with pytest.raises(ImportError, match=r"needs open_clip_torch 3.3.x but found 3.4.0: run `pip install"):
        _openclip.check_openclip_version("3.4.0")
    with pytest.raises(ImportError, match="found 2.32.0"):
        _openclip.check_openclip_version("2.32.0")
    _openclip.check_openclip_version("3.3.7")


def test_custom_text_configs_are_refused():
    with pytest.raises(ValueError, match="built-in text tower only"):
        open_clip.create_model("3T-tiny", force_custom_text=True)
