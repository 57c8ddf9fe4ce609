"""scripts/replicate.py's table of named runs, its protocol guard, and the diagnostics (no training here: the
quickstart test trains through the same functions)."""
import importlib.util
import os

import numpy as np
import pandas as pd
import pytest
import timm
import torch

from open_clip_3t.toy import experiments as ex
from open_clip_3t.toy.diagnostics import duplicate_rate
from open_clip_3t.toy.synthetic import write_classification_folder, write_shards
from tests.conftest import REPO
from training.params import parse_args

spec = importlib.util.spec_from_file_location("replicate", os.path.join(REPO, "scripts", "replicate.py"))
replicate = importlib.util.module_from_spec(spec)
spec.loader.exec_module(replicate)


def test_every_run_is_a_valid_training_command(tmp_path):
    """Each named run's training.main command passes training.main's own checks (run folders are distinct)."""
    assert len({replicate.slug(name) for name in replicate.RUNS}) == len(replicate.RUNS)
    write_shards(str(tmp_path / "val"), 4, samples_per_shard=4, split="val", image_size=32)
    data = {"train_spec": str(tmp_path / "val" / "00000.tar"), "val_spec": str(tmp_path / "val" / "00000.tar"),
            "zeroshot": [write_classification_folder(str(tmp_path / a), a, 1, seed=0, image_size=32)
                         for a in ex.EVAL_ATTRIBUTES]}
    weights = tmp_path / "h.pth"  # every tower is timm's test_resnet, as the toy's pretraining makes it
    torch.save(timm.create_model(ex.H_ARCH, num_classes=7).state_dict(), weights)
    for name, run in replicate.RUNS.items():
        towers = replicate.towers_of(run)
        assert run.kind in ex.MODELS and all(t in ex.TOWERS for t in towers), name
        named = {t: str(weights) for t in towers} if len(towers) > 1 else str(weights)
        cmd = ex.train_command(tmp_path / "logs", replicate.slug(name), run.kind, data, ex.SCALES["default"], 0,
                               weights=named, extra=run.flags, model=run.model, lock_image=run.lock_image)
        assert cmd[1:3] == ["-m", "training.main"]
        args = parse_args(cmd[3:])  # exits on a bad flag combination
        assert args.epochs == 4 and args.zeroshot_frequency == args.val_frequency == 1, name
        assert args.lock_image == (run.kind == "LiT" and run.lock_image), name
    finetuning = parse_args(ex.train_command(tmp_path, "ft", "3T", data, ex.SCALES["default"], 0, str(weights),
                                             extra=replicate.RUNS["3T (broad h) finetuning"].flags,
                                             model="3T-mini-timm")[3:])
    assert finetuning.third_tower_init_image


def test_the_two_tower_row_reads_each_towers_own_cache(tmp_path):
    """3T (shape + colour h): 3T-mini-K2 (3T-mini's f and g) with its towers named after experiments.TOWERS, each
    given its own weights file and the cache its single-tower row reads; the single-tower rows keep bare paths."""
    rep = replicate.Replication(tmp_path, ex.SCALES["tiny"], [0])
    rep.towers = {t: f"/w/h_{t}.pth" for t in ex.TOWERS}
    rep.caches = {t: f"/c/cache_{t}" for t in ex.TOWERS}
    both = replicate.RUNS["3T (shape + colour h)"]
    weights, cache = rep.tower_inputs(both)
    assert weights == {"shape": "/w/h_shape.pth", "colour": "/w/h_colour.pth"}
    assert cache == {"shape": "/c/cache_shape", "colour": "/c/cache_colour"}
    assert rep.tower_inputs(replicate.RUNS["3T (shape h)"]) == ("/w/h_shape.pth", "/c/cache_shape")
    assert rep.tower_inputs(replicate.RUNS["3T (colour h)"]) == ("/w/h_colour.pth", "/c/cache_colour")
    assert rep.tower_inputs(replicate.RUNS["LiT (broad h)"]) == ("/w/h_broad.pth", None)
    assert rep.tower_inputs(replicate.RUNS["3T (broad h) h online"]) == ("/w/h_broad.pth", None)
    assert rep.tower_inputs(replicate.RUNS["CLIP"]) == (None, None)

    data = {"train_spec": "/d/{0..7}.tar", "val_spec": "/d/val.tar", "zeroshot": ["/d/shape", "/d/colour"]}
    cmd = ex.train_command(tmp_path, "k2", both.kind, data, ex.SCALES["default"], 0, weights, cache, both.flags,
                           both.model)
    i, j, k = cmd.index("--model"), cmd.index("--third-tower-weights"), cmd.index("--third-tower-cache")
    assert cmd[i + 1] == "3T-mini-K2"
    assert cmd[j:k + 3] == ["--third-tower-weights", "shape=/w/h_shape.pth", "colour=/w/h_colour.pth",
                            "--third-tower-cache", "shape=/c/cache_shape", "colour=/c/cache_colour"]
    assert len(cmd) == k + 3  # nothing after the caches
    # 3T-mini-K2: 3T-mini's f and g, both towers 3T-mini's tower (test_resnet, 96-d) named shape and colour
    from open_clip_3t._openclip import read_model_config as model_config
    mini, k2 = model_config("3T-mini"), model_config("3T-mini-K2")
    assert {k: v for k, v in mini.items() if k != "three_towers"} == {k: v for k, v in k2.items() if k != "three_towers"}
    tower = {k: v for k, v in mini["three_towers"].items() if k not in ("head_type", "loss_weights", "transfer")}
    assert k2["three_towers"]["towers"] == [{"name": "shape", **tower}, {"name": "colour", **tower}]
    assert k2["three_towers"]["loss_weights"] == [1.0] * 5


def test_protocol_guard(tmp_path):
    ex.check_protocol(tmp_path, ex.SCALES["tiny"])
    ex.check_protocol(tmp_path, ex.SCALES["tiny"])  # same protocol: fine
    with pytest.raises(SystemExit, match=r"another protocol \(scale differs in \['batch_size', 'epochs'"):
        ex.check_protocol(tmp_path, ex.SCALES["default"])


def test_mean_std_over_seeds():
    runs = pd.DataFrame({"run": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0], "x": [1.0, 2.0, 6.0, 4.0],
                         "train s": [1, 2, 3, 4]})
    assert replicate.mean_std(runs, "run").to_dict("list") == {"run": ["a", "b"], "seeds": [3, 1],
                                                                 "x": ["3.0 ± 2.6", "4.0"]}  # one seed: no spread


def test_duplicate_rate_by_hand():
    e = np.eye(8, dtype=np.float32)
    e[1] = e[0] + 0.01 * e[5]  # cos(e0, e1) = 0.99995: twins
    e[2] = e[0] + 0.2 * e[5]   # cos(e0, e2) = 0.98: not twins; cos(e1, e2) = 0.983
    assert duplicate_rate(e, batch_size=8) == {"twin pairs per batch": 1.0, "samples with a twin (%)": 25.0}
    assert duplicate_rate(np.eye(8), batch_size=4) == {"twin pairs per batch": 0.0, "samples with a twin (%)": 0.0}
    assert duplicate_rate(np.ones((9, 3)), batch_size=4)["twin pairs per batch"] == 6.0  # 2 full batches of 4


def test_online_minus_cache_is_paired_by_seed():
    runs = pd.DataFrame({"run": ["on", "off", "on", "off", "on", "off", "other"], "seed": [0, 0, 1, 1, 2, 2, 0],
                         "x": [5.0, 1.0, 4.0, 2.0, 9.0, 3.0, 7.0], "train s": [1] * 7})
    diff = replicate.paired_difference(runs, "on", "off")  # per seed: 4, 2, 6
    assert diff.to_dict("list") == {"run": ["on minus off"], "seeds": [3], "x": ["4.0 ± 2.0"]}
    assert replicate.paired_difference(runs, "on", "missing") is None


def test_claims_judged_by_the_protocol_rule():
    from open_clip_3t.toy import claims

    def row(run, seed, shape, colour, r1):
        return {"run": run, "seed": seed, "shape top-1": shape, "colour top-1": colour, "I→T R@1": r1,
                "T→I R@1": r1 + 2, "I→T R@5": 0.0, "T→I R@5": 0.0, "train s": 1.0}
    runs = pd.DataFrame([row("CLIP", s, 20 + s, 90.0 + s, 30.0 + s) for s in range(3)]
                        + [row("3T (weak h)", s, 21 + s, 95.0 + s, 25.0 + 3 * s) for s in range(3)])
    verdicts = claims.judge(runs).set_index("metric")
    assert set(verdicts["claim"]) == {"3T beats the from-scratch CLIP"}  # only claims whose two rows ran
    # shape: +1.0 with margin 1.0 (not >): within noise; colour: +5 > 1: A beats B; mean R@1: 26+3s-(31+s):
    # means 29 vs 32, diff -3, margin std(26,29,32)=3: within noise
    assert verdicts.loc["shape top-1", "verdict"] == "within noise" and verdicts.loc["shape top-1", "A - B"] == 1.0
    assert verdicts.loc["colour top-1", "verdict"] == "A beats B"
    assert verdicts.loc["mean R@1", "A mean ± std"] == "29.0 ± 3.0" and verdicts.loc["mean R@1", "verdict"] == "within noise"
    two_seeds = claims.judge(runs[runs["seed"] < 2]).set_index("claim")  # the rule needs all three seeds
    assert two_seeds.loc["3T beats the from-scratch CLIP", "verdict"] == "not judged yet: 2 and 2 of 3 seeds"
    runs.loc[(runs["run"] == "3T (weak h)"), "I→T R@1"] = [10.0, 11.0, 12.0]
    assert claims.judge(runs).set_index("metric").loc["mean R@1", "verdict"] == "B beats A"

    combos = pd.DataFrame([{"pair": "3T (weak h) + LiT", "a": a, "seed": s, **row("", s, v + s, v, v)}
                           for s in range(3) for a, v in ((0.0, 10.0), (0.5, 14.0), (0.75, 11.0), (1.0, 12.0))])
    mixed = claims.judge(runs, combos.drop(columns="run")).query("claim == 'the combination beats both models'")
    shape = mixed.set_index("metric").loc["shape top-1"]
    assert (shape["A"], shape["B"], shape["A - B"], shape["verdict"]) == ("a=0.5", "a=1", 2.0, "A beats B")


def test_report_only_tables_the_finished_runs_and_trains_nothing(tmp_path, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("--report-only trained or evaluated")
    monkeypatch.setattr(replicate.Replication, "prepare", lambda self, runs: setattr(self, "caches", {}))
    monkeypatch.setattr(replicate.Replication, "towers_table", lambda self: pd.DataFrame({"tower": []}))
    monkeypatch.setattr(replicate.Replication, "plot_curves", lambda self, runs: None)
    monkeypatch.setattr(ex, "train", no_work)
    monkeypatch.setattr(ex, "evaluate", no_work)
    metrics = {"shape top-1": 20.0, "colour top-1": 90.0, "I→T R@1": 30.0, "T→I R@1": 32.0, "I→T R@5": 80.0,
               "T→I R@5": 81.0}
    finished = [("CLIP", s) for s in range(3)] + [("SigLIP", s) for s in range(2)]  # SigLIP: seed 2 not run yet
    for run, seed in finished:
        ex.write_json(tmp_path / "eval" / f"seed{seed}" / f"{replicate.slug(run)}.json",
                      {"run": run, "seed": seed, **{k: v + seed for k, v in metrics.items()}, "train s": 1.0})
    replicate.main(["--out", str(tmp_path), "--report-only"])
    table = pd.read_csv(tmp_path / "replication.csv").set_index("run")
    assert table["seeds"].to_dict() == {"CLIP": 3, "SigLIP": 2}
    assert table.loc["CLIP", "shape top-1"] == "21.0 ± 1.0" and table.loc["SigLIP", "shape top-1"] == "20.5 ± 0.7"
    assert len(pd.read_csv(tmp_path / "runs.csv")) == 5


def test_terms_at_the_end_are_each_seeds_last_logged_step(tmp_path):
    """The diagnosis table: a 3T row's three terms (L, as logged) and temperatures at its last step, per
    seed; a CLIP row and the two-tower row are not in it; a term the row drops is left empty, not zero."""
    from tests.test_curves import LINES_3T, write_run
    rep = replicate.Replication(tmp_path, ex.SCALES["tiny"], [0, 1])
    for seed in (0, 1):
        for name, params in (("3T (weak h)", ""), ("3T (weak h) without L(f_h,h_f)",
                                                   "third_tower_loss_weights: [1.0, 0.0, 1.0]\n"), ("CLIP", "")):
            write_run(rep.run_dir(seed, name), LINES_3T, params)
            rep.checkpoint(seed, name).touch()
    terms = rep.terms_table(list(replicate.RUNS))
    assert sorted(set(terms["run"])) == ["3T (weak h)", "3T (weak h) without L(f_h,h_f)"] and len(terms) == 4
    last = terms[terms["run"] == "3T (weak h)"].iloc[0]  # LINES_3T's last step: L = 0.5, 0.75, 0.25
    assert (last["L(f,g)"], last["L(f_h,h_f)"], last["L(g_h,h_g)"]) == pytest.approx((0.5, 0.75, 0.25))
    assert (last["s of L(f,g)"], last["s of L(f_h,h_f)"], last["s of L(g_h,h_g)"]) == (20.5, 9.75, 30.0)
    table = replicate.mean_std(terms, "run", digits=2).set_index("run")
    assert table.loc["3T (weak h)", "L(f_h,h_f)"] == "0.75 ± 0.00"
    assert table.loc["3T (weak h) without L(f_h,h_f)", "L(f_h,h_f)"] == ""


def test_centroid_probe_by_hand():
    from open_clip_3t.toy.diagnostics import centroid_probe
    # two classes on two axes: every held-out point is nearest its own centroid
    x = torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.9, 0.0], [1.1, 0.05],
                      [0.1, 1.0], [-0.1, 1.0], [0.0, 0.9], [0.05, 1.1]])
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    assert centroid_probe(x, y, folds=4) == 100.0
    assert centroid_probe(x, 1 - y, folds=4) == 100.0  # label values do not matter, only the grouping
    # features that carry no class: the point (0, 1) is in both classes, so one of each pair is always wrong
    same = torch.tensor([[0.0, 1.0]] * 8)
    assert centroid_probe(same, y, folds=4) == 50.0  # argmax of equal scores picks the first class: right 4 of 8


def test_probe_reads_the_runs_own_model_and_keeps_its_row(tmp_path):
    """Replication.probe: the checkpoint's image tower (model named by the run's params.txt) on each zero-shot
    folder, equal to centroid_probe of encode_image on the same images; the row is kept and read back."""
    import open_clip
    from torchvision.datasets import ImageFolder

    from open_clip_3t.toy.diagnostics import centroid_probe
    rep = replicate.Replication(tmp_path, ex.SCALES["tiny"], [0])
    rep.data = {"zeroshot": [write_classification_folder(str(tmp_path / a), a, 5, seed=0, image_size=32)
                             for a in ex.EVAL_ATTRIBUTES]}
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("3T-baseline-CLIP-tiny")
    checkpoint = rep.checkpoint(0, "CLIP")
    checkpoint.parent.mkdir(parents=True)
    torch.save({"state_dict": model.state_dict()}, checkpoint)
    (checkpoint.parent.parent / "params.txt").write_text("model: 3T-baseline-CLIP-tiny\n")
    row = rep.probe(0, "CLIP")
    model.eval()
    for folder in rep.data["zeroshot"]:
        images = ImageFolder(folder, transform=preprocess)
        with torch.no_grad():
            features = model.encode_image(torch.stack([image for image, _ in images]))
        assert row[f"{os.path.basename(folder)} probe"] == centroid_probe(features, torch.tensor(images.targets))
    assert set(row) == {"run", "seed"} | {f"{a} probe" for a in ex.EVAL_ATTRIBUTES}
    checkpoint.unlink()  # read back from OUT/eval/seed0/probe/CLIP.json, not recomputed
    assert rep.probe(0, "CLIP") == row


def test_centroid_probe_keeps_a_centroid_for_every_class():
    """Two samples per class and five folds asked: two stratified folds, so no class is ever without a centroid; a
    class of one sample is refused in one line."""
    from open_clip_3t.toy.diagnostics import centroid_probe
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0], [-0.9, -0.1]])
    assert centroid_probe(x, torch.tensor([0, 0, 1, 1, 2, 2]), folds=5) == 100.0
    with pytest.raises(ValueError, match="class 2 has one sample"):
        centroid_probe(x[:5], torch.tensor([0, 0, 1, 1, 2]))
