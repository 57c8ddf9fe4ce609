"""Precomputed third-tower embeddings: h is frozen, so its embedding of each training image is computed once.

    python -m open_clip_3t.cache build  --train-data SHARDS --model 3T-ViT-B-16 --out DIR [--third-tower-weights FILE]
    python -m open_clip_3t.cache verify --train-data SHARDS --model 3T-ViT-B-16 --cache DIR [--third-tower-weights FILE]
    python -m open_clip_3t.cache info   --cache DIR

Layout (docs/cache.md specifies it byte for byte):

    DIR/manifest.json                           the fingerprint: h's name, weights hash, preprocessing, dim, dtype
    DIR/<shard folder>/<shard file>.safetensors one sidecar per data shard: `embeddings` [N, D], `keys` (UTF-8,
                                                newline-joined), `image_crc32` [N] (checked by the training join),
                                                metadata (shard size and sha256, skipped samples)

A sidecar is written to a temporary name and renamed, so "the file exists" means "the shard is done": a killed
build is resumed by running it again, and ends byte-identical to an uninterrupted one. Training joins the sidecars
to OpenCLIP's webdataset pipeline by (shard, __key__): see training/cached_data.py.
"""
import argparse
import glob
import gzip
import hashlib
import io
import json
import os
import re
import signal
import socket
import sys
import tarfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

FORMAT = "open_clip_3t.cache/1"
MANIFEST = "manifest.json"
SUFFIX = ".safetensors"
META_KEY = "open_clip_3t_cache"        # the one key of a sidecar's safetensors __metadata__ (a JSON string)
IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")  # OpenCLIP's rename(image="jpg;png;jpeg;webp"): the first one wins
DTYPES = {"fp16": np.float16, "fp32": np.float32}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_SKIP_META = re.compile(r"__[^/]*__($|/)")       # webdataset skips such tar members (e.g. __index__)
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key = up to the first dot
_TEST_KILL = "OPEN_CLIP_3T_CACHE_TEST_KILL"      # tests only: "batches:N" or "write:N" -> SIGKILL ourselves there


class CacheError(ValueError):
    """A cache that does not fit the run, or bad build input: the message is one line naming the fix."""


def log(message):
    print(message, file=sys.stderr, flush=True)


# --- shards and their sidecars --------------------------------------------------------------------------------

def expand_shards(spec):
    """Shard URLs of a --train-data SPEC (braceexpand, `::`-joined sources), sorted, without duplicates."""
    import webdataset as wds
    if not spec:
        raise CacheError("no shards given: pass --train-data '/data/laion/{00000..41407}.tar'")
    return sorted(set(wds.shardlists.expand_urls(spec)))


def local_path(url):
    """The file behind a shard URL, or None for remote/pipe URLs."""
    path = url[len("file:"):] if url.startswith("file:") else url
    return None if re.match(r"^[a-z][a-z0-9+.-]*:", path) else path


def shard_id(url):
    """Sidecar name of a shard: its folder and file name, '<folder>/<file>' (e.g. 'laion400m/00012.tar').

    Not the full path, so a cache keeps working when the data is copied elsewhere (local scratch, another mount).
    For `pipe:` URLs the last word containing '.tar' is taken as the path.
    """
    path = url[len("file:"):] if url.startswith("file:") else url
    if path.startswith("pipe:"):
        words = [w for w in path[len("pipe:"):].split() if ".tar" in w]
        path = words[-1] if words else path
    path = path.split("?")[0].rstrip("/")
    if local_path(path) is not None:
        path = os.path.abspath(path)
    parts = path.replace("\\", "/").split("/")[-2:]
    return "/".join(re.sub(r"[^A-Za-z0-9._-]", "_", p) or "_" for p in parts)


def sidecar_path(cache_dir, url):
    return os.path.join(cache_dir, *shard_id(url).split("/")) + SUFFIX


def check_shard_ids(urls):
    """Refuse two shards that would share a sidecar (same folder name and file name in two sources)."""
    seen = {}
    for url in urls:
        other = seen.setdefault(shard_id(url), url)
        if other != url:
            raise CacheError(f"shards {other} and {url} map to the same sidecar {shard_id(url)}{SUFFIX}: the cache "
                             f"names a shard by its folder and file name; give one folder another name (a symlink will do)")


# --- the fingerprint ------------------------------------------------------------------------------------------

_SHA256_MEMO = {}


def file_sha256(path):
    stat = os.stat(path)
    memo = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _SHA256_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
        _SHA256_MEMO[memo] = digest.hexdigest()
    return _SHA256_MEMO[memo]


def third_tower_cfg(model, third_tower_weights=None, three_towers=None):
    """h's config from a 3T model name (or an explicit three_towers section), with the weights override."""
    from ._openclip import three_towers_config
    from .third_tower import ThreeTowersCfg
    section = three_towers if three_towers is not None else three_towers_config(model)
    if section is None:
        raise CacheError(f"model {model!r} has no three_towers section: pass a 3T model (e.g. 3T-ViT-B-16, 3T-tiny)")
    cfg = ThreeTowersCfg.from_dict(dict(section))
    if third_tower_weights is not None:
        cfg.weights = third_tower_weights
    return cfg


def weights_identity(cfg):
    """'sha256:<hex>' of a local weights file, 'timm-hub:<name>' for timm's hub weights, None for no weights."""
    if cfg.weights:
        return "sha256:" + file_sha256(cfg.weights)
    if cfg.timm_model_pretrained:
        return "timm-hub:" + cfg.timm_model_name
    return None


def fingerprint(cfg):
    """What decides h's embeddings: architecture, weights, eval preprocessing. Reads no weights (h is built on the
    meta device to resolve timm's defaults exactly as the real ThirdTower does)."""
    from .third_tower import ThirdTower, check_timm_model
    check_timm_model(cfg)
    with torch.device("meta"):
        h = ThirdTower(cfg, load_weights=False)
    return {
        "timm_model_name": cfg.timm_model_name,
        "timm_kwargs": dict(cfg.timm_kwargs),
        "embed_dim": cfg.embed_dim,
        "weights": weights_identity(cfg),
        "image_size": list(h.image_size),
        "interpolation": h.interpolation,
        "crop_pct": h.crop_pct,
        "mean": list(h.mean),
        "std": list(h.std),
    }


def fingerprint_diffs(found, expected):
    """['weights: cache sha256:.. != model sha256:..', ...] for every field that differs."""
    keys = sorted(set(found) | set(expected))
    return [f"{k}: cache has {found.get(k)!r}, model has {expected.get(k)!r}"
            for k in keys if json.dumps(found.get(k)) != json.dumps(expected.get(k))]


def make_manifest(model, cfg, dtype, precision):
    import timm
    from . import __version__
    return {
        "format": FORMAT,
        "model": model,                       # informational: any 3T model with the same h may use the cache
        "fingerprint": fingerprint(cfg),
        "dtype": np.dtype(DTYPES[dtype]).name,
        "precision": precision,               # h's compute precision during the build
        "versions": {"open_clip_3t": __version__, "timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
    }


def read_manifest(cache_dir):
    path = os.path.join(cache_dir, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise CacheError(f"{cache_dir} is not a third-tower cache (no {MANIFEST}): build one with "
                         f"`python -m open_clip_3t.cache build --out {cache_dir} ...`") from None
    if manifest.get("format") != FORMAT:
        raise CacheError(f"{path} has format {manifest.get('format')!r}, this open_clip_3t reads {FORMAT!r}: rebuild "
                         f"the cache with this version")
    return manifest


def _tmp_name(path):
    """A temporary name next to `path`, unique across the nodes sharing the file system."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def _write_atomic(path, data, kill_midway=False):
    """Write to a temporary name, fsync, rename: `path` either does not exist or is complete."""
    tmp = _tmp_name(path)
    with open(tmp, "wb") as f:
        if kill_midway:  # tests: die with half a temporary file written
            f.write(data[:len(data) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def ensure_manifest(cache_dir, manifest):
    """Create DIR/manifest.json once (create-exclusive: safe with many ranks/array tasks), else check it matches."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.exists(path):
        tmp = _tmp_name(path)
        with open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # atomic, fails if another rank was first
        except (FileExistsError, FileNotFoundError):
            pass
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    found = read_manifest(cache_dir)
    diffs = fingerprint_diffs(found["fingerprint"], manifest["fingerprint"])
    diffs += [f"{k}: cache has {found.get(k)!r}, this build has {manifest[k]!r}"
              for k in ("dtype", "precision") if found.get(k) != manifest[k]]
    if diffs:
        raise CacheError(f"{path} was built differently ({'; '.join(diffs)}): use another --out or the same options")
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by a killed rank; nobody needs them now
        try:
            os.remove(stale)
        except FileNotFoundError:
            pass
    return found


# --- sidecars -------------------------------------------------------------------------------------------------

def encode_sidecar(embeddings, keys, crc32, info):
    """safetensors bytes: deterministic (sorted JSON, no timestamps), so rebuilds are byte-identical."""
    if not len(keys) == len(embeddings) == len(crc32):
        raise ValueError(f"{len(keys)} keys, {len(crc32)} checksums for {len(embeddings)} embeddings")
    blob = "\n".join(keys).encode("utf-8")
    meta = json.dumps({"format": FORMAT, **info}, sort_keys=True, ensure_ascii=False)
    return st_save({"embeddings": np.ascontiguousarray(embeddings), "keys": np.frombuffer(blob, np.uint8),
                    "image_crc32": np.asarray(crc32, np.uint32)}, metadata={META_KEY: meta})


def sidecar_info(path):
    """A sidecar's metadata (no tensor data read), with `rows` = the embedding count."""
    with safe_open(path, framework="numpy") as f:
        meta = json.loads((f.metadata() or {})[META_KEY])
        shape = f.get_slice("embeddings").get_shape()
    meta["rows"], meta["dim"] = shape[0], shape[1]
    return meta


def load_sidecar(path):
    """(embeddings [N, D] array, keys list, image_crc32 [N] array, metadata) of one sidecar."""
    with open(path, "rb") as f:
        data = f.read()
    tensors = st_load(data)
    keys = tensors["keys"].tobytes().decode("utf-8").split("\n") if tensors["keys"].size else []
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"][META_KEY])
    if len(keys) != len(tensors["embeddings"]):
        raise CacheError(f"sidecar {path} is corrupt ({len(keys)} keys, {len(tensors['embeddings'])} rows): "
                         f"delete it and rerun the build")
    return tensors["embeddings"], keys, tensors["image_crc32"], meta


# --- reading shards (inside DataLoader workers) ---------------------------------------------------------------

class _HashingReader:
    """A file wrapper that hashes and counts what is read (the shard's sha256 comes free with the build)."""

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0

    def read(self, n=-1):
        data = self.f.read(n)
        self.sha256.update(data)
        self.size += len(data)
        return data

    def drain(self):
        while self.read(1 << 22):
            pass


def _tar_members(fileobj, stats):
    """(name, bytes) of the regular members webdataset reads; a truncated/corrupt tar ends the shard early.
    Other errors (an I/O error of the file system) fail the build: the shard must not look done."""
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|*")
        for member in stream:
            if member.isreg() and not _SKIP_META.match(member.name):
                yield member.name, stream.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        stats["truncated"] = f"{type(e).__name__}: {e}"


def iter_tar_samples(url, stats):
    """Samples {__key__, ext: bytes, ...} of a shard grouped as OpenCLIP's training pipeline groups them
    (open_clip_train.data.group_by_keys_nothrow: a new sample starts when the key changes or an extension repeats;
    extensions lower-cased). Fills stats with the shard's size, sha256 and truncation."""
    from webdataset.gopen import gopen
    raw = gopen(url, "rb")
    try:
        reader = _HashingReader(raw)
        current = None
        for name, data in _tar_members(reader, stats):
            match = _KEY_AND_EXT.match(name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if current is None or key != current["__key__"] or ext in current:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[ext] = data
        if current is not None:
            yield current  # also after a truncation: OpenCLIP's training pipeline yields it too
        reader.drain()
        stats["size"], stats["sha256"] = reader.size, reader.sha256.hexdigest()
    finally:
        raw.close()


class _Skip(Exception):
    pass


def image_bytes(sample):
    """The encoded image OpenCLIP trains on (rename(image="jpg;png;jpeg;webp")), or None."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    return None if ext is None else sample[ext]


def image_crc32(data):
    """Per-sample content check stored next to each embedding: the join refuses a row whose image changed."""
    return zlib.crc32(data)


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
        for sample in iter_tar_samples(url, stats):
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
    built from another path (the data moved, or two sources share a folder name)."""
    info = sidecar_info(path)
    file = local_path(url)
    if file is None or (info["shard"] == url and os.path.getsize(file) == info["shard_size"]):
        return
    if os.path.getsize(file) != info["shard_size"] or file_sha256(file) != info["shard_sha256"]:
        raise CacheError(f"{path} was built from another shard ({info['shard']}, {info['shard_size']} bytes), not "
                         f"{url}: if two sources share a folder name, give one another name (a symlink will do); "
                         f"if the shard changed, delete the sidecar; or use another --out")


class _Progress:
    """One stderr line with samples/s: redrawn in place on a terminal, every 30 s otherwise (SLURM logs)."""

    def __init__(self, label, total_shards, quiet=False):
        self.label, self.total, self.shards, self.samples, self.skipped = label, total_shards, 0, 0, 0
        self.start = self.last = time.monotonic()
        self.tty, self.quiet = sys.stderr.isatty(), quiet

    def rate(self):
        return self.samples / max(time.monotonic() - self.start, 1e-9)

    def line(self):
        return (f"{self.label}: shards {self.shards}/{self.total}, samples {self.samples}, "
                f"skipped {self.skipped}, {self.rate():.1f} samples/s")

    def update(self, samples=0, shards=0, skipped=0, force=False):
        self.samples, self.shards, self.skipped = self.samples + samples, self.shards + shards, self.skipped + skipped
        now = time.monotonic()
        if not self.quiet and (force or now - self.last >= (0.5 if self.tty else 30)):
            self.last = now
            print(("\r" if self.tty else "") + self.line(), end="" if self.tty else "\n", file=sys.stderr, flush=True)

    def close(self):
        self.update(force=True)
        if self.tty and not self.quiet:
            print(file=sys.stderr, flush=True)


def build(train_data, model, out, third_tower_weights=None, batch_size=256, workers=4, device="cpu",
          precision="fp32", dtype="fp16", split=None, three_towers=None, quiet=False):
    """Embed every sample of every shard of `train_data` assigned to this process; returns a summary dict."""
    say = (lambda m: None) if quiet else log
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
    cfg = third_tower_cfg(model, third_tower_weights, three_towers)
    if cfg.weights is None and not cfg.timm_model_pretrained:
        raise CacheError(f"{model}'s third tower {cfg.timm_model_name} has no pretrained weights "
                         f"(timm_model_pretrained is false): pass --third-tower-weights FILE")
    index, count = split if split is not None else shard_split()
    mine = urls[index::count]
    todo = [(i, u) for i, u in enumerate(mine) if not os.path.exists(sidecar_path(out, u))]
    for url in set(mine) - {u for _, u in todo}:
        _check_sidecar_is_for(sidecar_path(out, url), url)
    label = f"cache build [{index + 1}/{count}]"
    ensure_manifest(out, make_manifest(model, cfg, dtype, precision))
    summary = {"shards": len(mine), "already_done": len(mine) - len(todo), "built": 0, "samples": 0,
               "skipped": 0, "truncated": 0, "seconds": 0.0, "steady_samples_per_s": None}
    say(f"{label}: {len(mine)} of {len(urls)} shards are ours, {summary['already_done']} already done, "
        f"{len(todo)} to build into {out}")
    if not todo:
        return summary

    from .third_tower import ThirdTower
    h = ThirdTower(cfg).to(device=device, dtype=PRECISIONS[precision])
    for _, url in todo:  # temporary files of a killed build
        for stale in glob.glob(glob.escape(sidecar_path(out, url)) + ".tmp*"):
            os.remove(stale)
    reader = ShardReader(todo, h.eval_transform(), batch_size)
    loader = torch.utils.data.DataLoader(reader, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)
    kill_kind, _, kill_at = os.environ.get(_TEST_KILL, "").partition(":")
    store = {"fp16": torch.float16, "fp32": torch.float32}[dtype]
    rows, keys, crcs = {}, {}, {}  # per shard being built: embeddings (on the device until the shard is done), ...
    writer, written = ThreadPoolExecutor(max_workers=1), []  # sidecars are written while h computes the next batches

    def write(url, emb, shard_keys, shard_crcs, info, kill):
        path = sidecar_path(out, url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        emb = emb.cpu().numpy() if emb is not None else np.zeros((0, cfg.embed_dim), DTYPES[dtype])
        _write_atomic(path, encode_sidecar(emb, shard_keys, shard_crcs, info), kill_midway=kill)

    progress, first = _Progress(label, len(todo), quiet), None
    with torch.inference_mode():
        for batches, item in enumerate(loader, 1):
            shard = item["shard"]
            if item["pixels"] is not None:
                emb = h(item["pixels"].to(device, non_blocking=True))
                rows.setdefault(shard, []).append(emb.to(store))
                keys.setdefault(shard, []).extend(item["keys"])
                crcs.setdefault(shard, []).extend(item["crc32"])
                progress.update(samples=len(item["keys"]))
                if first is None:  # steady-state throughput excludes worker start-up and the first batch
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    first = (time.monotonic(), progress.samples)
            if kill_kind == "batches" and batches == int(kill_at):
                for f in written:  # tests: die mid-shard, after the finished shards are on disk
                    f.result()
                os.kill(os.getpid(), signal.SIGKILL)
            if item["done"] is not None:
                stats, url = item["done"], mine[shard]
                info = {"shard": url, "shard_id": shard_id(url), "shard_size": stats["size"],
                        "shard_sha256": stats["sha256"], "samples": stats["samples"], "skipped": stats["skipped"],
                        "truncated": stats["truncated"]}
                emb = torch.cat(rows.pop(shard)) if shard in rows else None
                kill = kill_kind == "write" and summary["built"] + 1 == int(kill_at)
                written.append(writer.submit(write, url, emb, keys.pop(shard, []), crcs.pop(shard, []), info, kill))
                for f in written:
                    if f.done():
                        f.result()  # surface a failed write now
                summary["built"] += 1
                summary["samples"] += stats["samples"]
                summary["skipped"] += len(stats["skipped"])
                summary["truncated"] += stats["truncated"] is not None
                if stats["skipped"] or stats["truncated"]:
                    progress.update(force=True)
                    reasons = "; ".join(f"{k}: {r}" for k, r in stats["skipped"][:3])
                    say(f"{chr(10) if progress.tty else ''}{label}: {url}: {len(stats['skipped'])} sample(s) skipped"
                        + (f" ({reasons}{', ...' if len(stats['skipped']) > 3 else ''})" if reasons else "")
                        + (f"; truncated tar ({stats['truncated']}), kept the {stats['samples']} samples before it"
                           if stats["truncated"] else ""))
                progress.update(shards=1, skipped=len(stats["skipped"]))
    for f in written:
        f.result()
    writer.shutdown()
    progress.close()
    end = time.monotonic()
    summary["seconds"] = end - progress.start
    if first is not None and summary["samples"] > first[1]:
        summary["steady_samples_per_s"] = (summary["samples"] - first[1]) / (end - first[0])
    say(f"{label}: built {summary['built']} shards, {summary['samples']} samples "
        f"({summary['samples'] / max(summary['seconds'], 1e-9):.1f} samples/s), {summary['skipped']} skipped, "
        f"{summary['truncated']} truncated shard(s)")
    return summary


# --- verify, validate, info -----------------------------------------------------------------------------------

def check_shards(cache_dir, urls, checksum=False, dim=None):
    """(missing, mismatched, infos): shards without a sidecar, problem lines, and each present sidecar's metadata."""
    missing, mismatched, infos = [], [], {}
    for url in urls:
        path = sidecar_path(cache_dir, url)
        if not os.path.exists(path):
            missing.append(url)
            continue
        try:
            info = sidecar_info(path)
        except Exception as e:
            mismatched.append(f"{url}: unreadable sidecar {path} ({type(e).__name__}: {e}); delete it and rebuild")
            continue
        infos[url] = info
        if dim is not None and info["dim"] != dim:
            mismatched.append(f"{url}: sidecar has {info['dim']}-d embeddings, the third tower {dim}-d")
        file = local_path(url)
        if file is not None and os.path.isfile(file):
            size = os.path.getsize(file)
            if size != info["shard_size"]:
                mismatched.append(f"{url}: shard is {size} bytes, the cache was built from {info['shard_size']} bytes")
            elif checksum and file_sha256(file) != info["shard_sha256"]:
                mismatched.append(f"{url}: shard sha256 differs from the one the cache was built from")
        elif file is not None:
            mismatched.append(f"{url}: shard file does not exist")
    return missing, mismatched, infos


def verify(train_data, model, cache_dir, third_tower_weights=None, checksum=False, three_towers=None):
    """Problems (one line each) that keep `cache_dir` from serving `train_data` for `model`; [] if none."""
    urls = expand_shards(train_data)
    check_shard_ids(urls)
    manifest = read_manifest(cache_dir)
    expected = fingerprint(third_tower_cfg(model, third_tower_weights, three_towers))
    problems = ["mismatched fingerprint: " + d for d in fingerprint_diffs(manifest["fingerprint"], expected)]
    missing, mismatched, _ = check_shards(cache_dir, urls, checksum, dim=expected["embed_dim"])
    problems += [f"missing: {u} (no {sidecar_path(cache_dir, u)})" for u in missing]
    problems += ["mismatched: " + m for m in mismatched]
    return problems


def validate(cache_dir, train_data, cfg, policy="error"):
    """Before training: refuse (CacheError, one line) a cache for another third tower or other shards. Shards with
    no sidecar are refused under policy 'error' and reported otherwise. Returns a summary dict."""
    urls = expand_shards(train_data)
    check_shard_ids(urls)
    manifest = read_manifest(cache_dir)
    diffs = fingerprint_diffs(manifest["fingerprint"], fingerprint(cfg))
    if diffs:
        raise CacheError(f"third-tower cache {cache_dir} was built for another third tower ({'; '.join(diffs)}): "
                         f"pass the same --model/--third-tower-weights as the build, or build a cache for this one")
    missing, mismatched, infos = check_shards(cache_dir, urls, dim=cfg.embed_dim)
    verify_hint = f"run `python -m open_clip_3t.cache verify --cache {cache_dir} ...` for the full list"
    if mismatched:
        raise CacheError(f"third-tower cache {cache_dir} does not match --train-data: {len(mismatched)} shard(s) "
                         f"differ (first: {mismatched[0]}); {verify_hint}")
    if missing and policy == "error":
        raise CacheError(f"third-tower cache {cache_dir} lacks {len(missing)} of {len(urls)} shards (first: "
                         f"{missing[0]}): finish the build, or pass --cache-missing skip|online")
    return {"shards": len(urls), "missing_shards": missing, "dtype": manifest["dtype"],
            "samples": sum(i["rows"] for i in infos.values()),
            "skipped": sum(len(i["skipped"]) for i in infos.values())}


def info(cache_dir):
    """Summary of a cache: the manifest and totals over every sidecar in it."""
    manifest = read_manifest(cache_dir)
    paths = sorted(glob.glob(os.path.join(glob.escape(cache_dir), "*", "*" + SUFFIX)))
    infos = [sidecar_info(p) for p in paths]
    size = sum(os.path.getsize(p) for p in paths) + os.path.getsize(os.path.join(cache_dir, MANIFEST))
    samples = sum(i["rows"] for i in infos)
    return {"model": manifest["model"], "third_tower": manifest["fingerprint"]["timm_model_name"],
            "weights": manifest["fingerprint"]["weights"], "dim": manifest["fingerprint"]["embed_dim"],
            "dtype": manifest["dtype"], "precision": manifest["precision"], "shards": len(paths), "samples": samples,
            "skipped": sum(len(i["skipped"]) for i in infos),
            "truncated_shards": sum(bool(i["truncated"]) for i in infos), "bytes": size,
            "bytes_per_sample": size / samples if samples else None}


# --- command line ---------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.cache", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, out_flag):
        p.add_argument("--train-data", required=True,
                       help="shards, e.g. '/data/laion/{00000..41407}.tar' ('::' joins sources)")
        p.add_argument("--model", required=True, help="3T model whose third tower is cached, e.g. 3T-ViT-B-16")
        p.add_argument(out_flag, required=True, dest="cache", metavar="DIR", help="cache directory")
        p.add_argument("--third-tower-weights", default=None, metavar="FILE", help="local weights file for h")

    p = sub.add_parser("build", help="embed every sample of every shard with the third tower h")
    common(p, "--out")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding the shards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="h's compute precision")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored embedding dtype")
    p = sub.add_parser("verify", help="check that a cache covers the shards and matches the model")
    common(p, "--cache")
    p.add_argument("--checksum", action="store_true", help="also re-hash every shard (sha256; reads all the data)")
    p = sub.add_parser("info", help="print the manifest summary")
    p.add_argument("--cache", required=True, metavar="DIR")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            build(args.train_data, args.model, args.cache, args.third_tower_weights, args.batch_size, args.workers,
                  args.device, args.precision, args.dtype)
        elif args.command == "verify":
            problems = verify(args.train_data, args.model, args.cache, args.third_tower_weights, args.checksum)
            for line in problems:
                print(line)
            if problems:
                print(f"cache {args.cache} does not serve --train-data for {args.model}: {len(problems)} problem(s)",
                      file=sys.stderr)
                return 1
            print(f"ok: {args.cache} covers {len(expand_shards(args.train_data))} shards for {args.model}")
        else:
            for k, v in info(args.cache).items():
                print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    except (CacheError, FileNotFoundError) as e:
        print(f"python -m open_clip_3t.cache {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
