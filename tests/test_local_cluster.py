"""The local SLURM cluster (scripts/slurm/local_cluster.sh) really schedules jobs: multi-task steps on one node and
across two (two slurmd daemons), arrays, requeue, exit codes; and its `stop` kills only what `start` started.

Skipped where the cluster cannot run (not root / SLURM packages not installable).
"""
import os
import shutil
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pytest

from tests.slurm_cluster import (DEFAULT_STATE_DIR, EXIT_UNAVAILABLE, SCRIPT, ClusterUnavailable, cluster_env,
                                 start_cluster)


def _write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def test_two_task_batch_job(slurm_cluster, tmp_path):
    script = _write_script(tmp_path / "two_tasks.sh", f"""
        #SBATCH --ntasks=2
        #SBATCH --cpus-per-task=1
        #SBATCH --time=2
        #SBATCH --output={tmp_path}/slurm-%j.out
        set -eu
        srun bash -c 'echo "$SLURM_PROCID $SLURM_NTASKS $SLURM_LOCALID $(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)" > {tmp_path}/rank_$SLURM_PROCID.txt'
        """)
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(script, timeout=60)
    print(f"\n2-task job {job_id}: {time.monotonic() - t0:.1f}s")
    assert rc == 0, (slurm_cluster.job_info(job_id), (tmp_path / f"slurm-{job_id}.out").read_text())
    rows = sorted(p.read_text().split() for p in tmp_path.glob("rank_*.txt"))
    node = rows[0][3]  # both tasks on one node (the job asked for one)
    assert node in slurm_cluster.nodes and rows == [["0", "2", "0", node], ["1", "2", "1", node]]
    assert slurm_cluster.job_state(job_id) == "COMPLETED"


def test_two_node_job(slurm_cluster, tmp_path):
    """A step over both nodes: one task on each slurmd, and each node reachable at its NodeAddr (127.0.0.1) while
    its name resolves nowhere, as on clusters where launchers must not rendezvous by node name."""
    slurm_cluster.require_nodes(2)
    script = _write_script(tmp_path / "two_nodes.sh", f"""
        #SBATCH --nodes=2
        #SBATCH --ntasks-per-node=1
        #SBATCH --cpus-per-task=1
        #SBATCH --time=2
        #SBATCH --output={tmp_path}/slurm-%j.out
        set -eu
        first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
        addr=$(scontrol show node -o "$first" | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')
        resolves=$(getent ahosts "$first" >/dev/null && echo yes || echo no)
        srun bash -c "echo \\$SLURM_PROCID \\$SLURMD_NODENAME $first $addr $resolves > {tmp_path}/task_\\$SLURM_PROCID.txt"
        """)
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(script, timeout=60)
    print(f"\n2-node job {job_id}: {time.monotonic() - t0:.1f}s")
    assert rc == 0, (slurm_cluster.job_info(job_id), (tmp_path / f"slurm-{job_id}.out").read_text())
    rows = sorted(p.read_text().split() for p in tmp_path.glob("task_*.txt"))
    nodes = slurm_cluster.nodes[:2]
    assert rows == [[str(i), node, nodes[0], "127.0.0.1", "no"] for i, node in enumerate(nodes)]


def test_array_job(slurm_cluster, tmp_path):
    script = _write_script(tmp_path / "array.sh", f"""
        #SBATCH --array=0-1
        #SBATCH --time=2
        #SBATCH --output={tmp_path}/slurm-%A_%a.out
        echo "$SLURM_ARRAY_TASK_ID $SLURM_ARRAY_TASK_COUNT" > {tmp_path}/task_$SLURM_ARRAY_TASK_ID.txt
        """)
    t0 = time.monotonic()
    job_id, rc = slurm_cluster.sbatch_wait(script, timeout=60)
    print(f"\narray job {job_id}: {time.monotonic() - t0:.1f}s")
    assert rc == 0, slurm_cluster.job_records(job_id)
    rows = {tuple(p.read_text().split()) for p in tmp_path.glob("task_*.txt")}
    assert rows == {("0", "2"), ("1", "2")}
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    assert {r.get("ArrayTaskId") for r in slurm_cluster.job_records(job_id)} == {"0", "1"}


def test_failing_job_exit_code(slurm_cluster, tmp_path):
    script = _write_script(tmp_path / "fail.sh", f"""
        #SBATCH --output={tmp_path}/slurm-%j.out
        exit 3
        """)
    job_id, rc = slurm_cluster.sbatch_wait(script, timeout=60)
    assert rc == 3
    assert slurm_cluster.job_state(job_id) == "FAILED"
    assert slurm_cluster.job_info(job_id)["ExitCode"] == "3:0"
    # the jobcomp file keeps the final record after slurmctld forgets the job (MinJobAge)
    assert slurm_cluster.jobcomp_records(job_id)[-1]["JobState"] == "FAILED"


def test_requeue(slurm_cluster, tmp_path):
    log = tmp_path / "restarts.txt"
    script = _write_script(tmp_path / "requeue.sh", f"""
        #SBATCH --requeue
        #SBATCH --time=5
        #SBATCH --output={tmp_path}/slurm-%j.out
        #SBATCH --open-mode=append
        echo "$SLURM_JOB_ID ${{SLURM_RESTART_COUNT:-0}} $(date +%s.%N)" >> {log}
        if [ "${{SLURM_RESTART_COUNT:-0}}" = 0 ]; then sleep 120; fi
        """)
    result = {}

    def submit():  # sbatch --wait must keep waiting through the requeue
        try:
            result["value"] = slurm_cluster.sbatch_wait(script, timeout=120)
        except BaseException as exc:  # noqa: BLE001 -- re-raised in the test thread
            result["error"] = exc

    t0 = time.monotonic()
    waiter = threading.Thread(target=submit, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 60
    while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.exists(), f"first run did not start: {result}"
    job_id = log.read_text().split()[0]
    assert slurm_cluster.job_state(job_id) == "RUNNING"

    t_requeue = time.monotonic()
    slurm_cluster.run("scontrol", "requeue", job_id)
    while len(log.read_text().splitlines()) < 2 and time.monotonic() < t_requeue + 90:
        time.sleep(0.1)
    requeue_s = time.monotonic() - t_requeue
    waiter.join(timeout=90)
    total_s = time.monotonic() - t0
    print(f"\nrequeue of job {job_id}: restarted {requeue_s:.1f}s after `scontrol requeue`; "
          f"submit-to-finish {total_s:.1f}s")

    assert "error" not in result, result
    assert result.get("value") == (job_id, 0), (result, slurm_cluster.job_info(job_id))
    runs = [line.split()[:2] for line in log.read_text().splitlines()]
    assert runs == [[job_id, "0"], [job_id, "1"]]
    assert slurm_cluster.job_state(job_id) == "COMPLETED"
    states = [r["JobState"] for r in slurm_cluster.jobcomp_records(job_id)]
    assert states[-1] == "COMPLETED" and len(states) >= 2, states
    # cred_expire=10 in slurm.conf; with Slurm's default (120 s) this would take > 2 minutes
    assert requeue_s < 45


def test_not_root_is_distinct_exit_code():
    """Where the cluster cannot run the script exits 3 with a one-line reason (tests skip on it)."""
    state_dir = tempfile.mkdtemp(prefix="oc3t_nonroot_", dir="/tmp")
    os.rmdir(state_dir)  # must not exist: a non-root user cannot create our state there
    env = cluster_env(state_dir)
    cmd = ["bash", str(SCRIPT), "start"]
    copy_dir = None
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("no runuser to run the script as an unprivileged user")
        # a copy nobody can read (the checkout or pytest's tmp_path may be private to root)
        copy_dir = Path(tempfile.mkdtemp(prefix="oc3t_script_", dir="/tmp"))
        copy_dir.chmod(0o755)
        shutil.copy(SCRIPT, copy_dir / "local_cluster.sh")
        cmd = ["runuser", "-u", "nobody", "--", "bash", str(copy_dir / "local_cluster.sh"), "start"]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, cwd="/tmp")
    finally:
        if copy_dir is not None:
            shutil.rmtree(copy_dir, ignore_errors=True)
    assert proc.returncode == EXIT_UNAVAILABLE, proc.stderr
    assert "local_cluster: unavailable: must be root" in proc.stderr
    assert not Path(state_dir).exists()


def test_exit_code_3_becomes_cluster_unavailable(tmp_path, monkeypatch):
    """The fixture's skip path: exit code 3 -> ClusterUnavailable carrying the one-line reason."""
    import tests.slurm_cluster as sc

    stub = _write_script(tmp_path / "stub.sh", """
        [ "$1" = status ] && exit 1
        echo "local_cluster: installing ..." >&2
        echo "local_cluster: unavailable: no package source" >&2
        exit 3
        """)
    monkeypatch.setattr(sc, "SCRIPT", stub)
    with pytest.raises(ClusterUnavailable, match="unavailable: no package source$"):
        start_cluster(tmp_path / "state")


def _free_port(count: int = 1) -> int:
    """A free port followed by count - 1 free ones."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for p in range(port + 1, port + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
            return port
        except OSError:
            continue
    pytest.skip(f"no {count} consecutive free ports")


def _daemon_pids(state_dir) -> dict:
    state_dir = Path(state_dir)
    files = {"munged": state_dir / "munge" / "munged.pid", "slurmctld": state_dir / "pid" / "slurmctld.pid",
             **{f.name[:-len(".pid")]: f for f in (state_dir / "pid").glob("slurmd*.pid")}}
    return {name: int(f.read_text().strip()) for name, f in files.items() if f.exists() and f.read_text().strip()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"  # zombies count as gone
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("nodes", [1, 2])
def test_stop_kills_only_what_start_started(nodes):
    """A second cluster (own state dir, own ports, own munged) next to the session's one:
    its `stop` ends its daemons only (munged, slurmctld, one slurmd per node) -- not look-alike
    processes named slurmd/slurmctld/munged, not a PID named in a stale PID file, not the other
    cluster."""
    state_dir = tempfile.mkdtemp(prefix="oc3t_slurm2_", dir="/tmp")  # short: the munge socket lives there
    fake_dir = Path(tempfile.mkdtemp(prefix="oc3t_fake_", dir="/tmp"))
    fakes = []
    other_pids = {n: p for n, p in _daemon_pids(os.environ.get("LOCAL_SLURM_DIR") or DEFAULT_STATE_DIR).items()
                  if _alive(p)}
    script_env = {"LOCAL_SLURM_CTLD_PORT": str(_free_port()), "LOCAL_SLURM_SLURMD_PORT": str(_free_port(nodes)),
                  "LOCAL_SLURM_NODES": str(nodes)}
    try:
        try:
            cluster = start_cluster(state_dir, script_env=script_env)
        except ClusterUnavailable as exc:
            pytest.skip(str(exc))
        assert cluster.started_here
        print(f"\nsecond cluster started in {cluster.start_seconds:.1f}s")
        assert cluster.run("srun", f"-N{nodes}", f"-n{nodes}", "hostname", timeout=60).stdout.strip()
        assert len(cluster.nodes) == nodes
        again = cluster.script("start")
        assert again.returncode == 0 and "already running" in again.stderr, again.stderr

        for name in ("slurmd", "slurmctld", "munged"):
            shutil.copy("/bin/sleep", fake_dir / name)
            fakes.append(subprocess.Popen([str(fake_dir / name), "300"]))
        pids = _daemon_pids(state_dir)
        slurmds = {"slurmd"} if nodes == 1 else {f"slurmd-n{i}" for i in range(1, nodes + 1)}
        assert set(pids) == {"munged", "slurmctld", *slurmds} and all(map(_alive, pids.values())), pids

        cluster.stop()
        deadline = time.monotonic() + 10
        while any(map(_alive, pids.values())) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, pids.values())), pids
        assert all(f.poll() is None for f in fakes), "stop killed a look-alike process"
        assert all(map(_alive, other_pids.values())), "stop killed the other cluster's daemons"
        assert cluster.script("status").returncode == 1

        # a stale PID file naming an unrelated (look-alike) process: stop must leave it alone
        (Path(state_dir) / "pid" / min(f"{name}.pid" for name in slurmds)).write_text(f"{fakes[0].pid}\n")
        cluster.stop()
        time.sleep(0.3)
        assert fakes[0].poll() is None, "stop killed the process named in a stale PID file"
    finally:
        if os.path.exists(os.path.join(state_dir, "slurm.conf")):
            subprocess.run(["bash", str(SCRIPT), "stop"], env={**cluster_env(state_dir), **script_env},
                           capture_output=True, timeout=60)
        for f in fakes:
            f.kill()
            f.wait()
        shutil.rmtree(fake_dir, ignore_errors=True)
        shutil.rmtree(state_dir, ignore_errors=True)
        if os.path.exists(f"{state_dir}.lock"):
            os.remove(f"{state_dir}.lock")
