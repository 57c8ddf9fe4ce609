"""Training from precomputed third-tower embeddings (`--third-tower-cache [NAME=]DIR ...`, one cache per cached tower,
each built with open_clip_3t.cache).

`get_cached_wds_dataset` is OpenCLIP's own get_wds_dataset (shard shuffling, resampling, `::` sources, workers,
node split: all unchanged) with one stage added right after the tar reader, where each sample still knows its shard
(`__url__`) and `__key__`: it attaches every cached tower's embedding (one stage and one read of each cache's sidecar
per shard, whatever the number of caches). Batches become (images, texts, embeddings of each cached tower).

Each sidecar is read whole once per shard, and refused (CacheError, whatever --cache-missing says) if its bytes do not
match its own sha256 or an embedding is not finite: corrupt is not missing. Each joined row is checked against a CRC32
of the sample's image bytes stored at build time: a sample whose image changed since the build stops the run under
--cache-missing error and counts as missing otherwise. Samples missing from a cache follow --cache-missing:
- error:  stop with an error naming the cache, shard and key (the default; before training, a shard with no sidecar
          at all is already refused);
- skip:   drop the sample;
- online: its row of that tower's embeddings is NaN; the training loop fills NaN rows with the tower computed online
          (`fill_missing_third`), so the model must then be built with that tower.
Samples the build skipped as corrupt (undecodable image, no caption) are dropped, as OpenCLIP's decode stage would.
"""
import logging
import multiprocessing as mp

import numpy as np
import torch

from open_clip_3t import cache
from open_clip_3t._openclip import (openclip_get_wds_dataset, openclip_has_caption_and_image, three_towers_config,
                                   wds_join_field)
from open_clip_3t.cache.format import fingerprint_diffs
from open_clip_3t.third_tower import DEFAULT_TOWER, ThreeTowersCfg, parse_named

POLICIES = ("error", "skip", "online")


def field(tower):
    """The sample key of a tower's cached embedding (webdataset's decoder leaves keys starting with "__" alone)."""
    return f"__third_{tower}__"


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
    """The pipeline stage: samples in shard order -> the same samples carrying the embedding of each cached tower
    (one read of each cache's sidecar per shard). `caches`: {tower: (cache folder, dim, dtype)}. A sample counts as
    joined when every cache holds it, as missing when one does not."""

    def __init__(self, caches, policy, stats):
        self.caches, self.policy, self.stats = caches, policy, stats

    def _load(self, cache_dir, url):
        """(embeddings, {key: row}, image crc32 per row, keys the build skipped as corrupt) of a shard."""
        path = cache.sidecar_path(cache_dir, url)
        try:
            embeddings, keys, crc32, meta = cache.load_sidecar(path)
        except FileNotFoundError:  # validated before training: only reachable under skip/online
            logging.warning(f"third-tower cache {cache_dir}: no sidecar for shard {url} ({path}): its samples are "
                            f"{'dropped' if self.policy == 'skip' else 'computed online'}")
            return None, {}, None, set()
        rows = {key: i for i, key in enumerate(keys)}
        return torch.from_numpy(np.array(embeddings)), rows, crc32.tolist(), {key for key, _ in meta["skipped"]}

    def _flush(self, url, counts):
        self.stats.add(**counts)
        if counts["missing"]:
            logging.warning(f"third-tower cache: {counts['missing']} sample(s) of {url} missing from a cache "
                            f"({'dropped' if self.policy == 'skip' else 'computed online'})")

    def _join(self, sample, url, shard):
        """Sets each tower's field of `sample`; returns 'joined', 'missing' or 'corrupt' (dropped by the build)."""
        key, crc, missing = sample["__key__"], None, False
        for tower, (embeddings, rows, crc32, corrupt) in shard.items():
            cache_dir, dim, dtype = self.caches[tower]
            row = rows.get(key)
            if row is not None and crc is None:
                crc = cache.image_crc32(cache.image_bytes(sample))
            stale = row is not None and crc != crc32[row]
            if row is not None and not stale:
                sample[field(tower)] = embeddings[row]
            elif key in corrupt:
                return "corrupt"
            elif stale and self.policy == "error":
                raise cache.CacheError(f"shard {url} changed since the third-tower cache {cache_dir} was built (sample "
                                       f"{key!r} has another image than the one the cache embedded): rebuild the cache "
                                       f"for this data (`python -m open_clip_3t.cache verify --checksum` lists the "
                                       f"changed shards)")
            elif self.policy == "error":
                raise cache.CacheError(f"sample {key!r} of shard {url} is not in the third-tower cache {cache_dir}: "
                                       f"rebuild the cache for this data, or pass --cache-missing skip|online")
            else:
                missing = True
                sample[field(tower)] = torch.full((dim,), float("nan"), dtype=dtype)
        return "missing" if missing else "joined"

    def __call__(self, samples):
        url, counts = None, None
        for sample in samples:
            if sample["__url__"] != url:
                if url is not None:
                    self._flush(url, counts)
                url, counts = sample["__url__"], {"joined": 0, "corrupt": 0, "missing": 0}
                shard = {tower: self._load(cache_dir, url) for tower, (cache_dir, _, _) in self.caches.items()}
            if not openclip_has_caption_and_image(sample):
                yield sample  # OpenCLIP's next stage drops it; the build skipped it too
                continue
            outcome = self._join(sample, url, shard)
            counts[outcome] += 1
            if outcome == "corrupt" or (outcome == "missing" and self.policy == "skip"):
                continue
            yield sample
        if url is not None:
            self._flush(url, counts)


def validate_cache(args, three_towers=None):
    """Check each cache of args.third_tower_cache ({tower: folder}, NAME=DIR words, or one folder for a model with one
    tower) against args.train_data and its tower of the model (args.model, args.third_tower_weights; or an explicit
    three_towers section) under args.cache_missing. Raises CacheError (one line) on a mismatch, naming the tower a
    cache holds when it was given for another; reads the weights files' bytes (sha256) and each sidecar's header,
    builds nothing. Cheap enough to call while checking arguments, before any model is built. Returns
    {tower: summary dict}."""
    policy = getattr(args, "cache_missing", "error")
    if policy not in POLICIES:
        raise cache.CacheError(f"--cache-missing {policy}: use one of {', '.join(POLICIES)}")
    section = three_towers if three_towers is not None else three_towers_config(args.model)
    names = ThreeTowersCfg.from_dict(section).names if section is not None else [DEFAULT_TOWER]
    try:
        caches = parse_named(args.third_tower_cache, names, "--third-tower-cache")
        weights = parse_named(getattr(args, "third_tower_weights", None) or {}, names, "--third-tower-weights")
    except ValueError as e:
        raise cache.CacheError(str(e)) from None
    cfgs = {name: cache.third_tower_cfg(args.model, weights.get(name), three_towers, name) for name in names}
    summaries = {}
    for name, cache_dir in caches.items():
        try:
            summaries[name] = cache.validate(cache_dir, args.train_data, cfgs[name], policy)
        except cache.CacheError:
            found = cache.read_manifest(cache_dir)["fingerprint"]
            owners = [other for other in names if not fingerprint_diffs(found, cache.fingerprint(cfgs[other]))]
            if owners and name not in owners:  # built for another tower of this model: the caches were swapped
                raise cache.CacheError(f"--third-tower-cache {name}={cache_dir} holds the embeddings of the tower "
                                       f"{owners[0]}, not {name}: pass {owners[0]}={cache_dir}") from None
            raise
        summaries[name]["embed_dim"] = cfgs[name].embed_dim
    return summaries


def get_cached_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None, three_towers=None):
    """OpenCLIP's get_wds_dataset with each cached tower's embeddings joined: batches (images, texts, embeddings of
    each cached tower, in the order of `cached_towers`).

    Reads args.third_tower_cache, args.cache_missing, args.model, args.third_tower_weights, args.train_data.
    The caches are validated first (CacheError, one line). Validation data (is_train=False) is OpenCLIP's, unchanged.
    The returned DataInfo has `cached_towers` (tower names), `cache_stats` (JoinStats) and `cache_summary`
    ({tower: shards, samples, missing shards}).
    """
    if not is_train:
        return openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
    policy = getattr(args, "cache_missing", "error")
    summaries = validate_cache(args, three_towers)
    caches = parse_named(args.third_tower_cache, list(summaries), "--third-tower-cache")
    for name, summary in summaries.items():
        logging.info(f"third-tower cache {caches[name]} (tower {name}): {summary['samples']} embeddings for "
                     f"{summary['shards']} shards ({len(summary['missing_shards'])} shards missing, --cache-missing "
                     f"{policy}; {summary['skipped']} corrupt samples skipped at build)")

    stats = JoinStats()
    join = CacheJoin({name: (caches[name], summary["embed_dim"],
                             torch.float16 if summary["dtype"] == "float16" else torch.float32)
                      for name, summary in summaries.items()}, policy, stats)
    data_info = openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
    wds_join_field(data_info, join, [field(name) for name in summaries])
    data_info.cached_towers = list(summaries)
    data_info.cache_stats = stats
    data_info.cache_summary = summaries
    return data_info


def fill_missing_third(model, images, third):
    """--cache-missing online: NaN rows of a tower's embeddings in `third` ({tower: embeddings}; samples missing from
    that tower's cache) get that tower's embedding computed online from the training images (f's view, resized to the
    tower's input). Returns (third, number of rows filled)."""
    model = model.module if hasattr(model, "module") else model
    filled, total = {}, 0
    for name, embeddings in third.items():
        missing = torch.isnan(embeddings).any(dim=1)
        n = int(missing.sum())
        if n:
            if model.third_towers[name] is None:
                raise RuntimeError(f"{n} sample(s) of this batch are missing from the cache of third tower {name} and "
                                   f"the model was built without it: build the model with it for --cache-missing "
                                   f"online")
            embeddings = embeddings.clone()
            embeddings[missing] = model.encode_third(images[missing], name).to(embeddings.dtype)
        filled[name], total = embeddings, total + n
    return filled, total
