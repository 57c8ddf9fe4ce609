"""scripts/slurm/train.sbatch's own command line, run with bash on CPU, with stub `srun`/`scontrol` on PATH:
srun starts 2 local tasks with the SLURM variables set, as SLURM would on one node."""
import os
import random
import socket
import subprocess
import sys

import pytest
import torch

from open_clip_3t.toy.synthetic import write_shards
from tests.conftest import REPO

SRUN = """#!/bin/bash
# stub srun: drop srun's own options (--opt=value form), run the command as $SLURM_NTASKS local tasks
echo "$@" > "$STUB_DIR/srun_args.txt"
while [[ $# -gt 0 && $1 == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 SLURM_STEP_ID=0 "$@" > "$STUB_DIR/task-$i.log" 2>&1 &
    pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""
SCONTROL = """#!/bin/bash
# stub scontrol: `scontrol show hostnames LIST` prints one host per line (plain comma lists only)
[[ $1 == show && $2 == hostnames ]] && tr ',' '\\n' <<< "$3"
"""


def free_port_in(lo, hi):
    for _ in range(100):
        port = random.randint(lo, hi - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port found")


def test_sbatch_launcher_with_stub_srun(h_weights, tmp_path):
    shards = tmp_path / "shards"
    write_shards(str(shards), num_samples=32, samples_per_shard=16, seed=0, image_size=32)  # one shard per rank
    stub = tmp_path / "bin"
    stub.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    port = free_port_in(20000, 40000)
    job_id = port  # train.sbatch derives MASTER_PORT = 20000 + job id % 20000, i.e. this free port
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MASTER_"))}
    env.update({
        "PATH": f"{stub}{os.pathsep}{env['PATH']}", "PYTHONPATH": REPO, "STUB_DIR": str(tmp_path),
        "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NODELIST": "localhost", "SLURM_NTASKS": "2", "SLURM_NNODES": "1",
        "REPO_DIR": REPO, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
        "MODE": "3t", "MODEL": "3T-tiny", "THIRD_TOWER_WEIGHTS": h_weights,
        "TRAIN_DATA": str(shards / "{00000..00001}.tar"), "TRAIN_NUM_SAMPLES": "64",
        "EPOCHS": "1", "BATCH_SIZE": "8", "LR": "1e-3", "WARMUP": "1", "WORKERS": "0",
        "DEVICE": "cpu", "DIST_BACKEND": "gloo", "PRECISION": "fp32", "LOGS": str(tmp_path / "logs"),
        "EXTRA_ARGS": "--log-every-n-steps 1",
    })
    script = os.path.join(REPO, "scripts", "slurm", "train.sbatch")
    proc = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=240)
    tasks = [(tmp_path / f"task-{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, (proc.stdout, proc.stderr, tasks[0][-3000:], tasks[1][-3000:])
    assert f"rendezvous localhost:{port}, run 3t-3T-tiny-{job_id}" in proc.stdout

    srun_args = (tmp_path / "srun_args.txt").read_text().split()
    for flag in ("--local-loss", "--gather-with-grad", "--model", "--third-tower-weights"):
        assert flag in srun_args
    assert srun_args[srun_args.index("--resume") + 1] == "latest"
    for rank, log in enumerate(tasks):
        assert f"Process (global: {rank}, local {rank}), total 2." in log
        assert f"done on rank {rank}: 4 steps, 32 samples" in log  # 64 samples / (2 ranks x 8)
    run_dir = tmp_path / "logs" / f"3t-3T-tiny-{job_id}"
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch_1.pt", "epoch_latest.pt"]  # --save-most-recent
    assert tasks[0].count("Train Epoch: 0 [") == 4 and "Train Epoch: 0 [" not in tasks[1]  # rank 0 logs

    # A requeued job runs the same script again under the same job id: it resumes from epoch 1.
    proc = subprocess.run(["bash", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**env, "EPOCHS": "2"}, timeout=240)
    tasks = [(tmp_path / f"task-{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 0, (proc.stdout, proc.stderr, tasks[0][-3000:], tasks[1][-3000:])
    assert "=> resuming checkpoint" in tasks[0] and "(epoch 1)" in tasks[0]
    assert "Train Epoch: 0 [" not in tasks[0] and tasks[0].count("Train Epoch: 1 [") == 4
    for rank, log in enumerate(tasks):
        assert f"Train Epoch: 1 done on rank {rank}: 4 steps, 32 samples" in log
    assert sorted(os.listdir(run_dir / "checkpoints")) == ["epoch_1.pt", "epoch_2.pt", "epoch_latest.pt"]
    assert torch.load(run_dir / "checkpoints" / "epoch_2.pt", map_location="cpu", weights_only=False)["epoch"] == 2


RECORD_SRUN = """#!/bin/bash
# stub srun: record the command line, one word per line, and start nothing
printf '%s\\n' "$@" > "$STUB_DIR/srun_args.txt"
"""


@pytest.mark.parametrize("script, variables, expected", [
    ("train.sbatch", {"MODEL": "3T-tiny-K2", "THIRD_TOWER_WEIGHTS": "vit=/w/vit.pth resnet=/w/resnet.pth",
                      "THIRD_TOWER_CACHE": "vit=/cache/vit resnet=/cache/resnet"},
     ["--model", "3T-tiny-K2", "--third-tower-weights", "vit=/w/vit.pth", "resnet=/w/resnet.pth",
      "--third-tower-cache", "vit=/cache/vit", "resnet=/cache/resnet", "--train-data"]),
    ("train.sbatch", {"MODEL": "3T-tiny", "THIRD_TOWER_CACHE": "/cache/h"},
     ["--model", "3T-tiny", "--third-tower-cache", "/cache/h", "--train-data"]),
    ("build_cache.sbatch", {"MODEL": "3T-tiny-K2", "TOWER": "resnet", "THIRD_TOWER_WEIGHTS": "/w/resnet.pth",
                            "OUT": "/cache/resnet"},
     ["--third-tower-weights", "/w/resnet.pth", "--tower", "resnet"]),
])
def test_launchers_pass_one_cache_and_weights_file_per_tower(script, variables, expected, tmp_path):
    """The launchers' command lines for several towers (NAME=DIR words, `--tower NAME` for a build) and for one."""
    stub = tmp_path / "bin"
    stub.mkdir()
    for name, text in (("srun", RECORD_SRUN), ("scontrol", SCONTROL)):
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MASTER_", "THIRD_TOWER"))}
    env.update({"PATH": f"{stub}{os.pathsep}{env['PATH']}", "STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "7",
                "SLURM_JOB_NODELIST": "localhost", "REPO_DIR": REPO, "TRAIN_DATA": "/data/{0..1}.tar", **variables})
    proc = subprocess.run(["bash", os.path.join(REPO, "scripts", "slurm", script)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    words = (tmp_path / "srun_args.txt").read_text().splitlines()
    start = words.index(expected[0])
    assert words[start:start + len(expected)] == expected
