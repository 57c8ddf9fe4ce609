"""The cache's index (open_clip_3t/cache/index.py) and `cache merge` (merge.py): start-up reads a few files whatever
the number of shards; parallel builders write their own parts; verify folds them; merge refuses what does not fit."""
import glob
import json
import os

import pytest
import timm
import torch

from open_clip_3t import cache
from open_clip_3t.cache import check, format, index
from tests.test_cache import MODEL, PER_SHARD, build, cli, file_hashes, make_shards
from training.params import parse_args


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("other_h") / "test_vit_other.pth"
    torch.save(timm.create_model("test_vit", num_classes=7, img_size=32).state_dict(), path)
    return str(path)


def index_names(folder):
    return sorted(os.path.basename(p) for p in glob.glob(f"{folder}/index*.json"))


def no_sidecar_opened(monkeypatch):
    """Make reading a sidecar (its header or the whole file) fail: what runs afterwards must not read one."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a sidecar was read: {args[:1]}")
    monkeypatch.setattr(check, "sidecar_info", refuse)
    monkeypatch.setattr(check, "load_sidecar", refuse)


def test_builders_write_parts_and_start_up_reads_only_the_index(tmp_path, h_weights, monkeypatch):
    spec = make_shards(tmp_path / "data", 5)
    out = tmp_path / "cache"
    for split in ((0, 2), (1, 2)):  # two builders (ranks, array tasks): one part each, never the same file
        build(spec, out, h_weights, split=split)
    assert index_names(out) == ["index.part-00000-of-00002.json", "index.part-00001-of-00002.json"]
    part0 = json.loads((out / "index.part-00000-of-00002.json").read_text())
    assert part0["format"] == index.INDEX_FORMAT and part0["fields"] == list(index.FIELDS)
    assert part0["shards"] == {f"data/0000{i}.tar": [PER_SHARD, 0, os.path.getsize(f"{tmp_path}/data/0000{i}.tar"),
                                                     False, 64] for i in (0, 2, 4)}
    cfg = cache.cached_tower(MODEL, h_weights)
    full = cache.validate(str(out), spec, cfg)  # the reference: what the sidecars' headers say
    assert (full["shards"], full["samples"], full["skipped"], full["missing_shards"]) == (5, 5 * PER_SHARD, 0, [])

    # Every rank: manifest + index, no sidecar; ranks other than 0 do not hash the weights file either.
    no_sidecar_opened(monkeypatch)
    monkeypatch.setattr(format, "_SHA256_MEMO", {})
    hashed = []
    real_sha256 = format.file_sha256
    monkeypatch.setattr(format, "file_sha256", lambda path: hashed.append(path) or real_sha256(path))
    assert cache.validate(str(out), spec, cfg, primary=False) == full and hashed == []
    assert cache.validate(str(out), spec, cfg, primary=True) == full and hashed == [h_weights]

    # training.main's own check, as rank 1 of 2: the plan carries the totals
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    plan = parse_args(["--model", MODEL, "--third-tower-weights", h_weights, "--third-tower-cache", str(out),
                       "--train-data", spec]).run_plan
    assert hashed == [h_weights]  # still the one hash rank 0 made above
    facts = plan.tower().cache_facts
    assert (facts["shards"], facts["samples"], facts["dtype"]) == (5, 5 * PER_SHARD, "float16")


def test_verify_folds_the_parts_and_a_shard_the_index_lacks_is_read_from_its_sidecar(tmp_path, h_weights, capsys):
    spec = make_shards(tmp_path / "data", 4)
    out = tmp_path / "cache"
    for split in ((0, 2), (1, 2)):
        build(spec, out, h_weights, split=split)
    before = cache.read_index(str(out))[0]
    assert cache.verify(spec, MODEL, str(out), h_weights) == []
    assert index_names(out) == ["index.json"] and cache.read_index(str(out))[0] == before

    # A cache without an index (built before there was one): start-up reads the headers, and says how to fix it.
    os.remove(out / "index.json")
    cfg = cache.cached_tower(MODEL, h_weights)
    warnings = []
    facts = cache.validate(str(out), spec, cfg, warn=warnings.append)
    assert facts["samples"] == 4 * PER_SHARD and len(warnings) == 1
    assert warnings[0] == (f"third-tower cache {out}: 4 of the 4 shards of --train-data are not in its index, so their "
                           f"sidecars' headers were read (one file each, at every start-up): run `python -m "
                           f"open_clip_3t.cache verify --third-tower-cache {out} ...` once to bring the index up to date")
    assert cli("verify", "--train-data", spec, "--model", MODEL, "--third-tower-cache", str(out), "--third-tower-weights",
               h_weights).returncode == 0
    assert cache.read_index(str(out))[0] == before
    warnings.clear()
    assert cache.validate(str(out), spec, cfg, warn=warnings.append) == facts and warnings == []

    # A shard that changed size since the build: refused on rank 0 from the index (no sidecar read).
    size = os.path.getsize(f"{tmp_path}/data/00003.tar")
    with open(f"{tmp_path}/data/00003.tar", "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(cache.CacheError, match=r"does not match --train-data: 1 shard\(s\) differ \(first: .*00003.tar: "
                                               r"shard is \d+ bytes, the cache was built from \d+ bytes\)"):
        cache.validate(str(out), spec, cfg)
    # A shard with no sidecar (deleted; verify brings the index up to date): refused under --third-tower-cache-missing error.
    os.remove(cache.sidecar_path(str(out), f"{tmp_path}/data/00002.tar"))
    assert [p.split(":")[0] for p in cache.verify(spec, MODEL, str(out), h_weights)] == ["missing", "mismatched"]
    assert "data/00002.tar" not in cache.read_index(str(out))[0]
    os.truncate(f"{tmp_path}/data/00003.tar", size)
    with pytest.raises(cache.CacheError, match=r"lacks 1 of 4 shards \(first: .*00002.tar, no .*00002.tar.safetensors\)"):
        cache.validate(str(out), spec, cfg)


def test_a_part_written_after_the_index_wins_and_survives_the_fold(tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 2)
    out = str(tmp_path / "cache")
    build(spec, out, h_weights)
    entries, read = cache.read_index(out)
    part = os.path.join(out, index.part_name(0, 1))
    # a builder rewrites its part between verify's read and its write: the part is kept, and stays the newer
    index.write_index(out, {**entries, "data/00001.tar": [5, 1, 123, True, 64]}, os.path.basename(part))
    index.fold_parts(out, entries, read)
    assert index_names(out) == ["index.json", os.path.basename(part)]
    assert cache.read_index(out)[0]["data/00001.tar"] == [5, 1, 123, True, 64]
    # an unreadable index file is ignored with a warning (its shards fall back to their sidecars)
    with open(os.path.join(out, "index.json"), "w") as f:
        f.write("{not json")
    os.remove(part)
    warnings = []
    assert cache.read_index(out, warnings.append)[0] == {}
    assert len(warnings) == 1 and warnings[0].startswith(f"index file {out}/index.json is unreadable (JSONDecodeError")


def test_merge_parts_built_in_separate_folders(tmp_path, h_weights, other_weights):
    spec = make_shards(tmp_path / "data", 4)
    a, b = tmp_path / "node1", tmp_path / "node2"
    build(spec, a, h_weights, split=(0, 2))  # e.g. each node's builders writing to its local scratch
    build(spec, b, h_weights, split=(1, 2))
    out = tmp_path / "merged"
    proc = cli("merge", str(a), str(b), "--third-tower-cache", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"ok: {out} holds 4 shards ({4 * PER_SHARD} samples) from 2 parts\n"
    assert cache.verify(spec, MODEL, str(out), h_weights, checksum=True) == []
    merged = file_hashes(out)
    for part in (a, b):  # the same sidecars, byte for byte, and the same manifest
        assert {k: v for k, v in file_hashes(part).items() if k.endswith(".safetensors")}.items() <= merged.items()
    assert (out / "manifest.json").read_text() == (a / "manifest.json").read_text()
    assert index_names(out) == ["index.json"]
    assert cache.read_index(str(out))[0] == {**cache.read_index(str(a))[0], **cache.read_index(str(b))[0]}
    assert not glob.glob(f"{tmp_path}/merged.tmp*")

    def refused(*argv):
        proc = cli("merge", *map(str, argv))
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        return proc.stderr.strip()

    # a shard in two parts; parts built with other weights; a --third-tower-cache that holds something
    build(f"{tmp_path}/data/00000.tar", tmp_path / "again", h_weights)
    assert refused(a, tmp_path / "again", "--third-tower-cache", tmp_path / "m2") == (
        f"python -m open_clip_3t.cache merge: error: cannot merge: shard data/00000.tar is in both {a} and "
        f"{tmp_path}/again; delete its sidecar from one of them ({tmp_path}/again/data/00000.tar.safetensors)")
    build(f"{tmp_path}/data/00003.tar", tmp_path / "other", other_weights)
    line = refused(a, tmp_path / "other", "--third-tower-cache", tmp_path / "m3")
    assert line.startswith(f"python -m open_clip_3t.cache merge: error: cannot merge {tmp_path}/other with {a}: they "
                           f"were built differently (weights: 'sha256:") and "' != 'sha256:" in line and line.endswith(
        "merge only the parts of one build (same model, weights, --dtype and --precision)")
    assert refused(a, b, "--third-tower-cache", out) == (f"python -m open_clip_3t.cache merge: error: --third-tower-cache {out} exists and is not "
                                           f"an empty folder: merge into a new folder")
    assert not any(os.path.exists(tmp_path / m) for m in ("m2", "m3"))

    # a corrupt sidecar in a part: the merged folder is never created, nothing is left behind
    sidecar = cache.sidecar_path(str(b), f"{tmp_path}/data/00001.tar")
    data = bytearray(open(sidecar, "rb").read())
    data[8 + int.from_bytes(data[:8], "little") + 2] ^= 0xFF  # a byte of the first tensor
    os.remove(sidecar)  # b's file was hard-linked into `out`: write a new one, as a corrupting disk would not
    open(sidecar, "wb").write(bytes(data))
    assert refused(a, b, "--third-tower-cache", tmp_path / "m4").startswith(
        f"python -m open_clip_3t.cache merge: error: sidecar {sidecar} is corrupt (its bytes do not match its sha256): "
        f"rebuild that shard's sidecar: delete {sidecar} and rerun")
    assert not os.path.exists(tmp_path / "m4") and not glob.glob(f"{tmp_path}/m4.tmp*")
