"""The cache's index: what each sidecar's header says (rows, skipped samples, shard size, truncated, dim) for every
shard, in one file, so that a training rank learns what a cache covers by reading one file instead of opening every
sidecar (41,408 of them for LAION-400M).

    DIR/index.json                        written by `verify` and `merge`: every shard they saw, plus the parts
    DIR/index.part-<i>-of-<n>.json        written by builder i of n when its build ends: its shards

Each builder writes only its own part (a temporary name, then a rename), so builders in parallel (ranks, SLURM array
tasks, nodes) never write the same file; a reader combines index.json and the parts, oldest file first, so that a
newer file's entry for a shard wins (its sidecar was rebuilt). `verify` folds the parts into index.json and removes
them. The index only saves opening files: a shard it lacks has its sidecar's header read instead, and training still
checks every sidecar it reads (its sha256) and every sample it joins (the image's CRC32).
"""
import json
import os
import re

from ..files import write_atomic

INDEX = "index.json"
INDEX_FORMAT = "open_clip_3t.cache.index/1"
FIELDS = ("rows", "skipped", "shard_size", "truncated", "dim")  # one list per shard, in this order
PART_RE = re.compile(r"index\.part-\d+-of-\d+\.json")


def entry(info):
    """A shard's index entry from its sidecar's metadata (format.sidecar_info)."""
    return [info["rows"], len(info["skipped"]), info["shard_size"], bool(info["truncated"]), info["dim"]]


def part_name(index, count):
    return f"index.part-{index:05d}-of-{count:05d}.json"


def write_index(cache_dir, entries, name=INDEX):
    """Write {shard_id: entry} as `name` in `cache_dir` (atomically); returns its path."""
    data = {"format": INDEX_FORMAT, "fields": list(FIELDS), "shards": dict(sorted(entries.items()))}
    return write_atomic(os.path.join(cache_dir, name), json.dumps(data, separators=(",", ":")) + "\n")


def index_files(cache_dir):
    """[(path, os.stat_result)] of the index files of `cache_dir`, oldest first (ties: by name). One listing of the
    cache's top folder, which holds the manifest, the index files and one folder per data folder."""
    found = []
    with os.scandir(cache_dir) as entries:
        for e in entries:
            if e.is_file() and (e.name == INDEX or PART_RE.fullmatch(e.name)):
                try:
                    found.append((e.path, e.stat()))
                except FileNotFoundError:  # removed meanwhile (verify folding the parts)
                    pass
    return sorted(found, key=lambda f: (f[1].st_mtime_ns, os.path.basename(f[0])))


def read_file(path):
    """{shard_id: entry} of one index file; FileNotFoundError, or ValueError/OSError for an unreadable one."""
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT or data.get("fields") != list(FIELDS):
        raise ValueError(f"not an index of format {INDEX_FORMAT!r}")
    return data["shards"]


def read_index(cache_dir, warn=None):
    """({shard_id: entry}, [(path, os.stat_result) of the files read]) combined over every index file, newest entry
    winning. An unreadable file is skipped, after `warn(line)`: its shards are then not indexed."""
    entries, read = {}, []
    for path, stat in index_files(cache_dir):
        try:
            entries.update(read_file(path))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as e:
            if warn is not None:
                warn(f"index file {path} is unreadable ({type(e).__name__}: {str(e)[:100]}): ignored (its shards' "
                     f"sidecar headers are read instead); `python -m open_clip_3t.cache verify` rewrites the index")
            continue
        read.append((path, stat))
    return entries, read


def fold_parts(cache_dir, entries, read):
    """Write `entries` as index.json, then remove the parts among `read` (the files they were read from) that are
    still the files read. A part a builder wrote meanwhile is kept and made newer than index.json, so that its
    entries still win."""
    path = write_index(cache_dir, entries)
    read = dict(read)
    for part, now in index_files(cache_dir):
        if part == path:
            continue
        stat = read.get(part)
        try:
            if stat is not None and (now.st_ino, now.st_mtime_ns, now.st_size) == (stat.st_ino, stat.st_mtime_ns,
                                                                                  stat.st_size):
                os.remove(part)
            else:
                os.utime(part)
        except FileNotFoundError:
            pass
    return path
