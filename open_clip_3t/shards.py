"""LAION-style webdataset shards, read the way OpenCLIP's training pipeline reads them: one shard lister (braceexpand,
`::`-joined sources) and one tar reader (members grouped into samples by webdataset's key rule)."""
import functools
import gzip
import hashlib
import re
import tarfile
import zlib

IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")      # OpenCLIP's rename(image="jpg;png;jpeg;webp"): the first one wins
_SKIP_META = re.compile(r"__[^/]*__($|/)")       # webdataset skips such tar members (e.g. __index__)
_KEY_AND_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's base_plus_ext: key = up to the first dot


class ShardSpecError(ValueError):
    """A shard spec that names nothing: the message is one line naming the fix."""


def expand_shards(spec, flag="--train-data"):
    """The shard URLs of a SPEC (braceexpand, `::`-joined sources), in the spec's order, without duplicates."""
    if not spec:
        raise ShardSpecError(f"no shards given: pass {flag} '/data/laion/{{00000..41407}}.tar'")
    return list(_expand(spec))


@functools.lru_cache(maxsize=8)
def _expand(spec):  # start-up expands --train-data in several places: 41,408 names once
    import webdataset as wds
    return tuple(dict.fromkeys(wds.shardlists.expand_urls(spec)))


_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*:")


def local_path(url):
    """The file behind a shard URL, or None for remote/pipe URLs."""
    path = url[len("file:"):] if url.startswith("file:") else url
    return None if _SCHEME.match(path) else path


def image_bytes(sample):
    """The encoded image OpenCLIP trains on (rename(image="jpg;png;jpeg;webp")), or None."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    return None if ext is None else sample[ext]


class _HashingReader:
    """A file wrapper that hashes and counts what is read (a shard's sha256 comes free with reading it)."""

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
    Other errors (an I/O error of the file system) propagate: a shard must not look read."""
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|*")
        for member in stream:
            if member.isreg() and not _SKIP_META.match(member.name):
                yield member.name, stream.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        stats["truncated"] = f"{type(e).__name__}: {e}"


def iter_samples(url, stats=None):
    """Samples {__key__, ext: bytes, ...} of a shard grouped as OpenCLIP's training pipeline groups them
    (open_clip_train.data.group_by_keys_nothrow: a new sample starts when the key changes or an extension repeats;
    extensions lower-cased). Fills `stats` with the shard's size and sha256 and, for a truncated or corrupt tar, the
    reason in stats["truncated"] (the samples before it are yielded, as OpenCLIP's pipeline yields them)."""
    from webdataset.gopen import gopen
    stats = {} if stats is None else stats
    stats["truncated"] = None
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
            yield current
        reader.drain()
        stats["size"], stats["sha256"] = reader.size, reader.sha256.hexdigest()
    finally:
        raw.close()
