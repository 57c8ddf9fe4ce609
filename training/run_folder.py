"""The run folder LOGS/NAME: one live job at a time, and `--resume latest` from the newest checkpoint that loads.

- `lock_run_folder`: an exclusive `fcntl.flock` on LOGS/NAME/.lock, held by global rank 0 for the life of the job.
  The kernel releases it when the process ends, however it ends, so a crashed or cancelled job never leaves the
  folder stuck; a second job on the same folder stops at once, naming the job that holds it. A requeued SLURM job
  (same SLURM_JOB_ID as the holder) waits up to REQUEUE_WAIT_S for its previous run to release it, as a network
  file system may keep a dead node's lock until its lease expires.
- `check_resume`: before any model is built, `--resume latest` on a run none of whose checkpoints loads stops.
- `checkpoint_loader`: replaces OpenCLIP's `pt_load` for --resume: a checkpoint that does not load (e.g. truncated
  by a node that died while writing it) is skipped, with a warning saying why, for the next older one; a step
  checkpoint's resume point (epoch, batch, data positions, RNG states) goes to args.resume_position.
"""
import json
import logging
import os
import re
import socket
import sys
import time
from datetime import datetime

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None

from open_clip_3t.weights import checkpoint_unreadable, error_line

from ._open_clip_train import openclip_pt_load, openclip_run_checkpoints

LOCK_FILE = ".lock"
REQUEUE_WAIT_S = 180


class RunFolderError(RuntimeError):
    """A run folder in use, or a checkpoint that does not load: the message is one line naming the fix."""


def _describe(holder):
    job = f"SLURM job {holder['job']}" if holder.get("job") else "a job"
    return f"{job} on host {holder.get('host', '?')} (pid {holder.get('pid', '?')}, since {holder.get('since', '?')})"


def lock_run_folder(run_dir, wait_s=REQUEUE_WAIT_S):
    """Lock `run_dir` for this process (creating the folder); returns the open lock file, which holds the lock
    until it is closed or the process ends (None where the file system has no flock). RunFolderError if taken."""
    if fcntl is None:
        return None
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_FILE)
    lock = os.fdopen(os.open(path, os.O_RDWR | os.O_CREAT, 0o644), "r+")
    ours, deadline, said = os.environ.get("SLURM_JOB_ID"), time.monotonic() + wait_s, False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            lock.seek(0)
            try:
                holder = json.loads(lock.read() or "{}")
            except ValueError:
                holder = {}
            if not (ours and holder.get("job") == ours) or time.monotonic() > deadline:
                lock.close()
                raise RunFolderError(f"run folder {run_dir} is in use by {_describe(holder)}: wait for that job to "
                                     f"end (or cancel it), or pass another --name") from None
            if not said:  # a requeued job: its previous run's lock is about to go
                print(f"training.main: run folder {run_dir} is still locked by the previous run of SLURM job {ours} "
                      f"({_describe(holder)}); waiting up to {wait_s} s for it to be released", file=sys.stderr)
                said = True
            time.sleep(2)
        except OSError as e:  # e.g. Lustre mounted without -o flock
            lock.close()
            print(f"training.main: warning: cannot lock {path} ({e}): this file system has no flock, so nothing "
                  f"stops a second job from training into {run_dir}", file=sys.stderr)
            return None
    lock.seek(0)
    lock.truncate()
    lock.write(json.dumps({"job": ours, "host": socket.gethostname(), "pid": os.getpid(),
                           "since": datetime.now().isoformat(timespec="seconds")}) + "\n")
    lock.flush()
    return lock


def _loadable(candidates):
    """(first candidate that loads or None, [(candidate, why it does not load), ...] for those before it)."""
    skipped = []
    for path in candidates:
        reason = checkpoint_unreadable(path)
        if reason is None:
            return path, skipped
        skipped.append((path, reason))
    return None, skipped


def _none_loads(where, skipped):
    listed = "; ".join(f"{os.path.basename(p)}: {r}" for p, r in skipped[:3])
    return RunFolderError(f"--resume latest: no checkpoint of {where} loads ({listed}): delete them to start the run "
                          f"over, or pass --resume FILE")


def check_resume(checkpoint_dir, save_most_recent, misfit=lambda path: None):
    """Before any model: stop a `--resume latest` that could only fail, or would silently start the run over, or
    would load a checkpoint of another model (`misfit(path)`: why it does not fit the run's model, else None)."""
    found, latest_name = openclip_run_checkpoints(checkpoint_dir)
    if not found:
        return
    names = [os.path.basename(p) for p in found]
    epochs = [name for name in names if re.fullmatch(r"epoch_\d+\.pt", name)]
    if save_most_recent and latest_name not in names and epochs:
        raise RunFolderError(f"--resume latest --save-most-recent reads {checkpoint_dir}/{latest_name}, which does "
                             f"not exist, but {epochs[0]} does: OpenCLIP would start the run over; copy {epochs[0]} "
                             f"to {latest_name}, or resume without --save-most-recent")
    chosen, skipped = _loadable(found)
    if chosen is None:
        raise _none_loads(checkpoint_dir, skipped)
    why = misfit(chosen)
    if why:
        raise RunFolderError(f"--resume latest: {chosen} does not fit this run's model ({why}): the run folder holds "
                             f"another model's run; pass another --name, or the --model and third-tower flags it was "
                             f"trained with")


def checkpoint_loader(args):
    """Replacement for open_clip_train.main's `pt_load` (which it calls only for --resume). Under `--resume latest`
    a checkpoint that does not load is skipped for the next older one of the run (OpenCLIP's own ranking), each
    skip logged with the reason, and args.resume updated to the one resumed from. A checkpoint that still fails
    to load stops the run with one line naming it."""
    latest = args.resume == "latest"

    def pt_load(path, map_location=None):
        if latest and os.path.isfile(path):
            ranked, _ = openclip_run_checkpoints(os.path.dirname(path))
            older = ranked[ranked.index(path) + 1:] if path in ranked else ranked
            chosen, skipped = _loadable([path] + older)
            if chosen is None:
                raise _none_loads(os.path.dirname(path), skipped)
            for skipped_path, reason in skipped:
                logging.warning(f"--resume latest: skipped {skipped_path}: it does not load ({reason})")
            if chosen != path:
                logging.warning(f"--resume latest: resuming from {chosen}, the newest checkpoint that loads")
                args.resume = path = chosen
        try:
            checkpoint = openclip_pt_load(path, map_location=map_location)
        except Exception as e:
            raise RunFolderError(f"--resume: checkpoint {path} does not load ({error_line(e)}): it is truncated or "
                                 f"not a training checkpoint; pass another one") from None
        # A step checkpoint says where inside its epoch the run stopped (training/long_run.py): the data stream and
        # the training loop go on from there.
        args.resume_position = checkpoint.get("resume") if isinstance(checkpoint, dict) else None
        return checkpoint
    return pt_load
