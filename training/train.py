"""One training epoch for CLIP, LiT and 3T models, in place of open_clip_train.train.train_one_epoch.

Why it replaces OpenCLIP's loop (which it otherwise follows step for step: scheduler, autocast, gradient
accumulation, scaler, clipping, logging keys):
- OpenCLIP unpacks `images, texts = batch`: a batch may here carry more elements, the embeddings of each cached
  third tower, passed to the model as `third_embeddings={tower name: embeddings}`;
- OpenCLIP clamps only `logit_scale`: 3T has a temperature per loss term;
- OpenCLIP logs one temperature: we log every term's (and, under --siglip, its bias) and every loss term, named after
  its tower (image_third_loss, text_third_loss for one tower; image_in21k_loss, ... for a tower named in21k);
- OpenCLIP's gradient accumulation concatenates every model output except `logit_scale`/`logit_bias`, so 3T's
  extra temperatures and biases crash it: we keep every temperature and bias out of the concatenation;
- the global RNGs are re-seeded from (seed, rank, epoch) at the start of each epoch, so a run resumed at epoch N
  draws the same augmentations and shuffles as a run that never stopped.
"""
import logging
import math
import random
import time

import numpy as np
import torch
from open_clip import get_input_dtype, get_tokenizer

from open_clip_3t._openclip import openclip_autocast
from .cached_data import fill_missing_third
from .evaluation import evaluate, unwrap_model

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


def optimizer_step(model, optimizer, scaler, args):
    if scaler is not None:
        if args.horovod:
            optimizer.synchronize()
            scaler.unscale_(optimizer)
            if args.grad_clip_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            with optimizer.skip_synchronize():
                scaler.step(optimizer)
        else:
            if args.grad_clip_norm is not None:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
            scaler.step(optimizer)
        scaler.update()
    else:
        if args.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip_norm, norm_type=2.0)
        optimizer.step()


def clamp_scales(model):
    """All temperatures to [0, ln 100], as OpenCLIP does for CLIP's one."""
    m = unwrap_model(model)
    with torch.no_grad():
        if hasattr(m, "clamp_logit_scales_"):
            m.clamp_logit_scales_()
        else:
            m.logit_scale.clamp_(0, math.log(100))


def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
    device = torch.device(args.device)
    autocast = openclip_autocast(args.precision, device_type=device.type)
    input_dtype = get_input_dtype(args.precision)
    seed_epoch(args.seed, args.rank, epoch)
    three_towers = hasattr(unwrap_model(model), "third_embeddings")
    cached_towers = getattr(data["train"], "cached_towers", ())

    model.train()
    if args.distill:
        dist_model.eval()

    data["train"].set_epoch(epoch)
    dataloader = data["train"].dataloader
    num_batches_per_epoch = dataloader.num_batches // args.accum_freq
    sample_digits = math.ceil(math.log(dataloader.num_samples + 1, 10))

    accum_batches, accum_features = [], {}
    steps_done, samples_done = 0, 0
    losses_m = {}
    batch_time_m, data_time_m = AverageMeter(), AverageMeter()
    end = time.time()
    for i, batch in enumerate(dataloader):
        i_accum = i // args.accum_freq
        step = num_batches_per_epoch * epoch + i_accum
        if not args.skip_scheduler:
            scheduler(step)

        images, texts, third = unpack(batch, device, input_dtype, cached_towers)
        if third is not None:  # NaN rows: samples missing from a cache under --cache-missing online
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

        optimizer_step(model, optimizer, scaler, args)
        steps_done += 1
        samples_done += len(images) * args.accum_freq
        if args.accum_freq > 1:
            accum_batches, accum_features = [], {}
        clamp_scales(model)

        batch_time_m.update(time.time() - end)
        end = time.time()
        batch_count = i_accum + 1
        if args.rank == 0 and (i_accum % args.log_every_n_steps == 0 or batch_count == num_batches_per_epoch):
            batch_size = len(images)
            num_samples = batch_count * batch_size * args.accum_freq * args.world_size
            percent_complete = 100.0 * batch_count / num_batches_per_epoch
            for key, val in losses.items():
                losses_m.setdefault(key, AverageMeter()).update(val.item(), batch_size)
            scales = {key[len("logit_"):]: val.item() for key, val in model_out.items()
                      if key.startswith(SCALE_PREFIXES)}
            samples_per_second = args.accum_freq * args.batch_size * args.world_size / batch_time_m.val
            samples_per_second_per_gpu = args.accum_freq * args.batch_size / batch_time_m.val
            scale_log = " ".join(f"Logit {name.replace('_', ' ').title()}: {val:.3f}" for name, val in scales.items())
            loss_log = " ".join(f"{name.capitalize()}: {m.val:#.5g} ({m.avg:#.5g})" for name, m in losses_m.items())
            logging.info(
                f"Train Epoch: {epoch} [{num_samples:>{sample_digits}}/{dataloader.num_samples} "
                f"({percent_complete:.0f}%)] "
                f"Data (t): {data_time_m.avg:.3f} "
                f"Batch (t): {batch_time_m.avg:.3f}, {samples_per_second:#g}/s, {samples_per_second_per_gpu:#g}/s/gpu "
                f"LR: {optimizer.param_groups[0]['lr']:5f} {scale_log} {loss_log}")

            log_data = {"data_time": data_time_m.val, "batch_time": batch_time_m.val,
                        "samples_per_second": samples_per_second,
                        "samples_per_second_per_gpu": samples_per_second_per_gpu,
                        **scales, "lr": optimizer.param_groups[0]["lr"]}
            log_data.update({name: m.val for name, m in losses_m.items()})
            log_data = {"train/" + name: val for name, val in log_data.items()}
            if tb_writer is not None:
                for name, val in log_data.items():
                    tb_writer.add_scalar(name, val, step)
            if args.wandb:
                assert wandb is not None, "Please install wandb."
                log_data["step"] = step
                wandb.log(log_data, step=step)
            batch_time_m, data_time_m = AverageMeter(), AverageMeter()  # per log window, as OpenCLIP

    # Every rank says how far it went (ranks that disagree point at uneven data).
    logging.info(f"Train Epoch: {epoch} done on rank {args.rank}: {steps_done} steps, {samples_done} samples")
    cache_stats = getattr(data["train"], "cache_stats", None)
    if cache_stats is not None:  # counted by the loader's workers, including samples read ahead into the shuffle buffer
        logging.info(f"Third-tower cache after epoch {epoch} on rank {args.rank}: {cache_stats.joined} joined, "
                     f"{cache_stats.missing} missing (--cache-missing {args.cache_missing}), "
                     f"{cache_stats.corrupt} corrupt samples skipped")

    # open_clip_train.main evaluates after an epoch only when it sees one of its own eval sets; evaluation sets
    # added by training/evaluation.py alone would never run, so run them here (before the checkpoint is saved).
    eval_keys = set(data) - {"train"}
    if eval_keys and not eval_keys & set(OPENCLIP_EVAL_KEYS):
        tokenizer = get_tokenizer(args.model, cache_dir=args.cache_dir, context_length=args.force_context_length)
        evaluate(model, data, epoch + 1, args, tb_writer=tb_writer, tokenizer=tokenizer)
        if args.distributed:
            torch.distributed.barrier()
