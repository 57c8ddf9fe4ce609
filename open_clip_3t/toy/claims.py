"""The paper's claims, judged on the replication's runs by the rule fixed in the protocol (docs/results.md).

On one metric, with the mean and standard deviation over seeds of rows A and B: "A beats B" when
mean(A) - mean(B) > max(std(A), std(B)); "B beats A" when mean(B) - mean(A) exceeds that margin; "within noise"
otherwise. Retrieval is judged on "mean R@1" (the mean of I→T and T→I R@1 of each run), classification on shape
and colour top-1 separately.
"""
import pandas as pd

SEEDS = 3  # the protocol's seeds: a claim is judged only when both of its rows ran on all of them
RETRIEVAL, CLASSIFICATION = ["mean R@1"], ["shape top-1", "colour top-1"]
ALL = CLASSIFICATION + RETRIEVAL


def claims():
    """(claim, regime, A, B, metrics): the paper says A beats B on these metrics."""
    out = []
    for h in ("weak", "matched", "broad", "mismatched"):
        out.append(("3T beats the from-scratch CLIP", h, f"3T ({h} h)", "CLIP", ALL))
        out.append(("3T beats LiT on retrieval", h, f"3T ({h} h)", f"LiT ({h} h)", RETRIEVAL))
    for h in ("weak", "matched"):
        out.append(("LiT beats 3T on classification when h matches the task (JFT)", h, f"LiT ({h} h)", f"3T ({h} h)",
                    CLASSIFICATION))
    for h in ("broad", "mismatched"):
        out.append(("3T beats LiT on classification with ImageNet-21k / Places365 towers", h, f"3T ({h} h)",
                    f"LiT ({h} h)", CLASSIFICATION))
    for h in ("weak", "broad"):
        out += [("removing L(f,g) is catastrophic", h, f"3T ({h} h)", f"3T ({h} h) without L(f,g)", ALL),
                ("L(f_h,h_f) helps", h, f"3T ({h} h)", f"3T ({h} h) without L(f_h,h_f)", ALL),
                ("L(g_h,h_g) helps", h, f"3T ({h} h)", f"3T ({h} h) without L(g_h,h_g)", ALL),
                ("removing L(g_h,h_g) hurts more than removing L(f_h,h_f)", h, f"3T ({h} h) without L(f_h,h_f)",
                 f"3T ({h} h) without L(g_h,h_g)", ALL),
                ("contrastive transfer beats L2 transfer", h, f"3T ({h} h)", f"3T ({h} h) L2 transfer", ALL)]
    # Beyond the paper: its method under the sigmoid loss, and several towers at once (its open question).
    out.append(("SigLIP-3T beats the SigLIP baseline", "matched", "SigLIP-3T (matched h)", "SigLIP", ALL))
    for alone in ("shape", "colour"):
        out.append(("two towers beat each one alone", "shape + colour", "3T (shape + colour h)", f"3T ({alone} h)",
                    ALL))
    out.append(("two towers beat the from-scratch CLIP", "shape + colour", "3T (shape + colour h)", "CLIP", ALL))
    return out


def with_mean_r1(frame):
    return frame.assign(**{"mean R@1": (frame["I→T R@1"] + frame["T→I R@1"]) / 2})


def compare(a: pd.Series, b: pd.Series):
    """(difference of means, margin, verdict) of per-seed values a and b."""
    diff, margin = a.mean() - b.mean(), max(a.std(ddof=1), b.std(ddof=1))
    verdict = "A beats B" if diff > margin else "B beats A" if -diff > margin else "within noise"
    return diff, margin, verdict


def judge(runs: pd.DataFrame, combos: pd.DataFrame = None) -> pd.DataFrame:
    """One row per (claim, regime, metric) whose two rows both ran: means ± stds, difference, verdict; and, with
    the combinations' per-seed rows, whether the best interior a beats the better of a = 0 and a = 1."""
    runs, rows = with_mean_r1(runs), []
    fmt = "{:.1f} ± {:.1f}".format
    for claim, regime, a, b, metrics in claims():
        rows_a, rows_b = runs[runs["run"] == a], runs[runs["run"] == b]
        if rows_a.empty or rows_b.empty:
            continue
        if min(len(rows_a), len(rows_b)) < SEEDS:  # listed, not judged: the rule needs every seed's spread
            rows.append({"claim": claim, "h": regime, "metric": ", ".join(metrics), "A": a, "B": b,
                         "verdict": f"not judged yet: {len(rows_a)} and {len(rows_b)} of {SEEDS} seeds"})
            continue
        for metric in metrics:
            diff, margin, verdict = compare(rows_a[metric], rows_b[metric])
            rows.append({"claim": claim, "h": regime, "metric": metric, "A": a, "B": b,
                         "A mean ± std": fmt(rows_a[metric].mean(), rows_a[metric].std(ddof=1)),
                         "B mean ± std": fmt(rows_b[metric].mean(), rows_b[metric].std(ddof=1)),
                         "A - B": round(diff, 1), "margin": round(margin, 1), "verdict": verdict})
    if combos is not None and len(combos):
        combos = with_mean_r1(combos)
        for pair, group in combos.groupby("pair", sort=False):
            if group["seed"].nunique() < SEEDS:
                rows.append({"claim": "the combination beats both models", "h": pair, "metric": ", ".join(ALL),
                             "verdict": f"not judged yet: {group['seed'].nunique()} of {SEEDS} seeds"})
                continue
            ends = group[group["a"].isin([0.0, 1.0])]
            inner = group[~group["a"].isin([0.0, 1.0])]
            for metric in ALL:
                best_end = ends.groupby("a")[metric].mean().idxmax()
                best_inner = inner.groupby("a")[metric].mean().idxmax()
                a_vals = inner[inner["a"] == best_inner][metric].reset_index(drop=True)
                b_vals = ends[ends["a"] == best_end][metric].reset_index(drop=True)
                diff, margin, verdict = compare(a_vals, b_vals)
                rows.append({"claim": "the combination beats both models", "h": pair, "metric": metric,
                             "A": f"a={best_inner:g}", "B": f"a={best_end:g}",
                             "A mean ± std": fmt(a_vals.mean(), a_vals.std(ddof=1)),
                             "B mean ± std": fmt(b_vals.mean(), b_vals.std(ddof=1)),
                             "A - B": round(diff, 1), "margin": round(margin, 1), "verdict": verdict})
    return pd.DataFrame(rows)
