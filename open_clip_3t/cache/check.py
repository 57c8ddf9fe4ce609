"""Checking a cache against data and a third tower: `verify` (every problem), `validate` (before training,
one-line refusal), `info` (totals)."""
import glob
import os

from ..config import DEFAULT_TOWER
from ..shards import local_path
from .format import (DIGEST, MANIFEST, SUFFIX, CacheError, cached_tower, check_shard_ids, expand_shards, file_sha256,
                     fingerprint, fingerprint_diffs, load_sidecar, log, read_manifest, rebuild_hint, shard_id,
                     shard_ids, sidecar_info, sidecar_path)
from .index import FIELDS, entry, fold_parts, index_files, read_index


def check_shards(cache_dir, urls, checksum=False, dim=None):
    """(missing, mismatched, infos): shards without a sidecar, problem lines, and each present sidecar's metadata.
    With `checksum`, every sidecar is read whole (its sha256, finite embeddings) and every shard re-hashed."""
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
        if info.get("shard_id", shard_id(url)) != shard_id(url):
            mismatched.append(f"{url}: sidecar {path} was built for the shard {info['shard_id']}, not this one: "
                              f"{rebuild_hint(path)}")
            continue
        if checksum:
            try:
                load_sidecar(path)
            except CacheError as e:
                mismatched.append(f"{url}: {e}")
            if DIGEST not in info:
                mismatched.append(f"{url}: sidecar {path} carries no sha256 (written before sidecars had one), so "
                                  f"its bytes cannot be checked: {rebuild_hint(path)}")
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


def staged_elsewhere(cache_dir, missing, urls):
    """Advice for shards without a sidecar whose file names the cache holds under another folder name, for shards
    of the same size that are not themselves in `urls` (the data was copied to a folder of another name): None if it
    holds none of them."""
    used = {shard_id(u) for u in urls}
    for url in missing:
        folder, name = shard_id(url).split("/")
        file = local_path(url)
        for other in sorted(os.listdir(cache_dir)):
            path = os.path.join(cache_dir, other, name + SUFFIX)
            if other == folder or f"{other}/{name}" in used or not os.path.isfile(path):
                continue
            try:
                size = sidecar_info(path)["shard_size"]
            except Exception:
                continue
            if file is not None and os.path.isfile(file) and size != os.path.getsize(file):
                continue
            return (f"the cache names a shard by its folder and file name, and holds {other}/{name}{SUFFIX}, but "
                    f"--train-data's shards are in a folder named {folder!r}: put them in (or symlink) a folder named "
                    f"{other!r}, or build a cache for these")
    return None


def verify(train_data, model, cache_dir, third_tower_weights=None, checksum=False, three_towers=None, tower=None):
    """Problems (one line each) that keep `cache_dir` from serving `train_data` for `model`'s tower `tower` (default:
    the only one); [] if none. A sidecar of a shard that was cut short or damaged when it was built is one."""
    urls = expand_shards(train_data)
    check_shard_ids(urls)
    manifest = read_manifest(cache_dir)
    expected = fingerprint(cached_tower(model, third_tower_weights, three_towers, tower))
    problems = ["mismatched fingerprint: " + d for d in fingerprint_diffs(manifest["fingerprint"], expected)]
    missing, mismatched, infos = check_shards(cache_dir, urls, checksum, dim=expected["embed_dim"])
    problems += [f"missing: {u} (no {sidecar_path(cache_dir, u)})" for u in missing]
    hint = staged_elsewhere(cache_dir, missing, urls)
    problems += [f"missing: {hint}"] if hint else []
    problems += ["mismatched: " + m for m in mismatched]
    problems += [f"damaged: {url}: the shard was cut short or damaged when the cache was built ({info['truncated']}): "
                 f"the cache holds only the {info['rows']} samples before the damage; replace the shard, delete "
                 f"{sidecar_path(cache_dir, url)} and build again, or leave the shard out of --train-data"
                 for url, info in infos.items() if info.get("truncated")]
    update_index(cache_dir, urls, infos)
    return problems


def update_index(cache_dir, urls, infos):
    """Bring the cache's index up to date for `urls` (each present sidecar's header in `infos`), folding the
    builders' parts into index.json. A cache folder this process cannot write keeps its index (a warning says so)."""
    entries, read = read_index(cache_dir)
    for sid in shard_ids(urls):
        entries.pop(sid, None)
    entries.update(zip(shard_ids(list(infos)), map(entry, infos.values())))
    try:
        fold_parts(cache_dir, entries, read)
    except OSError as e:
        log(f"cache {cache_dir}: its index was not brought up to date ({type(e).__name__}: {e}); training reads the "
            f"sidecar headers of the shards the index lacks")


def indexed_shards(cache_dir, urls, ids, dim, primary, warn):
    """(missing, mismatched, samples, skipped) of `urls` from the cache's index; a shard the index lacks has its
    sidecar's header read. On the primary process only, each indexed shard's size is compared to its file's (a stat
    per shard; the join checks each sample's image anyway)."""
    index, _ = read_index(cache_dir, warn if primary else None)
    rows, skipped, size, dim_at = (FIELDS.index(f) for f in ("rows", "skipped", "shard_size", "dim"))
    unindexed, mismatched, samples, dropped = [], [], 0, 0
    for url, sid in zip(urls, ids):
        values = index.get(sid)
        if values is None:
            unindexed.append(url)
            continue
        samples, dropped = samples + values[rows], dropped + values[skipped]
        if values[dim_at] != dim:
            mismatched.append(f"{url}: sidecar has {values[dim_at]}-d embeddings, the third tower {dim}-d")
        file = local_path(url) if primary else None
        if file is not None:
            try:
                found = os.stat(file).st_size
            except FileNotFoundError:
                mismatched.append(f"{url}: shard file does not exist")
                continue
            if found != values[size]:
                mismatched.append(f"{url}: shard is {found} bytes, the cache was built from {values[size]} bytes")
    missing, more, infos = check_shards(cache_dir, unindexed, dim=dim)
    if infos and primary:
        warn(f"third-tower cache {cache_dir}: {len(infos)} of the {len(urls)} shards of --train-data are not in its "
             f"index, so their sidecars' headers were read (one file each, at every start-up): run `python -m "
             f"open_clip_3t.cache verify --third-tower-cache {cache_dir} ...` once to bring the index up to date")
    samples += sum(i["rows"] for i in infos.values())
    dropped += sum(len(i["skipped"]) for i in infos.values())
    return missing, mismatched + more, samples, dropped


def validate(cache_dir, train_data, cfg, policy="error", primary=True, warn=log):
    """Before training: refuse (CacheError, one line) a cache for another third tower or other shards. Shards with
    no sidecar are refused under policy 'error' and reported otherwise. Returns a summary dict.

    Reads the manifest and the index (a few files, whatever the number of shards; the sidecar header of a shard the
    index lacks). `primary` (one process per job: global rank 0) also checks the fingerprint, which hashes the
    weights file, and each shard's size; the other ranks trust it (the job stops with it)."""
    urls = expand_shards(train_data)
    ids = check_shard_ids(urls)
    manifest = read_manifest(cache_dir)
    diffs = fingerprint_diffs(manifest["fingerprint"], fingerprint(cfg)) if primary else []
    if diffs:
        which = "this run's third tower" + ("" if cfg.name == DEFAULT_TOWER else f" {cfg.name}")
        raise CacheError(f"third-tower cache {cache_dir} was built with a different third tower than {which} "
                         f"({'; '.join(diffs).replace('model has', 'this run has')}): pass the --model and "
                         f"--third-tower-weights the cache was built with, or build a cache for this tower")
    missing, mismatched, samples, skipped = indexed_shards(cache_dir, urls, ids, cfg.embed_dim, primary, warn)
    verify_hint = f"run `python -m open_clip_3t.cache verify --third-tower-cache {cache_dir} ...` for the full list"
    if mismatched:
        raise CacheError(f"third-tower cache {cache_dir} does not match --train-data: {len(mismatched)} shard(s) "
                         f"differ (first: {mismatched[0]}); {verify_hint}")
    hint = staged_elsewhere(cache_dir, missing, urls) if missing else None
    if missing and (policy == "error" or hint and len(missing) == len(urls)):
        raise CacheError(f"third-tower cache {cache_dir} lacks {len(missing)} of {len(urls)} shards (first: "
                         f"{missing[0]}, no {sidecar_path(cache_dir, missing[0])}): "
                         f"{hint or 'finish the build, or pass --third-tower-cache-missing skip|online'}")
    if len(missing) == len(urls) and policy == "skip":
        raise CacheError(f"third-tower cache {cache_dir} covers none of the {len(urls)} shards of --train-data (first: "
                         f"{missing[0]}): --third-tower-cache-missing skip would drop every sample; build the cache "
                         f"for these shards, or pass --third-tower-cache-missing online")
    return {"shards": len(urls), "missing_shards": missing, "dtype": manifest["dtype"], "samples": samples,
            "skipped": skipped}


POLICIES = ("error", "skip", "online")


def validate_plan(plan, train_data, primary=True):
    """Check the cache of each cached tower of a run's plan against `train_data` and that tower, under the plan's
    --third-tower-cache-missing policy (see `validate`; `primary`: this process checks for the whole job). Raises
    CacheError (one line) on a mismatch, naming the tower a cache holds when it was given for another; reads the manifest and the
    index of each cache, and on the primary the weights files' bytes (sha256); builds nothing. Returns
    {tower name: the cache's totals (shards, samples, missing shards, skipped samples, dtype, embed_dim)}."""
    if plan.cache_missing not in POLICIES:
        raise CacheError(f"--third-tower-cache-missing {plan.cache_missing}: use one of {', '.join(POLICIES)}")
    facts = {}
    for tower in plan.towers:
        if tower.source != "cache":
            continue
        try:
            facts[tower.name] = validate(tower.cache, train_data, tower.cfg, plan.cache_missing, primary)
        except CacheError:
            found = read_manifest(tower.cache)["fingerprint"]
            owners = [t.name for t in plan.towers if not fingerprint_diffs(found, fingerprint(t.cfg))]
            if owners and tower.name not in owners:  # built for another tower of this model: the caches were swapped
                raise CacheError(f"--third-tower-cache {tower.name}={tower.cache} holds the embeddings of the tower "
                                 f"{owners[0]}, not {tower.name}: pass {owners[0]}={tower.cache}") from None
            raise
        facts[tower.name]["embed_dim"] = tower.cfg.embed_dim
    return facts


def info(cache_dir):
    """Summary of a cache: the manifest and totals over every sidecar in it."""
    manifest = read_manifest(cache_dir)
    paths = sorted(glob.glob(os.path.join(glob.escape(cache_dir), "*", "*" + SUFFIX)))
    infos = []
    for p in paths:
        try:
            infos.append(sidecar_info(p))
        except Exception as e:
            raise CacheError(f"sidecar {p} is unreadable ({type(e).__name__}: {str(e)[:100]}): {rebuild_hint(p)}") \
                from None
    size = (sum(os.path.getsize(p) for p in paths) + os.path.getsize(os.path.join(cache_dir, MANIFEST))
            + sum(stat.st_size for _, stat in index_files(cache_dir)))
    samples = sum(i["rows"] for i in infos)
    return {"model": manifest["model"], "tower": manifest.get("tower"),
            "third_tower": manifest["fingerprint"]["timm_model_name"],
            "weights": manifest["fingerprint"]["weights"], "dim": manifest["fingerprint"]["embed_dim"],
            "dtype": manifest["dtype"], "precision": manifest["precision"], "shards": len(paths), "samples": samples,
            "skipped": sum(len(i["skipped"]) for i in infos),
            "truncated_shards": sum(bool(i["truncated"]) for i in infos), "bytes": size,
            "bytes_per_sample": size / samples if samples else None}
