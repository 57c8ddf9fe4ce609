"""The project's launchers (scripts/slurm/*.sbatch) as real batch jobs on the local two-node SLURM cluster
(scripts/slurm/local_cluster.sh, fixture `slurm_cluster`): 2-task gloo training, on one node and across two (3T online
and from a cache: the same weights), a cache-build array job + verify (on one node, and across both), preemption
(`scontrol requeue`) and the launcher's time-limit trap (USR1) each followed by `--resume latest`, and evaluation of
the trained checkpoint.

CPU settings go in through the launchers' variables (DEVICE=cpu, PRECISION=fp32, ...) and sbatch flags
(--gpus-per-node=0 --cpus-per-task=1 ...): the scripts keep their GPU defaults. Tiny models, 32 px generated shards.
Skipped (with the reason) where the cluster cannot start: not root, no package source.
"""
import glob
import os
import re
import sys
import tarfile
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from open_clip_3t import cache
from open_clip_3t.toy.synthetic import write_classification_folder, write_shards
from tests.conftest import REPO
from training import eval as standalone

SLURM_DIR = os.path.join(REPO, "scripts", "slurm")
# --time=10: the launchers ask for USR1 180 s before the limit (a requeue); keep that beyond our timeouts.
CPU_FLAGS = ("--gpus-per-node=0", "--cpus-per-task=1", "--time=10")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
                "BOOT_FAIL", "DEADLINE"}
DONE_RE = re.compile(r"Train Epoch: (\d+) done on rank (\d+): (\d+) steps, (\d+) samples")

# PYTHON for train.sbatch: the real interpreter running `-m training.main`, recording per task which rank started
# under which SLURM_RESTART_COUNT on which node and which rank called torch.save on what (checkpoints are written by
# rank 0 only).
PYTHON_WRAPPER = f"""#!{sys.executable}
import os, re, runpy, sys
import torch
RECORD = os.environ["LAUNCHER_RECORD"]
RANK = os.environ.get("SLURM_PROCID", "?")

def record(line):
    with open(RECORD, "a") as f:
        f.write(line + "\\n")

_save = torch.save
def save(obj, f, *args, **kwargs):  # checkpoints are written to NAME.tmp.HOST.PID, then renamed to NAME
    record(f"save {{RANK}} {{re.sub(r'[.]tmp[.][^/]*$', '', getattr(f, 'name', str(f)))}}")
    return _save(obj, f, *args, **kwargs)

torch.save = save
record(f"start {{RANK}} {{os.environ.get('SLURM_RESTART_COUNT', '0')}}")
record(f"node {{RANK}} {{os.environ.get('SLURMD_NODENAME', '?')}}")
assert sys.argv[1] == "-m", sys.argv
module, sys.argv = sys.argv[2], [sys.argv[0], *sys.argv[3:]]
sys.path.insert(0, os.getcwd())  # as `python -m` does
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def read(path):
    return open(path).read() if os.path.exists(path) else ""


def tail(text, n=4000):
    return text[-n:]


def records(path):
    """[(kind, rank, value)] from the wrapper's record file."""
    return [tuple(line.split(" ", 2)) for line in read(path).splitlines() if line.strip()]


def done_lines(log):
    """{(epoch, rank): (steps, samples)} from the trainer's per-rank end-of-epoch lines."""
    return {(int(e), int(r)): (int(s), int(n)) for e, r, s, n in DONE_RE.findall(log)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm_data")
    write_shards(str(root / "train"), num_samples=32, samples_per_shard=16, seed=0, image_size=32)  # 1 shard/rank
    write_shards(str(root / "val"), num_samples=12, samples_per_shard=6, seed=0, split="val", image_size=32)
    write_classification_folder(str(root / "colour_test"), "colour", 2, seed=0, image_size=32)
    wrapper = root / "python_wrapper.py"
    wrapper.write_text(PYTHON_WRAPPER)
    wrapper.chmod(0o755)
    return SimpleNamespace(train=f"{root}/train/{{00000..00001}}.tar", val=f"{root}/val/{{00000..00001}}.tar",
                           folder=str(root / "colour_test"), python=str(wrapper))


def train_env(data, h_weights, tmp, **overrides):
    env = {"MODE": "3t", "MODEL": "3T-tiny", "THIRD_TOWER_WEIGHTS": h_weights, "TRAIN_DATA": data.train,
           "TRAIN_NUM_SAMPLES": "64", "EPOCHS": "1", "BATCH_SIZE": "8", "LR": "1e-3", "WARMUP": "1", "WORKERS": "0",
           "DEVICE": "cpu", "DIST_BACKEND": "gloo", "PRECISION": "fp32", "LOGS": str(tmp / "logs"),
           "PYTHON": data.python, "LAUNCHER_RECORD": str(tmp / "record.txt"), "REPO_DIR": REPO,
           "EXTRA_ARGS": "--log-every-n-steps 1"}
    return {**env, **overrides}


# --- 1. training: 2 tasks, gloo -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(slurm_cluster, data, h_weights, tmp_path_factory):
    """One 2-task 3T-tiny training job (1 epoch, 4 steps per rank); its checkpoint is also evaluated below."""
    tmp = tmp_path_factory.mktemp("slurm_train")
    env = train_env(data, h_weights, tmp)
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(os.path.join(SLURM_DIR, "train.sbatch"), "--ntasks-per-node=2", *CPU_FLAGS,
                                           f"--output={tmp}/slurm-%j.out", env_extra=env, cwd=REPO, timeout=240)
    seconds = time.monotonic() - t0
    print(f"\ntrain.sbatch, 2 tasks: job {job_id} in {seconds:.1f}s")
    log = read(tmp / f"slurm-{job_id}.out")
    run_dir = tmp / "logs" / f"3t-3T-tiny-{job_id}"
    return SimpleNamespace(job_id=job_id, rc=rc, info=slurm_cluster.job_info(job_id), log=log, run_dir=run_dir,
                           record=records(env["LAUNCHER_RECORD"]), seconds=seconds)


def test_train_sbatch_two_tasks_gloo(trained):
    t = trained
    assert t.rc == 0, (t.info, tail(t.log))
    assert t.info.get("JobState") == "COMPLETED" and t.info.get("ExitCode") == "0:0", (t.info, tail(t.log))
    assert f"train.sbatch: job {t.job_id}, 1 node(s), 2 task(s)" in t.log, tail(t.log)
    for rank in (0, 1):
        assert f"Process (global: {rank}, local {rank}), total 2." in t.log, tail(t.log)
    # 64 samples per epoch / (2 ranks x batch 8) = 4 steps of 8 samples on each rank
    assert done_lines(t.log) == {(0, 0): (4, 32), (0, 1): (4, 32)}, tail(t.log)
    assert sorted(r for k, r, _ in t.record if k == "start") == ["0", "1"], t.record
    saves = [(r, v) for k, r, v in t.record if k == "save"]
    # rank 1 writes nothing; rank 0 writes epoch_1.pt, and epoch_latest.pt through tmp.pt (--save-most-recent)
    assert saves == [("0", str(t.run_dir / "checkpoints" / name)) for name in ("epoch_1.pt", "tmp.pt")], saves
    assert sorted(os.listdir(t.run_dir / "checkpoints")) == ["epoch_1.pt", "epoch_latest.pt"]
    ckpt = torch.load(t.run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)
    assert ckpt["epoch"] == 1 and ckpt["name"] == f"3t-3T-tiny-{t.job_id}"


# --- 1b. training across two nodes: the weights of the same job on one node ----------------------------------------

def train_job(slurm_cluster, data, h_weights, tmp, *flags, **overrides):
    """One train.sbatch job (3T-tiny, 1 epoch of 64 samples, batch 8 per rank) with these sbatch flags."""
    tmp.mkdir(parents=True, exist_ok=True)
    env = train_env(data, h_weights, tmp, **overrides)
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(os.path.join(SLURM_DIR, "train.sbatch"), *flags, *CPU_FLAGS,
                                           f"--output={tmp}/slurm-%j.out", env_extra=env, cwd=REPO, timeout=240)
    print(f"\ntrain.sbatch {' '.join(flags)}: job {job_id} in {time.monotonic() - t0:.1f}s")
    return SimpleNamespace(job_id=job_id, rc=rc, info=slurm_cluster.job_info(job_id),
                           log=read(tmp / f"slurm-{job_id}.out"), run_dir=tmp / "logs" / f"3t-3T-tiny-{job_id}",
                           record=records(env["LAUNCHER_RECORD"]))


def final_weights(run):
    return torch.load(run.run_dir / "checkpoints" / "epoch_1.pt", map_location="cpu", weights_only=False)["state_dict"]


def assert_two_nodes_train_as_one(two, one):
    """`two` ran its 2 ranks on n1 and n2, met at n1's NodeAddr, and ends with `one`'s weights, bit for bit."""
    assert two.rc == 0 and one.rc == 0, (two.info, tail(two.log), one.info, tail(one.log))
    assert f"train.sbatch: job {two.job_id}, 2 node(s), 2 task(s), rendezvous 127.0.0.1:" in two.log, tail(two.log)
    assert {r: v for k, r, v in two.record if k == "node"} == {"0": "n1", "1": "n2"}, two.record
    assert len({v for k, _, v in one.record if k == "node"}) == 1, one.record
    for run in (one, two):
        assert done_lines(run.log) == {(0, 0): (4, 32), (0, 1): (4, 32)}, tail(run.log)
    a, b = final_weights(two), final_weights(one)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


def test_train_sbatch_across_two_nodes_equals_one_node(slurm_cluster, trained, data, h_weights, tmp_path):
    """3T online: --nodes=2 --ntasks-per-node=1 against the 2-task job on one node (`trained`)."""
    slurm_cluster.require_nodes(2)
    two = train_job(slurm_cluster, data, h_weights, tmp_path, "--nodes=2", "--ntasks-per-node=1")
    assert_two_nodes_train_as_one(two, trained)


@pytest.fixture(scope="module")
def train_cache(data, h_weights, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("slurm_cache") / "cache")
    cache.build(data.train, "3T-tiny", out, h_weights, batch_size=8, workers=0, split=(0, 1), quiet=True)
    return out


def test_train_sbatch_from_a_cache_across_two_nodes_equals_one_node(slurm_cluster, data, h_weights, train_cache,
                                                                    tmp_path):
    slurm_cluster.require_nodes(2)
    runs = [train_job(slurm_cluster, data, h_weights, tmp_path / name, *flags, THIRD_TOWER_CACHE=train_cache)
            for name, flags in (("one", ["--ntasks-per-node=2"]), ("two", ["--nodes=2", "--ntasks-per-node=1"]))]
    assert_two_nodes_train_as_one(runs[1], runs[0])
    for run in runs:  # trained from the cache: h never built, every sample joined
        assert f"third-tower cache {train_cache} (tower third): 32 embeddings for 2 shards" in run.log, tail(run.log)
        assert not any("third_tower." in k for k in final_weights(run))


# --- 2. cache build: array job of 2 tasks ----------------------------------------------------------------------

def tar_keys(path):
    with tarfile.open(path) as t:
        return {m.name.split(".")[0] for m in t.getmembers() if m.isfile()}


def test_build_cache_sbatch_array_then_verify(slurm_cluster, h_weights, tmp_path, capsys):
    shards = write_shards(str(tmp_path / "data"), num_samples=20, samples_per_shard=5, seed=1, image_size=32)
    spec = f"{tmp_path}/data/{{00000..00003}}.tar"
    out = tmp_path / "cache"
    env = {"TRAIN_DATA": spec, "OUT": str(out), "MODEL": "3T-tiny", "THIRD_TOWER_WEIGHTS": h_weights,
           "DEVICE": "cpu", "PRECISION": "fp32", "BATCH_SIZE": "4", "WORKERS": "0", "PYTHON": sys.executable,
           "REPO_DIR": REPO}
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(os.path.join(SLURM_DIR, "build_cache.sbatch"), "--array=0-1",
                                           "--ntasks-per-node=1", *CPU_FLAGS, f"--output={tmp_path}/slurm-%A_%a.out",
                                           env_extra=env, cwd=REPO, timeout=240)
    print(f"\nbuild_cache.sbatch, array of 2: job {job_id} in {time.monotonic() - t0:.1f}s")
    logs = {os.path.basename(p): read(p) for p in sorted(glob.glob(f"{tmp_path}/slurm-*.out"))}
    assert rc == 0, (slurm_cluster.job_records(job_id), {k: tail(v, 2000) for k, v in logs.items()})
    assert sorted(logs) == [f"slurm-{job_id}_0.out", f"slurm-{job_id}_1.out"], logs
    assert slurm_cluster.job_state(job_id) == "COMPLETED", slurm_cluster.job_records(job_id)
    for task, log in enumerate(logs.values()):
        assert f"array task {task} of 2" in log and "2 of 4 shards are ours" in log, log

    # every shard cached exactly once: one sidecar per shard, and its keys are exactly the shard's samples
    sidecars = sorted(glob.glob(f"{out}/**/*.safetensors", recursive=True))
    assert sidecars == sorted(cache.sidecar_path(str(out), s) for s in shards), sidecars
    assert not glob.glob(f"{out}/**/*.tmp*", recursive=True)
    all_keys = []
    for shard in shards:
        emb, keys, _, meta = cache.load_sidecar(cache.sidecar_path(str(out), shard))
        assert set(keys) == tar_keys(shard) and len(keys) == 5 and emb.shape == (5, 64), (shard, keys, emb.shape)
        all_keys += keys
    assert len(all_keys) == len(set(all_keys)) == 20

    verify = ["verify", "--train-data", spec, "--model", "3T-tiny", "--third-tower-cache", str(out),
              "--third-tower-weights", h_weights]
    capsys.readouterr()
    assert cache.main(verify) == 0, capsys.readouterr()
    assert f"ok: {out} covers 4 shards for 3T-tiny" in capsys.readouterr().out
    os.remove(sidecars[2])  # the same check fails on a cache that misses a shard
    assert cache.main(verify) == 1
    assert "missing: " in capsys.readouterr().out


def test_build_cache_sbatch_array_over_two_nodes_then_verify(slurm_cluster, h_weights, tmp_path, capsys):
    """An array of 2 tasks, each over both nodes (one builder per node): 4 builders, each writes its sidecars and
    its own part of the index; verify then checks the cache and folds the parts into index.json."""
    slurm_cluster.require_nodes(2)
    shards = write_shards(str(tmp_path / "data"), num_samples=20, samples_per_shard=5, seed=2, image_size=32)
    spec = f"{tmp_path}/data/{{00000..00003}}.tar"
    out = tmp_path / "cache"
    env = {"TRAIN_DATA": spec, "OUT": str(out), "MODEL": "3T-tiny", "THIRD_TOWER_WEIGHTS": h_weights,
           "DEVICE": "cpu", "PRECISION": "fp32", "BATCH_SIZE": "4", "WORKERS": "0", "PYTHON": sys.executable,
           "REPO_DIR": REPO}
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(os.path.join(SLURM_DIR, "build_cache.sbatch"), "--array=0-1",
                                           "--nodes=2", "--ntasks-per-node=1", *CPU_FLAGS,
                                           f"--output={tmp_path}/slurm-%A_%a.out", env_extra=env, cwd=REPO,
                                           timeout=240)
    print(f"\nbuild_cache.sbatch, array of 2 x 2 nodes: job {job_id} in {time.monotonic() - t0:.1f}s")
    logs = [read(f"{tmp_path}/slurm-{job_id}_{task}.out") for task in (0, 1)]
    assert rc == 0, (slurm_cluster.job_records(job_id), [tail(log, 2000) for log in logs])
    assert sorted(r.get("NodeList") for r in slurm_cluster.job_records(job_id)) == ["n[1-2]", "n[1-2]"]
    for task, log in enumerate(logs):
        for builder in (2 * task + 1, 2 * task + 2):
            assert f"cache build [{builder}/4]: 1 of 4 shards are ours, 0 already done, 1 to build" in log, log
    parts = sorted(os.path.basename(p) for p in glob.glob(f"{out}/index*.json"))
    assert parts == [f"index.part-0000{i}-of-00004.json" for i in range(4)]
    sizes = {cache.shard_id(s): os.path.getsize(s) for s in shards}
    assert cache.read_index(str(out))[0] == {sid: [5, 0, size, False, 64] for sid, size in sizes.items()}

    capsys.readouterr()
    assert cache.main(["verify", "--train-data", spec, "--model", "3T-tiny", "--third-tower-cache", str(out),
                       "--third-tower-weights", h_weights]) == 0
    assert f"ok: {out} covers 4 shards for 3T-tiny" in capsys.readouterr().out
    assert [os.path.basename(p) for p in glob.glob(f"{out}/index*.json")] == ["index.json"]
    assert cache.read_index(str(out))[0] == {sid: [5, 0, size, False, 64] for sid, size in sizes.items()}


# --- 3. preemption and the time limit: requeued twice, resumed inside the epoch each time ---------------------------

RESUMED_RE = re.compile(r"=> resuming checkpoint '(.+?)' \(epoch (\d+)\)")
INSIDE_RE = re.compile(r"Train Epoch: (\d+) resumes at batch (\d+) of 20")


def test_train_sbatch_requeued_job_resumes_inside_the_epoch_with_the_uninterrupted_weights(slurm_cluster, data,
                                                                                          h_weights, tmp_path):
    """A two-node job (one task per node): run 1 is preempted (`scontrol requeue`, as the scheduler does: SIGTERM to
    every task) in the middle of epoch 0; run 2 resumes inside that epoch and gets USR1 in the batch shell (what
    --signal=B:USR1@180 sends before the time limit) in the middle of epoch 1, whose trap passes it to the tasks on
    both nodes and requeues the job once they saved; run 3 resumes inside epoch 1 and finishes with the weights of the
    same 2-rank job run on one node without interruption."""
    epochs = 2
    # 320 samples / (2 ranks x 8) = 20 steps per rank per epoch (a few seconds on 2 shared cores)
    env = train_env(data, h_weights, tmp_path, EPOCHS=str(epochs), TRAIN_NUM_SAMPLES="320")
    t0 = time.monotonic()
    job_id = slurm_cluster.sbatch(os.path.join(SLURM_DIR, "train.sbatch"), "--nodes=2", "--ntasks-per-node=1",
                                  *CPU_FLAGS, f"--output={tmp_path}/slurm-%j.out", env_extra=env, cwd=REPO)
    out = tmp_path / f"slurm-{job_id}.out"
    ckpts = tmp_path / "logs" / f"3t-3T-tiny-{job_id}" / "checkpoints"

    def runs():  # --open-mode=append (the launcher's own #SBATCH line): each run opens with the launcher's header
        return read(out).split(f"train.sbatch: job {job_id},")[1:]

    def wait_for(what, ready, timeout=150):
        deadline = time.monotonic() + timeout
        while not ready(runs()):
            state = slurm_cluster.job_state(job_id)
            assert state not in FINAL_STATES, f"job {job_id} ended ({state}) before {what}:\n{tail(read(out))}"
            assert time.monotonic() < deadline, f"job {job_id} ({state}): no {what} after {timeout}s\n{tail(read(out))}"
            time.sleep(0.2)
        return time.monotonic() - t0

    try:
        t1 = wait_for("step 6 of epoch 0 in run 1", lambda r: len(r) == 1 and "Train Epoch: 0 [ 96/" in r[0])
        slurm_cluster.run("scontrol", "requeue", job_id)
        t2 = wait_for("step 6 of epoch 1 in run 2", lambda r: len(r) == 2 and "Train Epoch: 1 [ 96/" in r[1])
        slurm_cluster.run("scancel", "--signal=USR1", "--batch", job_id)
        state = slurm_cluster.wait_for_state(job_id, tuple(FINAL_STATES), timeout=240, poll=0.5)
    finally:
        if slurm_cluster.job_state(job_id) not in FINAL_STATES:
            slurm_cluster.cancel(job_id)
    info = slurm_cluster.job_info(job_id)
    log = read(out)
    print(f"\ntrain.sbatch requeued at {t1:.1f}s (scontrol requeue) and {t2:.1f}s (USR1), "
          f"finished at {time.monotonic() - t0:.1f}s: job {job_id} {state}")
    assert state == "COMPLETED" and info.get("ExitCode") == "0:0", (info, tail(log))
    if "Restarts" in info:  # scontrol's record (the jobcomp file has no such field)
        assert info["Restarts"] == "2", info
    states = [r.get("JobState") for r in slurm_cluster.jobcomp_records(job_id)]
    assert len(states) == 3 and states[-1] == "COMPLETED", states

    run1, run2, run3 = runs()  # exactly three runs
    starts = sorted((r, v) for k, r, v in records(env["LAUNCHER_RECORD"]) if k == "start")
    assert starts == [(r, c) for r in "01" for c in "012"], starts  # rank, SLURM_RESTART_COUNT
    assert "No latest resume checkpoint found" in run1 and not RESUMED_RE.search(run1), tail(run1)
    assert "stopped at epoch 0 step" in run1 and "time limit near" in run2, tail(run2)
    assert "progress saved in" in run2 and "requeueing job" in run2, tail(run2)  # the launcher's USR1 trap
    [(e2, b2)], [(e3, b3)] = (sorted({(int(e), int(b)) for e, b in INSIDE_RE.findall(r)}) for r in (run2, run3))
    assert e2 == 0 and e3 == 1 and 6 <= b2 < 20 and 6 <= b3 < 20, (b2, b3)  # inside the epoch, nothing redone
    for run, b in ((run2, b2), (run3, b3)):
        assert RESUMED_RE.search(run).group(1) == str(ckpts / "epoch_latest.pt"), tail(run)
        first = re.search(r"Train Epoch: \d \[ *(\d+)/", run.split("resumes at batch")[-1])
        assert int(first.group(1)) == (b + 1) * 16, tail(run)  # the epoch's counters go on from the resume point
    final = torch.load(ckpts / f"epoch_{epochs}.pt", map_location="cpu", weights_only=False)
    assert final["epoch"] == epochs

    # the same 2 ranks on one node, never interrupted: the same weights
    job2, rc = slurm_cluster.sbatch_wait(os.path.join(SLURM_DIR, "train.sbatch"), "--ntasks-per-node=2", *CPU_FLAGS,
                                         f"--output={tmp_path}/slurm-%j.out", env_extra=env, cwd=REPO, timeout=240)
    assert rc == 0, tail(read(tmp_path / f"slurm-{job2}.out"))
    straight = torch.load(tmp_path / "logs" / f"3t-3T-tiny-{job2}" / "checkpoints" / f"epoch_{epochs}.pt",
                          map_location="cpu", weights_only=False)["state_dict"]
    assert max(float((final["state_dict"][k] - v).abs().max()) for k, v in straight.items()) <= 1e-5


def test_a_time_limit_shorter_than_the_signal_lead_time_fails_instead_of_requeueing(slurm_cluster, data, h_weights,
                                                                                    tmp_path):
    """--time=1 (60 s) is under the launcher's 180 s signal lead: USR1 comes before anything is saved, so the job
    must fail with a line saying so, not requeue itself every half minute."""
    slow = tmp_path / "slow_start.py"  # a start-up slower than the signal: nothing trains before it comes
    slow.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(300)\n")
    slow.chmod(0o755)
    env = train_env(data, h_weights, tmp_path, PYTHON=str(slow))
    job_id, rc = slurm_cluster.sbatch_wait(os.path.join(SLURM_DIR, "train.sbatch"), "--ntasks-per-node=1",
                                           "--gpus-per-node=0", "--cpus-per-task=1", "--time=1",
                                           f"--output={tmp_path}/slurm-%j.out", env_extra=env, cwd=REPO, timeout=200)
    log = read(tmp_path / f"slurm-{job_id}.out")
    assert rc != 0 and slurm_cluster.job_state(job_id) == "FAILED", tail(log)
    assert "time limit is shorter than the signal's lead time" in log and "requeueing" not in log, tail(log)
    assert len(slurm_cluster.jobcomp_records(job_id)) == 1  # no requeue


# --- 4. evaluation of the checkpoint trained above ---------------------------------------------------------------

def test_eval_sbatch_evaluates_the_trained_checkpoint(slurm_cluster, trained, data, tmp_path):
    assert trained.rc == 0, "the training job failed (see test_train_sbatch_two_tasks_gloo)"
    ckpt = str(trained.run_dir / "checkpoints" / "epoch_1.pt")  # the model name comes from the run's params.txt
    env = {"CHECKPOINT": ckpt, "ZEROSHOT_DATA": data.folder, "VAL_DATA": data.val, "RETRIEVAL_K": "1 5",
           "OUT": str(tmp_path / "out"), "DEVICE": "cpu", "PRECISION": "fp32", "WORKERS": "0", "BATCH_SIZE": "8",
           "PYTHON": sys.executable, "REPO_DIR": REPO}
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(os.path.join(SLURM_DIR, "eval.sbatch"), *CPU_FLAGS,
                                           f"--output={tmp_path}/slurm-%j.out", env_extra=env, cwd=REPO, timeout=180)
    print(f"\neval.sbatch: job {job_id} in {time.monotonic() - t0:.1f}s")
    log = read(tmp_path / f"slurm-{job_id}.out")
    assert rc == 0, (slurm_cluster.job_info(job_id), tail(log))
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    assert f"eval.sbatch: job {job_id}, python -m training.eval" in log
    assert (tmp_path / "out" / "results.md").exists()
    table = pd.read_csv(tmp_path / "out" / "results.csv")
    expected = standalone.main(["--pretrained", ckpt, "--zeroshot-data", data.folder, "--val-data", data.val,
                                "--retrieval-k", "1", "5", "--out", str(tmp_path / "ref"), "--device", "cpu",
                                "--precision", "fp32", "--workers", "0", "--batch-size", "8"])
    assert list(table.columns) == list(expected.columns), table.columns
    assert {"colour_test-zeroshot-top1", "image_to_text_R@5", "text_to_image_R@1"} <= set(table.columns)
    assert "image_to_text_R@10" not in table
    assert len(table) == 1 and table.iloc[0, 1:].tolist() == pytest.approx(expected.iloc[0, 1:].tolist())
