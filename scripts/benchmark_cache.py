"""Benchmark the third-tower cache build and the training loader that reads it (figures, not a test).

From one run:
1. the build's decode stage: decode + resize samples/s with 1 worker and with --workers workers, per worker, and
   per worker CPU-second (the stage splits whole shards over its workers, so the per-worker figures stay flat
   while there are at least as many shards as workers and free cores; the CPU-second one also on a shared machine);
2. h's pure inference samples/s (h alone on batches already on the device) and the build's samples/s (target
   >= 0.9 of h's), with the rate predicted from the two: min(workers x decode per worker CPU-second, h);
3. training data-loader samples/s with the cache join against OpenCLIP's loader without it (target >= 0.98);
4. bytes per sample on disk.

    # CPU, seconds: 3T-tiny on synthetic shards
    python scripts/benchmark_cache.py --model 3T-tiny --num-samples 2000 --workers 2
    # GPU, a real third tower (random weights of its architecture unless --third-tower-weights is given)
    python scripts/benchmark_cache.py --model 3T-ViT-B-16 --device cuda --precision bf16 --num-samples 20000 \
        --image-size 256 --batch-size 256 --workers $(nproc)

A node's build rate, predicted from its cores: min(cores x decode_samples_per_worker_cpu_s, h_inference_samples_per_s),
the decode figure measured on the same CPU type and the same kind of images (their size decides the decode cost).
Without --third-tower-weights, h gets random weights of its architecture (throughput does not depend on them).
Without --train-data, LAION-style synthetic shards are written first (open_clip_3t.toy.synthetic).
"""
import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time

import open_clip
import timm
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo's training/ package
import open_clip_3t  # noqa: E402,F401
from open_clip_3t import cache  # noqa: E402
from training._open_clip_train import openclip_get_wds_dataset  # noqa: E402
from open_clip_3t.toy.synthetic import write_shards  # noqa: E402
from training.cached_data import get_cached_wds_dataset  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_weights(model, folder):
    """A weights file for h's architecture with random values: the build needs a file, throughput does not care."""
    cfg = cache.cached_tower(model)
    net = timm.create_model(cfg.timm_model_name, pretrained=False, **cfg.timm_kwargs)
    path = os.path.join(folder, "random_h.pth")
    torch.save(net.state_dict(), path)
    return path


def third_tower(model, weights, device, precision):
    """h as the build runs it: weights in the build precision, its mean/std fp32 (see cache.build)."""
    h = open_clip_3t.ThirdTower(cache.cached_tower(model, weights)).to(device)
    h.model.to(cache.PRECISIONS[precision])
    return h


def decode_rate(shards, h, batch_size, workers):
    """(samples/s, samples per worker CPU-second) of the build's decode stage alone (cache.decode_loader, no h).
    The first is timed from the moment every worker has delivered its first batch (the loader takes them in turn),
    so that worker start-up is excluded, and depends on the CPU share the workers get; the second, from the workers'
    CPU time (counted when they exit), does not: on a node whose cores are free, workers x the second is the rate."""
    cpu_before = children_cpu_seconds()
    counts, times = [], []
    for item in cache.decode_loader(shards, h, batch_size, workers, "cpu"):
        counts.append(len(item["pixels"]) if item["pixels"] is not None else 0)
        times.append(time.perf_counter())
    cpu = children_cpu_seconds() - cpu_before  # the loop has ended: the workers have exited and been reaped
    warm = min(workers, len(shards))
    if len(times) < 2 * warm or times[-1] == times[warm - 1]:
        raise SystemExit(f"benchmark_cache.py: error: {len(shards)} shard(s) gave {len(times)} batches to {warm} "
                         f"decode worker(s), too few to time: pass more --decode-shards-per-worker (each worker "
                         f"needs 2 batches or more) or a smaller --batch-size")
    return sum(counts[warm:]) / (times[-1] - times[warm - 1]), sum(counts) / cpu


def children_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def pure_inference(spec, h, batch_size, device, max_samples, repeats=3):
    """h alone over the build's batches (same shards, same per-shard batches), decoded beforehand onto the device,
    normalised and embedded as the build does."""
    batches, n = [], 0
    for item in cache.ShardReader(list(enumerate(cache.expand_shards(spec))), h.eval_transform(normalize=False),
                                  batch_size):
        if item["pixels"] is not None and n < max_samples:
            batches.append(item["pixels"].to(device))
            n += len(item["pixels"])
    with torch.inference_mode():
        h(h.normalize(batches[0]))  # warm-up
        rates = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for pixels in batches:
                h(h.normalize(pixels)).to(torch.float16)
            sync(device)
            rates.append(n / (time.perf_counter() - start))
    return max(rates), n


def loader_rate(make_info, max_batches):
    """Samples/s of one pass of a training DataLoader, timed from its first batch (worker start-up excluded)."""
    info = make_info()
    n, start = 0, None
    for i, batch in enumerate(info.dataloader):
        if i == 0:
            start = time.perf_counter()
        else:
            n += len(batch[0])
        if i + 1 >= max_batches:
            break
    return n / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="3T-tiny")
    p.add_argument("--third-tower-weights", default=None)
    p.add_argument("--train-data", default=None, help="shards to use; default: synthetic shards")
    p.add_argument("--num-samples", type=int, default=2000)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--image-size", type=int, default=64, help="synthetic image size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="the build's decode workers (a node: its cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(cache.PRECISIONS))
    p.add_argument("--inference-samples", type=int, default=20000, help="cap on batches held in memory")
    p.add_argument("--inference-repeats", type=int, default=3, help="best of n timed passes of h alone")
    p.add_argument("--loader-repeats", type=int, default=3, help="best of n passes of each training loader (0: skip)")
    p.add_argument("--decode-repeats", type=int, default=2, help="best of n passes of the decode stage per count")
    p.add_argument("--decode-shards-per-worker", type=int, default=4, help="shards each decode worker reads")
    p.add_argument("--out", default=None, help="build the cache in this folder and keep it (default: temporary)")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error("--workers must be >= 1 (the decode stage is measured per worker)")
    if args.out and os.path.exists(args.out) and os.listdir(args.out):
        p.error(f"--out {args.out} is not empty: the build must start from nothing to be timed")
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        spec = args.train_data
        if spec is None:
            paths = write_shards(os.path.join(work, "shards"), args.num_samples, args.samples_per_shard,
                                 image_size=args.image_size)
            spec = os.path.join(work, "shards", f"{{00000..{len(paths) - 1:05d}}}.tar")
        weights = args.third_tower_weights or random_weights(args.model, work)
        out = args.out or os.path.join(work, "cache")

        # 1. the decode stage alone, with 1 worker and with --workers (interleaved, best of n: the machine is shared)
        h = third_tower(args.model, weights, device, args.precision)
        shards = list(enumerate(cache.expand_shards(spec)))
        decode = {k: (0.0, 0.0) for k in sorted({1, args.workers})}
        for _ in range(args.decode_repeats):
            for k in decode:  # the same number of shards per worker for each count
                subset = shards[:k * args.decode_shards_per_worker]
                decode[k] = tuple(map(max, decode[k], decode_rate(subset, h, args.batch_size, k)))

        # 2. build vs h alone on the same batches
        summary = cache.build(spec, args.model, out, weights, args.batch_size, args.workers, args.device,
                              args.precision, split=(0, 1))
        build_rate = summary["samples"] / summary["seconds"]
        infer_rate, infer_samples = pure_inference(spec, h, args.batch_size, device, args.inference_samples,
                                                   args.inference_repeats)
        del h

        # 3. training loader with and without the join (same args, same preprocessing, same tokenizer)
        _, preprocess_train, _ = open_clip.create_model_and_transforms(args.model, third_tower=False)
        tokenizer = open_clip.get_tokenizer(args.model)
        num_samples = summary["samples"]
        targs = argparse.Namespace(
            train_data=spec, val_data=None, dataset_resampled=False, train_num_samples=num_samples,
            train_data_upsampling_factors=None, seed=0, workers=args.workers, world_size=1,
            batch_size=args.batch_size, model=args.model, third_tower_weights=weights, third_tower_cache=out,
            third_tower_cache_missing="error")
        max_batches = max(2, num_samples // args.batch_size)
        plain, joined = [], []
        for _ in range(args.loader_repeats):  # interleaved, best of n: the machine may be shared
            plain.append(loader_rate(lambda: openclip_get_wds_dataset(targs, preprocess_train, True,
                                                                      tokenizer=tokenizer), max_batches))
            joined.append(loader_rate(lambda: get_cached_wds_dataset(targs, preprocess_train, True,
                                                                     tokenizer=tokenizer), max_batches))

        # 4. bytes on disk
        info = cache.info(out)

    per_worker = {k: wall / k for k, (wall, _) in decode.items()}
    per_worker_cpu = {k: cpu for k, (_, cpu) in decode.items()}
    predicted = min(args.workers * per_worker_cpu[1], infer_rate)
    figures = {
        "model": args.model, "third_tower": info["third_tower"], "device": str(device), "precision": args.precision,
        "workers": args.workers, "batch_size": args.batch_size, "samples": summary["samples"],
        "cpu_cores": os.cpu_count(),
        "decode_samples_per_s": {str(k): round(wall, 1) for k, (wall, _) in decode.items()},
        "decode_samples_per_s_per_worker": {str(k): round(r, 1) for k, r in per_worker.items()},
        "decode_samples_per_worker_cpu_s": {str(k): round(r, 1) for k, r in per_worker_cpu.items()},
        "decode_per_worker_scaling": round(per_worker[args.workers] / per_worker[1], 3),
        "decode_per_worker_cpu_scaling": round(per_worker_cpu[args.workers] / per_worker_cpu[1], 3),
        "predicted_build_samples_per_s": round(predicted, 1),
        "build_samples_per_s": round(build_rate, 1),
        "build_steady_samples_per_s": round(summary["steady_samples_per_s"] or 0, 1),
        "h_inference_samples_per_s": round(infer_rate, 1), "h_inference_samples": infer_samples,
        "build_over_inference": round(build_rate / infer_rate, 3),
        "build_steady_over_inference": round((summary["steady_samples_per_s"] or 0) / infer_rate, 3),
        "build_over_predicted": round(build_rate / predicted, 3),
        "bytes_per_sample": round(info["bytes_per_sample"], 1),
        "embedding_bytes_per_sample": info["dim"] * (2 if info["dtype"] == "float16" else 4),
    }
    if plain:
        figures.update({
            "loader_plain_samples_per_s": round(max(plain), 1), "loader_cached_samples_per_s": round(max(joined), 1),
            "loader_cached_over_plain": round(max(joined) / max(plain), 3),
            "loader_runs": {"plain": [round(r, 1) for r in plain], "cached": [round(r, 1) for r in joined]},
            "median_loader_cached_over_plain": round(statistics.median(joined) / statistics.median(plain), 3),
        })
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
