"""LAION-style webdataset shards, read the way OpenCLIP's training pipeline reads them: one shard lister (braceexpand,
`::`-joined sources) and one tar reader (members grouped into samples by webdataset's key rule)."""
import functools
import gzip
import hashlib
import os
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
        self.data_end = 0  # the offset just after the last non-zero byte read

    def read(self, n=-1):
        data = self.f.read(n)
        self.sha256.update(data)
        nonzero = len(data.rstrip(b"\0"))
        if nonzero:
            self.data_end = self.size + nonzero
        self.size += len(data)
        return data

    def drain(self):
        while self.read(1 << 22):
            pass


def _tar_members(fileobj, stats):
    """(name, bytes) of the regular members webdataset reads; a truncated/corrupt tar ends the shard early.
    Other errors (an I/O error of the file system) propagate: a shard must not look read. For an uncompressed tar,
    stats["end"] is where its end-of-archive marker must start (checked once the whole file is read)."""
    try:
        stream = tarfile.open(fileobj=fileobj, mode="r|*")
        for member in stream:
            if member.isreg() and not _SKIP_META.match(member.name):
                yield member.name, stream.extractfile(member).read()
        if stream.fileobj.comptype == "tar":
            stats["end"] = stream.offset
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        stats["truncated"] = _error_line(e)


def _end_damage(end, size, data_end):
    """Why an uncompressed tar whose members stop at byte `end` is not whole (None if it is): tarfile (and webdataset)
    stop silently where a file was cut between two members, or at bytes that are no tar header; only the
    end-of-archive marker (zero blocks) after the last member tells a whole tar from a cut or damaged one."""
    if data_end > end:
        return f"ReadError: bytes at offset {end} are neither a tar header nor the end-of-archive marker (cut short " \
               f"inside a header, or damaged)"
    if size < end + 2 * tarfile.BLOCKSIZE or size % tarfile.BLOCKSIZE:
        return f"ReadError: no whole end-of-archive marker after the last member (the file ends at byte {size}): " \
               f"cut short"
    return None


def _error_line(e):
    """'Type: message' of a tar reading error, on one line."""
    text = (str(e).strip().splitlines() or [""])[0].rstrip(":")
    if text.startswith("file could not be opened successfully"):  # tarfile tried every compression
        text = "not a tar file"
    return f"{type(e).__name__}: {text}"


def tar_damage(path, walk=False):
    """Why the local tar file `path` is not a whole tar, as one short line; None if it looks whole. Cheap (two small
    reads): not empty, a tar header at the start and, for an uncompressed tar, the end-of-archive marker at the end.
    With `walk`, every member header is read too (no member data), and each member must end within the file."""
    size = os.path.getsize(path)
    if size == 0:
        return "empty file"
    with open(path, "rb") as f:
        head = f.read(tarfile.BLOCKSIZE)
        compressed = head[:2] == b"\x1f\x8b"  # gzip: only reading it whole finds damage
        if not compressed and not walk:
            try:
                tarfile.TarInfo.frombuf(head, tarfile.ENCODING, "surrogateescape")
            except tarfile.EOFHeaderError:
                return "ReadError: a tar without members"
            except tarfile.HeaderError:
                return "ReadError: no tar header at its start: not a tar file"
            if size % tarfile.BLOCKSIZE:
                return f"ReadError: its size ({size} bytes) is not a whole number of 512-byte tar blocks: cut short"
            f.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
            if f.read().strip(b"\0"):
                return "ReadError: no end-of-archive marker at its end: cut short"
            return None
    if not walk:
        return None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if not compressed and member.offset_data + member.size > size:
                    return f"ReadError: member {member.name} ends after the end of the file"
            end = tar.offset
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as e:
        return _error_line(e)
    if compressed:
        return None
    with open(path, "rb") as f:
        f.seek(end)
        rest = f.read()
    return _end_damage(end, size, end + len(rest.rstrip(b"\0")))


def sample_extensions(path):
    """The member extensions of each sample of the local tar `path`, grouped as `iter_samples` groups them, read
    from its headers only (no member data): a list of sets, one per sample."""
    samples, key = [], None
    with tarfile.open(path) as tar:
        for member in tar:
            match = _KEY_AND_EXT.match(member.name)
            if not member.isreg() or _SKIP_META.match(member.name) or match is None:
                continue
            ext = match.group(2).lower()
            if key != match.group(1) or ext in samples[-1]:
                key = match.group(1)
                samples.append(set())
            samples[-1].add(ext)
    return samples


class _Member:
    """A tar member's place, standing for its bytes while samples are grouped (read only if its sample is wanted)."""
    __slots__ = ("info",)

    def __init__(self, info):
        self.info = info


def read_samples_at(url, wanted, group):
    """{number: sample} of the samples numbered `wanted` (their order in the shard) of a local, uncompressed shard,
    exactly as OpenCLIP's tar reader yields them: the members webdataset keeps (regular files, no `__meta__` names),
    grouped by `group` (OpenCLIP's group_by_keys_nothrow), reading every tar header but only the wanted samples' data
    (the rest is skipped by seeking). None when that cannot be done (a remote or compressed shard, a damaged tar): the
    caller reads the shard as a stream instead."""
    path = local_path(url)
    if path is None or not wanted:
        return None
    found, last = {}, max(wanted)
    try:
        with tarfile.open(path, "r:") as tar:  # random access: the headers are read, the data is seeked over
            def members():
                for info in tar:
                    name = info.name
                    meta = "/" not in name and name.startswith("__") and name.endswith("__")
                    if info.isreg() and not meta and not _SKIP_META.match(name):
                        yield {"fname": name, "data": _Member(info), "__url__": url}
            for number, sample in enumerate(group(members())):
                if number in wanted:
                    found[number] = {k: tar.extractfile(v.info).read() if isinstance(v, _Member) else v
                                     for k, v in sample.items()}
                if number >= last:
                    break
    except (OSError, EOFError, tarfile.TarError):
        return None
    return found if len(found) == len(wanted) else None


def iter_samples(url, stats=None):
    """Samples {__key__, ext: bytes, ...} of a shard grouped as OpenCLIP's training pipeline groups them
    (open_clip_train.data.group_by_keys_nothrow: a new sample starts when the key changes or an extension repeats;
    extensions lower-cased). Fills `stats` with the shard's size and sha256 and, for a truncated or corrupt tar (also
    one cut between two members, or without its end-of-archive marker), the reason in stats["truncated"] (the samples
    before it are yielded, as OpenCLIP's pipeline yields them)."""
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
        end = stats.pop("end", None)
        if end is not None and not stats["truncated"]:
            stats["truncated"] = _end_damage(end, reader.size, reader.data_end)
    finally:
        raw.close()
