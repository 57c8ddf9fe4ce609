import errno
import json
import os
import pathlib
import stat
import subprocess
import sys

import open_clip
import pytest
import torch

from open_clip_3t import (ThreeTowersCLIP, ThreeTowersCustomTextCLIP, ThreeTowersLoss, ThreeTowersSigLipLoss,
                          clip_state_dict, export_clip)
from open_clip_3t._openclip import read_model_config as model_config
from tests.conftest import REPO, run_python

K2 = "3T-tiny-K2"  # two frozen towers, "vit" (test_vit) and "resnet" (test_resnet)
RELEASE = ["README.md", "open_clip_3t_provenance.json"]  # the model card and the provenance record


def trained_checkpoint(tmp_path, h_weights, ddp_prefix=True, model_name="3T-tiny"):
    """A few optimizer steps of a tiny 3T model, saved the way open_clip_train saves epoch_N.pt (module. prefixes);
    models with init_logit_bias train with the sigmoid loss, as under --siglip."""
    torch.manual_seed(0)
    towers = {"third_tower": "random"} if model_name == K2 else {"third_tower_weights": h_weights}
    model = open_clip.create_model(model_name, output_dict=True, **towers)
    loss = (ThreeTowersSigLipLoss if model.logit_bias is not None else ThreeTowersLoss)(towers=model.tower_names)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    images, texts = torch.randn(8, 3, 32, 32), open_clip.get_tokenizer(model_name)(["a red circle"] * 8)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        loss(**model(images, texts)).backward()
        opt.step()
    model.eval()
    sd = model.state_dict()
    if ddp_prefix:
        sd = {"module." + k: v for k, v in sd.items()}
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "params.txt").write_text(f"lr: 0.001\nmodel: {model_name}\nprecision: fp32\n")
    path = run / "checkpoints" / "epoch_1.pt"
    torch.save({"epoch": 1, "name": "run", "state_dict": sd, "optimizer": opt.state_dict()}, path)
    return model, path


VANILLA = """
import sys, torch, open_clip
m, _, val = open_clip.create_model_and_transforms('local-dir:{out}')
m.eval()
x = torch.load('{inputs}')
texts = open_clip.get_tokenizer('local-dir:{out}')(x['captions'])
with torch.no_grad():
    torch.save({{'image': m.encode_image(x['images'], normalize=True), 'text': m.encode_text(texts, normalize=True),
                'texts': texts, 'scale': m.logit_scale, 'bias': m.logit_bias, 'cls': type(m).__name__,
                'size': val.transforms[0].size, 'plugin': 'open_clip_3t' in sys.modules}}, '{result}')
"""


@pytest.mark.parametrize("model_name, cls", [("3T-tiny", "CLIP"), ("3T-tiny-sigmoid", "CustomTextCLIP"),
                                             ("hf_three_towers", "CustomTextCLIP"), (K2, "CLIP")])
def test_export_round_trip_in_vanilla_openclip(model_name, cls, tmp_path, h_weights, request):
    """The export of each class (CLIP; SigLIP-3T and a Hugging Face text tower: CustomTextCLIP; two frozen towers,
    every one dropped) loads in a process that never imports open_clip_3t with equal image and text features,
    logit_scale and logit_bias."""
    if model_name == "hf_three_towers":
        model_name = request.getfixturevalue("hf_three_towers")
    model, ckpt = trained_checkpoint(tmp_path, h_weights, model_name=model_name)
    out = tmp_path / "released"
    proc = subprocess.run([sys.executable, "-m", "open_clip_3t.export", str(ckpt), "--out", str(out)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert files[:4] == [*RELEASE, "open_clip_config.json", "open_clip_model.safetensors"]  # + the card and record
    assert (len(files) > 4) == ("hf_tokenizer_name" in model_config(model_name)["text_cfg"])  # + tokenizer files
    assert "three_towers" not in json.loads((out / "open_clip_config.json").read_text())["model_cfg"]

    images = torch.randn(3, 3, 32, 32)
    captions = ["a blue square", "two stars", "a dot"]
    torch.save({"images": images, "captions": captions}, tmp_path / "inputs.pt")
    run_python(VANILLA.format(out=out, inputs=tmp_path / "inputs.pt", result=tmp_path / "vanilla.pt"))
    vanilla = torch.load(tmp_path / "vanilla.pt")
    assert vanilla["cls"] == cls and vanilla["plugin"] is False and vanilla["size"] == 32
    texts = open_clip.get_tokenizer(model_name)(captions)
    assert torch.equal(vanilla["texts"], texts)  # the same tokenizer
    with torch.no_grad():
        torch.testing.assert_close(vanilla["image"], model.encode_image(images, normalize=True))
        torch.testing.assert_close(vanilla["text"], model.encode_text(texts, normalize=True))
    assert torch.equal(vanilla["scale"], model.logit_scale.detach())
    if model.logit_bias is None:
        assert vanilla["bias"] is None
    else:
        assert torch.equal(vanilla["bias"], model.logit_bias.detach()) and vanilla["bias"].item() != -10.0  # trained
    # --overwrite recognises the earlier export (its tokenizer files included), and nothing else
    assert export_clip(ckpt, out, overwrite=True) == out and sorted(p.name for p in out.iterdir()) == files
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds notes.txt, which is not an earlier export"):
        export_clip(ckpt, out, overwrite=True)


def test_export_api_takes_a_bare_state_dict(tmp_path, h_weights):
    model, _ = trained_checkpoint(tmp_path, h_weights)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="pass --model 3T-NAME"):
        export_clip(bare, tmp_path / "a")
    out = export_clip(bare, tmp_path / "a", model_name="3T-tiny")
    plain = open_clip.create_model(f"local-dir:{out}")
    assert type(plain) is open_clip.CLIP
    assert torch.equal(plain.visual.conv1.weight, model.visual.conv1.weight)


def export_error(*argv):
    """The error `python -m open_clip_3t.export ARGV` exits with: sys.exit(message), i.e. status 1, the message on
    stderr (in-process: the subprocess test above covers the real exit)."""
    from open_clip_3t.export import main
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    assert isinstance(e.value.code, str) and "\n" not in e.value.code  # exit status 1, one line
    return e.value.code


def test_export_keeps_the_normalisation_the_run_trained_with(tmp_path, h_weights):
    """3T finetuning starts f from h and feeds it h's normalisation (params.txt records it): so does the export."""
    _, ckpt = trained_checkpoint(tmp_path, h_weights)
    default = json.loads((export_clip(ckpt, tmp_path / "a") / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert default["mean"] == list(open_clip.OPENAI_DATASET_MEAN)
    params = ckpt.parent.parent / "params.txt"
    params.write_text(params.read_text() + "image_mean: [0.5, 0.5, 0.5]\nimage_std: [0.25, 0.5, 0.5]\n")
    out = export_clip(ckpt, tmp_path / "b")
    _, _, val = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert tuple(val.transforms[-1].mean) == (0.5, 0.5, 0.5) and tuple(val.transforms[-1].std) == (0.25, 0.5, 0.5)


def test_export_refuses_bad_input_and_never_leaves_half_folders(tmp_path, h_weights):
    _, ckpt = trained_checkpoint(tmp_path, h_weights)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    for overwrite in (False, True):  # --overwrite replaces an earlier export only
        with pytest.raises(FileExistsError, match="holds keep.txt, which is not an earlier export: choose another"):
            export_clip(ckpt, taken, overwrite=overwrite)
    assert (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_clip(tmp_path / "missing.pt", tmp_path / "x")
    plain_sd = tmp_path / "plain.pt"
    torch.save({"logit_scale": torch.tensor(1.0)}, plain_sd)
    with pytest.raises(ValueError, match="not a 3T checkpoint"):
        export_clip(plain_sd, tmp_path / "y", model_name="3T-tiny")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp folders left
    proc = subprocess.run([sys.executable, "-m", "open_clip_3t.export", str(ckpt), "--out", str(taken)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 1 and proc.stderr.strip().startswith("error: export folder") \
        and len(proc.stderr.strip().splitlines()) == 1


def test_overwrite_never_deletes_a_training_run_and_replaces_an_earlier_export(tmp_path, h_weights):
    """Issue 10, item 7: `--overwrite` deleted whatever --out held (a training run's checkpoints)."""
    model, ckpt = trained_checkpoint(tmp_path, h_weights)
    run = ckpt.parent.parent  # holds checkpoints/ and params.txt
    assert export_error(ckpt, "--out", run, "--overwrite") == (
        f"error: export folder {run} holds checkpoints, params.txt, which is not an earlier export: choose another "
        f"--out (--overwrite replaces only a folder written by export)")
    assert ckpt.is_file() and (run / "params.txt").is_file()

    out = export_clip(ckpt, tmp_path / "released")
    with pytest.raises(FileExistsError, match="holds an earlier export: pass --overwrite to replace it"):
        export_clip(ckpt, out)
    with torch.no_grad():
        model.logit_scale.fill_(1.25)
    newer = tmp_path / "newer.pt"
    torch.save(model.state_dict(), newer)
    assert export_clip(newer, out, model_name="3T-tiny", overwrite=True) == out
    assert open_clip.create_model(f"local-dir:{out}").logit_scale.item() == 1.25
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_exported_files_are_readable_by_others(tmp_path, h_weights):
    """Issue 10, item 10: safetensors' writer made open_clip_model.safetensors 0600."""
    _, ckpt = trained_checkpoint(tmp_path, h_weights)
    umask = os.umask(0o022)
    try:
        out = export_clip(ckpt, tmp_path / "released")
    finally:
        os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == {name: 0o644 for name in (*RELEASE, "open_clip_config.json", "open_clip_model.safetensors")}
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_export_errors_are_one_line_with_the_right_advice(tmp_path, h_weights, monkeypatch):
    """Issue 10, items 8 and 9: random bytes as the checkpoint, a plain CLIP checkpoint, an --out that cannot be
    written, an --out that is a mount point."""
    _, ckpt = trained_checkpoint(tmp_path, h_weights)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(4096))
    error = export_error(junk, "--out", tmp_path / "a", "--model", "3T-tiny")
    assert error.startswith(f"error: checkpoint {junk} does not load (") and "weights_only" not in error

    clip_run = tmp_path / "clip_run" / "checkpoints"
    clip_run.mkdir(parents=True)
    (clip_run.parent / "params.txt").write_text("model: 3T-baseline-CLIP-tiny\n")
    torch.save({"epoch": 1, "state_dict": open_clip.create_model("3T-baseline-CLIP-tiny").state_dict()}, clip_run / "epoch_1.pt")
    error = export_error(clip_run / "epoch_1.pt", "--out", tmp_path / "b")
    assert "it is not a 3T checkpoint, and a plain CLIP checkpoint needs no export (load it with " \
           "open_clip.create_model_and_transforms('3T-baseline-CLIP-tiny'" in error
    assert "pass the --model the checkpoint was trained with" not in error

    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "mkdir", read_only)
        with pytest.raises(ValueError, match=r"^cannot write --out .*/c \(Read-only file system\): choose a folder"):
            export_clip(ckpt, tmp_path / "c")
    assert not (tmp_path / "c").exists() and not list(tmp_path.glob(".*"))

    mount = tmp_path / "mount"  # a mount point cannot be renamed: the files are renamed into it instead
    mount.mkdir()
    with monkeypatch.context() as m:
        m.setattr(os.path, "ismount", lambda path: str(path) == str(mount))
        assert export_clip(ckpt, mount) == mount
    assert sorted(p.name for p in mount.iterdir()) == [*RELEASE, "open_clip_config.json",
                                                         "open_clip_model.safetensors"]
    assert not list(tmp_path.glob(".*"))
    assert type(open_clip.create_model(f"local-dir:{mount}")) is open_clip.CLIP


@pytest.mark.parametrize("model_name, cls", [("3T-tiny", ThreeTowersCLIP),
                                             ("3T-tiny-sigmoid", ThreeTowersCustomTextCLIP)])
def test_create_model_loads_a_full_3t_checkpoint_without_refetching_h(model_name, cls, tmp_path, h_weights,
                                                                      monkeypatch):
    model, ckpt = trained_checkpoint(tmp_path, h_weights, model_name=model_name)
    import timm.models._builder as builder
    monkeypatch.setattr(builder, "load_pretrained", lambda *a, **k: pytest.fail("h weights fetched again"))
    loaded = open_clip.create_model(model_name, pretrained=str(ckpt))
    assert type(loaded) is cls and loaded.third_tower is not None
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, reference[k]), k


@pytest.mark.parametrize("model_name", ["3T-tiny", "3T-tiny-sigmoid"])
def test_f_and_g_initialise_from_a_plain_checkpoint(model_name, tmp_path, h_weights):
    model, ckpt = trained_checkpoint(tmp_path, h_weights, model_name=model_name)
    out = export_clip(ckpt, tmp_path / "clip")
    torch.manual_seed(1)
    fresh = open_clip.create_model(model_name, third_tower_weights=h_weights)
    torch.manual_seed(1)
    init = open_clip.create_model(model_name, pretrained=str(out / "open_clip_model.safetensors"),
                                  third_tower_weights=h_weights)
    plain = clip_state_dict(model.state_dict())
    assert {"visual.conv1.weight", "logit_scale"} <= plain.keys()
    assert ("logit_bias" in plain) == (model_name == "3T-tiny-sigmoid")
    for k, v in clip_state_dict(init.state_dict()).items():  # f, g, logit_scale (and logit_bias): the checkpoint's
        assert torch.equal(v, plain[k]), k
    assert torch.equal(init.f_h.weight, fresh.f_h.weight)  # heads stay new
    assert not torch.equal(init.f_h.weight, model.f_h.weight)
    wrong = tmp_path / "wrong.pt"
    torch.save({"visual.conv1.weight": torch.zeros(1), "logit_scale": torch.tensor(1.0)}, wrong)
    with pytest.raises((ValueError, RuntimeError)):
        open_clip.create_model(model_name, pretrained=str(wrong))


def test_a_3t_checkpoint_loads_without_h_and_h_loads_beside_a_cache_trained_checkpoint(tmp_path, h_weights):
    model, ckpt = trained_checkpoint(tmp_path, h_weights)
    no_h = open_clip.create_model("3T-tiny", pretrained=str(ckpt), third_tower=False)
    assert no_h.third_tower is None and torch.equal(no_h.f_h.weight, model.f_h.weight)
    # a checkpoint trained from cached embeddings has no h: h then comes from its own weights file
    cache_trained = tmp_path / "cache_trained.pt"
    torch.save(no_h.state_dict(), cache_trained)
    with_h = open_clip.create_model("3T-tiny", pretrained=str(cache_trained), third_tower_weights=h_weights)
    assert torch.equal(with_h.h_g.weight, model.h_g.weight)
    assert torch.equal(with_h.third_tower.model.blocks[0].mlp.fc1.weight, model.third_tower.model.blocks[0].mlp.fc1.weight)


def test_two_tower_checkpoint_round_trip_and_evaluator(tmp_path, monkeypatch):
    """pretrained= a K = 2 checkpoint restores every tensor, both towers included (rebuilt without reading weights);
    a checkpoint trained with one tower cached lacks that tower, which is then not built; the evaluator loads f and g
    of either."""
    from training.eval import ModelSpec, load_model
    model, ckpt = trained_checkpoint(tmp_path, None, model_name=K2)
    import timm.models._builder as builder
    monkeypatch.setattr(builder, "load_pretrained", lambda *a, **k: pytest.fail("a tower's weights were fetched"))
    loaded = open_clip.create_model(K2, pretrained=str(ckpt))
    reference = model.state_dict()
    assert loaded.state_dict().keys() == reference.keys()
    assert sum(k.startswith(("vit_tower.", "resnet_tower.")) for k in reference) > 100
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, reference[k]), k
    half = {k: v for k, v in reference.items() if not k.startswith("vit_tower.")}  # vit trained from its cache
    torch.save(half, tmp_path / "half.pt")
    from_half = open_clip.create_model(K2, pretrained=str(tmp_path / "half.pt"))
    assert from_half.vit_tower is None and from_half.resnet_tower is not None
    assert from_half.state_dict().keys() == half.keys()
    images = torch.randn(2, 3, 32, 32)
    for path in (ckpt, tmp_path / "half.pt"):
        evaluated, _, _ = load_model(ModelSpec("k2", K2, str(path)), "cpu", "fp32")
        assert all(h is None for h in evaluated.third_towers.values())
        with torch.no_grad():
            torch.testing.assert_close(evaluated.encode_image(images), model.encode_image(images), rtol=0, atol=0)

    # --third-tower-pair NAME: that tower's pair h_g(h(I)), g_h(g(T)) with the temperature of its L(g_h, h_g)
    from training.eval import eval_plan
    from training.metrics import ThirdTowerPair
    spec = ModelSpec("k2", K2, str(ckpt))
    plan = eval_plan(spec, None, "resnet")
    assert plan.model_kwargs()["third_tower"] == {"vit": False, "resnet": "random"}  # only that tower, from the checkpoint
    assert plan.tower("resnet").source == "checkpoint" and plan.tower("vit").source == "none"
    with pytest.raises(ValueError, match=r"--third-tower-pair: this 3T model has the third towers \['vit', "
                                         r"'resnet'\]: name one of them"):
        eval_plan(spec, None, True)
    with_resnet, _, _ = load_model(spec, "cpu", "fp32", plan)
    pair = ThirdTowerPair(with_resnet)
    assert pair.tower == "resnet" and with_resnet.vit_tower is None
    assert torch.equal(pair.logit_scale, reference["logit_scale_text_resnet"])
    texts = open_clip.get_tokenizer(K2)(["a red circle", "two stars"])
    with torch.no_grad():
        h = model.encode_third(images, "resnet")
        torch.testing.assert_close(pair.encode_image(images), model.resnet_g(h), rtol=0, atol=0)
        torch.testing.assert_close(pair.encode_text(texts), model.g_resnet(model.encode_text(texts)), rtol=0, atol=0)
