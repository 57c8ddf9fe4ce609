"""The package's shape: one resolved plan per run (open_clip_3t/plan.py) for every family, OpenCLIP's names kept, the
library free of the trainer, one reader of the 3T section, files that fit a few screens, README listing every config."""
import json
import re
from pathlib import Path

import pytest
import timm
import torch

from open_clip_3t import cache
from open_clip_3t.toy.synthetic import write_shards
from tests.conftest import REPO, run_python
from training.params import parse_args


def plan_of(*argv):
    return parse_args(["--model", *argv]).run_plan


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    torch.manual_seed(5)
    path = tmp_path_factory.mktemp("resnet") / "test_resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=0).state_dict(), path)
    return str(path)


def test_plan_of_the_clip_baseline():
    plan = plan_of("3T-baseline-CLIP-tiny")
    assert (plan.family, plan.loss, plan.towers, plan.section, plan.cached) == ("clip", "softmax", (), None, ())
    assert plan.model_kwargs() == {} and plan.model_cfg["text_cfg"]["layers"] == 1


def test_plan_of_lit(h_weights):
    plan = plan_of("3T-baseline-LiT-tiny", "--lock-image", "--image-tower-weights", h_weights)
    assert (plan.family, plan.image_tower_weights, plan.towers) == ("lit", h_weights, ())
    assert plan.model_cfg["vision_cfg"]["timm_model_name"] == "test_vit"


def test_plan_of_3t_online(h_weights):
    plan = plan_of("3T-tiny", "--third-tower-weights", h_weights)
    assert (plan.family, plan.loss, plan.tower_names, plan.cached, plan.built) == (
        "3t", "softmax", ("third",), (), ("third",))
    h = plan.tower()
    assert (h.source, h.build, h.cfg.weights, h.cfg.timm_model_name, h.cache) == ("file", True, h_weights, "test_vit",
                                                                                  None)
    assert (plan.loss_weights, plan.transfer, plan.section.head_type) == ((1.0, 1.0, 1.0), "contrastive", "linear")
    assert plan.model_kwargs()["third_tower"] == {"third": True}
    assert str(plan) == (f"3t softmax 3T-tiny; towers: third: test_vit from file {h_weights} (built); loss weights "
                         f"[1.0, 1.0, 1.0], transfer contrastive, heads linear; precision amp")


def test_plan_of_sigmoid_3t_with_every_loss_choice(h_weights):
    plan = plan_of("3T-tiny-sigmoid", "--siglip", "--third-tower-weights", h_weights, "--precision", "fp32",
                   "--third-tower-loss-weights", "1", "0", "1", "--third-tower-transfer", "l2",
                   "--third-tower-head", "mlp")
    assert (plan.family, plan.loss, plan.precision) == ("3t", "sigmoid", "fp32")
    assert (plan.loss_weights, plan.transfer, plan.section.head_type) == ((1.0, 0.0, 1.0), "l2", "mlp")
    assert plan.model_cfg["init_logit_bias"] == -10


def test_plan_of_two_towers(h_weights, resnet_weights):
    plan = plan_of("3T-tiny-K2", "--third-tower-weights", f"vit={h_weights}", f"resnet={resnet_weights}")
    assert plan.tower_names == ("vit", "resnet") and len(plan.loss_weights) == 5
    assert [(t.source, t.build, t.cfg.weights) for t in plan.towers] == [("file", True, h_weights),
                                                                          ("file", True, resnet_weights)]
    assert plan.tower("resnet").cfg.embed_dim == 96


def test_plan_of_cached_and_online_fallback(tmp_path, h_weights):
    shards = write_shards(str(tmp_path / "data"), num_samples=8, samples_per_shard=4, seed=0, image_size=32)
    cache.build(shards[0], "3T-tiny", str(tmp_path / "cache"), h_weights, batch_size=4, workers=0, quiet=True)
    common = ["3T-tiny", "--third-tower-weights", h_weights, "--third-tower-cache", str(tmp_path / "cache"),
              "--train-data", shards[0]]
    plan = plan_of(*common)
    h = plan.tower()
    assert (plan.cached, plan.built, h.source, h.build, h.cache) == (("third",), (), "cache", False,
                                                                      str(tmp_path / "cache"))
    assert (h.cache_facts["samples"], h.cache_facts["shards"], h.cache_facts["dtype"]) == (4, 1, "float16")
    assert plan.model_kwargs()["third_tower"] == {"third": False}  # h is not built: its cache replaces it
    online = plan_of(*common, "--third-tower-cache-missing", "online")
    assert (online.cache_missing, online.built, online.tower().source) == ("online", ("third",), "cache")


def test_one_place_decides_where_a_tower_comes_from(tmp_path, h_weights):
    """resolve_plan's decisions as create_model, evaluation and a full 3T checkpoint ask them."""
    from open_clip_3t import resolve_plan
    assert resolve_plan("3T-tiny").tower().source == "random"  # test_vit has no hub weights: asked for nothing
    assert resolve_plan("3T-ViT-B-16").tower().source == "hub"
    assert resolve_plan("3T-tiny", third_tower_weights=h_weights).tower().source == "file"
    assert resolve_plan("3T-tiny", build_by_default=False).tower().source == "none"
    held = resolve_plan("3T-tiny-K2", checkpoint_towers=["resnet"], build_by_default=False)
    assert [(t.source, t.build) for t in held.towers] == [("none", False), ("checkpoint", "random")]
    asked = resolve_plan("3T-tiny-K2", third_tower={"vit": False}, checkpoint_head_type="mlp")
    assert [t.source for t in asked.towers] == ["none", "random"] and asked.section.head_type == "mlp"


def test_openclip_names_keep_their_signatures_and_docstrings():
    describe = ("import inspect, open_clip{}\n"
                "for f in (open_clip.create_model, open_clip.create_loss, open_clip.factory.create_model,\n"
                "          open_clip.get_tokenizer, open_clip.factory.get_tokenizer):\n"
                "    print(f.__name__, f.__module__, inspect.signature(f), repr(f.__doc__))")
    plain = run_python(describe.format(""))
    ours = run_python(describe.format(", open_clip_3t"))
    assert ours == plain and "model_name: str" in plain
    wrapped = run_python("import open_clip, open_clip_3t, open_clip_3t._openclip as s\n"
                         "print(open_clip.create_model.__wrapped__ is s.ORIGINAL['create_model'],"
                         " open_clip.create_loss.__wrapped__ is s.ORIGINAL['create_loss'],"
                         " open_clip.get_tokenizer.__wrapped__ is s.ORIGINAL['get_tokenizer'],"
                         " type(open_clip.create_model('3T-tiny')).__name__)")
    assert wrapped.split() == ["True", "True", "True", "ThreeTowersCLIP"]


def test_the_library_never_imports_the_trainer():
    loaded = run_python("import sys, open_clip_3t, open_clip_3t.export, open_clip_3t.cache.cli, open_clip_3t.plan\n"
                        "print(sorted(m for m in sys.modules if m.startswith(('open_clip_train', 'training'))))")
    assert loaded.strip() == "[]"
    imports = re.compile(r"^\s*(?:from|import)\s+(open_clip_train|training)\b", re.M)
    assert not [p for p in Path(REPO, "open_clip_3t").rglob("*.py") if imports.search(p.read_text())]


def test_the_three_towers_section_is_read_in_two_places():
    calls = [f"{p.relative_to(REPO)}" for folder in ("open_clip_3t", "training") for p in Path(REPO, folder).rglob("*.py")
             for line in p.read_text().splitlines()
             if "read_three_towers_section(" in line and not line.lstrip().startswith("def ")]
    assert sorted(calls) == ["open_clip_3t/factory.py", "open_clip_3t/plan.py"]


def test_every_module_fits_a_few_screens():
    sizes = {str(p.relative_to(REPO)): len(p.read_text().splitlines())
             for folder in ("open_clip_3t", "training") for p in Path(REPO, folder).rglob("*.py")}
    assert len(sizes) > 20 and {name: n for name, n in sizes.items() if n > 400} == {}


def test_no_test_hooks_in_the_package():
    hooks = re.compile(r"_TEST_KILL|kill_midway|os\.kill\(os\.getpid")
    assert not [p for folder in ("open_clip_3t", "training") for p in Path(REPO, folder).rglob("*.py")
                if hooks.search(p.read_text())]


def test_readme_lists_every_config_the_plugin_registers():
    added = json.loads(run_python("import json, open_clip\nplain = set(open_clip.list_models())\nimport open_clip_3t\n"
                                  "print(json.dumps(sorted(set(open_clip.list_models()) - plain)))"))
    readme = Path(REPO, "README.md").read_text()
    section = readme[readme.index("## Model configs"):readme.index("## Versions")]
    listed = re.findall(r"^\| `([^`]+)` \|", section, flags=re.M)
    assert listed and sorted(listed) == added and all(name.startswith("3T-") for name in added)
