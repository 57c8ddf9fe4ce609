"""Training from precomputed third-tower embeddings (`--third-tower-cache DIR`, built with open_clip_3t.cache).

`get_cached_wds_dataset` is OpenCLIP's own get_wds_dataset (shard shuffling, resampling, `::` sources, workers,
node split: all unchanged) with one stage added right after the tar reader, where each sample still knows its shard
(`__url__`) and `__key__`: it attaches the cached embedding. Batches become (images, texts, third_embeddings).

Each sidecar is read whole once per shard, and refused (CacheError, whatever --cache-missing says) if its bytes do not
match its own sha256 or an embedding is not finite: corrupt is not missing. Each joined row is checked against a CRC32
of the sample's image bytes stored at build time: a sample whose image changed since the build stops the run under
--cache-missing error and counts as missing otherwise. Samples missing from the cache follow --cache-missing:
- error:  stop with an error naming the shard and key (the default; before training, a shard with no sidecar at all
          is already refused);
- skip:   drop the sample;
- online: its row of third_embeddings is NaN; the training loop fills NaN rows with h computed online
          (`fill_missing_third`), so the model must then be built with its third tower.
Samples the build skipped as corrupt (undecodable image, no caption) are dropped, as OpenCLIP's decode stage would.
"""
import logging
import multiprocessing as mp

import numpy as np
import torch

from open_clip_3t import cache
from open_clip_3t._openclip import openclip_get_wds_dataset, openclip_has_caption_and_image, wds_join_field

FIELD = "__third__"  # webdataset's decoder leaves keys starting with "__" alone
POLICIES = ("error", "skip", "online")


class JoinStats:
    """Counters shared by the DataLoader workers (like OpenCLIP's SharedEpoch): joined, dropped as corrupt at
    build, missing from the cache. They accumulate over epochs."""

    def __init__(self):
        self._values = {name: mp.Value("q", 0) for name in ("joined", "corrupt", "missing")}

    def add(self, **counts):
        for name, n in counts.items():
            if n:
                with self._values[name].get_lock():
                    self._values[name].value += n

    def __getattr__(self, name):
        if name.startswith("_") or name not in self._values:
            raise AttributeError(name)
        return self._values[name].value

    def __repr__(self):
        return f"JoinStats(joined={self.joined}, corrupt={self.corrupt}, missing={self.missing})"


class CacheJoin:
    """The pipeline stage: samples in shard order -> the same samples carrying FIELD (one sidecar read per shard)."""

    def __init__(self, cache_dir, policy, dim, dtype, stats):
        self.cache_dir, self.policy, self.dim, self.dtype, self.stats = cache_dir, policy, dim, dtype, stats

    def _load(self, url):
        """(embeddings, {key: row}, image crc32 per row, keys the build skipped as corrupt) of a shard."""
        path = cache.sidecar_path(self.cache_dir, url)
        try:
            embeddings, keys, crc32, meta = cache.load_sidecar(path)
        except FileNotFoundError:  # validated before training: only reachable under skip/online
            logging.warning(f"third-tower cache: no sidecar for shard {url} ({path}): its samples are "
                            f"{'dropped' if self.policy == 'skip' else 'computed online'}")
            return None, {}, None, set()
        rows = {key: i for i, key in enumerate(keys)}
        return torch.from_numpy(np.array(embeddings)), rows, crc32.tolist(), {key for key, _ in meta["skipped"]}

    def _flush(self, url, counts):
        self.stats.add(**counts)
        if counts["missing"]:
            logging.warning(f"third-tower cache: {counts['missing']} sample(s) of {url} missing from the cache "
                            f"({'dropped' if self.policy == 'skip' else 'h computed online'})")

    def __call__(self, samples):
        url, counts = None, None
        missing_row = torch.full((self.dim,), float("nan"), dtype=self.dtype)
        for sample in samples:
            if sample["__url__"] != url:
                if url is not None:
                    self._flush(url, counts)
                url, counts = sample["__url__"], {"joined": 0, "corrupt": 0, "missing": 0}
                embeddings, rows, crc32, corrupt = self._load(url)
            if not openclip_has_caption_and_image(sample):
                yield sample  # OpenCLIP's next stage drops it; the build skipped it too
                continue
            key = sample["__key__"]
            row = rows.get(key)
            stale = row is not None and cache.image_crc32(cache.image_bytes(sample)) != crc32[row]
            if row is not None and not stale:
                sample[FIELD] = embeddings[row]
                counts["joined"] += 1
            elif key in corrupt:
                counts["corrupt"] += 1
                continue
            elif stale and self.policy == "error":
                raise cache.CacheError(f"shard {url} changed since the third-tower cache {self.cache_dir} was built "
                                       f"(sample {key!r} has another image than the one the cache embedded): rebuild "
                                       f"the cache for this data (`python -m open_clip_3t.cache verify --checksum` "
                                       f"lists the changed shards)")
            elif self.policy == "error":
                raise cache.CacheError(f"sample {key!r} of shard {url} is not in the third-tower cache "
                                       f"{self.cache_dir}: rebuild the cache for this data, or pass --cache-missing "
                                       f"skip|online")
            else:
                counts["missing"] += 1
                if self.policy == "skip":
                    continue
                sample[FIELD] = missing_row
            yield sample
        if url is not None:
            self._flush(url, counts)


def validate_cache(args, three_towers=None):
    """Check args.third_tower_cache against args.train_data and the model's third tower (args.model,
    args.third_tower_weights; or an explicit three_towers section) under args.cache_missing. Raises CacheError (one
    line) on a mismatch; reads the weights file's bytes (sha256) and each sidecar's header, builds nothing.
    Cheap enough to call while checking arguments, before any model is built. Returns a summary dict."""
    policy = getattr(args, "cache_missing", "error")
    if policy not in POLICIES:
        raise cache.CacheError(f"--cache-missing {policy}: use one of {', '.join(POLICIES)}")
    cfg = cache.third_tower_cfg(args.model, getattr(args, "third_tower_weights", None), three_towers)
    summary = cache.validate(args.third_tower_cache, args.train_data, cfg, policy)
    summary["embed_dim"] = cfg.embed_dim
    return summary


def get_cached_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None, three_towers=None):
    """OpenCLIP's get_wds_dataset with cached h embeddings joined: batches (images, texts, third_embeddings).

    Reads args.third_tower_cache, args.cache_missing, args.model, args.third_tower_weights, args.train_data.
    The cache is validated first (CacheError, one line). Validation data (is_train=False) is OpenCLIP's, unchanged.
    The returned DataInfo has `cache_stats` (JoinStats) and `cache_summary` (shards, samples, missing shards).
    """
    if not is_train:
        return openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
    policy = getattr(args, "cache_missing", "error")
    summary = validate_cache(args, three_towers)
    logging.info(f"third-tower cache {args.third_tower_cache}: {summary['samples']} embeddings for "
                 f"{summary['shards']} shards ({len(summary['missing_shards'])} shards missing, --cache-missing "
                 f"{policy}; {summary['skipped']} corrupt samples skipped at build)")

    stats = JoinStats()
    dtype = torch.float16 if summary["dtype"] == "float16" else torch.float32
    join = CacheJoin(args.third_tower_cache, policy, summary["embed_dim"], dtype, stats)
    data_info = openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
    wds_join_field(data_info, join, FIELD)
    data_info.cache_stats = stats
    data_info.cache_summary = summary
    return data_info


def fill_missing_third(model, images, third):
    """--cache-missing online: NaN rows of `third` (samples missing from the cache) get h's embedding, computed online
    from the training images (f's view, resized to h's input). Returns (third, number of rows filled)."""
    missing = torch.isnan(third).any(dim=1)
    n = int(missing.sum())
    if n:
        h_model = model.module if hasattr(model, "module") else model
        if getattr(h_model, "third_tower", None) is None:
            raise RuntimeError(f"{n} sample(s) of this batch are missing from the third-tower cache and the model has "
                               f"no third tower: build the model with h for --cache-missing online")
        third = third.clone()
        third[missing] = h_model.encode_third(images[missing]).to(third.dtype)
    return third, n
