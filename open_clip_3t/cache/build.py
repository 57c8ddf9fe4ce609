"""Building a cache: read each shard's samples as OpenCLIP's training pipeline groups them (in DataLoader
workers), run h on h's own eval view, write one sidecar per shard (temporary name, then rename)."""
import glob
import io
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..files import unwritable, write_atomic
from ..progress import progress
from ..shards import IMAGE_EXTS, iter_samples, local_path
from .format import (DTYPES, PRECISIONS, CacheError, cached_tower, check_shard_ids, encode_sidecar, ensure_manifest,
                     expand_shards, file_sha256, image_crc32, log, make_manifest, shard_id, sidecar_info, sidecar_path)
from .index import entry, part_name, read_file, write_index


# --- reading shards (inside DataLoader workers) ---------------------------------------------------------------

class _Skip(Exception):
    pass


def _decode(sample, transform):
    """(h's input, image crc32) for a sample; _Skip for samples OpenCLIP's pipeline drops (no caption/image,
    undecodable)."""
    from PIL import Image
    if "\n" in sample["__key__"]:
        raise _Skip("key contains a newline")
    if "txt" not in sample:
        raise _Skip("no caption (.txt)")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise _Skip("no image (." + "/.".join(IMAGE_EXTS) + ")")
    try:
        with Image.open(io.BytesIO(sample[ext])) as image:
            image.load()
            return transform(image.convert("RGB")), image_crc32(sample[ext])
    except Exception as e:  # anything PIL or the transform raise on a bad image: skip it, as OpenCLIP does
        raise _Skip(f"undecodable .{ext}: {type(e).__name__}: {e}"[:200]) from None


class ShardReader(torch.utils.data.IterableDataset):
    """Yields per-shard batches {shard, keys, crc32, pixels, done}. A batch never mixes shards and its boundaries
    are fixed by the batch size, so h sees the same batches in a resumed build as in an uninterrupted one
    (bit-identical outputs). `done` (the shard's statistics) comes with the shard's last batch."""

    def __init__(self, shards, transform, batch_size):
        self.shards, self.transform, self.batch_size = shards, transform, batch_size

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        mine = self.shards[worker.id::worker.num_workers] if worker else self.shards
        for index, url in mine:
            yield from self.read_shard(index, url)

    def read_shard(self, index, url):
        stats = {"samples": 0, "skipped": [], "truncated": None}
        keys, crcs, pixels = [], [], []
        for sample in iter_samples(url, stats):
            try:
                pixel, crc = _decode(sample, self.transform)
            except _Skip as e:
                stats["skipped"].append([sample["__key__"], str(e)])
                continue
            keys.append(sample["__key__"])
            crcs.append(crc)
            pixels.append(pixel)
            if len(keys) == self.batch_size:
                yield {"shard": index, "keys": keys, "crc32": crcs, "pixels": torch.stack(pixels), "done": None}
                stats["samples"] += len(keys)
                keys, crcs, pixels = [], [], []
        stats["samples"] += len(keys)
        yield {"shard": index, "keys": keys, "crc32": crcs, "pixels": torch.stack(pixels) if pixels else None,
               "done": stats}


def decode_loader(shards, h, batch_size, workers, device):
    """The build's decode stage: `workers` processes (no more than there are shards), each decoding and resizing
    whole shards, so that it scales with the workers while there are at least as many shards as workers. Batches are
    uint8, pinned for a non-blocking copy to a CUDA device; h.normalize finishes h's preprocessing there."""
    reader = ShardReader(shards, h.eval_transform(normalize=False), batch_size)
    workers = min(workers, len(shards))
    return torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers,
                                       prefetch_factor=4 if workers else None,
                                       pin_memory=torch.device(device).type == "cuda")


# --- build ----------------------------------------------------------------------------------------------------

def shard_split(environ=None):
    """(index, count) of this process among all builders: ranks (torchrun RANK/WORLD_SIZE, or srun
    SLURM_PROCID/SLURM_NTASKS) times SLURM array tasks. Shard i goes to index i % count."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
    elif "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:  # an srun step (not the batch script itself)
        rank, world = int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", 1)))
    else:
        rank, world = 0, 1
    task, tasks = 0, 1
    if "SLURM_ARRAY_TASK_ID" in env:
        first, last = int(env["SLURM_ARRAY_TASK_MIN"]), int(env["SLURM_ARRAY_TASK_MAX"])
        tasks = int(env["SLURM_ARRAY_TASK_COUNT"])
        if last - first + 1 != tasks:
            raise CacheError(f"SLURM array {first}-{last} has {tasks} tasks: use a contiguous range "
                             f"(sbatch --array=0-{tasks - 1})")
        task = int(env["SLURM_ARRAY_TASK_ID"]) - first
    if not (0 <= rank < world and 0 <= task < tasks):
        raise CacheError(f"bad rank {rank}/{world} or array task {task}/{tasks} in the environment")
    return task * world + rank, tasks * world


def _check_sidecar_is_for(path, url):
    """A finished sidecar is skipped only if it was built from this shard: same size, and same sha256 when it was
    built from another path (the data moved, or two sources share a folder name). Returns its metadata."""
    info = sidecar_info(path)
    file = local_path(url)
    if file is None or (info["shard"] == url and os.path.getsize(file) == info["shard_size"]):
        return info
    if os.path.getsize(file) != info["shard_size"] or file_sha256(file) != info["shard_sha256"]:
        raise CacheError(f"{path} was built from another shard ({info['shard']}, {info['shard_size']} bytes), not "
                         f"{url}: if two sources share a folder name, give one another name (a symlink will do); "
                         f"if the shard changed, delete the sidecar; or use another --third-tower-cache")
    return info


def write_part(out, index, count, entries):
    """This builder's part of the cache's index (see index.py): its shards, added to those of its previous part (a
    build of other shards into the same cache with the same split)."""
    path = os.path.join(out, part_name(index, count))
    try:
        previous = read_file(path)
    except (OSError, ValueError):
        previous = {}
    write_index(out, {**previous, **entries}, os.path.basename(path))


def shard_sizes(urls):
    """The number of samples of each shard from the sizes.json beside it (the file OpenCLIP reads for an epoch's
    length: {"00000.tar": 10000, ...}), or None when a shard is not listed in one."""
    sizes, listed = {}, {}
    for url in urls:
        path = local_path(url)
        folder = os.path.dirname(path) if path is not None else None
        if folder not in listed:
            try:
                with open(os.path.join(folder, "sizes.json")) as f:
                    listed[folder] = {k: int(v) for k, v in json.load(f).items()}
            except (OSError, TypeError, ValueError, AttributeError):
                listed[folder] = {}
        sizes[url] = listed[folder].get(os.path.basename(path)) if path is not None else None
    return None if None in sizes.values() else sizes


def progress_bar(label, todo, quiet):
    """Samples embedded out of the total (from sizes.json; else estimated from the shards done so far, `~` in the
    postfix), rate and ETA, shards done, samples skipped: a bar on a terminal, else one line per 10% (SLURM logs)."""
    sizes = shard_sizes([url for _, url in todo])
    bar = progress(sum(sizes.values()) if sizes else None, label, " samples", quiet=quiet, emit=log)
    bar.set_postfix_str(f"shards 0/{len(todo)}, skipped 0", refresh=False)
    return bar, sizes is not None


def build(train_data, model, out, third_tower_weights=None, batch_size=256, workers=4, device="cpu",
          precision="fp32", dtype="fp16", split=None, three_towers=None, quiet=False, tower=None):
    """Embed every sample of every shard of `train_data` assigned to this process with `model`'s tower `tower`
    (default: the only one); returns a summary dict."""
    say = (lambda m: None) if quiet is True else log
    # Everything that can be wrong is checked before h is loaded or a shard is read.
    if dtype not in DTYPES:
        raise CacheError(f"--dtype {dtype}: use one of {sorted(DTYPES)}")
    if precision not in PRECISIONS:
        raise CacheError(f"--precision {precision}: use one of {sorted(PRECISIONS)}")
    if batch_size < 1 or workers < 0:
        raise CacheError(f"--batch-size {batch_size} / --workers {workers}: need batch size >= 1, workers >= 0")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CacheError("--device cuda: no CUDA device is visible; use --device cpu")
    urls = expand_shards(train_data)
    check_shard_ids(urls)
    absent = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
    if absent:
        raise CacheError(f"{len(absent)} shard(s) of --train-data do not exist (first: {absent[0]}): fix the path")
    cfg = cached_tower(model, third_tower_weights, three_towers, tower)
    if cfg.weights is None and not cfg.timm_model_pretrained:
        raise CacheError(f"{model}'s third tower {cfg.name} ({cfg.timm_model_name}) has no pretrained weights "
                         f"(timm_model_pretrained is false): pass --third-tower-weights FILE")
    index, count = split if split is not None else shard_split()
    mine = urls[index::count]
    todo = [(i, u) for i, u in enumerate(mine) if not os.path.exists(sidecar_path(out, u))]
    indexed = {shard_id(url): entry(_check_sidecar_is_for(sidecar_path(out, url), url))
               for url in sorted(set(mine) - {u for _, u in todo})}
    label = f"cache build{'' if tower is None else ' ' + tower} [{index + 1}/{count}]"
    reason = unwritable(out) if todo else None
    if reason:
        raise CacheError(f"--third-tower-cache {out}: cannot write there ({reason}): free space on that file system, or "
                         f"pass a --third-tower-cache folder on a writable one")
    from ..third_tower import ThirdTower
    h = ThirdTower(cfg) if todo else None  # h's weights load strictly before the manifest binds them to `out`
    ensure_manifest(out, make_manifest(model, cfg, dtype, precision))
    summary = {"shards": len(mine), "already_done": len(mine) - len(todo), "built": 0, "samples": 0,
               "skipped": 0, "truncated": 0, "seconds": 0.0, "steady_samples_per_s": None, "damaged": []}
    say(f"{label}: {len(mine)} of {len(urls)} shards are ours, {summary['already_done']} already done, "
        f"{len(todo)} to build into {out}")
    if not todo:
        write_part(out, index, count, indexed)
        return summary

    h = h.to(device)
    h.model.to(PRECISIONS[precision])  # h's weights in the build precision; its mean/std stay fp32 (h.normalize)
    for _, url in todo:  # temporary files of a killed build
        for stale in glob.glob(glob.escape(sidecar_path(out, url)) + ".tmp*"):
            os.remove(stale)
    loader = decode_loader(todo, h, batch_size, workers, device)
    store = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    rows, keys, crcs = {}, {}, {}  # per shard being built: embeddings (on the device until the shard is done), ...
    writer, written = ThreadPoolExecutor(max_workers=1), []  # sidecars are written while h computes the next batches

    def write(url, emb, shard_keys, shard_crcs, info):
        path = sidecar_path(out, url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        emb = emb.cpu().numpy() if emb is not None else np.zeros((0, cfg.embed_dim), DTYPES[dtype])
        if not np.isfinite(emb).all():
            raise CacheError(f"h gave non-finite embeddings for {int((~np.isfinite(emb)).any(1).sum())} sample(s) "
                             f"of {url}: nothing written; build with --precision fp32 if h overflows in {precision}, else "
                             f"check h's weights")
        write_atomic(path, encode_sidecar(emb, shard_keys, shard_crcs, info))
        return shard_id(url), entry({**info, "rows": len(emb), "dim": emb.shape[1]})

    start, first, embedded = time.monotonic(), None, 0
    progress, exact = progress_bar(label, todo, quiet)
    try:
        with torch.inference_mode():
            for batches, item in enumerate(loader, 1):
                shard = item["shard"]
                if item["pixels"] is not None:
                    emb = h(h.normalize(item["pixels"].to(device, non_blocking=True)))
                    rows.setdefault(shard, []).append(emb.to(store))
                    keys.setdefault(shard, []).extend(item["keys"])
                    crcs.setdefault(shard, []).extend(item["crc32"])
                    embedded += len(item["keys"])
                    progress.update(len(item["keys"]))
                    if first is None and batches >= loader.num_workers:
                        # steady state: every decode worker has delivered a batch (the loader takes them in turn)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        first = (time.monotonic(), embedded)
                if item["done"] is not None:
                    stats, url = item["done"], mine[shard]
                    info = {"shard": url, "shard_id": shard_id(url), "shard_size": stats["size"],
                            "shard_sha256": stats["sha256"], "samples": stats["samples"], "skipped": stats["skipped"],
                            "truncated": stats["truncated"]}
                    emb = torch.cat(rows.pop(shard)) if shard in rows else None
                    written.append(writer.submit(write, url, emb, keys.pop(shard, []), crcs.pop(shard, []), info))
                    for f in written:
                        if f.done():
                            f.result()  # surface a failed write now
                    summary["built"] += 1
                    summary["samples"] += stats["samples"]
                    summary["skipped"] += len(stats["skipped"])
                    summary["truncated"] += stats["truncated"] is not None
                    if stats["truncated"] or not stats["samples"]:
                        summary["damaged"].append((url, stats["truncated"] or "no sample with an image and a caption"))
                    if not exact:  # the total so far: the mean of the shards done, times the shards
                        progress.total = max(progress.n, round(summary["samples"] / summary["built"] * len(todo)))
                    if (stats["skipped"] or stats["truncated"]) and quiet is not True:
                        reasons = "; ".join(f"{k}: {r}" for k, r in stats["skipped"][:3])
                        progress.write(f"{label}: {url}: {len(stats['skipped'])} sample(s) skipped"
                                       + (f" ({reasons}{', ...' if len(stats['skipped']) > 3 else ''})" if reasons else "")
                                       + (f"; truncated tar ({stats['truncated']}), kept the {stats['samples']} samples "
                                          f"before it" if stats["truncated"] else ""), file=sys.stderr)
                    progress.set_postfix_str(f"shards {summary['built']}/{len(todo)}, skipped {summary['skipped']}"
                                             + ("" if exact else ", total estimated"), refresh=False)
        indexed.update(f.result() for f in written)
        writer.shutdown()
        write_part(out, index, count, indexed)
    finally:
        progress.close()  # its line ends before any error is printed
    end = time.monotonic()
    summary["seconds"] = end - start
    if first is not None and summary["samples"] > first[1]:
        summary["steady_samples_per_s"] = (summary["samples"] - first[1]) / (end - first[0])
    say(f"{label}: built {summary['built']} shards, {summary['samples']} samples "
        f"({summary['samples'] / max(summary['seconds'], 1e-9):.1f} samples/s), {summary['skipped']} skipped, "
        f"{summary['truncated']} truncated shard(s)")
    return summary
