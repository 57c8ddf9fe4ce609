"""The paper's comparisons in miniature (generated data, 2 CPU cores), several seeds, mean ± std.

    python scripts/replicate.py --out replication_out --seeds 0 1 2

Rows: the CLIP baseline; LiT and 3T with a matched third tower (pretrained on shape x colour, what evaluation asks
about) and with a mismatched one (pretrained on background x position: blind to shape and colour, the analogue of
the paper's Places365 case); 3T ablations (without L(f,g), without L(f_h,h_f), without L(g_h,h_g), L2 transfer);
the SigLIP baseline and SigLIP-3T with the matched tower (OpenCLIP's sigmoid loss, --siglip, on the CLIP rows'
towers); and the post-hoc 3T + LiT convex combination p = a p_3T + (1 - a) p_LiT swept over a. All runs have equal
budgets (same data, epochs, batch size, learning rate); a seed changes model initialisation and data order, while
the data and the two pretrained towers are shared. Writes OUT/replication.{csv,md} (mean ± std), OUT/runs.csv (every
run) and OUT/combination.{csv,md}.
"""
import argparse
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from open_clip_3t.toy import experiments as ex  # noqa: E402

# name: (kind, tower task, extra training.main flags)
RUNS = {
    "CLIP": ("CLIP", None, ()),
    "LiT (matched h)": ("LiT", "matched", ()),
    "3T (matched h)": ("3T", "matched", ()),
    "LiT (mismatched h)": ("LiT", "mismatched", ()),
    "3T (mismatched h)": ("3T", "mismatched", ()),
    "3T without L(f,g)": ("3T", "matched", ("--three-towers-loss-weights", "0", "1", "1")),
    "3T without L(f_h,h_f)": ("3T", "matched", ("--three-towers-loss-weights", "1", "0", "1")),
    "3T without L(g_h,h_g)": ("3T", "matched", ("--three-towers-loss-weights", "1", "1", "0")),
    "3T L2 transfer": ("3T", "matched", ("--three-towers-transfer", "l2")),
    "SigLIP": ("SigLIP", None, ()),
    "SigLIP-3T (matched h)": ("SigLIP-3T", "matched", ()),
}
ALPHAS = ("0", "0.25", "0.5", "0.75", "1")


def mean_std(df, by):
    metrics = [c for c in df.columns if c not in (by, "seed", "train s")]
    grouped = df.groupby(by, sort=False)
    mean, std = grouped[metrics].mean(), grouped[metrics].std(ddof=1).fillna(0.0)
    table = pd.DataFrame({c: [f"{m:.1f} ± {s:.1f}" for m, s in zip(mean[c], std[c])] for c in metrics},
                         index=mean.index).reset_index()
    return table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="replication_out")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scale", choices=sorted(ex.SCALES), default="default")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), metavar="RUN")
    args = parser.parse_args(argv)
    scale, out = ex.SCALES[args.scale], Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()

    ex.say(f"[{time.time() - start:5.0f}s] data and third towers in {out}")
    data = ex.prepare_data(out / "data", scale)
    towers = ex.pretrain_towers(out, data, scale)
    caches = {task: ex.build_cache(out, data, towers[task], task)[0] for task in towers}

    rows, checkpoints = [], {}
    for seed in args.seeds:
        for name in args.runs:
            kind, task, extra = RUNS[name]
            run_name = f"seed{seed}/{name.replace(' ', '_').replace('(', '').replace(')', '').replace(',', '')}"
            ex.say(f"[{time.time() - start:5.0f}s] seed {seed}: {name}")
            checkpoint, seconds = ex.train(out / "runs", run_name, kind, data, scale, seed,
                                           weights=towers.get(task), cache=caches.get(task), extra=extra)
            checkpoints[seed, name] = checkpoint
            results = ex.evaluate(out / "eval" / run_name, checkpoint, kind, data)
            rows.append({"run": name, "seed": seed, **ex.summary_row(results), "train s": seconds})
    runs = pd.DataFrame(rows)
    runs.to_csv(out / "runs.csv", index=False)
    ex.save_table(mean_std(runs, "run"), out, "replication")

    combos = []
    for seed in args.seeds:
        for task in ("matched", "mismatched"):
            pair = (checkpoints.get((seed, f"3T ({task} h)")), checkpoints.get((seed, f"LiT ({task} h)")))
            if None in pair:
                continue
            ex.say(f"[{time.time() - start:5.0f}s] seed {seed}: 3T + LiT ({task} h) combination")
            results = ex.evaluate(out / "eval" / f"seed{seed}" / f"combination_{task}", pair[0], "3T", data,
                                  combine_with=pair[1], alphas=ALPHAS)
            for i, alpha in enumerate(results["alpha"]):
                combos.append({"h": task, "a (weight of 3T)": alpha, "seed": seed,
                               **ex.summary_row(results.iloc[[i]])})
    if combos:
        combos = pd.DataFrame(combos)
        combos["combination"] = combos["h"] + " h, a=" + combos["a (weight of 3T)"].map(lambda a: f"{a:g}")
        combos = combos.drop(columns=["h", "a (weight of 3T)"])
        ex.save_table(mean_std(combos, "combination"), out, "combination")

    ex.say(mean_std(runs, "run").to_string(index=False))
    if len(combos):
        ex.say(mean_std(combos, "combination").to_string(index=False))
    ex.say(f"total {time.time() - start:.0f}s; tables in {out}")


if __name__ == "__main__":
    main()
