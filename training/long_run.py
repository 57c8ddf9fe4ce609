"""What a week-long run on a preemptible cluster needs from the training loop: step checkpoints (atomic, finite, the
newest few kept), a stop every rank agrees on (SIGUSR1 / SIGTERM: save, then exit EXIT_PREEMPTED for the launcher
to requeue), and divergence caught (a non-finite loss term or gradient norm stops the run or, with
--skip-nonfinite-steps K, skips at most K updates in a row; no checkpoint with a non-finite weight is ever written).

`Watch.check` runs once per optimizer step, between backward and the optimizer: one all-reduce carries every rank's
verdict (non-finite here, a signal received, a save due by the clock), so every rank skips, saves or stops at the
same step boundary.
"""
import atexit
import errno
import glob
import logging
import multiprocessing
import os
import random
import re
import shutil
import signal
import time

import numpy as np
import torch

from open_clip_3t.files import write_atomic
from open_clip_3t.weights import first_nonfinite

EXIT_PREEMPTED = 75    # stopped by SIGUSR1/SIGTERM after saving its progress: requeue it (sysexits' EX_TEMPFAIL)
EXIT_NO_PROGRESS = 76  # signalled before its first step: nothing new to save
STEP_CHECKPOINT = re.compile(r"epoch_(\d+)_step_(\d+)\.pt")


class Diverged(RuntimeError):
    """A non-finite loss, gradient or weight: one line naming where, and what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written (a full disk): one line naming the folder and the bytes needed."""


class Preempted(Exception):
    """Every rank stopped at the same step after a signal; `code` is the process's exit status."""

    def __init__(self, message, code):
        super().__init__(message)
        self.code = code


# --- signals ------------------------------------------------------------------------------------------------------

_received = []


def _note_signal(signum, frame):
    if not _received:
        logging.warning(f"received {signal.Signals(signum).name}: stopping at the next step boundary, after saving "
                        f"a step checkpoint")
    _received.append(signum)


def install_signal_handlers():
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, scontrol requeue, scancel) ask the
    run to stop at the next step boundary, after saving; nothing is killed mid-step."""
    for signum in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(signum, _note_signal)


# Set when the main process exits (atexit runs this before multiprocessing's own exit handler, which terminates the
# data workers with SIGTERM); forked data workers share it.
_exiting = multiprocessing.Value("b", 0)
atexit.register(lambda: setattr(_exiting, "value", 1))


def _worker_sigterm(signum, frame):
    if _exiting.value:  # the main process is shutting its workers down
        raise SystemExit(0)


def ignore_stop_signals(worker_id=None):
    """In DataLoader workers: the main process decides when to stop (SLURM signals every process of a job step), so
    SIGUSR1 and a SIGTERM from outside are ignored; the main process's own SIGTERM at its exit still ends them."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _worker_sigterm)


def stop_requested():
    return bool(_received)


# --- writing checkpoints ------------------------------------------------------------------------------------------

def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield "", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            for name, t in _tensors(value):
                yield f"{key}.{name}" if name else str(key), t
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            for name, t in _tensors(value):
                yield f"{i}.{name}" if name else str(i), t


def save_checkpoint(obj, path):
    """torch.save(obj, path), atomically (a temporary name, fsync, rename), refused for non-finite weights and for a
    folder without room for it, before anything is written. OpenCLIP's own epoch checkpoints come here too
    (training/_open_clip_train.py)."""
    state_dict = obj.get("state_dict") if isinstance(obj, dict) else None
    bad = first_nonfinite(state_dict) if isinstance(state_dict, dict) else None
    if bad is not None:
        raise Diverged(f"not writing {path}: the model's {bad} holds non-finite values; resume from the last "
                       f"checkpoint (--resume latest) with a lower --lr")
    folder = os.path.dirname(os.path.abspath(path))
    needed = sum(t.numel() * t.element_size() for _, t in _tensors(obj)) + (1 << 20)

    def full(free):
        return CheckpointError(f"checkpoint folder {folder} has {free} bytes free, {os.path.basename(path)} needs "
                               f"about {needed}: free space there (or move --logs) and resume with --resume latest; "
                               f"the previous checkpoints are untouched")
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise full(free)
    try:
        write_atomic(path, lambda f: torch.save(obj, f))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise full(shutil.disk_usage(folder).free) from None
        raise


def step_checkpoints(folder):
    """The step checkpoints of a run's checkpoints/ folder, newest first."""
    found = [(tuple(int(x) for x in m.groups()), p) for p in glob.glob(os.path.join(glob.escape(folder), "*.pt"))
             if (m := STEP_CHECKPOINT.fullmatch(os.path.basename(p)))]
    return [p for _, p in sorted(found, reverse=True)]


def rng_state():
    """This process's RNG states, in types a weights_only torch.load reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                       gauss), "random": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["random"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the per-step watch -------------------------------------------------------------------------------------------

def total_grad_norm(parameters):
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


class Watch:
    """One epoch's watch over a run: divergence, signals, step checkpoints. `state_fn()` gives the checkpoint to
    save (rank 0), `positions_fn()` this rank's data positions."""

    def __init__(self, args, epoch, steps_per_epoch, device):
        self.args, self.epoch, self.steps_per_epoch, self.device = args, epoch, steps_per_epoch, device
        # train_one_epoch's own callers (tests, scripts) may pass args without the long-run flags: all off
        self.every_n = getattr(args, "save_every_n_steps", 0)
        self.minutes = getattr(args, "save_every_minutes", 0)
        self.max_skips = getattr(args, "skip_nonfinite_steps", 0)
        self.skips_in_a_row = 0
        self.last_save = getattr(args, "_last_step_save", None) or time.monotonic()

    def check(self, losses, grad_norm, step):
        """Between backward and the optimizer: (update?, save?, stop?) agreed by every rank. Raises Diverged when a
        non-finite loss term or gradient norm is not to be skipped."""
        args = self.args
        finite = torch.stack([torch.isfinite(v.detach()).all() for v in losses.values()]).all()
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        due = bool(self.minutes) and args.rank == 0 and time.monotonic() - self.last_save >= 60 * self.minutes
        flags = torch.stack([~finite.to(self.device), torch.tensor(stop_requested(), device=self.device),
                             torch.tensor(due, device=self.device)]).to(torch.int32)  # on the loss's device (NCCL)
        if args.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad, stop, due = (bool(x) for x in flags.tolist())
        save = stop or due or bool(self.every_n) and (step + 1) % self.every_n == 0
        if not bad:
            self.skips_in_a_row = 0
            return True, save, stop
        self.skips_in_a_row += 1
        where = f"epoch {self.epoch}, step {step - self.epoch * self.steps_per_epoch + 1} of {self.steps_per_epoch} " \
                f"(global step {step + 1})"
        what = next((f"the loss term {name}" for name, v in losses.items() if not bool(torch.isfinite(v).all())),
                    "the gradient norm" if grad_norm is not None and not bool(torch.isfinite(grad_norm))
                    else "another rank's loss or gradients")
        if self.skips_in_a_row <= self.max_skips:
            logging.warning(f"skipped the update of {where}: {what} is not finite ({self.skips_in_a_row} in a row, "
                            f"--skip-nonfinite-steps {self.max_skips})")
            return False, save, stop
        raise Diverged(f"the run diverged at {where}: {what} is not finite; no checkpoint was written after it: "
                       f"resume from the last one (--resume latest) with a lower --lr, or pass --skip-nonfinite-steps K")

    def saved(self):
        self.last_save = time.monotonic()
        self.args._last_step_save = self.last_save


def checkpoint_name(epoch, step_in_epoch):
    return f"epoch_{epoch}_step_{step_in_epoch}.pt"


def save_step_checkpoint(args, checkpoint, epoch, step_in_epoch):
    """Rank 0 writes epoch_E_step_K.pt (E: epochs completed, K: steps done in epoch E), points epoch_latest.pt at it
    under --save-most-recent, then removes the step checkpoints beyond the newest --keep-step-checkpoints (never
    before the new one is complete)."""
    folder = args.checkpoint_path
    path = os.path.join(folder, checkpoint_name(epoch, step_in_epoch))
    save_checkpoint(checkpoint, path)
    if args.save_most_recent:  # OpenCLIP's --resume latest --save-most-recent reads epoch_latest.pt only
        latest = os.path.join(folder, "epoch_latest.pt")
        try:
            tmp = latest + ".link.tmp"
            if os.path.lexists(tmp):
                os.remove(tmp)
            os.link(path, tmp)
            os.replace(tmp, latest)
        except OSError:  # a file system without hard links: a copy
            save_checkpoint(checkpoint, latest)
    for old in step_checkpoints(folder)[max(1, args.keep_step_checkpoints):]:
        os.remove(old)
    logging.info(f"saved step checkpoint {path}")
    return path


def step_checkpoint(model, optimizer, scaler, args, epoch, batches, positions):
    """The training checkpoint of a step boundary (OpenCLIP's keys, plus where to resume: every rank's data
    positions and RNG states, gathered to rank 0); None on other ranks."""
    state = {"positions": positions, "rng": rng_state()}
    if args.world_size > 1:
        gathered = [None] * args.world_size if args.rank == 0 else None
        torch.distributed.gather_object(state, gathered, dst=0)
    else:
        gathered = [state]
    if args.rank != 0:
        return None
    saved = model._orig_mod if hasattr(model, "_orig_mod") else model  # what OpenCLIP saves: not the compiled wrapper
    checkpoint = {"epoch": epoch, "name": args.name, "state_dict": saved.state_dict(),
                  "optimizer": optimizer.state_dict(),
                  "resume": {"epoch": epoch, "batches": batches, "world_size": args.world_size,
                             "workers": max(1, args.workers), "accum_freq": args.accum_freq,
                             "positions": [g["positions"] for g in gathered], "rng": [g["rng"] for g in gathered]}}
    if scaler is not None:
        checkpoint["scaler"] = scaler.state_dict()
    return checkpoint


def stop_at_epoch_start(model, optimizer, scaler, args, epoch):
    """Every rank, before an epoch's first step: a signal received since the last step boundary (during start-up,
    evaluation or an epoch checkpoint) stops the run here, agreed by every rank. Progress made in this job is saved
    (a step checkpoint at this epoch's start) and the run exits EXIT_PREEMPTED for a requeue; a job that has trained
    nothing yet exits EXIT_NO_PROGRESS without saving (its launcher must not requeue it)."""
    flags = torch.tensor([int(stop_requested()), getattr(args, "_steps_this_job", 0)], device=args.device)
    if args.world_size > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    stop, steps = (int(x) for x in flags.tolist())
    if not stop:
        return
    if not steps:
        raise Preempted("stopped by a signal before its first step: nothing to save", EXIT_NO_PROGRESS)
    checkpoint = step_checkpoint(model, optimizer, scaler, args, epoch, 0, {})  # this epoch starts afresh
    if checkpoint is not None and args.save_logs:
        save_step_checkpoint(args, checkpoint, epoch, 0)
    if args.distributed:
        torch.distributed.barrier()
    raise Preempted(f"stopped by a signal before epoch {epoch}'s first step, with a step checkpoint: resume with "
                    f"--resume latest", EXIT_PREEMPTED)
