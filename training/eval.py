"""Standalone evaluator: a training checkpoint or an exported folder, alone or in one of the paper's ensembles.

    python -m training.eval --model 3T-ViT-B-16 --pretrained logs/RUN/checkpoints/epoch_32.pt \\
        --zeroshot-data data/places365_val data/pets_test --val-data 'data/val/{00000..00009}.tar' --out results/3t
    python -m training.eval --model local-dir:released/ --zeroshot-data data/pets_test --out results/released
    python -m training.eval --pretrained logs/3T/checkpoints/epoch_32.pt --combine-with logs/LiT/checkpoints/epoch_32.pt \\
        --alphas 0 0.25 0.5 0.75 1 --zeroshot-data data/pets_test --val-data 'data/val/{00000..00009}.tar' --out results/mix
    python -m training.eval --pretrained logs/3T/checkpoints/epoch_32.pt --third-tower-pair --third-tower-weights h.pth \
        --zeroshot-data data/pets_test --out results/3t+h

Writes OUT/tasks/TASK.json as each task ends (its rows and what they are over: images and classes, or pairs), then
OUT/results.csv and OUT/results.md: one row for the model, or one row per alpha with --combine-with, where
p = alpha * p_model + (1 - alpha) * p_combine_with, or with --third-tower-pair, where p_combine_with is the 3T
model's own third-tower pair h_g(h(I)) . g_h(g(T)) (softmax probabilities; see training/metrics.py for the exact
definitions). Columns: model, [alpha,] NAME-zeroshot-top1/top5 per folder, image_to_text_R@k, text_to_image_R@k,
mean and median ranks.
"""
import argparse
import errno
import json
import logging
import os

import pandas as pd
import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

from open_clip_3t._openclip import trusting_remote_code
from open_clip_3t.files import unwritable, write_atomic
from open_clip_3t.flags import HelpFormatter, add_renamed
from open_clip_3t.progress import tracked

from .eval_models import ModelSpec, check_fits, eval_plan, load_model, resolve_spec  # noqa: F401  (ModelSpec: API)
from .eval_sets import (ZeroShotTask, add_eval_args, check_eval_args, class_folders, count_pairs, folder_dataloader,
                        one_line, pair_batches, val_shards)
from .metrics import (ThirdTowerPair, build_classifier, encode_pairs, logit_scale_of, mix_log_probs,
                      retrieval_metrics, topk_correct, zero_shot_batches)

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")


# --- scores and table -----------------------------------------------------------------------------------------

RETRIEVAL = "retrieval"  # the name of the --val-data task (a zero-shot task is named by its metric prefix)


def task_scores(model, preprocess, tokenizer, task, shards, args):
    """One model's raw scores on one task: {"zeroshot": {prefix: (scores (N, C), targets (N,))}} for a zero-shot
    task, {"retrieval": (N, N) scores} for the --val-data shards (task RETRIEVAL)."""
    quiet = "lines" if args.quiet else False
    if task == RETRIEVAL:
        pairs = min(count_pairs(shards), args.val_num_samples or float("inf"))
        batches = tracked(pair_batches(shards, preprocess, tokenizer, args.batch_size, args.val_num_samples),
                          -(-pairs // args.batch_size), RETRIEVAL, quiet=quiet, emit=logging.info)
        image, text, _ = encode_pairs(model, batches, args.device, args.precision)
        return {"zeroshot": {}, "retrieval": logit_scale_of(model) * image @ text.t()}
    classifier = build_classifier(model, tokenizer, task.classnames, task.templates, args.device, args.precision)
    loader = folder_dataloader(task.root, preprocess, args.batch_size, args.workers)
    loader = tracked(loader, len(loader), task.prefix, quiet=quiet, emit=logging.info)
    batches = list(zero_shot_batches(model, classifier, loader, args.device, args.precision))
    return {"zeroshot": {task.prefix: (torch.cat([s for s, _ in batches]), torch.cat([t for _, t in batches]))},
            "retrieval": None}


def task_counts(task, scores, shards):
    """What the task's figures are over: {"pairs", "shards"} for retrieval, {"images", "classes"} for zero-shot."""
    if task == RETRIEVAL:
        return {"pairs": scores["retrieval"].shape[0], "shards": len(shards)}
    return {"images": len(scores["zeroshot"][task.prefix][1]), "classes": len(task.classnames)}


def metrics_row(zeroshot, retrieval, ks):
    """zeroshot: {prefix: (scores, targets)}; retrieval: (image->text scores, text->image scores) or None."""
    row = {}
    for prefix, (scores, targets) in zeroshot.items():
        top1, top5 = topk_correct(scores, targets, (1, 5))
        row[f"{prefix}-top1"], row[f"{prefix}-top5"] = top1 / len(targets), top5 / len(targets)
    if retrieval is not None:
        row.update(retrieval_metrics(*retrieval, ks=ks))
    return row


def single_row(scores, ks):
    retrieval = None if scores["retrieval"] is None else (scores["retrieval"], None)
    return metrics_row(scores["zeroshot"], retrieval, ks)


def combined_row(a, b, alpha, ks):
    """Metrics of p = alpha * p_a + (1 - alpha) * p_b (see training/metrics.py)."""
    zeroshot = {prefix: (mix_log_probs(scores, b["zeroshot"][prefix][0], alpha, dim=1), targets)
                for prefix, (scores, targets) in a["zeroshot"].items()}
    retrieval = None
    if a["retrieval"] is not None:
        image_to_text = mix_log_probs(a["retrieval"], b["retrieval"], alpha, dim=1)  # softmax over texts
        text_to_image = mix_log_probs(a["retrieval"], b["retrieval"], alpha, dim=0).t()  # softmax over images
        retrieval = (image_to_text, text_to_image)
    return metrics_row(zeroshot, retrieval, ks)


def evaluate_models(spec, tasks, shards, args, combine_spec=None, alphas=None, plan=None, out=None) -> pd.DataFrame:
    """The results table: one row for `spec`, or one row per alpha of its convex combination with `combine_spec`,
    or with its own third-tower pair when its `plan` (see eval_plan) builds a tower h. Task by task: each task's
    rows and what they are over (images and classes, or pairs) are printed and, with `out`, written at once to
    OUT/tasks/TASK.json, so that a later failure loses none of them."""
    ks = args.retrieval_k
    plan = plan or eval_plan(spec)
    first = load_model(spec, args.device, args.precision, plan)
    second, label = None, spec.label
    if plan.built:
        second, label = (ThirdTowerPair(first[0]), *first[1:]), f"{spec.label} + third-tower pair"
    elif combine_spec is not None:
        second, label = load_model(combine_spec, args.device, args.precision), f"{spec.label} + {combine_spec.label}"
    rows = [{"model": label}] if second is None else [{"model": label, "alpha": float(a)} for a in alphas]
    for task in [*tasks, *([RETRIEVAL] if shards else [])]:
        name = task if task == RETRIEVAL else task.prefix
        logging.info(f"evaluating {label} on {name}")
        scores = task_scores(*first, task, shards, args)
        if second is None:
            part = [single_row(scores, ks)]
        else:
            other = task_scores(*second, task, shards, args)
            part = [combined_row(scores, other, a, ks) for a in alphas]
        for row, values in zip(rows, part):
            row.update(values)
        over = task_counts(task, scores, shards)
        print(f"{name}: over {', '.join(f'{v} {k}' for k, v in over.items())}", flush=True)
        if out is not None:
            os.makedirs(os.path.join(out, "tasks"), exist_ok=True)
            write_atomic(os.path.join(out, "tasks", f"{name}.json"), json.dumps(
                {"task": name, "over": over, "rows": [{**{k: row[k] for k in ("model", "alpha") if k in row}, **values}
                                                     for row, values in zip(rows, part)]}, indent=1) + "\n")
    return pd.DataFrame(rows)


def markdown_table(df: pd.DataFrame) -> str:
    """The table as GitHub Markdown (pandas' writer, through tabulate), floats to 4 decimals."""
    return df.to_markdown(index=False, floatfmt=".4f") + "\n"


def write_results(df: pd.DataFrame, out_dir):
    """OUT/results.csv (full precision) and OUT/results.md, each written to a temporary name and renamed."""
    os.makedirs(out_dir, exist_ok=True)
    return [write_atomic(os.path.join(out_dir, name), text)
            for name, text in (("results.csv", df.to_csv(index=False)), ("results.md", markdown_table(df)))]


# --- command line ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m training.eval", description=__doc__.split("\n")[0],
                                     allow_abbrev=False, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=None,
                        help="OpenCLIP/3T model name of --pretrained (default: read from the run's params.txt), or "
                             "local-dir:DIR for an exported folder, or hf-hub:ORG/REPO.")
    add_renamed(parser, "training.eval", parser.add_argument(
        "--pretrained", default=None, metavar="FILE",
        help="The weights to evaluate, as OpenCLIP's --pretrained: a training checkpoint (epoch_N.pt) of --model, or "
             "an exported folder."))
    parser.add_argument("--combine-with", default=None, metavar="SPEC",
                        help="Second model (the paper's LiT) for the convex combination: a checkpoint file, an "
                             "exported folder, local-dir:DIR or hf-hub:ORG/REPO.")
    parser.add_argument("--combine-model", default=None, metavar="NAME",
                        help="Model name of a --combine-with checkpoint (default: read from its run's params.txt).")
    parser.add_argument("--third-tower-pair", nargs="?", const=True, default=False, metavar="NAME",
                        help="Combine a 3T checkpoint with its own third-tower pair, h_g(h(I)) against g_h(g(T)) "
                             "(the paper's test-time use of h), instead of a --combine-with model. With several "
                             "third towers, NAME says which tower's pair.")
    parser.add_argument("--third-tower-weights", default=None, metavar="FILE",
                        help="h's weights for --third-tower-pair when the checkpoint was trained from a cache "
                             "(a checkpoint trained with h online holds them).")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], metavar="A",
                        help="Weights a of p = a * p_model + (1 - a) * p_other (--combine-with or --third-tower-pair), "
                             "one table row each.")
    add_eval_args(parser)
    parser.add_argument("--imagenet-val", default=None, metavar="DIR",
                        help="ImageNet validation folder (1000 class sub-folders): zero-shot with OpenCLIP's class "
                             "names and templates.")
    parser.add_argument("--val-data", default=None, metavar="SHARDS",
                        help="LAION-style webdataset shards (jpg/png/webp + txt) for image<->text retrieval.")
    parser.add_argument("--val-num-samples", type=int, default=None, help="Use only the first N pairs.")
    parser.add_argument("--batch-size", type=int, default=64, help="Images (or pairs) per forward pass.")
    parser.add_argument("--workers", type=int, default=4, help="Dataloader workers for the zero-shot folders.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="Default: cuda when a GPU is visible, else cpu.")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="fp32 by default: the figures then equal the training-time evaluation's of an fp32 run "
                             "on any device; on GPUs amp is faster (scripts/slurm/eval.sbatch uses it).")
    parser.add_argument("--quiet", action="store_true",
                        help="No progress bars: one progress line per 10%% of each task instead, as when stderr is "
                             "not a terminal (SLURM logs).")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="Writes DIR/results.csv and DIR/results.md, and DIR/tasks/TASK.json as each task ends.")
    parser.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Run code that comes with a model's tokenizer or Hugging Face text tower (refused by "
                             "default): only for models you trust. See docs/untrusted_models.md.")
    return parser, parser.parse_args(argv)


def check_args(args):
    """Every input checked before a model is built; returns (spec, its plan, combine_spec, tasks, shards)."""
    reason = unwritable(args.out)
    if reason:
        raise ValueError(f"--out {args.out}: cannot write there ({reason}): free space on that file system, or pass "
                         f"an --out folder on a writable one")
    if args.pretrained is not None:
        spec = resolve_spec(args.pretrained, args.model, "--pretrained", "--model")
    elif args.model is not None and (args.model.startswith(("local-dir:", "hf-hub:")) or os.path.isdir(args.model)):
        spec = resolve_spec(args.model, None, "--model", "--model")
    else:
        raise ValueError("nothing to evaluate: pass --pretrained FILE (with --model NAME unless the run's params.txt "
                         "names it), --model local-dir:DIR or --model hf-hub:ORG/REPO")
    combine_spec = None
    if args.combine_with is not None and args.third_tower_pair:
        raise ValueError("--combine-with and --third-tower-pair each give the second model of the combination: "
                         "pass one of them")
    if args.third_tower_weights is not None and not args.third_tower_pair:
        raise ValueError("--third-tower-weights is h's weights for --third-tower-pair: pass --third-tower-pair too")
    if args.combine_with is not None:
        combine_spec = resolve_spec(args.combine_with, args.combine_model, "--combine-with", "--combine-model")
    elif args.combine_model is not None:
        raise ValueError("--combine-model names the --combine-with checkpoint's model: pass --combine-with too")
    plan = eval_plan(spec, args.third_tower_weights, args.third_tower_pair)
    check_fits(spec, plan, "--pretrained" if args.pretrained is not None else "--model")
    if combine_spec is not None:
        check_fits(combine_spec, eval_plan(combine_spec), "--combine-with")
    if combine_spec is not None or plan.built:
        bad = [a for a in args.alphas if not 0.0 <= a <= 1.0]
        if bad:
            raise ValueError(f"--alphas: {bad[0]} is outside [0, 1]; the convex combination needs 0 <= a <= 1")
    tasks = check_eval_args(args)
    if args.imagenet_val is not None:
        if not os.path.isdir(args.imagenet_val):
            raise FileNotFoundError(f"--imagenet-val {args.imagenet_val}: no such folder")
        found = len(class_folders(args.imagenet_val))
        if found != len(IMAGENET_CLASSNAMES):
            raise ValueError(f"--imagenet-val {args.imagenet_val} has {found} class sub-folders, not ImageNet's "
                             f"{len(IMAGENET_CLASSNAMES)}: pass other class sets with --zeroshot-data")
        tasks.append(ZeroShotTask("imagenet", args.imagenet_val, list(IMAGENET_CLASSNAMES),
                                  list(OPENAI_IMAGENET_TEMPLATES), prefix="imagenet-zeroshot-val"))
    shards = val_shards(args.val_data) if args.val_data else []
    if not tasks and not shards:
        raise ValueError("no evaluation data: pass --zeroshot-data DIR, --imagenet-val DIR and/or --val-data SHARDS")
    if args.val_num_samples is not None and args.val_num_samples < 1:
        raise ValueError(f"--val-num-samples {args.val_num_samples}: must be >= 1")
    return spec, plan, combine_spec, tasks, shards


def main(argv=None):
    parser, args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(message)s")
    try:
        with trusting_remote_code(args.trust_remote_code):  # check_args and the models' loads
            spec, plan, combine_spec, tasks, shards = check_args(args)
            df = evaluate_models(spec, tasks, shards, args, combine_spec, args.alphas, plan, out=args.out)
        paths = write_results(df, args.out)
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT):  # a full disk, ...
            e = f"cannot write {e.filename or args.out} ({e.strerror}): free space on that file system, or pass an " \
                f"--out folder on a writable one (the tasks finished before are in {os.path.join(args.out, 'tasks')})"
        elif isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
            e = f"cannot read or write {e.filename} ({e.strerror or e}): check that file and its file system"
        parser.exit(2, f"{parser.prog}: error: {one_line(e)}\n")
    print(markdown_table(df), end="")
    print(f"wrote {' and '.join(paths)}")
    return df


if __name__ == "__main__":
    main()
