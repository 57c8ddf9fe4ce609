"""scripts/gpu_check.sh, the one GPU check of issue 13, run here tiny on CPU (GPU_CHECK_TINY=1: 3T-tiny, 3T-baseline-CLIP-tiny,
gloo): a complete run writes a report holding every figure and target; a failing step exits non-zero, names the step
and leaves no report (not even an earlier run's)."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

STEPS = ["environment", "data", "step_benchmark", "cache_benchmark", "train_3t", "export", "reload", "train_clip"]
VARIANTS = {"clip", "3t-fed", "3t-online", "3t-k2-fed", "distill", "siglip", "siglip-3t-fed", "siglip-3t-online",
            "h-forward"}


def gpu_check(out, work, **env):
    return subprocess.run([os.path.join(REPO, "scripts", "gpu_check.sh"), str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "PYTHON": sys.executable, **env})


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_check")
    return root / "out", gpu_check(root / "out", root / "work", GPU_CHECK_TINY="1")


def test_tiny_cpu_check_writes_a_complete_report(tiny_run):
    out, proc = tiny_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == ["logs", "report.json", "report.md"]
    assert sorted(os.listdir(out / "logs")) == sorted(f"{step}.log" for step in STEPS)
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and report["mode"] == "tiny-cpu"
    assert [s["step"] for s in report["steps"]] == STEPS
    f = report["figures"]

    # 1. the step benchmark: every variant timed and measured; the ratios are those of the times and peaks
    bench = f["step_benchmark"]
    times, peaks = bench["median_step_s"], bench["step_peak_bytes"]
    assert set(times) == set(peaks) == VARIANTS and all(t > 0 for t in times.values())
    assert (bench["model"], bench["batch_size"], bench["precision"]) == ("3T-tiny", 8, "fp32")
    assert bench["fed_over_clip"] == pytest.approx(times["3t-fed"] / times["clip"])
    assert bench["online_over_clip_plus_h"] == pytest.approx(times["3t-online"] / (times["clip"] + times["h-forward"]))
    assert bench["siglip_online_over_siglip_plus_h"] == pytest.approx(
        times["siglip-3t-online"] / (times["siglip"] + times["h-forward"]))
    assert bench["step_peak_over_base"]["3t-online"] == pytest.approx(peaks["3t-online"] / peaks["clip"])
    assert bench["step_peak_over_base"]["siglip-3t-fed"] == pytest.approx(peaks["siglip-3t-fed"] / peaks["siglip"])

    # 2. the cache build: every generated sample embedded; per-worker figures are the totals over the workers
    cache = f["cache_benchmark"]
    assert cache["samples"] == f["data"]["samples"] == 4 * 16 and f["data"]["shards"] == 4  # 2 per decode worker
    assert f["data"]["train_samples"] == 4 * 8
    assert set(cache["decode_samples_per_s"]) == {"1", "2"} and cache["workers"] == 2
    assert cache["decode_samples_per_s_per_worker"]["2"] == pytest.approx(cache["decode_samples_per_s"]["2"] / 2,
                                                                          abs=0.1)
    assert cache["predicted_build_samples_per_s"] == pytest.approx(
        min(2 * cache["decode_samples_per_worker_cpu_s"]["1"], cache["h_inference_samples_per_s"]), abs=0.2)

    # 3. training, export, reload: 4 steps each; samples/s from the median step; vanilla OpenCLIP's features equal
    for name in ("train_3t", "train_clip"):
        run = f[name]
        assert run["steps"] == 4 and run["world_size"] == 1
        assert run["samples_per_s"] == pytest.approx(8 / run["median_step_s"])
    assert f["train_3t"]["checkpoint_bytes"] > 0
    assert f["export"]["files"] == ["README.md", "open_clip_3t_provenance.json", "open_clip_config.json",
                                    "open_clip_model.safetensors"]  # the model card and provenance (docs/release.md)
    assert f["export"]["third_tower_built"] is False  # trained from the cache: h is not in the checkpoint
    assert (f["reload"]["class"], f["reload"]["plugin_imported"], f["reload"]["equal"]) == ("CLIP", False, True)

    # the targets: each value is its figures' ratio; passed says whether it meets the issue's limit
    targets = {t["target"]: t for t in report["targets"]}
    assert len(targets) == 10
    assert targets["3T fed-in / CLIP step time"]["value"] == pytest.approx(bench["fed_over_clip"], abs=1e-4)
    assert targets["cache build / h pure inference samples/s (steady)"]["value"] == pytest.approx(
        cache["build_steady_samples_per_s"] / cache["h_inference_samples_per_s"], abs=2e-3)
    assert targets["3T from the cache / ViT-B-16 training samples/s"]["value"] == pytest.approx(
        f["train_3t"]["samples_per_s"] / f["train_clip"]["samples_per_s"], abs=1e-4)
    for t in targets.values():
        assert t["passed"] == (t["value"] <= t["limit"] if t["kind"] == "max" else t["value"] >= t["limit"])
    passed = sum(t["passed"] for t in targets.values())
    assert report["targets_passed"] == f"{passed}/10"
    markdown = (out / "report.md").read_text()
    assert f"Targets passed: {passed}/10" in markdown and "Not a GPU run" in markdown
    assert all(name in markdown for name in targets) and markdown.count("| yes |") == passed
    assert f"targets passed {passed}/10" in proc.stdout


def test_a_failing_step_exits_non_zero_naming_it_and_leaves_no_report(tiny_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(tiny_run[0], out)  # a complete report of an earlier run is there
    proc = gpu_check(out, tmp_path / "work", GPU_CHECK_TINY="1", GPU_CHECK_BATCH="1")  # benchmark.py refuses it
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAILED at step step_benchmark: exit status 2: "), last
    assert "--batch-size >= 2" in last
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    failed = json.loads((out / "FAILED.json").read_text())
    assert failed["complete"] is False and failed["failed_step"] == "step_benchmark"
    assert [s["step"] for s in failed["finished_steps"]] == ["environment", "data"]
    assert set(failed["figures_so_far"]) == {"environment", "data"}
    assert (out / "FAILED.md").read_text().startswith("# open_clip_3t GPU check FAILED at step `step_benchmark`")


def test_without_a_visible_gpu_the_check_stops_at_its_first_step(tmp_path):
    proc = gpu_check(tmp_path / "out", tmp_path / "work", CUDA_VISIBLE_DEVICES="")  # the real (GPU) settings
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAILED at step environment: ") and "sees no CUDA device" in last, last
    failed = json.loads((tmp_path / "out" / "FAILED.json").read_text())
    assert failed["finished_steps"] == [] and failed["settings"]["model"] == "3T-ViT-B-16"
    assert not (tmp_path / "work" / "shards").exists()  # nothing was generated
