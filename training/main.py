"""`python -m training.main`: OpenCLIP's trainer for 3T, LiT and the CLIP baseline.

This runs `open_clip_train.main.main` (distributed set-up, logging, optimizer, scheduler, checkpoints, resume,
TensorBoard/W&B) with seven of its helpers replaced (see training/_open_clip_train.py), each for a reason:
- parse_args: adds the 3T flags, rejects inconsistent ones before any work and resolves the run's plan, which every
  later stage reads as args.run_plan (training/params.py);
- create_model_and_transforms: passes the 3T options to the factory (h's weights, a cache instead of h, head
  type...), loads local timm weights into a LiT image tower, copies h into f for 3T finetuning, and freezes the
  heads, temperatures and biases that no loss term uses (DDP fails on parameters that never get a gradient);
- get_data: joins cached h embeddings to the shards, stops an epoch that could never end, adds evaluation sets
  (training/data.py);
- train_one_epoch: batches with h embeddings, three temperatures (and biases), 3T gradient accumulation
  (training/train.py);
- evaluate: adds zero-shot on --zeroshot-data folders, R@k retrieval and numpy>=2.4-safe accuracy (training/train.py);
- pt_load: --resume latest falls back to the newest checkpoint that loads (training/run_folder.py);
- setup_logging: OpenCLIP's, without forcing INFO onto torch's loggers (their dynamo statistics at exit); TORCH_LOGS works.
Before OpenCLIP starts, global rank 0 locks the run folder: one live job per LOGS/NAME (training/run_folder.py).
"""
import glob
import logging
import os
import shutil
import sys

import open_clip
import timm
import torch

import open_clip_3t  # noqa: F401  (registers the 3T model family)
from open_clip_3t._openclip import RemoteCodeError, trusting_remote_code
from open_clip_3t.cache import CacheError
from open_clip_3t.factory import checkpoint_misfit
from open_clip_3t.model import tower_keys, transfer_heads
from open_clip_3t.weights import WeightsError, create_timm_model

from ._open_clip_train import RendezvousError, launch_rank, openclip_setup_logging, openclip_trainer
from .data import TrainingDataError, get_data
from .eval_sets import EvalDataError
from .long_run import CheckpointError, Diverged, Preempted, install_signal_handlers, save_checkpoint
from .params import fail, meta_build_kwargs, parse_args
from .run_folder import RunFolderError, check_resume, checkpoint_loader, lock_run_folder
from .train import evaluate, train_one_epoch


def freeze_unused(model):
    """requires_grad=False on the heads, temperatures and biases of terms with weight 0 and on the temperatures and
    biases unused by l2 transfer, before DDP and the optimizer are created (DDP fails on parameters that never get a
    gradient)."""
    cfg, heads = model.three_towers_cfg, transfer_heads(model.tower_names)
    names = [name for weight, term in zip(cfg.loss_weights, model.loss_terms) if not weight
             for name in (*heads.get(term.name, ()), term.scale, term.bias)]
    if cfg.transfer == "l2":  # the transfer terms then use neither temperature nor bias
        names += [name for term in model.loss_terms[1:] for name in (term.scale, term.bias)]
    names = [name for name in dict.fromkeys(names) if getattr(model, name, None) is not None]  # biases: SigLIP only
    for name in names:
        part = getattr(model, name)
        for p in [part] if isinstance(part, torch.nn.Parameter) else part.parameters():
            p.requires_grad_(False)
    if names:
        logging.info(f"3T: frozen, used by no loss term (loss weights {list(cfg.loss_weights)}, "
                     f"transfer {cfg.transfer}): {', '.join(names)}")
    return names


def init_image_from_third_tower(model, tower):
    """3T finetuning: f's timm trunk starts from the weights of the third tower called `tower` (same architecture
    required)."""
    trunk = getattr(model.visual, "trunk", None)
    h = model.third_towers[tower].model
    if trunk is None:
        raise ValueError("--third-tower-init-image: f is not a timm tower; use a 3T config whose "
                         "vision_cfg.timm_model_name is h's timm model")
    h_state, f_state = h.state_dict(), trunk.state_dict()
    differ = sorted(k for k in set(h_state) | set(f_state)
                    if k not in h_state or k not in f_state or h_state[k].shape != f_state[k].shape)
    if differ:
        raise ValueError(f"--third-tower-init-image: f and h have different weights ({len(differ)} keys, "
                         f"e.g. {differ[:3]}); f must be built exactly like h (same timm model and image size)")
    trunk.load_state_dict(h_state)
    logging.info(f"3T finetuning: f's trunk initialised from third tower {tower} ({len(h_state)} tensors)")


def load_image_tower_weights(model, timm_name, path):
    """LiT: a local timm weights file into the timm image tower, through timm's own file door (which drops the
    classifier and resizes position embeddings as it does for hub weights). Strict: every weight of the timm
    trunk comes from the file (a classifier the tower uses as its projection stays as built)."""
    source = create_timm_model(timm_name, path, what="--image-tower-weights")
    result = model.visual.trunk.load_state_dict(source.state_dict(), strict=False)
    if result.unexpected_keys:
        raise WeightsError(f"--image-tower-weights {path}: keys {result.unexpected_keys[:3]} do not fit the image "
                           f"tower {timm_name}; pass weights of that timm model")
    logging.info(f"image tower initialised from {path} ({timm_name}); left as built: {result.missing_keys}")


def create_student(args, model_name, pretrained, kwargs):
    plan = args.run_plan
    timm_name = plan.model_cfg.get("vision_cfg", {}).get("timm_model_name")
    starts_pretrained = plan.image_tower_weights or args.pretrained_image or plan.init_image_from
    if timm_name and starts_pretrained and kwargs.get("image_mean") is None:
        # A pretrained timm tower (LiT, or f started from h) expects its own normalisation, as h does (unless
        # --image-mean/--image-std).
        data_cfg = timm.models.get_pretrained_cfg(timm_name)
        kwargs.update(image_mean=data_cfg.mean, image_std=data_cfg.std)
        # recorded in params.txt (written after the model is built): evaluation and export read it from there
        args.image_mean, args.image_std = list(data_cfg.mean), list(data_cfg.std)
        logging.info(f"image normalisation of {timm_name}: mean {data_cfg.mean}, std {data_cfg.std}")
    kwargs.update(plan.model_kwargs())

    model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(model_name, pretrained, **kwargs)

    if plan.image_tower_weights:
        load_image_tower_weights(model, timm_name, plan.image_tower_weights)
    if plan.family == "3t":
        tower = plan.init_image_from
        if tower:
            init_image_from_third_tower(model, tower)
            if plan.tower(tower).source == "cache" and plan.cache_missing != "online":
                setattr(model, tower_keys(tower).tower, None)  # built only to initialise f: its cache replaces it
        freeze_unused(model)
    return model, preprocess_train, preprocess_val


def model_factory(args):
    """Replacement for open_clip_train.main's create_model_and_transforms: the first call builds the model being
    trained; a second one (the --distill teacher) takes OpenCLIP's path untouched."""
    calls = []

    def create_model_and_transforms(model_name, pretrained=None, **kwargs):
        calls.append(model_name)
        if len(calls) > 1:
            return open_clip.create_model_and_transforms(model_name, pretrained, **kwargs)
        return create_student(args, model_name, pretrained, kwargs)
    return create_model_and_transforms


# Our one-line errors: after the arguments are checked they can still come from the rendezvous, the model build
# (weights, a model's own code), the data loader (the cache join, an endless epoch), an evaluation set (an image that
# does not decode), the run folder (lock, resume) or a long run (divergence, a checkpoint that cannot be written).
STOPS = (CacheError, WeightsError, TrainingDataError, RunFolderError, Diverged, CheckpointError,
         RemoteCodeError, RendezvousError, EvalDataError)


def one_line(error):
    """The message of one of our errors, also when a DataLoader worker raised it: torch re-raises it with the
    worker's traceback in the message, whose last line is 'module.Class: message'."""
    lines = str(error).strip().splitlines() or [""]
    return lines[-1].split(": ", 1)[1] if len(lines) > 1 and ": " in lines[-1] else lines[-1]


def claim_run_folder(args):
    """Global rank 0, before any process group or model: lock LOGS/NAME and check what --resume latest will find.
    Returns the lock (held until it is closed or the process ends), or None."""
    if launch_rank() != 0 or not args.name or not args.logs or args.logs.lower() == "none":
        return None  # without --name, OpenCLIP names the run by its start time: a new folder
    run_dir = os.path.join(args.logs, args.name)
    lock = lock_run_folder(run_dir)
    if args.resume == "latest" and args.remote_sync is None:
        try:
            check_resume(os.path.join(run_dir, "checkpoints"), args.save_most_recent, lambda path: checkpoint_misfit(
                args.model, path, strict=True, **meta_build_kwargs(args, args.run_plan)))
        except RunFolderError:
            if lock is not None:
                lock.close()
            raise
    return lock


def new_run_folder(args):
    """Global rank 0: whether this run creates its folder LOGS/NAME (without --name, OpenCLIP names a new one)."""
    return launch_rank() == 0 and bool(args.logs) and args.logs.lower() != "none" and not (
        args.name and os.path.exists(os.path.join(args.logs, args.name)))


def set_aside_unstarted_run(args):
    """The run folder this run created, when the run stops before its first checkpoint: its out.log (which says why)
    becomes out.log.failed, so that the folder no longer looks like a run and OpenCLIP does not refuse the same --name
    ("Experiment already exists"); a folder holding nothing else (no log yet) is removed."""
    run_dir = os.path.join(args.logs, args.name) if args.name else None
    if run_dir is None or not os.path.isdir(run_dir) or glob.glob(os.path.join(glob.escape(run_dir), "checkpoints",
                                                                                 "*.pt")):
        return
    for handler in list(logging.getLogger().handlers):  # OpenCLIP's out.log handler
        if os.path.abspath(getattr(handler, "baseFilename", "/")).startswith(os.path.abspath(run_dir) + os.sep):
            handler.close()
            logging.getLogger().removeHandler(handler)
    logs = [name for name in os.listdir(run_dir) if name.startswith("out") and name.endswith(".log")]
    if not logs:
        shutil.rmtree(run_dir, ignore_errors=True)
    for name in logs:
        os.replace(os.path.join(run_dir, name), os.path.join(run_dir, name + ".failed"))


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # our checks run here, before any process group, model or data
    install_signal_handlers()  # SIGUSR1 / SIGTERM: save and stop at the next step boundary (training/long_run.py)
    lock, new_folder = None, new_run_folder(args)
    try:
        lock = claim_run_folder(args)
        with openclip_trainer(rendezvous_timeout=args.rendezvous_timeout,
                              parse_args=lambda _: args, create_model_and_transforms=model_factory(args),
                              get_data=get_data, train_one_epoch=train_one_epoch, evaluate=evaluate,
                              pt_load=checkpoint_loader(args), setup_logging=openclip_setup_logging,
                              save_checkpoint=save_checkpoint) as run:
            with trusting_remote_code(args.trust_remote_code):  # --trust-remote-code: for OpenCLIP's loads too
                result = run(argv)
    except Preempted as e:
        logging.warning(str(e))
        print(f"training.main: {e}", file=sys.stderr)
        raise SystemExit(e.code) from None
    except STOPS as e:
        if logging.getLogger().handlers:  # OpenCLIP's log is set up: keep the reason in out.log too
            logging.error(one_line(e))
        if new_folder:
            set_aside_unstarted_run(args)
        if args.debug:
            raise
        fail(one_line(e), code=1 if isinstance(e, (Diverged, CheckpointError)) else 2)
    finally:
        if lock is not None:
            lock.close()
    if result == -1:  # OpenCLIP returns -1 (after printing why) instead of raising, e.g. when the run exists
        raise SystemExit("training.main: stopped without training (see the message above); for an existing "
                         "run pass a new --name or --resume latest")
    return result


if __name__ == "__main__":
    main()
