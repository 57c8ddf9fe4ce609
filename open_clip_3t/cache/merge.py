"""`python -m open_clip_3t.cache merge PART... --third-tower-cache DIR`: one cache from caches built in separate
folders (one per node or array task, e.g. on node-local scratch), each a complete cache (manifest and sidecars) of
some shards.

Refused, one line each, before anything is written: parts built differently (fingerprint, dtype, precision), and a
shard present in two parts. The merged cache is assembled in a temporary folder beside DIR (sidecars hard-linked
where the file system allows it, else copied and fsynced), verified there (every sidecar read whole: its sha256,
finite embeddings, its shard name and dim), given its index, and renamed to DIR: DIR exists only once complete.
"""
import glob
import json
import os
import shutil

from ..files import tmp_name, write_atomic
from .format import MANIFEST, SUFFIX, CacheError, load_sidecar, log, read_manifest
from .index import entry, write_index


def sidecars(part):
    """Sidecar paths of a cache folder, relative to it ('<folder>/<file>.safetensors'), sorted."""
    paths = glob.glob(os.path.join(glob.escape(part), "*", "*" + SUFFIX))
    return sorted(os.path.relpath(p, part) for p in paths)


def _link_or_copy(src, dst):
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.link(src, dst)  # sidecars are never modified in place (rebuilt = written anew and renamed)
        return
    except OSError:
        pass
    shutil.copyfile(src, dst)
    with open(dst, "rb") as f:
        os.fsync(f.fileno())


def _check_parts(parts):
    """{relative sidecar path: part} after refusing parts built differently and shards in two parts."""
    first = read_manifest(parts[0])
    for part in parts[1:]:
        manifest = read_manifest(part)
        found = {**manifest["fingerprint"], "dtype": manifest.get("dtype"), "precision": manifest.get("precision")}
        wanted = {**first["fingerprint"], "dtype": first.get("dtype"), "precision": first.get("precision")}
        diffs = [f"{k}: {found.get(k)!r} != {wanted.get(k)!r}" for k in sorted(set(found) | set(wanted))
                 if json.dumps(found.get(k)) != json.dumps(wanted.get(k))]
        if diffs:
            raise CacheError(f"cannot merge {part} with {parts[0]}: they were built differently "
                             f"({'; '.join(diffs)}); merge only the parts of one build (same model, weights, --dtype "
                             f"and --precision)")
    owner = {}
    for part in parts:
        for rel in sidecars(part):
            other = owner.setdefault(rel, part)
            if other != part:
                raise CacheError(f"cannot merge: shard {rel[:-len(SUFFIX)]} is in both {other} and {part}; delete its "
                                 f"sidecar from one of them ({os.path.join(part, rel)})")
    return first, owner


def _verify(folder, dim, owner):
    """{shard_id: index entry} of every sidecar of `folder` (the merged copy of the parts' sidecars, `owner`: {relative
    path: part}), each read whole; CacheError on the first bad one, naming the part's file."""
    entries = {}
    for rel in sidecars(folder):
        shard, path = rel[:-len(SUFFIX)], os.path.join(folder, rel)
        try:
            embeddings, keys, _, meta = load_sidecar(path)  # sha256, finite rows, keys vs rows
        except CacheError as e:
            raise CacheError(str(e).replace(path, os.path.join(owner[rel], rel))) from None
        if meta.get("shard_id", shard) != shard or embeddings.shape[1] != dim:
            raise CacheError(f"sidecar {os.path.join(owner[rel], rel)} holds shard {meta.get('shard_id')!r} with "
                             f"{embeddings.shape[1]}-d embeddings, not shard {shard!r} with the manifest's {dim}-d: "
                             f"rebuild it")
        entries[shard] = entry({**meta, "rows": len(keys), "dim": embeddings.shape[1]})
    return entries


def merge(parts, out, quiet=False):
    """Merge the cache folders `parts` into the new cache folder `out`; returns {"parts", "shards", "samples"}."""
    out = os.path.normpath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CacheError(f"--third-tower-cache {out} exists and is not an empty folder: merge into a new folder")
    if os.path.abspath(out) in {os.path.abspath(p) for p in parts}:
        raise CacheError(f"--third-tower-cache {out} is one of the parts: merge into a new folder")
    manifest, owner = _check_parts(parts)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tmp_name(out)
    os.makedirs(tmp)
    try:
        for rel, part in owner.items():
            _link_or_copy(os.path.join(part, rel), os.path.join(tmp, rel))
        write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        entries = _verify(tmp, manifest["fingerprint"]["embed_dim"], owner)
        write_index(tmp, entries)
        os.rename(tmp, out)  # onto nothing, or an empty folder: atomic
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary = {"parts": len(parts), "shards": len(entries), "samples": sum(e[0] for e in entries.values())}
    if not quiet:
        log(f"cache merge: {summary['shards']} shards ({summary['samples']} samples) from {len(parts)} parts, "
            f"verified, into {out}")
    return summary
