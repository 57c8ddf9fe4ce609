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
# stub scontrol, as SLURM answers: `show hostnames LIST` expands a host list (gpu[001-004,007],login1: one host per
# line); `show node -o NAME` prints the node's one-line record, NodeAddr=$STUB_NODEADDR (default: the name itself)
echo "$@" >> "${STUB_DIR:-/tmp}/scontrol_args.txt"
one() {  # one host-list item: prefix[ranges]suffix or a plain name
    if [[ $1 =~ ^([^[]*)\\[([^]]*)\\](.*)$ ]]; then
        local pre=${BASH_REMATCH[1]} post=${BASH_REMATCH[3]} r n lo hi
        IFS=, read -r -a ranges <<< "${BASH_REMATCH[2]}"
        for r in "${ranges[@]}"; do
            lo=${r%-*} hi=${r#*-}
            for ((n = 10#$lo; n <= 10#$hi; n++)); do printf '%s%0*d%s\\n' "$pre" "${#lo}" "$n" "$post"; done
        done
    else
        echo "$1"
    fi
}
if [[ $1 == show && $2 == hostnames ]]; then
    item="" depth=0
    for ((i = 0; i < ${#3}; i++)); do  # split on the commas outside brackets
        c=${3:i:1}
        [[ $c == "[" ]] && depth=1
        [[ $c == "]" ]] && depth=0
        if [[ $c == "," && $depth == 0 ]]; then one "$item"; item=""; else item+=$c; fi
    done
    one "$item"
elif [[ $1 == show && $2 == node ]]; then
    name=${!#}
    echo "NodeName=$name Arch=x86_64 CoresPerSocket=1 NodeAddr=${STUB_NODEADDR:-$name} NodeHostName=$name State=IDLE"
fi
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


def run_launcher(script, tmp_path, variables):
    """scripts/slurm/SCRIPT run by bash as SLURM would start it (job 7), with stub `srun` (records its command line in
    srun_args.txt, one word per line) and `scontrol` on PATH, and no SLURM_/SBATCH_/MASTER_/THIRD_TOWER variable of
    this process; `variables` are set on top."""
    stub = tmp_path / "bin"
    stub.mkdir()
    for name, text in (("srun", RECORD_SRUN), ("scontrol", SCONTROL)):
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "MASTER_", "THIRD_TOWER"))}
    env.update({"PATH": f"{stub}{os.pathsep}{env['PATH']}", "STUB_DIR": str(tmp_path), "SLURM_JOB_ID": "7",
                "REPO_DIR": REPO, "TRAIN_DATA": "/data/{0..1}.tar", **variables})
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "slurm", script)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)


@pytest.mark.parametrize("script, variables, expected", [
    ("train.sbatch", {"MODEL": "3T-tiny-K2", "THIRD_TOWER_WEIGHTS": "vit=/w/vit.pth resnet=/w/resnet.pth",
                      "THIRD_TOWER_CACHE": "vit=/cache/vit resnet=/cache/resnet"},
     ["--model", "3T-tiny-K2", "--third-tower-weights", "vit=/w/vit.pth", "resnet=/w/resnet.pth",
      "--third-tower-cache", "vit=/cache/vit", "resnet=/cache/resnet", "--train-data"]),
    ("train.sbatch", {"MODEL": "3T-tiny", "THIRD_TOWER_CACHE": "/cache/h"},
     ["--model", "3T-tiny", "--third-tower-cache", "/cache/h", "--train-data"]),
    ("build_cache.sbatch", {"MODEL": "3T-tiny-K2", "TOWER": "resnet", "THIRD_TOWER_WEIGHTS": "/w/resnet.pth",
                            "THIRD_TOWER_CACHE": "/cache/resnet"},
     ["--train-data", "/data/{0..1}.tar", "--model", "3T-tiny-K2", "--third-tower-cache", "/cache/resnet"]),
    ("build_cache.sbatch", {"MODEL": "3T-tiny-K2", "TOWER": "resnet", "THIRD_TOWER_WEIGHTS": "/w/resnet.pth",
                            "OUT": "/cache/resnet"},  # OUT: the variable's name before 0.2
     ["--third-tower-weights", "/w/resnet.pth", "--third-tower", "resnet"]),
])
def test_launchers_pass_one_cache_and_weights_file_per_tower(script, variables, expected, tmp_path):
    """The launchers' command lines for several towers (NAME=DIR words, `--third-tower NAME` for a build) and for
    one."""
    proc = run_launcher(script, tmp_path, {"SLURM_JOB_NODELIST": "localhost", **variables})
    assert proc.returncode == 0, proc.stderr
    words = (tmp_path / "srun_args.txt").read_text().splitlines()
    start = words.index(expected[0])
    assert words[start:start + len(expected)] == expected


def test_scontrol_stub_expands_host_lists(tmp_path):
    (tmp_path / "scontrol").write_text(SCONTROL)
    (tmp_path / "scontrol").chmod(0o755)

    def hosts(nodelist):
        return subprocess.run([str(tmp_path / "scontrol"), "show", "hostnames", nodelist], capture_output=True,
                              text=True, env={**os.environ, "STUB_DIR": str(tmp_path)}, check=True).stdout.split()
    assert hosts("gpu[001-004]") == ["gpu001", "gpu002", "gpu003", "gpu004"]
    assert hosts("a[1-2,5],login1,c[09-10]x") == ["a1", "a2", "a5", "login1", "c09x", "c10x"]


@pytest.mark.parametrize("node_addr, expected", [("127.0.0.1", "rendezvous 127.0.0.1:"), (None, None)])
def test_train_sbatch_meets_at_the_first_nodes_address(node_addr, expected, tmp_path):
    """MASTER_ADDR is the first node's NodeAddr (names like gpu001 need not resolve); a name that does not resolve
    stops the launcher at once with one line, before srun (instead of ranks retrying it for 30 minutes)."""
    proc = run_launcher("train.sbatch", tmp_path, {"SLURM_JOB_NODELIST": "oc3t-gpu[001-004]", "SLURM_NNODES": "4",
                                                   "RENDEZVOUS_TIMEOUT": "90",
                                                   **({"STUB_NODEADDR": node_addr} if node_addr else {})})
    asked = (tmp_path / "scontrol_args.txt").read_text().splitlines()
    assert asked == ["show hostnames oc3t-gpu[001-004]", "show node -o oc3t-gpu001"], proc.stderr + proc.stdout
    if expected:
        assert proc.returncode == 0, proc.stderr
        assert f"{expected}20007, run 3t-3T-ViT-B-16-7" in proc.stdout
        words = (tmp_path / "srun_args.txt").read_text().splitlines()
        assert words[words.index("--rendezvous-timeout") + 1] == "90"
    else:
        assert proc.returncode == 2 and not (tmp_path / "srun_args.txt").exists()
        assert proc.stderr == (f"train.sbatch: MASTER_ADDR=oc3t-gpu001 does not resolve on {socket.gethostname()}: "
                               f"set MASTER_ADDR to an address of the job's first node that every node reaches (its "
                               f"IP address)\n")
