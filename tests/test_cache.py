"""The third-tower embedding cache: build, resume, verify, ranks, and training from it (open_clip_3t/cache/,
training/cached_data.py). Tiny LAION-style shards from open_clip_3t.toy.synthetic; h = 3T-tiny's test_vit."""
import argparse
import collections
import copy
import glob
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

import numpy as np
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import load_file
from safetensors.numpy import save as save_numpy

import open_clip_3t
from open_clip_3t import cache
from open_clip_3t.cache.format import encode_sidecar
from open_clip_3t.toy.synthetic import write_shards
from tests.conftest import REPO
from training.cached_data import fill_missing_third, get_cached_wds_dataset

MODEL = "3T-tiny"
PER_SHARD = 6
TOL = dict(rtol=2e-3, atol=2e-3)  # fp16 storage of h's embeddings


def make_shards(folder, num_shards, seed=0):
    write_shards(str(folder), num_shards * PER_SHARD, PER_SHARD, seed=seed, image_size=48)
    return f"{folder}/{{{0:05d}..{num_shards - 1:05d}}}.tar"


def build(spec, out, weights, **kw):
    kw = {"batch_size": 4, "workers": 0, "split": (0, 1), "quiet": True, **kw}
    return cache.build(spec, MODEL, str(out), weights, **kw)


def rewrite_tar(path, edit):
    """Rewrite a shard, passing each (name, bytes) member through edit(name, data) -> bytes or None (drop)."""
    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for name, data in members:
            data = edit(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def truncate_in_member(path, name):
    """Cut a shard in the middle of member `name`'s data."""
    with tarfile.open(path) as t:
        member = t.getmember(name)
    with open(path, "r+b") as f:
        f.truncate(member.offset_data + member.size // 2)


def tar_images(path):
    """{key: PIL image} of a shard's readable samples with captions, in tar order."""
    out = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.name.endswith(".jpg"):
                out[m.name[:-4]] = Image.open(io.BytesIO(t.extractfile(m).read())).convert("RGB")
    return out


def h_model(weights):
    cfg = cache.cached_tower(MODEL, weights)
    return open_clip_3t.ThirdTower(cfg).eval()


def train_args(spec, cache_dir, weights, **kw):
    return argparse.Namespace(**{
        "train_data": spec, "val_data": None, "dataset_resampled": False, "train_num_samples": None,
        "train_data_upsampling_factors": None, "seed": 0, "workers": 0, "world_size": 1, "batch_size": 1,
        "model": MODEL, "third_tower_weights": weights, "third_tower_cache": str(cache_dir), "third_tower_cache_missing": "error",
        **kw})


def cached_batches(args):
    _, _, preprocess_val = open_clip.create_model_and_transforms(MODEL, third_tower=False)
    info = get_cached_wds_dataset(args, preprocess_val, is_train=True, tokenizer=open_clip.get_tokenizer(MODEL))
    return list(info.dataloader), info


def file_hashes(folder):
    return {os.path.relpath(p, folder): hashlib.sha256(open(p, "rb").read()).hexdigest()
            for p in glob.glob(f"{folder}/**/*", recursive=True) if os.path.isfile(p)}


def cli(*argv, env=None, fault=""):
    """`python -m open_clip_3t.cache ARGV` in a fresh interpreter; `fault`: code run there first (a fault injected
    into the build, e.g. a patched writer that kills the process)."""
    code = f"import sys, open_clip_3t.cache as cache\n{fault}\nsys.exit(cache.main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          cwd=REPO, env={**os.environ, **(env or {})}, timeout=300)


# Faults injected into a build from outside: SIGKILL with half of the second sidecar written to its temporary name,
# and SIGKILL right after h embedded the third batch, once the sidecars finished before it are on disk.
KILL_WRITING_SECOND_SIDECAR = """
import os, signal
from open_clip_3t import files
build = sys.modules["open_clip_3t.cache.build"]  # the module (the package's `build` is the function)
written = []
def write_atomic(path, data, exclusive=False):
    written.append(path)
    if len(written) == 2:
        with open(files.tmp_name(path), "wb") as f:
            f.write(data[:len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return files.write_atomic(path, data, exclusive)
build.write_atomic = write_atomic
"""
KILL_AFTER_THIRD_BATCH = """
import os, signal, time
from open_clip_3t import third_tower
forward, calls = third_tower.ThirdTower.forward, []
def counting(self, pixels):
    out = forward(self, pixels)
    calls.append(1)
    if len(calls) == 3:
        while not os.path.exists(sys.argv[sys.argv.index("--third-tower-cache") + 1] + "/data/00001.tar.safetensors"):
            time.sleep(0.01)  # the writer thread finishes the sidecar of the shard before
        os.kill(os.getpid(), signal.SIGKILL)
    return out
third_tower.ThirdTower.forward = counting
"""


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("other_h") / "test_vit_other.pth"
    torch.save(timm.create_model("test_vit", num_classes=7, img_size=32).state_dict(), path)
    return str(path)


def test_cached_embeddings_equal_direct_h_output(tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 3)
    summary = build(spec, tmp_path / "cache", h_weights, workers=1)
    assert (summary["built"], summary["samples"], summary["skipped"]) == (3, 18, 0)

    h = h_model(h_weights)
    transform = h.eval_transform()
    for shard in cache.expand_shards(spec):
        path = cache.sidecar_path(str(tmp_path / "cache"), shard)
        assert path == f"{tmp_path}/cache/data/{os.path.basename(shard)}.safetensors"
        raw = load_file(path)  # a plain safetensors reader sees the documented tensors
        assert set(raw) == {"embeddings", "keys", "image_crc32"} and raw["embeddings"].dtype == np.float16
        embeddings, keys, crc32, meta = cache.load_sidecar(path)
        images = tar_images(shard)
        assert keys == list(images)  # every sample, in tar order
        direct = h(torch.stack([transform(im) for im in images.values()])).numpy()
        np.testing.assert_allclose(embeddings.astype(np.float32), direct, **TOL)
        assert np.abs(embeddings.astype(np.float32) - direct).max() < 1e-2 * np.abs(direct).max()
        assert meta["shard_size"] == os.path.getsize(shard) and meta["samples"] == PER_SHARD
        assert meta["shard_sha256"] == hashlib.sha256(open(shard, "rb").read()).hexdigest()

    info = cache.info(str(tmp_path / "cache"))
    assert (info["shards"], info["samples"], info["dim"], info["dtype"]) == (3, 18, 64, "float16")
    sizes = sum(os.path.getsize(p) for p in glob.glob(f"{tmp_path}/cache/**/*", recursive=True) if os.path.isfile(p))
    assert info["bytes"] == sizes


def test_training_from_cache_never_runs_h_and_matches_online_training(tmp_path, h_weights, monkeypatch):
    spec = make_shards(tmp_path / "data", 2)
    build(spec, tmp_path / "cache", h_weights)
    # f's val transform at 32 px (resize 32, center crop 32) is h's eval view: augmentation is deterministic.
    batches, info = cached_batches(train_args(spec, tmp_path / "cache", h_weights, batch_size=4))
    assert len(batches) == 3 and info.cache_stats.joined == 12 and info.cache_stats.missing == 0

    torch.manual_seed(0)
    online = open_clip.create_model(MODEL, third_tower_weights=h_weights, output_dict=True)
    cached = open_clip.create_model(MODEL, third_tower=False, output_dict=True)
    state = {k: v for k, v in online.state_dict().items() if not k.startswith("third_tower.")}
    cached.load_state_dict(state, strict=True)
    assert cached.third_tower is None and not any(k.startswith("third_tower") for k in cached.state_dict())

    control = copy.deepcopy(cached)

    def train(model, third_rows=None):
        loss_fn = open_clip_3t.ThreeTowersLoss()
        # SGD: fp16 differences in h's rows move the weights proportionally (Adam would amplify near-zero gradients)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        losses = []
        for images, texts, third in batches:
            out = model(images, texts, third_embeddings=None if third_rows is None else third_rows(third))
            terms = loss_fn(**out, output_dict=True)
            opt.zero_grad()
            sum(terms.values()).backward()
            opt.step()
            model.clamp_logit_scales_()
            losses.append([terms[k].item() for k in ("contrastive_loss", "image_third_loss", "text_third_loss")])
        return np.array(losses)

    # Each cached row is h's embedding of that very image (the join kept samples and rows together).
    for images, _, third in batches:
        np.testing.assert_allclose(third.float().numpy(), online.encode_third(images).numpy(), **TOL)
    online_losses = train(online)

    def h_must_not_run(*args, **kwargs):
        raise AssertionError("the third tower ran while training from the cache")
    monkeypatch.setattr(open_clip_3t.ThirdTower, "forward", h_must_not_run)
    cached_losses = train(cached, lambda third: third)
    assert np.all(online_losses[1:] != online_losses[0])  # the steps did change the model
    np.testing.assert_allclose(cached_losses, online_losses, atol=3e-3, rtol=0)  # fp16 rows, logit scale ~14
    # Control: rows joined to the wrong samples (rolled by one in each batch) miss by far more than that tolerance.
    wrong_losses = train(control, lambda third: third.roll(1, dims=0))
    assert np.abs(wrong_losses - online_losses).max() > 10 * 3e-3


def test_killed_build_resumes_byte_identical(tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 4)
    build(spec, tmp_path / "ref", h_weights, workers=1)
    run = tmp_path / "run"
    argv = ["build", "--train-data", spec, "--model", MODEL, "--third-tower-cache", str(run), "--third-tower-weights", h_weights,
            "--batch-size", "4", "--workers", "0", "--device", "cpu"]

    # 1: SIGKILL while writing the second sidecar (half a temporary file on disk).
    first = cli(*argv, fault=KILL_WRITING_SECOND_SIDECAR)
    assert first.returncode == -signal.SIGKILL, first.stderr
    done, partial = sorted(os.listdir(run / "data"))
    assert done == "00000.tar.safetensors" and partial.startswith("00001.tar.safetensors.tmp")
    problems = cache.verify(spec, MODEL, str(run), h_weights)
    assert [p.split()[1] for p in problems] == [f"{tmp_path}/data/0000{i}.tar" for i in (1, 2, 3)]
    # 2: SIGKILL mid-shard: shard 1 (2 batches) is rebuilt, then the first batch of shard 2 is computed.
    second = cli(*argv, fault=KILL_AFTER_THIRD_BATCH)
    assert second.returncode == -signal.SIGKILL, second.stderr
    assert "1 already done, 3 to build" in second.stderr
    assert sorted(os.listdir(run / "data")) == ["00000.tar.safetensors", "00001.tar.safetensors"]
    # 3: the rerun finishes; every file equals the uninterrupted build's, byte for byte.
    third = cli(*argv)
    assert third.returncode == 0 and "2 already done, 2 to build" in third.stderr, third.stderr
    # (and the index: the uninterrupted build's one part; here the same part, plus the index.json verify wrote)
    hashes = file_hashes(run)
    assert hashes.pop("index.json") and hashes == file_hashes(tmp_path / "ref") and len(hashes) == 6
    assert cache.read_index(str(run))[0] == cache.read_index(str(tmp_path / "ref"))[0]
    assert build(spec, run, h_weights)["already_done"] == 4  # a finished cache is left alone


def test_corrupt_and_truncated_samples_are_skipped_and_counted(tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 3)
    shard0, shard1, _ = cache.expand_shards(spec)
    rewrite_tar(shard0, lambda name, data: b"not a jpeg" if name == "000000002.jpg" else
                None if name == "000000004.txt" else data)
    truncate_in_member(shard1, "000000009.jpg")  # samples 6, 7, 8 survive

    summary = build(spec, tmp_path / "cache", h_weights)
    assert (summary["samples"], summary["skipped"], summary["truncated"]) == (13, 2, 1)
    _, keys0, _, meta0 = cache.load_sidecar(cache.sidecar_path(str(tmp_path / "cache"), shard0))
    assert keys0 == ["000000000", "000000001", "000000003", "000000005"]
    assert [k for k, _ in meta0["skipped"]] == ["000000002", "000000004"]
    assert meta0["skipped"][0][1].startswith("undecodable .jpg") and meta0["skipped"][1][1] == "no caption (.txt)"
    _, keys1, _, meta1 = cache.load_sidecar(cache.sidecar_path(str(tmp_path / "cache"), shard1))
    assert keys1 == ["000000006", "000000007", "000000008"] and meta1["truncated"].startswith("ReadError")
    assert cache.info(str(tmp_path / "cache"))["truncated_shards"] == 1

    # Training sees exactly the cached samples (policy error: none missing), each once; the corrupt one is counted.
    batches, info = cached_batches(train_args(spec, tmp_path / "cache", h_weights, train_num_samples=13))
    rows = collections.Counter(tuple(third[0].tolist()) for _, _, third in batches)
    cached_rows = collections.Counter()
    for shard in cache.expand_shards(spec):
        cached_rows.update(tuple(r) for r in cache.load_sidecar(cache.sidecar_path(str(tmp_path / "cache"), shard))[0]
                           .astype(np.float32).tolist())
    assert rows == cached_rows and sum(rows.values()) == 13
    assert (info.cache_stats.joined, info.cache_stats.corrupt, info.cache_stats.missing) == (13, 1, 0)


def test_cache_for_another_third_tower_or_other_shards_is_refused(tmp_path, h_weights, other_weights):
    spec = make_shards(tmp_path / "data", 2)
    build(spec, tmp_path / "cache", h_weights)
    cache_dir = str(tmp_path / "cache")
    assert cache.verify(spec, MODEL, cache_dir, h_weights) == []

    # Another third tower: verify exits 1 naming the weights; training refuses with one line.
    proc = cli("verify", "--train-data", spec, "--model", MODEL, "--third-tower-cache", cache_dir, "--third-tower-weights",
               other_weights)
    assert proc.returncode == 1 and proc.stdout.startswith("mismatched fingerprint: weights: cache has 'sha256:")
    with pytest.raises(cache.CacheError) as e:
        cached_batches(train_args(spec, cache_dir, other_weights))
    assert str(e.value).startswith(f"third-tower cache {cache_dir} was built with a different third tower than this "
                                   f"run's third tower (weights: cache has 'sha256:") and "this run has 'sha256:" in \
        str(e.value) and str(e.value).endswith(": pass the --model and --third-tower-weights the cache was built with, "
                                               "or build a cache for this tower")
    assert "\n" not in str(e.value)
    with pytest.raises(cache.CacheError, match="built differently"):  # nor may a build mix the two
        build(spec, tmp_path / "cache", other_weights)

    # Other shards: one the cache lacks; refused by verify and, under --third-tower-cache-missing error, before training.
    make_shards(tmp_path / "more", 1)
    more = f"{spec}::{tmp_path}/more/00000.tar"
    assert cache.verify(more, MODEL, cache_dir, h_weights) == [
        f"missing: {tmp_path}/more/00000.tar (no {cache_dir}/more/00000.tar.safetensors)"]
    with pytest.raises(cache.CacheError, match="lacks 1 of 3 shards"):
        cached_batches(train_args(more, cache_dir, h_weights))

    # The same shard names with other content (regenerated data): the join's image checksums refuse them.
    regenerated = make_shards(tmp_path / "elsewhere" / "data", 2, seed=1)
    problems = cache.verify(regenerated, MODEL, cache_dir, h_weights, checksum=True)
    assert len(problems) == 2 and all("sha256 differs" in p for p in problems)
    with pytest.raises(cache.CacheError, match="changed since the third-tower cache .* was built .* has another image"):
        cached_batches(train_args(regenerated, cache_dir, h_weights, train_num_samples=12))
    with pytest.raises(cache.CacheError, match="was built from another shard"):  # never taken for "already done"
        build(regenerated, tmp_path / "cache", h_weights)


def verify_lines(spec, cache_dir, weights, capsys, *flags):
    """(exit status, stdout lines) of `python -m open_clip_3t.cache verify ...`, in this process."""
    status = cache.main(["verify", "--train-data", spec, "--model", MODEL, "--third-tower-cache", str(cache_dir),
                         "--third-tower-weights", weights, *flags])
    return status, capsys.readouterr().out.strip().splitlines()


def test_sidecars_carry_their_own_sha256(tmp_path, h_weights, capsys):
    """Issue 10, item 4: 200 overwritten embedding bytes passed `verify --checksum` and were trained on (values of
    203); NaN rows stopped mid-epoch advising --third-tower-cache-missing online. Now verify --checksum and the training join
    both refuse the sidecar, and the advice (rebuild that shard's sidecar) is the fix."""
    spec = make_shards(tmp_path / "data", 2)
    build(spec, tmp_path / "cache", h_weights)
    shard, _ = cache.expand_shards(spec)
    path = cache.sidecar_path(str(tmp_path / "cache"), shard)
    data = open(path, "rb").read()
    digest = cache.sidecar_info(path)["sha256"]  # docs/cache.md: sha256 of the file with this value blanked
    assert hashlib.sha256(data.replace(digest.encode(), b"0" * 64, 1)).hexdigest() == digest
    hint = f"rebuild that shard's sidecar: delete {path} and rerun `python -m open_clip_3t.cache build`"

    header_len = int.from_bytes(data[:8], "little")
    start = 8 + header_len + json.loads(data[8:8 + header_len])["embeddings"]["data_offsets"][0]
    with open(path, "r+b") as f:  # 200 bytes of embeddings become fp16 0x5A5A = 203.25
        f.seek(start + 16)
        f.write(b"\x5a" * 200)
    assert verify_lines(spec, tmp_path / "cache", h_weights, capsys)[0] == 0  # headers only: the sizes still fit
    status, lines = verify_lines(spec, tmp_path / "cache", h_weights, capsys, "--checksum")
    assert status == 1 and lines == [f"mismatched: {shard}: sidecar {path} is corrupt (its bytes do not match its "
                                     f"sha256): {hint} with the same options (it builds only the sidecars that do not "
                                     f"exist)"]
    for policy in ("error", "skip", "online"):  # corrupt is not missing: no policy trains on it
        with pytest.raises(cache.CacheError, match="is corrupt") as e:
            cached_batches(train_args(spec, tmp_path / "cache", h_weights, third_tower_cache_missing=policy, train_num_samples=12))
        assert hint in str(e.value) and "--third-tower-cache-missing" not in str(e.value)

    embeddings, keys, crc32, meta = cache.load_sidecar(cache.sidecar_path(str(tmp_path / "cache"), shard.replace(
        "00000", "00001")))  # an intact sidecar, re-encoded with a NaN row: its checksum holds, its values do not
    embeddings = embeddings.copy()
    embeddings[3, 5] = np.nan
    info = {k: v for k, v in meta.items() if k not in ("format", "sha256")}
    nan_path = cache.sidecar_path(str(tmp_path / "cache"), shard.replace("00000", "00001"))
    open(nan_path, "wb").write(encode_sidecar(embeddings, keys, crc32, info))
    status, lines = verify_lines(spec, tmp_path / "cache", h_weights, capsys, "--checksum")
    assert status == 1 and lines[1] == (f"mismatched: {shard.replace('00000', '00001')}: sidecar {nan_path} holds "
                                        f"non-finite embeddings (1 rows, first key '000000009'): rebuild that shard's "
                                        f"sidecar: delete {nan_path} and rerun `python -m open_clip_3t.cache build` "
                                        f"with the same options (it builds only the sidecars that do not exist)")
    with pytest.raises(cache.CacheError, match="holds non-finite embeddings") as e:
        cached_batches(train_args(spec, tmp_path / "cache", h_weights, third_tower_cache_missing="online", train_num_samples=12))
    assert "--third-tower-cache-missing online" not in str(e.value)

    os.remove(path)  # the advice, followed
    os.remove(nan_path)
    build(spec, tmp_path / "cache", h_weights)
    assert verify_lines(spec, tmp_path / "cache", h_weights, capsys, "--checksum") == (0, [
        f"ok: {tmp_path / 'cache'} covers 2 shards for {MODEL}"])

    # A sidecar written before sidecars carried a sha256 still reads (nothing can be misread), but verify
    # --checksum says it cannot vouch for its bytes.
    _, keys, crc32, meta = cache.load_sidecar(path)
    old = json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True, ensure_ascii=False)
    embeddings = cache.load_sidecar(path)[0]
    open(path, "wb").write(save_numpy({"embeddings": embeddings, "keys": np.frombuffer("\n".join(keys).encode(), np.uint8),
                                       "image_crc32": crc32}, metadata={"open_clip_3t_cache": old}))
    assert cache.load_sidecar(path)[1] == keys
    status, lines = verify_lines(spec, tmp_path / "cache", h_weights, capsys, "--checksum")
    assert status == 1 and lines == [f"mismatched: {shard}: sidecar {path} carries no sha256 (written before sidecars "
                                     f"had one), so its bytes cannot be checked: {hint} with the same options (it "
                                     f"builds only the sidecars that do not exist)"]


def test_a_build_never_writes_non_finite_embeddings(tmp_path, h_weights, monkeypatch):
    spec = make_shards(tmp_path / "data", 1)
    monkeypatch.setattr(open_clip_3t.ThirdTower, "forward", lambda self, pixels: torch.full((len(pixels), 64), np.inf))
    with pytest.raises(cache.CacheError, match=r"h gave non-finite embeddings for 6 sample\(s\) of .*00000.tar: "
                                               r"nothing written; build with --precision fp32 if h overflows in fp32"):
        build(spec, tmp_path / "cache", h_weights)
    assert not glob.glob(f"{tmp_path}/cache/data/*")


def test_missing_samples_follow_the_policy(tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 3)
    build("{}/data/{{00000..00001}}.tar".format(tmp_path), tmp_path / "cache", h_weights)  # shard 2 not cached

    batches, info = cached_batches(train_args(spec, tmp_path / "cache", h_weights, third_tower_cache_missing="skip",
                                              train_num_samples=12))
    assert sum(len(b[0]) for b in batches) == 12 and not any(torch.isnan(b[2]).any() for b in batches)
    assert (info.cache_stats.joined, info.cache_stats.missing) == (12, 6)

    batches, info = cached_batches(train_args(spec, tmp_path / "cache", h_weights, third_tower_cache_missing="online",
                                              batch_size=18, train_num_samples=18))
    (images, _, third), = batches
    assert torch.isnan(third).any(dim=1).sum() == 6 and info.cache_stats.missing == 6
    online = open_clip.create_model(MODEL, third_tower_weights=h_weights)
    filled, n = fill_missing_third(online, images, {"third": third})  # {tower: its cached rows}
    assert n == 6 and not torch.isnan(filled["third"]).any()
    np.testing.assert_allclose(filled["third"].float().numpy(), online.encode_third(images).numpy(), **TOL)
    with pytest.raises(RuntimeError, match="missing from the cache of third tower third and the model was built "
                                           "without it"):
        fill_missing_third(open_clip.create_model(MODEL, third_tower=False), images, {"third": third})


def test_two_ranks_split_the_shards(tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 5)
    argv = ["build", "--train-data", spec, "--model", MODEL, "--third-tower-cache", str(tmp_path / "cache"),
            "--third-tower-weights", h_weights, "--batch-size", "4", "--workers", "0", "--device", "cpu"]
    procs = [subprocess.Popen([sys.executable, "-m", "open_clip_3t.cache", *argv], cwd=REPO, text=True,
                              stderr=subprocess.PIPE, env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert "3 of 5 shards are ours" in errs[0] and "2 of 5 shards are ours" in errs[1]
    keys = []
    for shard in cache.expand_shards(spec):
        keys += cache.load_sidecar(cache.sidecar_path(str(tmp_path / "cache"), shard))[1]
    assert sorted(keys) == [f"{i:09d}" for i in range(5 * PER_SHARD)]  # every sample once, none twice
    assert cache.verify(spec, MODEL, str(tmp_path / "cache"), h_weights) == []


def test_shard_split_combines_ranks_and_array_tasks():
    array = {"SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "2", "SLURM_ARRAY_TASK_COUNT": "2"}
    seen = [cache.shard_split({**array, "SLURM_ARRAY_TASK_ID": str(task), "SLURM_PROCID": str(rank),
                               "SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "3", "SLURM_NTASKS": "3"})
            for task in (1, 2) for rank in range(3)]
    assert seen == [(i, 6) for i in range(6)]
    assert cache.shard_split({"RANK": "1", "WORLD_SIZE": "4"}) == (1, 4)
    assert cache.shard_split({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1)  # batch script, not an srun step
    with pytest.raises(cache.CacheError, match="contiguous"):
        cache.shard_split({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "4",
                           "SLURM_ARRAY_TASK_COUNT": "2"})


def test_bad_input_fails_before_work(tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 1)
    with pytest.raises(cache.CacheError, match="has no three_towers section"):
        cache.build(spec, "ViT-B-32", str(tmp_path / "c"), h_weights)
    with pytest.raises(cache.CacheError, match="no pretrained weights"):
        cache.build(spec, MODEL, str(tmp_path / "c"))
    with pytest.raises(cache.CacheError, match=r"1 shard\(s\) of --train-data do not exist"):
        cache.build(f"{tmp_path}/data/00009.tar", MODEL, str(tmp_path / "c"), h_weights)
    make_shards(tmp_path / "b" / "data", 1)
    with pytest.raises(cache.CacheError, match="map to the same sidecar data/00000.tar"):
        cache.build(f"{spec}::{tmp_path}/b/data/00000.tar", MODEL, str(tmp_path / "c"), h_weights)
    assert not os.path.exists(tmp_path / "c")  # nothing written
    proc = cli("info", "--third-tower-cache", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "is not a third-tower cache" in proc.stderr


def test_sbatch_array_builds_the_whole_cache(slurm_cluster, tmp_path, h_weights):
    spec = make_shards(tmp_path / "data", 3)
    out = tmp_path / "cache"
    env = {"TRAIN_DATA": spec, "OUT": str(out), "MODEL": MODEL, "THIRD_TOWER_WEIGHTS": h_weights, "DEVICE": "cpu",
           "PRECISION": "fp32", "BATCH_SIZE": "4", "WORKERS": "0", "PYTHON": sys.executable, "REPO_DIR": REPO}
    job, rc = slurm_cluster.sbatch_wait(
        os.path.join(REPO, "scripts", "slurm", "build_cache.sbatch"), "--array=1-2", "--ntasks-per-node=1",
        "--gpus-per-node=0", "--cpus-per-task=1", "--time=5", f"--output={tmp_path}/%A_%a.out",
        env_extra=env, timeout=240)
    logs = {p: open(p).read() for p in sorted(glob.glob(f"{tmp_path}/*.out"))}
    assert rc == 0, logs
    ours = sorted(line.split(": ")[1].split(",")[0] for log in logs.values() for line in log.splitlines()
                  if "shards are ours" in line)
    assert ours == ["1 of 3 shards are ours", "2 of 3 shards are ours"]
    keys = []
    for shard in cache.expand_shards(spec):
        keys += cache.load_sidecar(cache.sidecar_path(str(out), shard))[1]
    assert sorted(keys) == [f"{i:09d}" for i in range(3 * PER_SHARD)]


def test_join_refuses_a_pipeline_of_another_shape(tmp_path):
    from training._open_clip_train import openclip_get_wds_dataset, wds_join_field
    spec = make_shards(tmp_path / "data", 1)
    args = train_args(spec, tmp_path, None, val_data=spec, val_num_samples=PER_SHARD)
    _, _, preprocess_val = open_clip.create_model_and_transforms(MODEL, third_tower=False)
    val = openclip_get_wds_dataset(args, preprocess_val, is_train=False, tokenizer=open_clip.get_tokenizer(MODEL))
    with pytest.raises(RuntimeError, match="expected one tarfile_to_samples_nothrow stage, found 0"):
        wds_join_field(val, lambda samples: samples, "__third__")


def test_the_build_moves_uint8_pixels_and_normalises_them_bit_identically(tmp_path, h_weights):
    """The decode stage stops at uint8 (a quarter of the bytes to pin and copy); h.normalize on the device finishes
    the preprocessing with exactly the values of h's eval transform."""
    spec = make_shards(tmp_path / "data", 2)
    h = h_model(h_weights)
    shards = list(enumerate(cache.expand_shards(spec)))
    batches = list(cache.decode_loader(shards, h, batch_size=4, workers=2, device="cpu"))
    assert sorted(b["shard"] for b in batches) == [0, 0, 1, 1] and all(b["pixels"].dtype == torch.uint8 for b in batches)
    transform = h.eval_transform()
    for batch in batches:
        pictures = tar_images(cache.expand_shards(spec)[batch["shard"]])
        expected = torch.stack([transform(pictures[k]) for k in batch["keys"]])
        assert torch.equal(h.normalize(batch["pixels"]), expected)


def test_one_cache_per_tower_of_a_two_tower_model(tmp_path, h_weights, other_weights):
    """3T-tiny-K2 (towers vit: test_vit, resnet: test_resnet): `build --third-tower` caches one tower; a one-tower model's
    cache serves the tower with the same fingerprint (the name is not part of it); the join attaches every cached
    tower's row to each sample in one stage; a cache named for the wrong tower is refused naming the tower it holds."""
    spec = make_shards(tmp_path / "data", 2)
    with pytest.raises(cache.CacheError, match=r"has the third towers \['vit', 'resnet'\]: say which one with --third-tower"):
        cache.build(spec, "3T-tiny-K2", str(tmp_path / "x"), h_weights, quiet=True)
    assert not (tmp_path / "x").exists()
    torch.manual_seed(3)
    resnet = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), resnet)
    cache.build(spec, "3T-tiny-K2", str(tmp_path / "resnet"), str(resnet), batch_size=4, workers=0, split=(0, 1),
                quiet=True, tower="resnet")
    build(spec, tmp_path / "vit", h_weights)  # built for 3T-tiny's single tower "third": the same test_vit
    assert cache.info(str(tmp_path / "resnet"))["tower"] == "resnet" and cache.info(str(tmp_path / "vit"))["tower"] == "third"

    args = train_args(spec, None, None, model="3T-tiny-K2", batch_size=4,
                      third_tower_weights=[f"vit={h_weights}", f"resnet={resnet}"],
                      third_tower_cache=[f"vit={tmp_path / 'vit'}", f"resnet={tmp_path / 'resnet'}"])
    _, _, preprocess_val = open_clip.create_model_and_transforms("3T-tiny-K2", third_tower=False)
    info = get_cached_wds_dataset(args, preprocess_val, is_train=True, tokenizer=open_clip.get_tokenizer("3T-tiny-K2"))
    batches = list(info.dataloader)
    assert info.cached_towers == ["vit", "resnet"] and len(batches) == 3 and info.cache_stats.joined == 12
    # Each tower's row is that tower's embedding of that very sample. f's val view at 32 px is test_vit's eval view
    # (bicubic), so vit's rows match within fp16; test_resnet's eval view resizes bilinearly, so its rows are matched
    # to the samples by nearest embedding.
    online = open_clip.create_model("3T-tiny-K2", third_tower_weights={"vit": h_weights, "resnet": str(resnet)})
    for images, _, vit_rows, resnet_rows in batches:
        assert vit_rows.shape == (4, 64) and resnet_rows.shape == (4, 96)
        with torch.no_grad():
            np.testing.assert_allclose(vit_rows.float().numpy(), online.encode_third(images, "vit").numpy(), **TOL)
            direct = F.normalize(online.encode_third(images, "resnet"), dim=-1)
        nearest = (F.normalize(resnet_rows.float(), dim=-1) @ direct.T).argmax(dim=1)
        assert nearest.tolist() == [0, 1, 2, 3]

    args.third_tower_cache = [f"vit={tmp_path / 'resnet'}", f"resnet={tmp_path / 'vit'}"]
    with pytest.raises(cache.CacheError) as e:
        get_cached_wds_dataset(args, preprocess_val, is_train=True)
    assert str(e.value) == (f"--third-tower-cache vit={tmp_path / 'resnet'} holds the embeddings of the tower "
                            f"resnet, not vit: pass resnet={tmp_path / 'resnet'}")
    args.third_tower_cache, args.third_tower_weights = [f"vit={tmp_path / 'vit'}"], [f"vit={other_weights}",
                                                                                       f"resnet={resnet}"]
    with pytest.raises(cache.CacheError, match="built with a different third tower than this run's third tower vit "):  # not a swap: other weights
        get_cached_wds_dataset(args, preprocess_val, is_train=True)
