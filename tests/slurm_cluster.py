"""A real SLURM cluster for tests (scripts/slurm/local_cluster.sh): two nodes on this machine (two slurmd daemons,
each NodeAddr=127.0.0.1 on its own port: LOCAL_SLURM_SLURMD_PORT and the next one), unless LOCAL_SLURM_NODES says
otherwise.

Usage in a test module (the fixture is re-exported by tests/conftest.py)::

    def test_launcher(slurm_cluster, tmp_path):
        job_id, rc = slurm_cluster.sbatch_wait(script, "--export=ALL", env_extra={"X": "1"}, timeout=120)
        assert rc == 0, slurm_cluster.job_info(job_id)
        assert slurm_cluster.job_state(job_id) == "COMPLETED"

The session fixture starts the cluster once (unless one already runs in the same state dir,
``$LOCAL_SLURM_DIR`` or /tmp/open_clip_3t_slurm) and stops it at session end only if this
session started it. Where the cluster cannot run (not root, no package source: the script
exits with code 3) every test using the fixture is skipped with the script's reason. A test
that needs both nodes calls ``slurm_cluster.require_nodes(2)`` (a reused one-node cluster: skip).

Job scripts and ``srun`` inside them find the cluster through ``SLURM_CONF``, which is in
``cluster.env`` and inherited by jobs (sbatch's default ``--export=ALL``; with
``--export=NONE`` slurmd still sets ``SLURM_CONF`` in the job, but PATH etc. are then bare).
"""
from __future__ import annotations

import fcntl
import os
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "slurm" / "local_cluster.sh"
DEFAULT_STATE_DIR = "/tmp/open_clip_3t_slurm"
TEST_NODES = "2"  # nodes of the cluster the session fixture starts (LOCAL_SLURM_NODES wins)
EXIT_UNAVAILABLE = 3  # local_cluster.sh: cannot run here (not root, cannot install packages)

# Variables an enclosing SLURM job (pytest itself run under sbatch/srun) would leak into our
# sbatch/srun calls, making them think they run inside that job.
_LEAKY_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")

_KV_RE = re.compile(r"(\w+)=(.*?)(?= \w+=|\s*$)")


class ClusterUnavailable(RuntimeError):
    """The cluster cannot run on this machine (the script exited with code 3)."""


def _parse_kv(line: str) -> dict[str, str]:
    """'JobId=5 JobState=COMPLETED WorkDir=/a b ...' -> dict (values may contain spaces)."""
    return {k: v for k, v in _KV_RE.findall(line.strip())}


def cluster_env(state_dir: str | os.PathLike, base: dict | None = None) -> dict[str, str]:
    """os.environ (or `base`) without leaked SLURM job variables, plus SLURM_CONF/LOCAL_SLURM_DIR."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if not k.startswith(_LEAKY_PREFIXES)}
    env["LOCAL_SLURM_DIR"] = str(state_dir)
    env["SLURM_CONF"] = str(Path(state_dir) / "slurm.conf")
    return env


@dataclass
class LocalSlurmCluster:
    state_dir: Path
    env: dict[str, str]
    started_here: bool = False
    start_seconds: float = 0.0  # wall time of `local_cluster.sh start` (0 if it was already running)
    script_env: dict[str, str] = field(default_factory=dict)  # env for local_cluster.sh (ports, ...)

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def jobcomp_file(self) -> Path:
        return self.state_dir / "jobcomp.txt"

    @property
    def nodes(self) -> list[str]:
        """The cluster's node names, e.g. ["n1", "n2"]."""
        return sorted(self.run("sinfo", "-h", "-N", "-o", "%N").stdout.split())

    def require_nodes(self, count: int) -> None:
        """Skip the calling test unless the cluster has `count` nodes or more."""
        if len(self.nodes) < count:
            pytest.skip(f"needs a {count}-node cluster; the one in {self.state_dir} has {len(self.nodes)} node(s) "
                        f"(stop it, and rerun with LOCAL_SLURM_NODES={count})")

    # --- generic ------------------------------------------------------------------
    def run(self, *cmd: str, env_extra: dict | None = None, check: bool = True, timeout: float = 60,
            cwd: str | os.PathLike | None = None) -> subprocess.CompletedProcess:
        """Run a command (e.g. "squeue", "-h") against this cluster; text output captured."""
        proc = subprocess.run(list(cmd), env={**self.env, **(env_extra or {})}, capture_output=True, text=True,
                              timeout=timeout, cwd=cwd)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    # --- submission ---------------------------------------------------------------
    def sbatch(self, script: str | os.PathLike, *args: str, env_extra: dict | None = None,
               cwd: str | os.PathLike | None = None) -> str:
        """Submit without waiting; returns the job id. `args` are sbatch options (before the script)."""
        out = self.run("sbatch", "--parsable", *args, str(script), env_extra=env_extra, cwd=cwd).stdout
        return out.strip().split(";")[0]

    def sbatch_wait(self, script: str | os.PathLike, *args: str, env_extra: dict | None = None,
                    timeout: float = 120, cwd: str | os.PathLike | None = None) -> tuple[str, int]:
        """`sbatch --parsable --wait [args] script`: returns (job_id, sbatch's exit code).

        The exit code is the job's (for an array job: the highest of its tasks). On timeout the
        job is cancelled and TimeoutError raised (with the job's last known state).
        """
        cmd = ["sbatch", "--parsable", "--wait", *args, str(script)]
        proc = subprocess.Popen(cmd, env={**self.env, **(env_extra or {})}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=cwd)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            job_id = out.strip().split("\n")[0].split(";")[0]
            info = self.job_info(job_id) if job_id else {}
            if job_id:
                self.run("scancel", job_id, check=False)
            raise TimeoutError(f"job {job_id or '?'} not finished after {timeout}s: {info}\n{err}") from None
        job_id = out.strip().split("\n")[0].split(";")[0] if out.strip() else ""
        if not job_id:
            raise RuntimeError(f"sbatch did not submit ({proc.returncode}): {' '.join(cmd)}\n{err}")
        return job_id, proc.returncode

    def cancel(self, job_id: str) -> None:
        self.run("scancel", str(job_id), check=False)

    # --- job information ----------------------------------------------------------
    def jobcomp_records(self, job_id: str | None = None) -> list[dict[str, str]]:
        """Records of finished (and requeued) jobs from the jobcomp file, oldest first.

        With `job_id` ("12" or array task "12_1"), only that job's records; for an array job id
        also its tasks' records.
        """
        try:
            lines = self.jobcomp_file.read_text().splitlines()
        except FileNotFoundError:
            return []
        recs = [_parse_kv(line) for line in lines if line.strip()]
        if job_id is None:
            return recs
        job_id = str(job_id)
        if "_" in job_id:
            array_id, task = job_id.split("_", 1)
            return [r for r in recs if r.get("ArrayJobId") == array_id and r.get("ArrayTaskId") == task]
        return [r for r in recs if r.get("JobId") == job_id or r.get("ArrayJobId") == job_id]

    def job_records(self, job_id: str) -> list[dict[str, str]]:
        """One dict per job (or array task): from `scontrol show job` while slurmctld still
        knows the job (MinJobAge=5 s after it ends), else the last jobcomp record of each."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if proc.returncode == 0 and proc.stdout.strip():
            return [_parse_kv(line) for line in proc.stdout.splitlines() if line.strip()]
        last: dict[str, dict[str, str]] = {}
        for rec in self.jobcomp_records(job_id):
            last[rec.get("JobId", "")] = rec  # requeued jobs have several records: keep the last
        return list(last.values())

    def job_info(self, job_id: str) -> dict[str, str]:
        """The (first) record of job_records(), {} if the job is unknown."""
        recs = self.job_records(job_id)
        return recs[0] if recs else {}

    def job_state(self, job_id: str) -> str | None:
        """JobState, e.g. "RUNNING", "COMPLETED", "FAILED"; None if unknown. For an array job
        id whose tasks differ: their sorted distinct states joined by ","."""
        states = sorted({r.get("JobState", "") for r in self.job_records(job_id)})
        return ",".join(states) if states else None

    def wait_for_state(self, job_id: str, states: str | tuple[str, ...] = ("RUNNING",),
                       timeout: float = 60, poll: float = 0.25) -> str:
        """Poll job_state() until it is one of `states`; returns it, TimeoutError otherwise."""
        states = (states,) if isinstance(states, str) else tuple(states)
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} in state {state}, not {states}, after {timeout}s")

    # --- lifecycle ----------------------------------------------------------------
    def script(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run `local_cluster.sh <command>` for this cluster's state dir (and ports)."""
        env = {**self.env, **self.script_env}
        return subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        proc = self.script("stop")
        if proc.returncode != 0:
            raise RuntimeError(f"local_cluster.sh stop failed ({proc.returncode}):\n{proc.stderr}")


@contextmanager
def _start_lock(state_dir: Path):
    """Serialize concurrent starts of the same cluster (e.g. pytest-xdist workers)."""
    lock_path = Path(f"{state_dir}.lock")
    with open(lock_path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def start_cluster(state_dir: str | os.PathLike | None = None, script_env: dict | None = None,
                  timeout: float = 300) -> LocalSlurmCluster:
    """Start the cluster in `state_dir` unless it already runs; returns a LocalSlurmCluster.

    `script_env`: extra variables for local_cluster.sh (LOCAL_SLURM_CTLD_PORT, ...).
    Raises ClusterUnavailable (exit code 3: not root, packages not installable) or
    RuntimeError (anything else, with the script's output: daemon logs' tails).
    """
    state_dir = Path(state_dir or os.environ.get("LOCAL_SLURM_DIR") or DEFAULT_STATE_DIR)
    cluster = LocalSlurmCluster(state_dir=state_dir, env=cluster_env(state_dir), script_env=dict(script_env or {}))
    with _start_lock(state_dir):
        if cluster.script("status").returncode == 0:
            return cluster  # already running (started by a user or another session): not ours to stop
        t0 = time.monotonic()
        proc = cluster.script("start", timeout=timeout)
        cluster.start_seconds = time.monotonic() - t0
    if proc.returncode == EXIT_UNAVAILABLE:
        lines = [line for line in proc.stderr.splitlines() if "unavailable:" in line]
        reason = lines[-1].split("unavailable:", 1)[1].strip() if lines else proc.stderr.strip()[-300:]
        raise ClusterUnavailable(f"local SLURM cluster unavailable: {reason}")
    if proc.returncode != 0:
        raise RuntimeError(f"local_cluster.sh start failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    cluster.started_here = True
    return cluster


@pytest.fixture(scope="session")
def slurm_cluster():
    """Session-wide local SLURM cluster (see module docstring); skips where it cannot run."""
    try:
        cluster = start_cluster(script_env={"LOCAL_SLURM_NODES": os.environ.get("LOCAL_SLURM_NODES", TEST_NODES)})
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    print(f"\n[slurm_cluster] {'started in %.1fs' % cluster.start_seconds if cluster.started_here else 'reusing running cluster'}"
          f" ({cluster.state_dir})")
    try:
        yield cluster
    finally:
        if cluster.started_here:
            cluster.stop()
