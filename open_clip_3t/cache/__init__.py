"""Precomputed third-tower embeddings: h is frozen, so its embedding of each training image is computed once.

    python -m open_clip_3t.cache build  --train-data SHARDS --model 3T-ViT-B-16 --third-tower-cache DIR \
        [--third-tower-weights FILE]
    python -m open_clip_3t.cache verify --train-data SHARDS --model 3T-ViT-B-16 --third-tower-cache DIR \
        [--third-tower-weights FILE]
    python -m open_clip_3t.cache merge  PART... --third-tower-cache DIR
    python -m open_clip_3t.cache info   --third-tower-cache DIR

A cache holds one tower's embeddings: for a model with several third towers, `--third-tower NAME` says which (one cache
per tower; training takes `--third-tower-cache NAME=DIR ...`).

Layout (docs/cache.md specifies it byte for byte):

    DIR/manifest.json                           the fingerprint: h's name, weights hash, preprocessing, dim, dtype
    DIR/<shard folder>/<shard file>.safetensors one sidecar per data shard: `embeddings` [N, D], `keys` (UTF-8,
                                                newline-joined), `image_crc32` [N] (checked by the training join),
                                                metadata (shard size and sha256, skipped samples, and the
                                                sidecar's own sha256, checked whenever it is read whole)
    DIR/index.json, DIR/index.part-*.json       the index: each sidecar's header facts (rows, shard size, ...), so
                                                that training reads one file, not every sidecar (see index.py)

A sidecar is written to a temporary name and renamed, so "the file exists" means "the shard is done": a killed
build is resumed by running it again, and ends byte-identical to an uninterrupted one. Training joins the sidecars
to OpenCLIP's webdataset pipeline by (shard, __key__): see training/cached_data.py.

The package: `format` (layout, manifest, fingerprint, sidecars), `index` (the index), `build` (the builder), `check`
(verify, validate, info), `merge` (caches built in separate folders), `cli` (the command line).
"""
from ..shards import image_bytes
from .build import ShardReader, build, decode_loader, shard_split
from .check import check_shards, info, validate, validate_plan, verify
from .index import INDEX, read_index
from .merge import merge
from .format import (DTYPES, FORMAT, MANIFEST, PRECISIONS, CacheError, cached_tower, expand_shards, fingerprint,
                     image_crc32, load_sidecar, read_manifest, shard_id, sidecar_info, sidecar_path)
from .cli import main

__all__ = ["CacheError", "build", "verify", "validate", "validate_plan", "info", "merge", "read_index", "INDEX", "main", "load_sidecar", "sidecar_path", "sidecar_info",
           "expand_shards", "cached_tower", "fingerprint", "read_manifest", "shard_id", "shard_split",
           "image_bytes", "image_crc32", "check_shards", "ShardReader", "decode_loader", "FORMAT", "MANIFEST",
           "DTYPES", "PRECISIONS"]
