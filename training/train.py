"""One training epoch, and training-time evaluation, for CLIP, LiT and 3T models: our open_clip_train/train.py
(`train_one_epoch` and `evaluate` replace OpenCLIP's; both keep its signatures, logging keys and schedule).

Why train_one_epoch replaces OpenCLIP's loop (which it otherwise follows step for step: scheduler, autocast, gradient
accumulation, scaler, clipping, logging keys):
- OpenCLIP unpacks `images, texts = batch`: a batch may here carry more elements, the embeddings of each cached
  third tower, passed to the model as `third_embeddings={tower name: embeddings}`;
- OpenCLIP clamps only `logit_scale`: 3T has a temperature per loss term;
- OpenCLIP logs one temperature: we log every term's (and, under --siglip, its bias) and every loss term, named after
  its tower (image_third_loss, text_third_loss for one tower; image_in21k_loss, ... for a tower named in21k), each
  as its own unweighted value L and the weighted total as `loss` (so curves of CLIP and 3T runs overlay);
- OpenCLIP's gradient accumulation concatenates every model output except `logit_scale`/`logit_bias`, so 3T's
  extra temperatures and biases crash it: we keep every temperature and bias out of the concatenation;
- the global RNGs are re-seeded from (seed, rank, epoch) at the start of each epoch, so a run resumed at epoch N
  draws the same augmentations and shuffles as a run that never stopped.
Why evaluate replaces OpenCLIP's: its zero-shot `accuracy()` converts a 1-element array with `float()`, which numpy
>= 2.4 refuses (ours is computed with torch); it knows only ImageNet (we add any --zeroshot-data folder); it gives
R@1, 5, 10 only (we give the --retrieval-k values, with the same keys). Metrics are defined in training/metrics.py.
"""
import json
import logging
import math
import os
import random
import time

import numpy as np
import open_clip
import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, get_input_dtype, get_tokenizer

from open_clip_3t.progress import tracked

from ._open_clip_train import openclip_autocast
from .cached_data import fill_missing_third
from .eval_sets import DEFAULT_RETRIEVAL_K
from .long_run import (EXIT_PREEMPTED, Preempted, Watch, save_step_checkpoint, set_rng_state, step_checkpoint,
                       stop_at_epoch_start, total_grad_norm)
from .metrics import (build_classifier, encode_pairs, logit_scale_of, retrieval_metrics, unwrap_model,
                      zero_shot_accuracy)

try:
    import wandb
except ImportError:
    wandb = None

# Model outputs holding a temperature (exponentiated) or a bias start with these; each is logged under its name without
# "logit_" (OpenCLIP logs "scale"): scale, scale_image_third, ..., bias, bias_image_third, ... (biases: --siglip).
SCALE_PREFIXES = ("logit_scale", "logit_bias")
# Data keys for which open_clip_train.main itself calls evaluate() after each epoch.
OPENCLIP_EVAL_KEYS = ("val", "imagenet-val", "imagenet-v2")


class AverageMeter:
    def __init__(self):
        self.val = self.sum = self.count = self.avg = 0.0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def seed_epoch(seed, rank, epoch):
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(2)
    torch.manual_seed(int(state[0]))
    np.random.seed(int(state[1]))
    random.seed(int(state[1]))


def unpack(batch, device, input_dtype, cached_towers=()):
    """(images, texts, {tower name: cached embeddings} or None) of a batch (images, texts, *one per cached tower)."""
    if len(batch) != 2 + len(cached_towers):
        raise ValueError(f"a training batch has {len(batch)} elements: expected images, texts and the embeddings of "
                         f"the cached towers {list(cached_towers)}")
    images, texts, *cached = batch
    images = images.to(device=device, dtype=input_dtype, non_blocking=True)
    texts = texts.to(device=device, non_blocking=True)
    third = {name: x.to(device=device, non_blocking=True) for name, x in zip(cached_towers, cached)} or None
    return images, texts, third


def forward(model, images, texts, third):
    return model(images, texts) if third is None else model(images, texts, third_embeddings=third)


def backward(total_loss, scaler):
    if scaler is not None:
        scaler.scale(total_loss).backward()
    else:
        total_loss.backward()


def prepare_update(model, optimizer, scaler, args):
    """Before the optimizer: unscale (amp), clip (--grad-clip-norm). Returns the gradient norm the divergence check
    reads, where it is needed before the update: --grad-clip-norm (computed once, for both) or
    --skip-nonfinite-steps (to skip the update). Else None: the check reads the loss terms only (a pass over every
    gradient costs ~3% of a small CPU step), and a non-finite gradient stops the run one step later (its update
    makes the loss non-finite; a checkpoint of non-finite weights is never written). With a GradScaler: None, its own
    skipping of non-finite fp16 gradients stays in charge."""
    params = list(model.parameters())
    if scaler is not None:
        if args.horovod:
            optimizer.synchronize()
        if args.grad_clip_norm is not None or args.horovod:
            scaler.unscale_(optimizer)
        if args.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip_norm, norm_type=2.0)
        return None
    if args.grad_clip_norm is None and not getattr(args, "skip_nonfinite_steps", 0):
        return None
    norm = total_grad_norm(params)
    if args.grad_clip_norm is not None:
        torch.nn.utils.clip_grads_with_norm_(params, args.grad_clip_norm, norm)
    return norm


def apply_update(optimizer, scaler, args, update):
    """optimizer.step() (through the GradScaler under amp), or no update at all for a skipped step."""
    if scaler is None:
        if update:
            optimizer.step()
        return
    if update and args.horovod:
        with optimizer.skip_synchronize():
            scaler.step(optimizer)
    elif update:
        scaler.step(optimizer)
    else:
        scaler.unscale_(optimizer)  # records the non-finite gradients, so that update() lowers the scale
    scaler.update()


def clamp_scales(model):
    """All temperatures to [0, ln 100], as OpenCLIP does for CLIP's one."""
    m = unwrap_model(model)
    with torch.no_grad():
        if hasattr(m, "clamp_logit_scales_"):
            m.clamp_logit_scales_()
        else:
            m.logit_scale.clamp_(0, math.log(100))


def logged_losses(loss, losses):
    """What the logs show of a step's losses: each term as its own value L, unweighted (a 3T term enters the loss as
    w/(1 + 2K) * L, but is logged as L, so that CLIP's and 3T's contrastive_loss mean the same), and the weighted
    total, the loss the step minimised, as `loss`."""
    factors = getattr(loss, "term_factors", {})
    return {name: val.item() / factors.get(name, 1.0) for name, val in losses.items()}


def log_step(args, epoch, i_accum, num_batches_per_epoch, dataloader, losses, losses_m, model_out, optimizer,
             batch_time_m, data_time_m, batch_size, step, tb_writer):
    """OpenCLIP's step line and scalars, with every temperature, bias and loss term (`losses`: logged_losses)."""
    batch_count = i_accum + 1
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))
    num_samples = batch_count * batch_size * args.accum_freq * args.world_size
    percent_complete = 100.0 * batch_count / num_batches_per_epoch
    for key, val in losses.items():
        losses_m.setdefault(key, AverageMeter()).update(val, batch_size)
    scales = {key[len("logit_"):]: val.item() for key, val in model_out.items() if key.startswith(SCALE_PREFIXES)}
    samples_per_second = args.accum_freq * args.batch_size * args.world_size / batch_time_m.val
    samples_per_second_per_gpu = args.accum_freq * args.batch_size / batch_time_m.val
    scale_log = " ".join(f"Logit {name.replace('_', ' ').title()}: {val:.3f}" for name, val in scales.items())
    loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})" for name, m in losses_m.items())
    logging.info(
        f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{dataloader.num_samples} ({percent_complete:.0f}%)] "
        f"Data (t): {data_time_m.avg:.3f} "
        f"Batch (t): {batch_time_m.avg:.3f}, {samples_per_second:#g}/s, {samples_per_second_per_gpu:#g}/s/gpu "
        f"LR: {optimizer.param_groups[0]['lr']:5f} {scale_log} {loss_log}")
    log_data = {"data_time": data_time_m.val, "batch_time": batch_time_m.val, "samples_per_second": samples_per_second,
                "samples_per_second_per_gpu": samples_per_second_per_gpu, **scales,
                "lr": optimizer.param_groups[0]["lr"]}
    log_data.update({name: m.val for name, m in losses_m.items()})
    log_data = {"train/" + name: val for name, val in log_data.items()}
    if tb_writer is not None:
        for name, val in log_data.items():
            tb_writer.add_scalar(name, val, step)
    if args.wandb:
        assert wandb is not None, "Please install wandb."
        log_data["step"] = step
        wandb.log(log_data, step=step)


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    device = torch.device(args.device)
    autocast = openclip_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    seed_epoch(args.seed, args.rank, epoch)
    three_towers = hasattr(unwrap_model(model), "third_embeddings")
    cached_towers = getattr(data["train"], "cached_towers", ())
    resumable = getattr(data["train"], "resumable", False)

    model.train()
    if args.distill:
        dist_model.eval()

    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    num_batches_per_epoch = dataloader.num_batches // args.accum_freq
    watch = Watch(args, epoch, num_batches_per_epoch, device)
    resume = getattr(args, "resume_position", None)
    resume = resume if resume and resume["epoch"] == epoch else None
    skip_batches = resume["batches"] if resume and not resumable else 0  # CSV, synthetic: drawn again and dropped
    if resume:
        logging.info(f"Train Epoch: {epoch} resumes at batch {resume['batches']} of {dataloader.num_batches} "
                     f"(step {resume['batches'] // args.accum_freq} of {num_batches_per_epoch})")
        if resume["world_size"] == args.world_size:
            set_rng_state(resume["rng"][args.rank])
    stop_at_epoch_start(model, optimizer, scaler, args, epoch)

    accum_batches, accum_features = [], {}
    steps_done, samples_done, positions = 0, 0, {}
    losses_m = {}
    batch_time_m, data_time_m = AverageMeter(), AverageMeter()
    end = time.time()
    for i, batch in enumerate(dataloader):
        if isinstance(batch, str) or i < skip_batches:  # SKIPPED: consumed before the resume (nothing was read)
            continue
        if resumable:
            *batch, position = batch
            positions[int(position["worker"])] = position
        i_accum = i // args.accum_freq
        step = num_batches_per_epoch * epoch + i_accum
        if not args.skip_scheduler:
            scheduler(step)

        images, texts, third = unpack(batch, device, input_dtype, cached_towers)
        if third is not None:  # NaN rows: samples missing from a cache under --third-tower-cache-missing online
            third, _ = fill_missing_third(model, images, third)
        data_time_m.update(time.time() - end)
        optimizer.zero_grad()

        if args.accum_freq == 1:
            with autocast():
                model_out = forward(model, images, texts, third)
                if args.distill:
                    with torch.no_grad():
                        dist_model_out = dist_model(images, texts)
                    model_out.update({f"dist_{k}": v for k, v in dist_model_out.items()})
                losses = loss(**model_out, output_dict=True)
                total_loss = sum(losses.values())
                losses["loss"] = total_loss
            backward(total_loss, scaler)
        else:
            # First pass without gradients: keep every per-sample output as negatives for the other micro-batches.
            with torch.no_grad(), autocast():
                if three_towers:  # the towers run online once per micro-batch, not twice
                    third = unwrap_model(model).third_embeddings(images, third)
                for key, val in forward(model, images, texts, third).items():
                    if not key.startswith(SCALE_PREFIXES):  # temperatures and biases are never concatenated
                        accum_features.setdefault(key, []).append(val)
            accum_batches.append((images, texts, third))
            if (i + 1) % args.accum_freq > 0:
                continue

            # Second pass, one micro-batch at a time with gradients, against the cached features of the others.
            optimizer.zero_grad()
            for j, (images, texts, third) in enumerate(accum_batches):
                with autocast():
                    model_out = forward(model, images, texts, third)
                    inputs = {key: torch.cat(cached[:j] + [model_out[key]] + cached[j + 1:])
                              for key, cached in accum_features.items()}
                    inputs.update({key: val for key, val in model_out.items() if key.startswith(SCALE_PREFIXES)})
                    losses = loss(**inputs, output_dict=True)
                    del inputs
                    total_loss = sum(losses.values())
                    losses["loss"] = total_loss
                backward(total_loss, scaler)

        update, save, stop = watch.check(losses, prepare_update(model, optimizer, scaler, args), step)
        apply_update(optimizer, scaler, args, update)
        if not update:
            optimizer.zero_grad()
        steps_done += 1
        samples_done += len(images) * args.accum_freq
        if args.accum_freq > 1:
            accum_batches, accum_features = [], {}
        clamp_scales(model)
        args._steps_this_job = getattr(args, "_steps_this_job", 0) + 1
        # every rank: the positions are gathered to rank 0
        if save and getattr(args, "logs", None) and args.logs.lower() != "none":
            checkpoint = step_checkpoint(model, optimizer, scaler, args, epoch, i + 1, positions)
            if checkpoint is not None and args.save_logs:
                save_step_checkpoint(args, checkpoint, epoch, i_accum + 1)
            watch.saved()
            if args.distributed:
                torch.distributed.barrier()
        if stop:
            raise Preempted(f"stopped at epoch {epoch} step {i_accum + 1} of {num_batches_per_epoch} after a signal, "
                            f"with a step checkpoint: resume with --resume latest", EXIT_PREEMPTED)

        batch_time_m.update(time.time() - end)
        end = time.time()
        if args.rank == 0 and (i_accum % args.log_every_n_steps == 0 or i_accum + 1 == num_batches_per_epoch):
            log_step(args, epoch, i_accum, num_batches_per_epoch, dataloader, logged_losses(loss, losses), losses_m,
                     model_out, optimizer, batch_time_m, data_time_m, len(images), step, tb_writer)
            batch_time_m, data_time_m = AverageMeter(), AverageMeter()  # per log window, as OpenCLIP

    # Every rank says how far it went (ranks that disagree point at uneven data).
    logging.info(f"Train Epoch: {epoch} done on rank {args.rank}: {steps_done} steps, {samples_done} samples")
    cache_stats = getattr(data["train"], "cache_stats", None)
    if cache_stats is not None:  # counted by the loader's workers, including samples read ahead into the shuffle buffer
        logging.info(f"Third-tower cache after epoch {epoch} on rank {args.rank}: {cache_stats.joined} joined, "
                     f"{cache_stats.missing} missing (--third-tower-cache-missing {args.third_tower_cache_missing}), "
                     f"{cache_stats.corrupt} corrupt samples skipped")

    # open_clip_train.main evaluates after an epoch only when it sees one of its own eval sets; evaluation sets
    # added by training/eval_sets.py alone would never run, so run them here (before the checkpoint is saved).
    eval_keys = set(data) - {"train"}
    if eval_keys and not eval_keys & set(OPENCLIP_EVAL_KEYS):
        tokenizer = get_tokenizer(args.model, cache_dir=args.cache_dir, context_length=args.force_context_length)
        evaluate(model, data, epoch + 1, args, tb_writer=tb_writer, tokenizer=tokenizer)
        if args.distributed:
            torch.distributed.barrier()


# --- training-time evaluation ---------------------------------------------------------------------------------

def _due(epoch, frequency, epochs):
    """OpenCLIP's schedule: every `frequency` epochs and after the last one; never when frequency is 0."""
    return bool(frequency) and (epoch % frequency == 0 or epoch == epochs)


def with_progress(dataloader, task, args):
    """The batches of one evaluation task, counted (done/total, rate, ETA): a bar on a terminal, else (and with
    --quiet) one log line per 10%."""
    total = getattr(dataloader, "num_batches", None) or (len(dataloader) if hasattr(dataloader, "__len__") else None)
    return tracked(dataloader, total, f"Eval {task}", quiet="lines" if getattr(args, "quiet", False) else False,
                   emit=logging.info)


def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None) -> dict:
    """open_clip_train.train.evaluate's replacement (same signature, keys and logging), on rank 0 only.

    Zero-shot ImageNet (`imagenet-val`, `imagenet-v2` entries; keys imagenet-zeroshot-val-top1/5, ...) and every
    `zeroshot/NAME` folder (NAME-zeroshot-top1/5) every --zeroshot-frequency epochs; retrieval on `val`
    (image_to_text_R@k, text_to_image_R@k, mean/median ranks, clip_val_loss) every --val-frequency epochs.
    """
    metrics = {}
    if getattr(args, "rank", 0) != 0:
        return metrics
    model = unwrap_model(model)
    model.eval()  # a ThreeTowersCLIP in eval mode is a plain CLIP: h and the heads never run
    device, precision = args.device, args.precision
    epochs = getattr(args, "epochs", 0)

    zeroshot = {k: v for k, v in data.items() if k in ("imagenet-val", "imagenet-v2") or k.startswith("zeroshot/")}
    if zeroshot and _due(epoch, getattr(args, "zeroshot_frequency", 1), epochs):
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(args.model)
        imagenet = [k for k in ("imagenet-val", "imagenet-v2") if k in zeroshot]
        if imagenet:
            logging.info("Starting zero-shot imagenet.")
            classifier = build_classifier(model, tokenizer, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES,
                                          device, precision)
            for key in imagenet:
                prefix = "imagenet-zeroshot-val" if key == "imagenet-val" else "imagenetv2-zeroshot-val"
                top1, top5 = zero_shot_accuracy(model, classifier, with_progress(data[key].dataloader, prefix, args),
                                                device, precision)
                metrics[f"{prefix}-top1"], metrics[f"{prefix}-top5"] = top1, top5
        for key in sorted(k for k in zeroshot if k.startswith("zeroshot/")):
            name = key.split("/", 1)[1]
            logging.info(f"Starting zero-shot {name}.")
            entry = data[key]
            classifier = build_classifier(model, tokenizer, entry.classnames, entry.templates, device, precision)
            batches = with_progress(entry.dataloader, f"{name}-zeroshot", args)
            top1, top5 = zero_shot_accuracy(model, classifier, batches, device, precision)
            metrics[f"{name}-zeroshot-top1"], metrics[f"{name}-zeroshot-top5"] = top1, top5

    if "val" in data and _due(epoch, getattr(args, "val_frequency", 1), epochs):
        image, text, loss = encode_pairs(model, with_progress(data["val"].dataloader, "retrieval", args), device,
                                         precision)
        scores = logit_scale_of(model) * image @ text.t()
        ks = getattr(args, "retrieval_k", None) or DEFAULT_RETRIEVAL_K
        metrics.update(retrieval_metrics(scores, ks=ks))
        metrics.update({"clip_val_loss": loss, "epoch": epoch, "num_samples": len(image)})

    if not metrics:
        return metrics
    logging.info(f"Eval Epoch: {epoch} " + "\t".join(f"{k}: {round(v, 4):.4f}" for k, v in metrics.items()))
    log_data = {"val/" + name: value for name, value in metrics.items()}
    if getattr(args, "save_logs", False):
        if tb_writer is not None:
            for name, value in log_data.items():
                tb_writer.add_scalar(name, value, epoch)
        with open(os.path.join(args.checkpoint_path, "results.jsonl"), "a+") as f:
            f.write(json.dumps(metrics) + "\n")
    if getattr(args, "wandb", False):
        import wandb
        step = None
        if "train" in data:
            step = data["train"].dataloader.num_batches // getattr(args, "accum_freq", 1) * epoch
        wandb.log({**log_data, "epoch": epoch}, step=step)
    return metrics
