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
from ..flags import HelpFormatter, add_renamed


CACHE_HELP = "the cache folder (the same --third-tower-cache DIR that training reads)"


def make_parser():
    """The command line of `python -m open_clip_3t.cache` (its subcommands: `parser._subparsers`)."""
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.cache", description=PACKAGE_DOC.split("\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def cache_flag(p, command, help=CACHE_HELP):
        add_renamed(p, f"open_clip_3t.cache {command}",
                    p.add_argument("--third-tower-cache", dest="cache", metavar="DIR", default=None, help=help))

    def common(p, command):
        p.add_argument("--train-data", required=True,
                       help="shards, e.g. '/data/laion/{00000..41407}.tar' ('::' joins sources)")
        p.add_argument("--model", required=True, help="3T model whose third tower is cached, e.g. 3T-ViT-B-16")
        cache_flag(p, command)
        add_renamed(p, f"open_clip_3t.cache {command}", p.add_argument(
            "--third-tower", dest="tower", default=None, metavar="NAME",
            help="the model's third tower to cache (its config name); needed when the model has several"))
        p.add_argument("--third-tower-weights", default=None, metavar="FILE",
                       help="local weights file for that tower (default: the config's weights, else timm's hub)")

    def sub_parser(name, help):
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    p = sub_parser("build", "embed every sample of every shard with the third tower h")
    common(p, "build")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass of h")
    p.add_argument("--workers", type=int, default=4, help="DataLoader processes decoding the shards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default="fp32",
                   help="h's compute precision (fp32: exact on any device; on GPUs fp16 or bf16 are faster, as "
                        "scripts/slurm/build_cache.sbatch sets)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="stored embedding dtype")
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar: one progress line per 10%% instead (as when stderr is not a terminal)")
    p = sub_parser("verify", "check that a cache covers the shards and matches the model")
    common(p, "verify")
    p.add_argument("--checksum", action="store_true",
                   help="also read every sidecar whole (its own sha256, finite embeddings) and re-hash every shard "
                        "(sha256; reads all the data)")
    p = sub_parser("merge", "one cache from caches built in separate folders (one per node or array task)")
    p.add_argument("parts", nargs="+", metavar="PART", help="cache folders, each with its manifest and sidecars")
    cache_flag(p, "merge", help="the merged cache: a new (or empty) folder")
    p = sub_parser("info", "print the manifest summary")
    cache_flag(p, "info")
    for p in sub.choices.values():
        p.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    return parser, sub


def main(argv=None):
    parser, sub = make_parser()
    args = parser.parse_args(argv)
    if args.cache is None:
        sub.choices[args.command].error("the following arguments are required: --third-tower-cache")

    error = f"python -m open_clip_3t.cache {args.command}: error:"
    try:
        if args.command == "build":
            summary = build(args.train_data, args.model, args.cache, args.third_tower_weights, args.batch_size,
                            args.workers, args.device, args.precision, args.dtype, tower=args.tower,
                            quiet="lines" if args.quiet else False)
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
            summary = merge(args.parts, args.cache)
            print(f"ok: {args.cache} holds {summary['shards']} shards ({summary['samples']} samples) from "
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
