"""The cache's on-disk format: shard names, the manifest (h's fingerprint), sidecars (write, read, describe).

docs/cache.md specifies the layout byte for byte:

    DIR/manifest.json                           the fingerprint: h's name, weights hash, preprocessing, dim, dtype
    DIR/<shard folder>/<shard file>.safetensors one sidecar per data shard: `embeddings` [N, D], `keys` (UTF-8,
                                                newline-joined), `image_crc32` [N] (checked by the training join),
                                                metadata (shard size and sha256, skipped samples, and the
                                                sidecar's own sha256, checked whenever it is read whole)
"""
import dataclasses
import glob
import hashlib
import json
import os
import re
import sys
import zlib

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from ..files import abandoned, write_atomic
from ..shards import expand_shards as list_shards
from ..shards import local_path

FORMAT = "open_clip_3t.cache/1"
MANIFEST = "manifest.json"
SUFFIX = ".safetensors"
META_KEY = "open_clip_3t_cache"        # the one key of a sidecar's safetensors __metadata__ (a JSON string)
DTYPES = {"fp16": np.float16, "fp32": np.float32}
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class CacheError(ValueError):
    """A cache that does not fit the run, or bad build input: the message is one line naming the fix."""


def log(message):
    print(message, file=sys.stderr, flush=True)

# --- shards and their sidecars --------------------------------------------------------------------------------

def expand_shards(spec):
    """Shard URLs of a --train-data SPEC (braceexpand, `::`-joined sources), sorted, without duplicates."""
    try:
        return sorted(list_shards(spec))
    except ValueError as e:
        raise CacheError(str(e)) from None


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
    if local_path(path) is not None and not (path.startswith("/") and "/." not in path and "//" not in path):
        path = os.path.abspath(path)  # (an absolute path without '.', '..' or '//' parts already is one)
    parts = path.replace("\\", "/").split("/")[-2:]
    return "/".join(p if _NAME.fullmatch(p) else _UNSAFE.sub("_", p) or "_" for p in parts)


_NAME, _UNSAFE = re.compile(r"[A-Za-z0-9._-]+"), re.compile(r"[^A-Za-z0-9._-]")


def sidecar_path(cache_dir, url):
    return os.path.join(cache_dir, *shard_id(url).split("/")) + SUFFIX


def shard_ids(urls):
    """[shard_id(url) for url in urls], with one abspath per folder instead of one per shard (41,408 names at
    start-up)."""
    folders, ids = {}, []
    for url in urls:
        head, _, name = url.rpartition("/")
        if not head or not name or name in (".", "..") or ":" in url or "?" in url:
            ids.append(shard_id(url))
            continue
        folder = folders.get(head)
        if folder is None:
            folder = folders[head] = shard_id(head + "/_").split("/")[0]
        ids.append(f"{folder}/{name if _NAME.fullmatch(name) else _UNSAFE.sub('_', name)}")
    return ids


def check_shard_ids(urls):
    """Refuse two shards that would share a sidecar (same folder name and file name in two sources). Returns each
    url's shard_id, in order."""
    ids = shard_ids(urls)
    if len(set(ids)) != len(ids):
        seen = {}
        for url, sid in zip(urls, ids):
            other = seen.setdefault(sid, url)
            if other != url:
                raise CacheError(f"shards {other} and {url} map to the same sidecar {sid}{SUFFIX}: the cache names a "
                                 f"shard by its folder and file name; give one folder another name (a symlink will do)")
    return ids


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


def cached_tower(model, third_tower_weights=None, three_towers=None, tower=None):
    """The config of the tower called `tower` (default: the only one) of a 3T model name (or of an explicit
    three_towers section), with the weights file the build or check reads: the tower a cache of this model holds."""
    from .._openclip import model_exists
    from ..plan import resolve_plan
    if three_towers is None and not model_exists(model):
        raise CacheError(f"model {model!r} does not exist (no such OpenCLIP or 3T config): pass a 3T model, e.g. "
                         f"3T-ViT-B-16 or 3T-tiny")
    try:
        plan = resolve_plan(model, section=three_towers, build_by_default=False, cli=True)
    except ValueError as e:
        raise CacheError(f"model {model!r}: {e}") from None
    if plan.family != "3t":
        raise CacheError(f"model {model!r} has no three_towers section: pass a 3T model (e.g. 3T-ViT-B-16, 3T-tiny)")
    if tower is None and len(plan.towers) > 1:
        raise CacheError(f"model {model!r} has the third towers {list(plan.tower_names)}: say which one with "
                         f"--third-tower NAME (a cache holds one tower's embeddings)")
    if tower is not None and tower not in plan.tower_names:
        raise CacheError(f"model {model!r} has no third tower {tower!r}: pass --third-tower one of "
                         f"{list(plan.tower_names)}")
    cfg = plan.tower(tower).cfg
    return cfg if third_tower_weights is None else dataclasses.replace(cfg, weights=third_tower_weights)


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
    from ..third_tower import ThirdTower, check_timm_model
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
    from .. import __version__
    return {
        "format": FORMAT,
        "model": model,                       # informational: any 3T model with the same h may use the cache
        "tower": cfg.name,                    # informational too: the fingerprint decides which tower it serves
        "fingerprint": fingerprint(cfg),
        "dtype": np.dtype(DTYPES[dtype]).name,
        "precision": precision,               # h's compute precision during the build
        "versions": {"open_clip_3t": __version__, "timm": timm.__version__, "torch": torch.__version__.split("+")[0]},
    }


def read_manifest(cache_dir):
    path = os.path.join(cache_dir, MANIFEST)
    again = (f"copy it again from where the cache came from, or build the cache again into a new folder "
             f"(`python -m open_clip_3t.cache build --third-tower-cache NEW_DIR ...`)")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read())
    except FileNotFoundError:
        raise CacheError(f"{cache_dir} is not a third-tower cache (no {MANIFEST}): build one with "
                         f"`python -m open_clip_3t.cache build --third-tower-cache {cache_dir} ...`") from None
    except ValueError as e:  # not JSON, not UTF-8
        raise CacheError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:80]}): it is cut short or "
                         f"damaged; {again}") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise CacheError(f"{path} is not a third-tower cache manifest (it has no \"format\" field): another file is "
                         f"in its place; {again}")
    if manifest["format"] != FORMAT:
        raise CacheError(f"{path} has format {manifest.get('format')!r}, this open_clip_3t reads {FORMAT!r}: rebuild "
                         f"the cache with this version")
    if not isinstance(manifest.get("fingerprint"), dict) or "dtype" not in manifest:
        raise CacheError(f"{path} lacks its fingerprint or dtype: it is damaged; {again}")
    return manifest


def ensure_manifest(cache_dir, manifest):
    """Create DIR/manifest.json once (create-exclusive: safe with many ranks/array tasks), else check it matches."""
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.exists(path):  # the first of several builders (ranks, array tasks) writes it
        write_atomic(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n", exclusive=True)
    found = read_manifest(cache_dir)
    diffs = fingerprint_diffs(found["fingerprint"], manifest["fingerprint"])
    diffs += [f"{k}: cache has {found.get(k)!r}, this build has {manifest[k]!r}"
              for k in ("dtype", "precision") if found.get(k) != manifest[k]]
    if diffs:
        raise CacheError(f"{path} was built differently ({'; '.join(diffs)}): use another --third-tower-cache or the "
                         f"same options")
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by a killed rank (not one still writing its own)
        if abandoned(stale):
            try:
                os.remove(stale)
            except FileNotFoundError:
                pass
    return found


# --- sidecars -------------------------------------------------------------------------------------------------

DIGEST = "sha256"    # metadata field: sha256 of the sidecar's own bytes, taken with this field's value set to BLANK
BLANK = "0" * 64


def rebuild_hint(path):
    return (f"rebuild that shard's sidecar: delete {path} and rerun `python -m open_clip_3t.cache build` with the same "
            f"options (it builds only the sidecars that do not exist)")


def sidecar_digest(data, digest=BLANK):
    """sha256 of sidecar bytes `data` whose metadata holds `digest` as its sha256, with that value blanked."""
    header_end = 8 + int.from_bytes(data[:8], "little")
    sha = hashlib.sha256(data[:8])
    sha.update(data[8:header_end].replace(digest.encode(), BLANK.encode(), 1))
    sha.update(memoryview(data)[header_end:])
    return sha.hexdigest()


def encode_sidecar(embeddings, keys, crc32, info):
    """safetensors bytes: deterministic (sorted JSON, no timestamps), so rebuilds are byte-identical. The metadata
    carries the sha256 of the file itself (computed with that value blanked, then written in its place)."""
    if not len(keys) == len(embeddings) == len(crc32):
        raise ValueError(f"{len(keys)} keys, {len(crc32)} checksums for {len(embeddings)} embeddings")
    blob = "\n".join(keys).encode("utf-8")
    meta = json.dumps({"format": FORMAT, **info, DIGEST: BLANK}, sort_keys=True, ensure_ascii=False)
    data = st_save({"embeddings": np.ascontiguousarray(embeddings), "keys": np.frombuffer(blob, np.uint8),
                    "image_crc32": np.asarray(crc32, np.uint32)}, metadata={META_KEY: meta})
    header_end = 8 + int.from_bytes(data[:8], "little")  # __metadata__ comes first in the header: the first BLANK
    header = data[8:header_end].replace(BLANK.encode(), sidecar_digest(data).encode(), 1)
    return data[:8] + header + data[header_end:]


def sidecar_info(path):
    """A sidecar's metadata (no tensor data read), with `rows` = the embedding count."""
    with safe_open(path, framework="numpy") as f:
        meta = json.loads((f.metadata() or {})[META_KEY])
        shape = f.get_slice("embeddings").get_shape()
    meta["rows"], meta["dim"] = shape[0], shape[1]
    return meta


def load_sidecar(path):
    """(embeddings [N, D] array, keys list, image_crc32 [N] array, metadata) of one sidecar. Refuses (CacheError,
    one line) a sidecar whose bytes do not match its sha256, or that holds a non-finite embedding. A sidecar
    without a sha256 (written before sidecars carried one) is read unchecked."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(json.loads(data[8:8 + header_len])["__metadata__"][META_KEY])
        keys = tensors["keys"].tobytes().decode("utf-8").split("\n") if tensors["keys"].size else []
    except Exception as e:
        raise CacheError(f"sidecar {path} is unreadable ({type(e).__name__}: {str(e)[:100]}): "
                         f"{rebuild_hint(path)}") from None
    if DIGEST in meta and sidecar_digest(data, meta[DIGEST]) != meta[DIGEST]:
        raise CacheError(f"sidecar {path} is corrupt (its bytes do not match its sha256): {rebuild_hint(path)}")
    embeddings = tensors["embeddings"]
    if len(keys) != len(embeddings):
        raise CacheError(f"sidecar {path} is corrupt ({len(keys)} keys, {len(embeddings)} rows): {rebuild_hint(path)}")
    finite = np.isfinite(embeddings).all(axis=1)
    if not finite.all():
        first = int(np.argmin(finite))
        raise CacheError(f"sidecar {path} holds non-finite embeddings ({int((~finite).sum())} rows, first key "
                         f"{keys[first]!r}): {rebuild_hint(path)}")
    return embeddings, keys, tensors["image_crc32"], meta


def image_crc32(data):
    """Per-sample content check stored next to each embedding: the join refuses a row whose image changed."""
    return zlib.crc32(data)
