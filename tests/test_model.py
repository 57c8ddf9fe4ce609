import hashlib
import importlib
import json
import math
from pathlib import Path

import open_clip
import open_clip.factory as oc_factory
import pytest
import timm
import torch
import torch.nn.functional as F

import open_clip_3t
from open_clip_3t import ThreeTowersCLIP, ThreeTowersCustomTextCLIP, ThreeTowersLoss, ThreeTowersSigLipLoss, _openclip
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


@pytest.mark.parametrize("model_name, loss, n_outputs", [("3T-tiny", ThreeTowersLoss(), 9),
                                                         ("3T-tiny-sigmoid", ThreeTowersSigLipLoss(), 12)])
def test_tuple_output_feeds_the_loss_like_the_dict(model_name, loss, n_outputs, h_weights):
    """OpenCLIP's default output_dict=False gives a tuple: loss(*model(...)) equals loss(**model(...)); a SigLIP
    config's tuple ends with the three biases."""
    from open_clip_3t.loss import MODEL_OUTPUTS
    images, texts = batch()
    torch.manual_seed(0)
    with_dict = open_clip.create_model(model_name, third_tower_weights=h_weights, output_dict=True).train()
    torch.manual_seed(0)
    plain = open_clip.create_model(model_name, third_tower_weights=h_weights).train()  # output_dict=False
    as_dict, as_tuple = with_dict(images, texts), plain(images, texts)
    assert isinstance(as_tuple, tuple) and tuple(as_dict) == MODEL_OUTPUTS[:n_outputs] and len(as_tuple) == n_outputs
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


# (not 3T-tiny-sigmoid: OpenCLIP 3.3's own bf16 conversion fails on a text tower with proj_bias, plain SigLIP's too)
@pytest.mark.parametrize("model_name", ["3T-tiny", "3T-mini-sigmoid"])
def test_bf16_casts_h_as_a_whole(model_name, h_weights):
    h = {"third_tower_weights": h_weights} if model_name == "3T-tiny" else {"third_tower": "random"}  # mini: a ResNet h
    m = open_clip.create_model(model_name, precision="bf16", **h)
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


# --- OpenCLIP's other classes: CustomTextCLIP (custom and Hugging Face text towers, SigLIP); CoCa refused ----------

THREE_TOWERS_ONLY = {"f_h.weight", "f_h.bias", "h_f.weight", "h_f.bias", "g_h.weight", "g_h.bias", "h_g.weight",
                     "h_g.bias", "logit_scale_image_third", "logit_scale_text_third"}
SIGMOID_ONLY = {"logit_bias_image_third", "logit_bias_text_third"}


def plain_keys(name):
    """State-dict keys of the plain OpenCLIP model (no plugin class) of config `name` minus its 3T section."""
    cfg = json.loads((_openclip.CONFIG_DIR / f"{name}.json").read_text())
    cls = open_clip.CustomTextCLIP if cfg.pop("custom_text", False) else open_clip.CLIP
    cfg.pop("three_towers")
    return set(cls(**cfg).state_dict())


def test_every_class_keeps_openclip_names_and_3t_keys_are_unchanged():
    clip = open_clip.create_model("3T-tiny", third_tower=False)
    assert set(clip.state_dict()) - plain_keys("3T-tiny") == THREE_TOWERS_ONLY  # today's checkpoints load unchanged
    sigmoid = open_clip.create_model("3T-tiny-sigmoid", third_tower=False)
    assert type(sigmoid) is ThreeTowersCustomTextCLIP and isinstance(sigmoid, open_clip.CustomTextCLIP)
    plain = plain_keys("3T-tiny-sigmoid")
    assert set(sigmoid.state_dict()) - plain == THREE_TOWERS_ONLY | SIGMOID_ONLY
    assert {"logit_bias", "text.token_embedding.weight"} <= plain  # g under text., as OpenCLIP's CustomTextCLIP
    assert set(open_clip_3t.clip_state_dict(sigmoid.state_dict())) == plain  # export is a filter
    # force_custom_text turns the built-in text tower into OpenCLIP's custom one, as for plain models
    assert type(open_clip.create_model("3T-tiny", force_custom_text=True)) is ThreeTowersCustomTextCLIP


def test_sigmoid_3t_outputs_and_initialisation():
    torch.manual_seed(0)
    m = open_clip.create_model("3T-tiny-sigmoid", third_tower="random", output_dict=True).train()
    images, _ = batch()
    out = m(images, open_clip.get_tokenizer("3T-tiny-sigmoid")(["a red circle"] * 4))
    assert set(out) == OUTPUT_KEYS | {"logit_bias", "logit_bias_image_third", "logit_bias_text_third"}
    for k in ("logit_bias", "logit_bias_image_third", "logit_bias_text_third"):
        assert out[k].item() == -10.0  # init_logit_bias of the config, as OpenCLIP initialises SigLIP's
    for k in ("logit_scale", "logit_scale_image_third", "logit_scale_text_third"):
        assert out[k].item() == pytest.approx(1 / 0.07, rel=1e-5)
    m.eval()
    assert set(m(images, torch.zeros(4, 32, dtype=torch.long))) == \
        {"image_features", "text_features", "logit_scale", "logit_bias"}  # eval: OpenCLIP's own forward


def test_sigmoid_gradients_reach_the_three_temperatures_and_biases_but_never_h(h_weights):
    torch.manual_seed(0)
    m = open_clip.create_model("3T-tiny-sigmoid", third_tower_weights=h_weights, output_dict=True).train()
    images, _ = batch()
    ThreeTowersSigLipLoss()(**m(images, open_clip.get_tokenizer("3T-tiny-sigmoid")(["two stars"] * 4))).backward()
    for name, p in m.named_parameters():
        if name.startswith("third_tower."):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name in ("logit_scale", "logit_scale_image_third", "logit_scale_text_third", "logit_bias",
                 "logit_bias_image_third", "logit_bias_text_third"):
        assert getattr(m, name).grad.abs().item() > 0, name


def test_hugging_face_text_tower_is_a_3t_model(hf_three_towers, h_weights):
    torch.manual_seed(0)
    m = open_clip.create_model(hf_three_towers, third_tower_weights=h_weights, output_dict=True).train()
    assert type(m) is ThreeTowersCustomTextCLIP and type(m.text).__name__ == "HFTextEncoder"
    texts = open_clip.get_tokenizer(hf_three_towers)(["a photo of two red circles", "a green star"] * 2)
    assert texts.shape == (4, 16) and texts[0, 0].item() == 0  # RoBERTa's <s>: the tokenizer written by the fixture
    images, _ = batch()
    out = m(images, texts)
    assert set(out) == OUTPUT_KEYS
    ThreeTowersLoss()(**out).backward()
    assert m.text.transformer.embeddings.word_embeddings.weight.grad.abs().sum() > 0  # g is trained
    assert all(p.grad is None for p in m.third_tower.parameters())


def test_coca_configs_are_refused_with_the_reason(tmp_path):
    cfg = json.loads((Path(open_clip.__file__).parent / "model_configs" / "coca_ViT-B-32.json").read_text())
    cfg["three_towers"] = _tiny_section()
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    with pytest.raises(ValueError, match=r"3T does not support CoCa \(multimodal_cfg\): its loss adds a captioning "
                                         r"term") as e:
        open_clip.create_model(f"local-dir:{tmp_path}")
    assert "\n" not in str(e.value)
