"""The whole of 3T on a laptop, in under 10 minutes on 2 CPU cores, with nothing to download:

    python -m open_clip_3t.toy.quickstart [--out quickstart_out] [--tiny]

1. generate LAION-style shards of drawn shapes with compositional captions, held-out zero-shot and retrieval sets;
2. pretrain a small timm model (the third tower h) on a labelled set, save it to a file;
3. build the third-tower embedding cache;
4. train the CLIP baseline, LiT (h's weights, locked) and 3T (h from the cache) with equal budgets, each evaluated
   after every epoch;
5. evaluate zero-shot classification (shape, colour) and retrieval on held-out data;
6. export the 3T model and reload the export with vanilla OpenCLIP;
7. print the results table, save it as CSV and markdown, and plot the curves (matplotlib PNGs, with their data).
"""
import argparse
import time
from pathlib import Path

import pandas as pd

from . import curves
from . import experiments as ex

TOWER = "weak"  # shape x colour, small pretraining budget: minutes, not tens of minutes


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.toy.quickstart", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="quickstart_out", help="working folder (data, runs, results)")
    parser.add_argument("--tiny", action="store_true", help="CI-sized: every step, on far too little data to learn")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    scale = ex.SCALES["tiny" if args.tiny else "default"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    def step(n, text):
        ex.say(f"[{n}/7 {time.time() - start:5.0f}s] {text}")

    step(1, f"generating data in {out / 'data'} ({scale.train_samples} training pairs)")
    data = ex.prepare_data(out / "data", scale, towers=(TOWER,))
    tower = ex.TOWERS[TOWER]
    step(2, f"pretraining the third tower ({ex.H_ARCH}) on {' x '.join(tower.attributes)} labels "
            f"({scale.weak_tower_samples} images, {scale.weak_tower_epochs} epochs)")
    weights = ex.pretrain_towers(out, data, scale, towers=(TOWER,), progress=True)[TOWER]
    step(3, "building the third-tower embedding cache")
    cache, seconds = ex.build_cache(out, data, weights, TOWER)
    ex.say(f"  cache built in {seconds:.0f}s: {cache}" if seconds is not None else f"  cache: reused {cache}")

    runs, logs = {}, out / "runs"
    for kind in ("CLIP", "LiT", "3T"):
        step(4, f"training {kind} ({ex.MODELS[kind]}, {scale.epochs} epochs of {scale.train_samples} pairs)")
        checkpoint, seconds = ex.train(logs, kind, kind, data, scale, args.seed, weights=weights, cache=cache)
        runs[kind] = checkpoint
        ex.say(f"  {kind} trained in {seconds:.0f}s" if seconds is not None else f"  {kind}: reused {checkpoint}")

    step(5, "evaluating zero-shot classification and retrieval on held-out data")
    rows = []
    for kind, checkpoint in runs.items():
        results = ex.evaluate(out / "eval" / kind, checkpoint, ex.MODELS[kind], data)
        rows.append({"model": kind, **ex.summary_row(results)})
    table = pd.DataFrame(rows)

    step(6, "exporting 3T to a plain OpenCLIP folder and reloading it with vanilla OpenCLIP")
    diff = ex.export_and_reload(runs["3T"], out / "exported_3T", ex.MODELS["3T"])
    ex.say(f"  reloaded local-dir:{out / 'exported_3T'} without open_clip_3t: largest feature difference {diff:.2e}")
    if diff > 1e-5:
        raise SystemExit(f"quickstart: the exported model differs from the 3T model by {diff}")

    step(7, "results")
    csv, md = ex.save_table(table, out, "results")
    plots = [curves.plot(curves.eval_series({kind: [logs / kind] for kind in runs}), out / "curves.png",
                         "zero-shot top-1 and retrieval R@1 after each epoch"),
             curves.plot(curves.three_towers_series([logs / "3T"]), out / "curves_3T.png",
                         "3T: its three loss terms and temperatures")]
    ex.say(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    ex.say(f"(percent; chance: shape {100 / 7:.1f}, colour {100 / 8:.1f}, R@1 {100 / scale.val_samples:.1f})")
    ex.say(f"saved {csv}, {md}, {', '.join(map(str, plots))} (each plot's data beside it as .csv); "
           f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
