"""Benchmark the third-tower cache (figures for the closing note of the cache issue; not a test).

From one run:
1. build throughput (samples/s) against h's pure inference throughput on the same batches (target >= 0.95);
2. training data-loader samples/s with the cache join against OpenCLIP's loader without it (target >= 0.98);
3. bytes per sample on disk.

    # CPU, seconds: 3T-tiny on synthetic shards
    python scripts/benchmark_cache.py --model 3T-tiny --num-samples 2000 --workers 1
    # GPU, a real third tower (random weights of its architecture unless --third-tower-weights is given)
    python scripts/benchmark_cache.py --model 3T-ViT-B-16 --device cuda --precision fp16 --num-samples 20000 \
        --image-size 256 --batch-size 256 --workers 12

Without --third-tower-weights, h gets random weights of its architecture (throughput does not depend on them).
Without --train-data, LAION-style synthetic shards are written first (open_clip_3t.toy.synthetic).
"""
import argparse
import json
import os
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
from open_clip_3t._openclip import openclip_get_wds_dataset  # noqa: E402
from open_clip_3t.toy.synthetic import write_shards  # noqa: E402
from training.cached_data import get_cached_wds_dataset  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def random_weights(model, folder):
    """A weights file for h's architecture with random values: the build needs a file, throughput does not care."""
    cfg = cache.third_tower_cfg(model)
    net = timm.create_model(cfg.timm_model_name, pretrained=False, **cfg.timm_kwargs)
    path = os.path.join(folder, "random_h.pth")
    torch.save(net.state_dict(), path)
    return path


def pure_inference(spec, model, weights, batch_size, device, precision, max_samples, repeats=3):
    """h alone over the build's batches (same shards, same per-shard batches), decoded beforehand into memory."""
    cfg = cache.third_tower_cfg(model, weights)
    h = open_clip_3t.ThirdTower(cfg).to(device=device, dtype=cache.PRECISIONS[precision])
    reader = cache.ShardReader(list(enumerate(cache.expand_shards(spec))), h.eval_transform(), batch_size)
    batches, n = [], 0
    for item in reader:
        if item["pixels"] is not None and n < max_samples:
            batches.append(item["pixels"].to(device))
            n += len(item["pixels"])
    with torch.inference_mode():
        h(batches[0])  # warm-up
        rates = []
        for _ in range(repeats):
            sync(device)
            start = time.perf_counter()
            for pixels in batches:
                h(pixels).to(torch.float16)
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
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=sorted(cache.PRECISIONS))
    p.add_argument("--inference-samples", type=int, default=20000, help="cap on batches held in memory")
    p.add_argument("--inference-repeats", type=int, default=3, help="best of n timed passes of h alone")
    p.add_argument("--loader-repeats", type=int, default=3, help="best of n passes of each training loader")
    p.add_argument("--workdir", default=None, help="default: a temporary folder, deleted afterwards")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    args = p.parse_args(argv)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        spec = args.train_data
        if spec is None:
            paths = write_shards(os.path.join(work, "shards"), args.num_samples, args.samples_per_shard,
                                 image_size=args.image_size)
            spec = os.path.join(work, "shards", f"{{00000..{len(paths) - 1:05d}}}.tar")
        weights = args.third_tower_weights or random_weights(args.model, work)
        out = os.path.join(work, "cache")

        # 1. build vs h alone on the same batches
        summary = cache.build(spec, args.model, out, weights, args.batch_size, args.workers, args.device,
                              args.precision, split=(0, 1))
        build_rate = summary["samples"] / summary["seconds"]
        infer_rate, infer_samples = pure_inference(spec, args.model, weights, args.batch_size, device,
                                                   args.precision, args.inference_samples, args.inference_repeats)

        # 2. training loader with and without the join (same args, same preprocessing, same tokenizer)
        _, preprocess_train, _ = open_clip.create_model_and_transforms(args.model, third_tower=False)
        tokenizer = open_clip.get_tokenizer(args.model)
        num_samples = summary["samples"]
        targs = argparse.Namespace(
            train_data=spec, val_data=None, dataset_resampled=False, train_num_samples=num_samples,
            train_data_upsampling_factors=None, seed=0, workers=args.workers, world_size=1,
            batch_size=args.batch_size, model=args.model, third_tower_weights=weights, third_tower_cache=out,
            cache_missing="error")
        max_batches = max(2, num_samples // args.batch_size)
        plain, joined = [], []
        for _ in range(args.loader_repeats):  # interleaved, best of n: the machine may be shared
            plain.append(loader_rate(lambda: openclip_get_wds_dataset(targs, preprocess_train, True,
                                                                      tokenizer=tokenizer), max_batches))
            joined.append(loader_rate(lambda: get_cached_wds_dataset(targs, preprocess_train, True,
                                                                     tokenizer=tokenizer), max_batches))

        # 3. bytes on disk
        info = cache.info(out)

    figures = {
        "model": args.model, "third_tower": info["third_tower"], "device": str(device), "precision": args.precision,
        "workers": args.workers, "batch_size": args.batch_size, "samples": summary["samples"],
        "build_samples_per_s": round(build_rate, 1),
        "build_steady_samples_per_s": round(summary["steady_samples_per_s"] or 0, 1),
        "h_inference_samples_per_s": round(infer_rate, 1), "h_inference_samples": infer_samples,
        "build_over_inference": round(build_rate / infer_rate, 3),
        "build_steady_over_inference": round((summary["steady_samples_per_s"] or 0) / infer_rate, 3),
        "loader_plain_samples_per_s": round(max(plain), 1), "loader_cached_samples_per_s": round(max(joined), 1),
        "loader_cached_over_plain": round(max(joined) / max(plain), 3),
        "loader_runs": {"plain": [round(r, 1) for r in plain], "cached": [round(r, 1) for r in joined]},
        "bytes_per_sample": round(info["bytes_per_sample"], 1),
        "embedding_bytes_per_sample": info["dim"] * (2 if info["dtype"] == "float16" else 4),
        "median_loader_cached_over_plain": round(statistics.median(joined) / statistics.median(plain), 3),
    }
    print(json.dumps(figures, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
