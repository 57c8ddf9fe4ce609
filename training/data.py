"""Training data: OpenCLIP's get_data, plus the third-tower cache join, a guard against endless epochs, and our
evaluation sets.

Shards, braceexpand, `::` sources with upsampling factors, resampling, CSV and ImageNet stay OpenCLIP's code.
"""
import copy

import torch

from open_clip_3t.shards import expand_shards

from ._open_clip_train import openclip_get_data, openclip_is_webdataset, wds_watch
from .cached_data import cache_plan, get_cached_wds_dataset
from .eval_sets import get_eval_data


class TrainingDataError(RuntimeError):
    """Training data that can never fill an epoch: the message is one line naming the input to check."""


class EndlessEpochGuard:
    """Two webdataset stages that stop a training loader which would otherwise wait forever.

    OpenCLIP's train loader repeats passes over each data worker's shards until the epoch's batches are drawn
    (webdataset's with_epoch). A pass that yields no batch (every shard missing or unreadable, every sample dropped,
    e.g. by --cache-missing skip) would then repeat forever, logging each failed shard. So:
    - without resampling, a pass that ends with fewer usable samples than one batch raises TrainingDataError;
    - with --dataset-resampled (endless shard draws, no pass ends), `max_urls` shards drawn in a row without one
      usable sample raise it (10 x the shard count, at least 2000: twice what OpenCLIP's sample shuffle buffer
      reads before its first sample even when every shard holds a single sample).
    """

    def __init__(self, batch_size, num_shards, resampled, hint):
        self.batch_size, self.resampled, self.hint = batch_size, resampled, hint
        self.max_urls = max(10 * num_shards, 2000)
        self.urls_since_sample = 0

    def _where(self):
        worker = torch.utils.data.get_worker_info()
        return f"data-loader worker {worker.id}" if worker else "the data loader"

    def urls(self, urls):
        for url in urls:
            self.urls_since_sample += 1
            if self.resampled and self.urls_since_sample > self.max_urls:
                raise TrainingDataError(f"training data: {self._where()} drew {self.max_urls} shards in a row "
                                        f"(--dataset-resampled) without one usable sample, so the epoch could never "
                                        f"end: {self.hint}")
            yield url

    def samples(self, samples):
        n = 0
        for sample in samples:
            n += 1
            self.urls_since_sample = 0
            yield sample
        if not self.resampled and n < self.batch_size:
            raise TrainingDataError(f"training data: a full pass over the shards of {self._where()} gave {n} usable "
                                    f"sample(s), fewer than one batch of {self.batch_size}, so the epoch could never "
                                    f"end: {self.hint}")


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """`open_clip_train.data.get_data`, with the train set joined to cached h embeddings under --third-tower-cache
    (batches (images, texts, third_embeddings)), webdataset train sets guarded against endless epochs, and the
    --zeroshot-data folders added."""
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
                     "--cache-missing skip drops the samples it lacks")
        guard = EndlessEpochGuard(args.batch_size, len(expand_shards(args.train_data)), args.dataset_resampled, hint)
        wds_watch(data["train"], guard.urls, guard.samples)
    data.update(get_eval_data(args, preprocess_val, tokenizer))
    return data
