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


@pytest.mark.parametrize("model_name, loss, n_outputs", [
    ("3T-tiny", ThreeTowersLoss(), 9), ("3T-tiny-sigmoid", ThreeTowersSigLipLoss(), 12),
    ("3T-tiny-K2", ThreeTowersLoss(towers=("vit", "resnet")), 15)])
def test_tuple_output_feeds_the_loss_like_the_dict(model_name, loss, n_outputs, h_weights):
    """OpenCLIP's default output_dict=False gives a tuple: loss(*model(...)) equals loss(**model(...)); a SigLIP
    config's tuple ends with the three biases."""
    from open_clip_3t.loss import model_outputs
    images, texts = batch()
    towers = {"third_tower_weights": h_weights} if model_name != "3T-tiny-K2" else {"third_tower": "random"}
    torch.manual_seed(0)
    with_dict = open_clip.create_model(model_name, output_dict=True, **towers).train()
    torch.manual_seed(0)
    plain = open_clip.create_model(model_name, **towers).train()  # output_dict=False
    as_dict, as_tuple = with_dict(images, texts), plain(images, texts)
    outputs = model_outputs(with_dict.tower_names)
    assert isinstance(as_tuple, tuple) and tuple(as_dict) == outputs[:n_outputs] and len(as_tuple) == n_outputs
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
    _openclip.register(open_clip_3t.factory.create_model, open_clip_3t.factory.create_loss)
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


# --- several frozen towers (K = 2) and today's single tower as K = 1 ----------------------------------------------

def k2_section(**overrides):
    section = json.loads((_openclip.CONFIG_DIR / "3T-tiny-K2.json").read_text())["three_towers"]
    section.update(overrides)
    return section


# 3T-tiny's model and loss with the tower of h_weights (conftest: test_vit, seed 123), in float64 on a fixed batch,
# as computed by the code before several towers existed (open_clip_3t at e594a78, one tower): the K = 1 path must
# give these numbers. Terms of the loss, and the sum of |gradient| over each top-level parameter group.
TODAY = {
    "3T-tiny": ({"contrastive_loss": 0.6624145736521553, "image_third_loss": 0.7034180088131335,
                 "text_third_loss": 0.8490742076650312},
                {"f_h": 25.927940583898366, "g_h": 49.38100204820109, "h_f": 55.627765329902566,
                 "h_g": 79.66308643074493, "ln_final": 2.029696938619115, "logit_scale": 0.10570731462009168,
                 "logit_scale_image_third": 0.21430165612272592, "logit_scale_text_third": 0.45879470773052977,
                 "positional_embedding": 241.50587651313748, "text_projection": 56.49655700828619,
                 "token_embedding": 290.25615337832136, "transformer": 664.7320785096617,
                 "visual": 185.47972933147966}),
    "3T-tiny-sigmoid": ({"contrastive_loss": 3.326577896446658, "image_third_loss": 3.1874866789099907,
                         "text_third_loss": 4.653461096128785},
                        {"f_h": 124.03933393912153, "g_h": 126.9723810535472, "h_f": 304.9938718836066,
                         "h_g": 274.915953781276, "logit_bias": 0.3332383204699682,
                         "logit_bias_image_third": 0.3327605931917842, "logit_bias_text_third": 0.3333309484633171,
                         "logit_scale": 0.0068439344021959435, "logit_scale_image_third": 0.14478087449569527,
                         "logit_scale_text_third": 1.3201172882274375, "text": 3242.0804491992553,
                         "visual": 923.7047108635427}),
}


def loss_and_gradients(model_name, h_weights, **kwargs):
    """(state-dict keys, loss terms, {top-level name: sum of |grad|}) of one float64 step on a fixed batch."""
    torch.manual_seed(0)
    m = open_clip.create_model(model_name, third_tower_weights=h_weights, output_dict=True, **kwargs).double().train()
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)
    texts = open_clip.get_tokenizer(model_name)([f"a photo of {i} red circles" for i in range(6)])
    loss = ThreeTowersSigLipLoss() if "sigmoid" in model_name else ThreeTowersLoss()
    terms = loss(**m(images, texts), output_dict=True)
    sum(terms.values()).backward()
    grads = {}
    for name, p in m.named_parameters():
        if p.grad is not None:
            grads[name.split(".")[0]] = grads.get(name.split(".")[0], 0.0) + p.grad.abs().sum().item()
    return list(m.state_dict()), {k: v.item() for k, v in terms.items()}, grads


@pytest.mark.parametrize("model_name", ["3T-tiny", "3T-tiny-sigmoid"])
def test_one_tower_is_todays_3t_loss_gradients_and_keys(model_name, h_weights):
    """K = 1: today's single-tower section and the same tower written as a one-entry tower list named "third" give
    the loss, gradients and state-dict keys of the code before several towers existed (TODAY), on the same seed."""
    keys, terms, grads = loss_and_gradients(model_name, h_weights)
    today_terms, today_grads = TODAY[model_name]
    assert terms.keys() == today_terms.keys() and grads.keys() == today_grads.keys()
    for k, v in {**terms, **grads}.items():
        assert v == pytest.approx({**today_terms, **today_grads}[k], rel=1e-9), k
    h = {k for k in keys if k.startswith("third_tower.")}
    assert len(h) == 78  # test_vit's 78 tensors, under today's prefix
    assert set(keys) - plain_keys(model_name) - h == THREE_TOWERS_ONLY | (SIGMOID_ONLY if "sigmoid" in model_name
                                                                          else set())

    section = json.loads((_openclip.CONFIG_DIR / f"{model_name}.json").read_text())["three_towers"]
    shared = {k: section.pop(k) for k in ("head_type", "loss_weights", "transfer")}
    as_list = {"towers": [{"name": "third", **section}], **shared}
    assert loss_and_gradients(model_name, h_weights, three_towers=as_list) == (keys, terms, grads)  # bit for bit


def test_two_towers_have_their_own_heads_temperatures_and_outputs():
    torch.manual_seed(0)
    m = open_clip.create_model("3T-tiny-K2", third_tower="random", output_dict=True).train()
    assert m.tower_names == ("vit", "resnet")
    assert {n: type(h.model).__name__ for n, h in m.third_towers.items()} == {"vit": "VisionTransformer",
                                                                                "resnet": "ResNet"}
    # each tower: its module, four heads (h's side reads its own width: 64 for test_vit, 96 for test_resnet)
    for name, width in (("vit", 64), ("resnet", 96)):
        f_h, h_f, g_h, h_g = m.heads(name)
        assert (f_h.in_features, h_f.in_features, g_h.in_features, h_g.in_features) == (32, width, 32, width)
        assert getattr(m, f"{name}_tower") is m.third_towers[name]
    three_t = {k for k in m.state_dict() if not k.startswith(("vit_tower.", "resnet_tower."))} - plain_keys("3T-tiny")
    assert three_t == {f"{head}.{p}" for name in ("vit", "resnet") for head in (f"f_{name}", f"{name}_f", f"g_{name}",
                                                                                  f"{name}_g") for p in ("weight", "bias")
                       } | {f"logit_scale_{side}_{name}" for side in ("image", "text") for name in ("vit", "resnet")}
    images, texts = batch()
    out = m(images, texts)
    assert set(out) == {"image_features", "text_features", "logit_scale"} | {
        key for name in ("vit", "resnet") for side in ("image", "text")
        for key in (f"{side}_{name}_features", f"{name}_{side}_features", f"logit_scale_{side}_{name}")}
    # the tower's side of each term is that tower's embedding through that tower's head
    h = m.encode_third(images, "resnet")
    assert h.shape == (4, 96)
    torch.testing.assert_close(out["resnet_text_features"], F.normalize(m.resnet_g(h), dim=-1))
    torch.testing.assert_close(out["image_vit_features"], F.normalize(m.f_vit(m.encode_image(images)), dim=-1))
    assert not torch.allclose(out["vit_text_features"], out["resnet_text_features"][:, :32])


@pytest.mark.parametrize("sigmoid", [False, True])
def test_gradients_of_two_towers_reach_f_g_every_head_and_temperature_but_no_tower(sigmoid):
    extra = {"init_logit_bias": -10.0} if sigmoid else {}
    torch.manual_seed(0)
    m = open_clip.create_model("3T-tiny-K2", third_tower="random", output_dict=True, **extra).train()
    loss = (ThreeTowersSigLipLoss if sigmoid else ThreeTowersLoss)(towers=m.tower_names)
    images, texts = batch()
    loss(**m(images, texts)).backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    towers = {n for n, _ in m.named_parameters() if n.startswith(("vit_tower.", "resnet_tower."))}
    assert len(towers) > 50 and not any(p.requires_grad or p.grad is not None
                                        for n, p in m.named_parameters() if n in towers)
    assert trained == {n for n, _ in m.named_parameters()} - towers  # everything else: f, g, 8 heads, 5 temperatures
    scales = {f"logit_scale_{side}_{name}" for side in ("image", "text") for name in ("vit", "resnet")}
    assert scales | {"logit_scale", "f_vit.weight", "resnet_g.bias", "visual.conv1.weight"} <= trained
    if sigmoid:
        assert {"logit_bias"} | {s.replace("scale", "bias") for s in scales} <= trained


def test_two_towers_fed_in_one_online_and_the_eval_model_is_plain_clip():
    torch.manual_seed(0)
    online = open_clip.create_model("3T-tiny-K2", third_tower="random", output_dict=True).train()
    images, texts = batch()
    vit = online.encode_third(images, "vit")
    half = open_clip.create_model("3T-tiny-K2", third_tower={"vit": False}, output_dict=True)
    half.load_state_dict({k: v for k, v in online.state_dict().items() if not k.startswith("vit_tower.")})
    assert half.vit_tower is None and half.resnet_tower is not None
    fed, full = half.train()(images, texts, third_embeddings={"vit": vit}), online(images, texts)
    for key, value in full.items():
        torch.testing.assert_close(fed[key], value, msg=key)
    with pytest.raises(RuntimeError, match="without its third tower 'vit'"):
        half(images, texts)
    with pytest.raises(ValueError, match=r"third towers \['vit', 'resnet'\]: name one of them"):
        half(images, texts, third_embeddings=vit)  # a bare tensor names no tower
    with pytest.raises(ValueError, match=r"\['places'\] are not third towers of this model"):
        half(images, texts, third_embeddings={"places": vit})
    online.eval()
    assert set(online(images, texts)) == {"image_features", "text_features", "logit_scale"}  # no tower runs
    plain = open_clip.model.CLIP(**{k: v for k, v in json.loads(
        (_openclip.CONFIG_DIR / "3T-tiny-K2.json").read_text()).items() if k != "three_towers"})
    plain.load_state_dict(open_clip_3t.clip_state_dict(online.state_dict()))  # strict: every tower and head dropped
    torch.testing.assert_close(plain.eval().encode_image(images), online.encode_image(images))


@pytest.mark.parametrize("section, message", [
    ({"towers": [{"timm_model_name": "test_vit", "embed_dim": 64}] * 2}, "give every tower a short name"),
    ({"towers": [{"name": "a", "timm_model_name": "test_vit", "embed_dim": 64}] * 2}, "the tower names ['a', 'a'] repeat"),
    ({"towers": [{"name": "In-21k", "timm_model_name": "test_vit", "embed_dim": 64}]}, "'In-21k' is not a short name"),
    ({"towers": [{"name": n, "timm_model_name": "test_vit", "embed_dim": 64} for n in ("third", "h")]},
     "a tower may not be called 'h' (the heads of a tower N are f_N, N_f, g_N, N_g)"),  # f_h would be third's too
    ({"towers": [{"name": "a", "timm_model_name": "test_vit"}]}, "tower 'a' needs timm_model_name and embed_dim"),
    (k2_section(loss_weights=[1, 1, 1]), "loss_weights has 3 values: give 5, one per term: contrastive_loss, "
                                         "image_vit_loss, text_vit_loss, image_resnet_loss, text_resnet_loss"),
    ({**k2_section(), "weights": "h.pth"}, "lists its towers and also has the tower key(s) ['weights']"),
    ({"towers": [{"name": "a", "timm_model_name": "test_vit", "embed_dim": 64, "head_type": "mlp"}]},
     "unknown key(s) ['head_type'] in the three_towers config section"),
])
def test_bad_tower_lists_are_refused_in_one_line(section, message):
    with pytest.raises(ValueError) as e:
        open_clip.create_model("3T-tiny", three_towers=section)
    assert message in str(e.value) and "\n" not in str(e.value)

