"""Training data: OpenCLIP's get_data, plus the third-tower cache join, a stream that is the same for the same seed
and resumes at any batch (training/resumable_data.py, which also stops epochs that could never end), and our
evaluation sets.

Shards, braceexpand, `::` sources with upsampling factors, resampling, CSV and ImageNet stay OpenCLIP's code.
"""
import copy
import logging

from open_clip_3t.shards import expand_shards

from ._open_clip_train import openclip_get_data, openclip_is_webdataset, wds_make_resumable
from .cached_data import cache_plan, get_cached_wds_dataset
from .eval_sets import get_eval_data
from .long_run import ignore_stop_signals
from .resumable_data import ResumableStream, TrainingDataError  # noqa: F401  (TrainingDataError: main's stops)


def resume_of_this_rank(args, num_workers):
    """The resume point (training/resumable_data.py) of this rank's train stream: the exact positions of its data
    workers when the checkpoint came from as many ranks and workers as this run has; else the number of batches to
    skip per worker, said once, since the rest of the epoch is then not in the order the interrupted run had."""
    resume = getattr(args, "resume_position", None)
    if not resume:
        return None
    world_size, rank = getattr(args, "world_size", 1), getattr(args, "rank", 0)
    if resume["world_size"] == world_size and resume["workers"] == num_workers:
        return {"epoch": resume["epoch"], "positions": resume["positions"][rank]}
    if rank == 0:
        logging.warning(f"the checkpoint was written by {resume['world_size']} rank(s) x {resume['workers']} data "
                        f"worker(s), this run has {world_size} x {num_workers}: epoch {resume['epoch']} goes on "
                        f"after the {resume['batches']} batches it had consumed, but no longer in the order the "
                        f"interrupted run would have seen")
    consumed = resume["batches"]
    return {"epoch": resume["epoch"], "skip": {w: max(0, -(-(consumed - w) // num_workers))
                                              for w in range(num_workers)}}


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """`open_clip_train.data.get_data`, with the train set joined to cached h embeddings under --third-tower-cache
    (batches (images, texts, third_embeddings)), webdataset train sets made resumable (batches carry their data
    position; see training/resumable_data.py), and the --zeroshot-data folders added."""
    preprocess_train, preprocess_val = preprocess_fns
    plan = cache_plan(args) if args.train_data and args.third_tower_cache else None
    if plan is not None and plan.cached:
        train = get_cached_wds_dataset(args, preprocess_train, is_train=True, epoch=epoch, tokenizer=tokenizer)
        others = copy.copy(args)
        others.train_data = None  # OpenCLIP builds everything else (val, ImageNet)
        data = openclip_get_data(others, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        data["train"] = train
    else:
        data = openclip_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    if "train" in data and args.train_data and openclip_is_webdataset(args):
        hint = "check that the shards of --train-data exist and hold images with captions"
        if plan is not None and plan.cached and plan.cache_missing == "skip":
            hint += (", and that the third-tower cache covers them (`python -m open_clip_3t.cache verify`): "
                     "--third-tower-cache-missing skip drops the samples it lacks")
        train = data["train"]
        rank = getattr(args, "rank", 0)
        stream = ResumableStream(args.seed, rank, train.shared_epoch, args.dataset_resampled,
                                 len(expand_shards(args.train_data)), hint, resume_of_this_rank(args, max(1, args.workers)))
        wds_make_resumable(train, stream, args.seed, rank, worker_init_fn=ignore_stop_signals)
        train.resumable = True
    data.update(get_eval_data(args, preprocess_val, tokenizer))
    return data
