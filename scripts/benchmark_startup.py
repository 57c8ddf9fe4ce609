"""Benchmark a training launch at scale: launch -> first step of `python -m training.main` with a third-tower cache
against the same run with h online, at 1k, 5k and 41,408 shards (LAION-400M's count), and the cache files the
training main process opens and stats at start-up (figures, not a test).

    python scripts/benchmark_startup.py                           # 1000 5000 41408 shards, 3 launches each
    python scripts/benchmark_startup.py --shards 41408 --repeats 5 --json startup.json

The shards are hard links of one small generated shard (4 samples, 32 px) and each cache's sidecars hard links of
that shard's sidecar, so 41k shards cost 41k directory entries, not 41k builds. Each size gets its own cache, whose
index `python -m open_clip_3t.cache verify` writes (timed). Three launches per size, interleaved, medians reported:
- online:        h runs (3T-tiny's test_vit, random weights);
- cache:         --third-tower-cache, start-up reads the manifest and the index;
- cache, no index: the same cache with its index moved aside: start-up reads every sidecar's header (what every rank
                 did before the index existed, and what a cache built before it still costs until `verify` runs).
A launch is timed from process start to its first logged step ("Train Epoch: 0 [", --log-every-n-steps 1) and then
stopped. On a shared machine that figure carries seconds of noise, so the start-up checks alone (training/params.py
`parse_args`: the flags, the plan, the cache's validation; imports excluded) are also timed, in a fresh process each
time, as global rank 0 (which hashes the weights and stats the shards) and as rank 1 of 2 (which reads two files). One data worker (--workers 1), so that the sidecar the first step joins is read in the worker, not in the
main process. Opens and stats are counted with strace (-f; the main process's threads, not its data workers: a
clone with CLONE_THREAD stays in its parent's process) on paths inside the cache folder; without strace they read n/a.
"""
import argparse
import glob
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from open_clip_3t import cache  # noqa: E402
from open_clip_3t.toy.synthetic import write_shards  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = "Train Epoch: 0 ["
VARIANTS = ("online", "cache", "cache, no index")


def prepare(work, sizes):
    """(h weights, {size: (spec, cache folder)}), all shards hard links of one."""
    torch.manual_seed(0)
    weights = os.path.join(work, "h.pth")
    torch.save(timm.create_model("test_vit", num_classes=7, img_size=32).state_dict(), weights)
    (one,) = write_shards(os.path.join(work, "one"), 4, 4, seed=0, image_size=32)
    cache.build(one, "3T-tiny", os.path.join(work, "one_cache"), weights, batch_size=4, workers=0, quiet=True)
    sidecar = cache.sidecar_path(os.path.join(work, "one_cache"), one)
    data = os.path.join(work, "laion")
    os.makedirs(data)
    for i in range(max(sizes)):
        os.link(one, os.path.join(data, f"{i:05d}.tar"))
    runs = {}
    for n in sizes:
        spec = os.path.join(data, f"{{00000..{n - 1:05d}}}.tar")
        folder = os.path.join(work, f"cache_{n}")
        os.makedirs(os.path.join(folder, "laion"))
        shutil.copy(os.path.join(work, "one_cache", cache.MANIFEST), folder)
        for i in range(n):
            os.link(sidecar, os.path.join(folder, "laion", f"{i:05d}.tar{os.path.splitext(sidecar)[1]}"))
        start = time.perf_counter()
        problems = cache.verify(spec, "3T-tiny", folder, weights)  # writes the index
        runs[n] = (spec, folder, time.perf_counter() - start)
        if problems:
            raise SystemExit(f"benchmark_startup.py: the {n}-shard cache does not verify: {problems[:2]}")
    return weights, runs


def command(work, weights, spec, folder, variant, name):
    argv = [sys.executable, "-m", "training.main", "--model", "3T-tiny", "--third-tower-weights", weights,
            "--train-data", spec, "--train-num-samples", "64", "--batch-size", "4", "--epochs", "1", "--lr", "1e-3",
            "--warmup", "1", "--workers", "1", "--device", "cpu", "--precision", "fp32", "--log-every-n-steps", "1",
            "--logs", os.path.join(work, "logs"), "--name", name, "--seed", "0"]
    return argv + (["--third-tower-cache", folder] if variant != "online" else [])


CHECKS = """import os, sys, time
import training.params
start = time.perf_counter()
training.params.parse_args(sys.argv[1:])
print(time.perf_counter() - start)
"""


def checks_seconds(argv, rank):
    """Seconds of training.main's start-up checks (parse_args) for `argv` (training.main's flags) as global rank
    `rank` of 2 (rank 0 alone when `rank` is 0), in a fresh interpreter, imports excluded."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if rank:
        env.update(RANK=str(rank), WORLD_SIZE="2")
    out = subprocess.run([sys.executable, "-c", CHECKS, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"benchmark_startup.py: the checks failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def first_step_seconds(argv, prefix=()):
    """Seconds from launch to the first logged step; the run is then stopped (its whole process group)."""
    start = time.perf_counter()
    proc = subprocess.Popen([*prefix, *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if FIRST_STEP in line:
                return time.perf_counter() - start
        raise SystemExit("benchmark_startup.py: a launch ended before its first step:\n" + "".join(lines[-20:]))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        proc.stdout.close()


CLONE_RE = re.compile(r"^(clone3?|fork|vfork)\((.*)\)\s+= (\d+)$")
PATH_RE = re.compile(r'^(openat|open|newfstatat|statx|stat|lstat|fstatat64)\((?:[A-Z_0-9]+, )?"([^"]*)"')


def main_process_file_calls(trace_prefix, folder):
    """(opens, stats) of paths inside `folder` by the traced program's main process (all its threads), from strace
    -ff files (one per thread or process: TRACE.<tid>)."""
    files = {int(p.rsplit(".", 1)[1]): p for p in glob.glob(trace_prefix + ".*")}
    group, children = {}, {}
    for tid, path in files.items():
        for line in open(path, errors="replace"):
            m = CLONE_RE.match(line.strip())
            if m:
                children[int(m.group(3))] = (tid, "CLONE_THREAD" in m.group(2))
    root = min(tid for tid in files if tid not in children)

    def tgid(tid):
        if tid not in group:
            parent, thread = children.get(tid, (None, False))
            group[tid] = tgid(parent) if thread and parent is not None else tid
        return group[tid]

    opens = stats = 0
    folder = os.path.abspath(folder) + os.sep
    for tid, path in files.items():
        if tgid(tid) != root:
            continue
        for line in open(path, errors="replace"):
            m = PATH_RE.match(line)
            if m and os.path.abspath(os.path.join(REPO, m.group(2))).startswith(folder):
                if m.group(1) in ("openat", "open"):
                    opens += 1
                else:
                    stats += 1
    return opens, stats


def count_cache_files(work, argv, folder):
    strace = shutil.which("strace")
    if strace is None:
        return None, None
    prefix = os.path.join(work, "trace", "t")
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)
    os.makedirs(os.path.dirname(prefix))
    first_step_seconds(argv, (strace, "-ff", "-qq", "-o", prefix, "-e",
                              "trace=openat,open,newfstatat,statx,stat,lstat,clone,clone3,fork,vfork"))
    return main_process_file_calls(prefix, folder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=int, nargs="+", default=[1000, 5000, 41408])
    p.add_argument("--repeats", type=int, default=3, help="launches per variant and size (medians reported)")
    p.add_argument("--check-repeats", type=int, default=5, help="timed start-up checks per variant, size and rank")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        weights, runs = prepare(work, args.shards)
        for n, (spec, folder, verify_s) in runs.items():
            times = {v: [] for v in VARIANTS}
            checks = {(v, rank): [] for v in VARIANTS for rank in (0, 1)}
            index = os.path.join(folder, cache.INDEX)
            for r in range(max(args.repeats, args.check_repeats)):
                for v in VARIANTS:  # interleaved: the machine may be shared
                    if v == "cache, no index":
                        os.rename(index, index + ".aside")
                    try:
                        argv = command(work, weights, spec, folder, v, f"{n}-{v}-{r}")
                        if r < args.repeats:
                            times[v].append(first_step_seconds(argv))
                        if r < args.check_repeats:
                            for rank in (0, 1):
                                checks[v, rank].append(checks_seconds(argv[3:], rank))
                    finally:
                        if os.path.exists(index + ".aside"):
                            os.rename(index + ".aside", index)
            opened = {}
            for v in VARIANTS[1:]:
                if v == "cache, no index":
                    os.rename(index, index + ".aside")
                try:
                    opened[v] = count_cache_files(work, command(work, weights, spec, folder, v, f"{n}-{v}-trace"),
                                                  folder)
                finally:
                    if os.path.exists(index + ".aside"):
                        os.rename(index + ".aside", index)
            med = {v: statistics.median(t) for v, t in times.items()}
            rows.append({"shards": n, "verify_s": round(verify_s, 2),
                         **{f"{v}_s": round(med[v], 2) for v in VARIANTS},
                         "cache_minus_online_s": round(med["cache"] - med["online"], 2),
                         "no_index_minus_online_s": round(med["cache, no index"] - med["online"], 2),
                         "runs_s": {v: [round(t, 2) for t in ts] for v, ts in times.items()},
                         **{f"checks_rank{rank}_{v}_s": round(statistics.median(t), 3)
                            for (v, rank), t in checks.items()},
                         "cache_opens": opened["cache"][0], "cache_stats": opened["cache"][1],
                         "no_index_opens": opened["cache, no index"][0],
                         "no_index_stats": opened["cache, no index"][1]})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(f"launch -> first step (s, median of {args.repeats}); start-up checks (s, median of {args.check_repeats}) "
          f"as rank 0 and as rank 1 of 2; cache files the training main process opens / stats at start-up; "
          f"{os.cpu_count()} CPU cores")
    print("| shards | verify (s) | first step: online | cache | cache - online | no index | no index - online "
          "| checks, rank 0: online / cache / no index | rank 1: online / cache / no index "
          "| files: cache | no index |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        c0 = " / ".join(str(r[f"checks_rank0_{v}_s"]) for v in VARIANTS)
        c1 = " / ".join(str(r[f"checks_rank1_{v}_s"]) for v in VARIANTS)
        print(f"| {r['shards']} | {r['verify_s']} | {r['online_s']} | {r['cache_s']} | {r['cache_minus_online_s']:+} "
              f"| {r['cache, no index_s']} | {r['no_index_minus_online_s']:+} | {c0} | {c1} | {r['cache_opens']} / "
              f"{r['cache_stats']} | {r['no_index_opens']} / {r['no_index_stats']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
