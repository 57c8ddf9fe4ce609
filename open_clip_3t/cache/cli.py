"""`python -m open_clip_3t.cache build|verify|merge|info` (see the package docstring)."""
import argparse
import errno
import sys

import torch

from . import __doc__ as PACKAGE_DOC
from .build import build
from .check import info, verify
from ..weights import WeightsError
from .format import DTYPES, PRECISIONS, CacheError, expand_shards
from .merge import merge


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.cache", description=PACKAGE_DOC.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, out_flag):
        p.add_argument("--train-data", required=True,
                       help="shards, e.g. '/data/laion/{00000..41407}.tar' ('::' joins sources)")
        p.add_argument("--model", required=True, help="3T model whose third tower is cached, e.g. 3T-ViT-B-16")
        p.add_argument(out_flag, required=True, dest="cache", metavar="DIR", help="cache directory")
        p.add_argument("--tower", default=None, metavar="NAME",
                       help="the model's third tower to cache (its config name); needed when the model has several")
        p.add_argument("--third-tower-weights", default=None, metavar="FILE",
                       help="local weights file for that tower")

    p = sub.add_parser("build", help="embed every sample of every shard with the third tower h")
    common(p, "--out")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding the shards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32", help="h's compute precision")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored embedding dtype")
    p = sub.add_parser("verify", help="check that a cache covers the shards and matches the model")
    common(p, "--cache")
    p.add_argument("--checksum", action="store_true",
                   help="also read every sidecar whole (its own sha256, finite embeddings) and re-hash every shard "
                        "(sha256; reads all the data)")
    p = sub.add_parser("merge", help="one cache from caches built in separate folders (one per node or array task)")
    p.add_argument("parts", nargs="+", metavar="PART", help="cache folders, each with its manifest and sidecars")
    p.add_argument("--out", required=True, metavar="DIR", help="the merged cache: a new (or empty) folder")
    p = sub.add_parser("info", help="print the manifest summary")
    p.add_argument("--cache", required=True, metavar="DIR")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    args = parser.parse_args(argv)

    error = f"python -m open_clip_3t.cache {args.command}: error:"
    try:
        if args.command == "build":
            summary = build(args.train_data, args.model, args.cache, args.third_tower_weights, args.batch_size,
                            args.workers, args.device, args.precision, args.dtype, tower=args.tower)
            if summary["damaged"]:
                (url, why), n = summary["damaged"][0], len(summary["damaged"])
                print(f"{error} {n} shard(s) of --train-data are cut short or damaged, or hold no sample (first: "
                      f"{url}: {why}): their sidecars hold only the samples before the damage (`verify` lists them); "
                      f"replace the shards, delete their sidecars and build again, or leave them out of --train-data",
                      file=sys.stderr)
                return 1
        elif args.command == "verify":
            problems = verify(args.train_data, args.model, args.cache, args.third_tower_weights, args.checksum,
                              tower=args.tower)
            for line in problems:
                print(line)
            if problems:
                print(f"cache {args.cache} does not serve --train-data for {args.model}: {len(problems)} problem(s)",
                      file=sys.stderr)
                return 1
            print(f"ok: {args.cache} covers {len(expand_shards(args.train_data))} shards for {args.model}")
        elif args.command == "merge":
            summary = merge(args.parts, args.out)
            print(f"ok: {args.out} holds {summary['shards']} shards ({summary['samples']} samples) from "
                  f"{summary['parts']} parts")
        else:
            for k, v in info(args.cache).items():
                print(f"{k}: {v:.1f}" if isinstance(v, float) else f"{k}: {v}")
    except (CacheError, WeightsError, ValueError, FileNotFoundError) as e:
        if args.debug:
            raise
        print(f"{error} {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. a file system that fills while the build writes
        if args.debug:
            raise
        if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):
            print(f"{error} cannot write {e.filename or args.cache} ({e.strerror}): free space on that file system "
                  f"(or make it writable), then run the same command again: the finished sidecars are kept and only "
                  f"the rest is built", file=sys.stderr)
        else:
            print(f"{error} cannot read or write {e.filename} ({e.strerror or e}): check that file and its file system",
                  file=sys.stderr)
        return 2
    return 0
