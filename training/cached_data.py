"""Training from precomputed third-tower embeddings (`--third-tower-cache [NAME=]DIR ...`, one cache per cached tower,
each built with open_clip_3t.cache).

`get_cached_wds_dataset` is OpenCLIP's own get_wds_dataset (shard shuffling, resampling, `::` sources, workers,
node split: all unchanged) with one stage added right after the tar reader, where each sample still knows its shard
(`__url__`) and `__key__`: it attaches every cached tower's embedding (one stage and one read of each cache's sidecar
per shard, whatever the number of caches). Batches become (images, texts, embeddings of each cached tower).

Each sidecar is read whole once per shard, and refused (CacheError, whatever --third-tower-cache-missing says) if its
bytes do not match its own sha256 or an embedding is not finite: corrupt is not missing. Each joined row is checked against a CRC32
of the sample's image bytes stored at build time: a sample whose image changed since the build stops the run under
--third-tower-cache-missing error and counts as missing otherwise. Samples missing from a cache follow
--third-tower-cache-missing:
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
from open_clip_3t.cache.format import rebuild_hint
from open_clip_3t.plan import resolve_plan
from open_clip_3t.shards import image_bytes

from ._open_clip_train import openclip_get_wds_dataset, openclip_has_caption_and_image, wds_join_field


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
        except FileNotFoundError:  # missing at start-up (skip/online), or removed since its index entry was written
            if self.policy == "error":
                raise cache.CacheError(f"third-tower cache {cache_dir} has no sidecar {path} for shard {url} (the "
                                       f"cache's index lists it: removed after the build?): finish the build "
                                       f"(`python -m open_clip_3t.cache build` with the same options), or pass "
                                       f"--third-tower-cache-missing skip|online") from None
            logging.warning(f"third-tower cache {cache_dir}: no sidecar for shard {url} ({path}): its samples are "
                            f"{'dropped' if self.policy == 'skip' else 'computed online'}")
            return None, {}, None, set()
        built_for = meta.get("shard_id", cache.shard_id(url))
        if built_for != cache.shard_id(url):  # start-up read the index, not this header
            raise cache.CacheError(f"sidecar {path} was built for the shard {built_for}, not this one: "
                                   f"{rebuild_hint(path)}")
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
                crc = cache.image_crc32(image_bytes(sample))
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
                                       f"rebuild the cache for this data, or pass --third-tower-cache-missing "
                                       f"skip|online")
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


def cache_plan(args):
    """The run's plan (`args.run_plan`, built and validated by training/params.py), or, for a caller that built
    `args` by hand, one resolved from args.model, args.third_tower_weights, args.third_tower_cache and
    args.third_tower_cache_missing, its caches validated against args.train_data (CacheError, one line, on a
    mismatch)."""
    plan = getattr(args, "run_plan", None)
    if plan is not None:
        return plan
    try:
        plan = resolve_plan(args.model, third_tower_weights=getattr(args, "third_tower_weights", None),
                            third_tower_cache=args.third_tower_cache,
                            cache_missing=getattr(args, "third_tower_cache_missing", "error"), cli=True)
    except ValueError as e:
        raise cache.CacheError(str(e)) from None
    return plan.with_cache_facts(cache.validate_plan(plan, args.train_data))


def get_cached_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
    """OpenCLIP's get_wds_dataset with each cached tower's embeddings joined: batches (images, texts, embeddings of
    each cached tower, in the order of the plan's `cached` towers).

    The run's plan (see `cache_plan`) says which towers are cached, where, and under which --third-tower-cache-missing
    policy. Validation data (is_train=False) is OpenCLIP's, unchanged. The returned DataInfo has `cached_towers` (tower
    names) and `cache_stats` (JoinStats).
    """
    if not is_train:
        return openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
    plan = cache_plan(args)
    cached = [plan.tower(name) for name in plan.cached]
    for tower in cached:
        facts = tower.cache_facts
        logging.info(f"third-tower cache {tower.cache} (tower {tower.name}): {facts['samples']} embeddings for "
                     f"{facts['shards']} shards ({len(facts['missing_shards'])} shards missing, "
                     f"--third-tower-cache-missing {plan.cache_missing}; {facts['skipped']} corrupt samples skipped "
                     f"at build)")

    stats = JoinStats()
    join = CacheJoin({tower.name: (tower.cache, tower.cfg.embed_dim,
                                   torch.float16 if tower.cache_facts["dtype"] == "float16" else torch.float32)
                      for tower in cached}, plan.cache_missing, stats)
    data_info = openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)
    wds_join_field(data_info, join, [field(tower.name) for tower in cached])
    data_info.cached_towers = list(plan.cached)
    data_info.cache_stats = stats
    return data_info


def fill_missing_third(model, images, third):
    """--third-tower-cache-missing online: NaN rows of a tower's embeddings in `third` ({tower: embeddings};
    samples missing from that tower's cache) get that tower's embedding computed online from the training images (f's view, resized to the
    tower's input). Returns (third, number of rows filled)."""
    model = model.module if hasattr(model, "module") else model
    filled, total = {}, 0
    for name, embeddings in third.items():
        missing = torch.isnan(embeddings).any(dim=1)
        n = int(missing.sum())
        if n:
            if model.third_towers[name] is None:
                raise RuntimeError(f"{n} sample(s) of this batch are missing from the cache of third tower {name} and "
                                   f"the model was built without it: build the model with it for "
                                   f"--third-tower-cache-missing online")
            embeddings = embeddings.clone()
            embeddings[missing] = model.encode_third(images[missing], name).to(embeddings.dtype)
        filled[name], total = embeddings, total + n
    return filled, total
