"""Several nodes without SLURM: torchrun with two agents (two "nodes" on this machine, c10d and static rendezvous)
ends with the weights of one agent with two processes; and a rendezvous that cannot happen stops within its bound,
with one line naming the address and the fix (training/_open_clip_train.py `rendezvous_store`)."""
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from open_clip_3t.toy.synthetic import write_shards
from tests.conftest import REPO

# training.main behind torchrun, which would take --logs for its own --logs-specs: our flags come after "--". Runs of
# the same job see the same batches (the stream is seeded: training/resumable_data.py), so weights compare bit for bit.
MAIN = """
import sys
import training.main
argv = sys.argv[1:]
training.main.main(argv[1:] if argv[:1] == ["--"] else argv)
"""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def job(tmp_path_factory, h_weights):
    root = tmp_path_factory.mktemp("multinode")
    write_shards(str(root / "shards"), num_samples=32, samples_per_shard=16, seed=0, image_size=32)
    (root / "main.py").write_text(MAIN)
    train_args = ["--model", "3T-tiny", "--third-tower-weights", h_weights, "--train-data",
                  str(root / "shards" / "{00000..00001}.tar"), "--train-num-samples", "64", "--batch-size", "8",
                  "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--device", "cpu", "--dist-backend", "gloo",
                  "--precision", "fp32", "--workers", "0", "--local-loss", "--gather-with-grad", "--seed", "0",
                  "--log-every-n-steps", "1"]

    def run(name, *agents):
        """Start one torchrun per entry of `agents` (its own options) at once; returns (outputs, final weights)."""
        env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
        env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
        t0 = time.monotonic()
        procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *options,
                                   str(root / "main.py"), "--", "--logs", str(root / "logs"), "--name", name,
                                   *train_args], cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for options in agents]
        outputs = [p.communicate(timeout=300)[0] for p in procs]
        print(f"\ntorchrun {name}: {len(agents)} agent(s), {time.monotonic() - t0:.1f}s")
        assert [p.returncode for p in procs] == [0] * len(procs), [out[-3000:] for out in outputs]
        ckpt = root / "logs" / name / "checkpoints" / "epoch_1.pt"
        return outputs, torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]

    outputs, reference = run("one-agent", ["--standalone", "--nproc-per-node", "2"])
    for rank in (0, 1):
        assert f"done on rank {rank}: 4 steps, 32 samples" in outputs[0]
    return run, reference


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ


def test_torchrun_two_agents_c10d_rendezvous_equals_one_agent(job):
    run, reference = job
    port = free_port()
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
              f"127.0.0.1:{port}", "--rdzv-id", "oc3t-test", "--rdzv-conf", "join_timeout=120"]
    outputs, weights = run("c10d", common, common)
    text = "".join(outputs)
    for rank in (0, 1):  # one worker per agent: ranks 0 and 1, each alone on its "node"
        assert f"done on rank {rank}: 4 steps, 32 samples" in text
        assert f"Process (global: {rank}, local 0), total 2." in text
    assert_same_weights(weights, reference)


def test_torchrun_two_agents_static_rendezvous_equals_one_agent(job):
    run, reference = job
    port = free_port()
    agents = [["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
               "--master-port", str(port)] for node in (0, 1)]
    outputs, weights = run("static", *agents)
    assert "Process (global: 0, local 0), total 2." in outputs[0]
    assert "Process (global: 1, local 0), total 2." in outputs[1]
    assert_same_weights(weights, reference)


def rank_alone(tmp_path, rank, addr, port, timeout):
    """`python -m training.main` as srun's rank `rank` of 2 (SLURM_PROCID), the other rank never coming."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "RANK", "WORLD_SIZE"))}
    env.update({"PYTHONPATH": REPO, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NTASKS": "2",
                "MASTER_ADDR": addr, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "training.main", "--model", "3T-baseline-CLIP-tiny",
                           "--dataset-type", "synthetic", "--train-num-samples", "16", "--device", "cpu",
                           "--precision", "fp32", "--rendezvous-timeout", str(timeout), "--logs",
                           str(tmp_path / "logs")], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    return proc, time.monotonic() - t0


def test_a_master_addr_that_does_not_resolve_stops_at_once(tmp_path):
    proc, seconds = rank_alone(tmp_path, 1, "n1.invalid", free_port(), 600)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith(f"training.main: error: rendezvous: rank 1 of 2 on {socket.gethostname()}: "
                           f"MASTER_ADDR=n1.invalid does not resolve (")
    assert last.endswith("): set MASTER_ADDR to an address every node reaches, e.g. the first node's NodeAddr from "
                         "`scontrol show node NAME` (scripts/slurm/train.sbatch takes it from there)")
    assert seconds < 100  # start-up only: not the 600 s bound, nor torch's 30 minutes
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").iterdir())


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rendezvous_nobody_joins_stops_within_its_timeout(tmp_path, rank):
    """Rank 1 finds nobody listening; rank 0 hosts the store and waits for a rank 1 that never comes."""
    port = free_port()
    proc, seconds = rank_alone(tmp_path, rank, "127.0.0.1", port, 4)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert last.startswith(f"training.main: error: rendezvous: rank {rank} of 2 on {socket.gethostname()} did not "
                           f"meet the other ranks at MASTER_ADDR:MASTER_PORT = 127.0.0.1:{port} within 4 s (")
    assert last.endswith("): check that every node reaches that address and that the port is free on the first "
                         "node, or raise --rendezvous-timeout")
    assert seconds < 100
