"""Standalone evaluator: a training checkpoint or an exported folder, alone or in one of the paper's ensembles.

    python -m training.eval --model 3T-ViT-B-16 --checkpoint logs/RUN/checkpoints/epoch_32.pt \\
        --zeroshot-data data/places365_val data/pets_test --val-data 'data/val/{00000..00009}.tar' --out results/3t
    python -m training.eval --model local-dir:released/ --zeroshot-data data/pets_test --out results/released
    python -m training.eval --checkpoint logs/3T/checkpoints/epoch_32.pt --combine-with logs/LiT/checkpoints/epoch_32.pt \\
        --alphas 0 0.25 0.5 0.75 1 --zeroshot-data data/pets_test --val-data 'data/val/{00000..00009}.tar' --out results/mix
    python -m training.eval --checkpoint logs/3T/checkpoints/epoch_32.pt --third-tower-pair --third-tower-weights h.pth \
        --zeroshot-data data/pets_test --out results/3t+h

Writes OUT/results.csv and OUT/results.md: one row for the model, or one row per alpha with --combine-with, where
p = alpha * p_model + (1 - alpha) * p_combine_with, or with --third-tower-pair, where p_combine_with is the 3T
model's own third-tower pair h_g(h(I)) . g_h(g(T)) (softmax probabilities; see training/metrics.py for the exact
definitions). Columns: model, [alpha,] NAME-zeroshot-top1/top5 per folder, image_to_text_R@k, text_to_image_R@k,
mean and median ranks.
"""
import argparse
import io
import logging
import os
import tarfile
from dataclasses import dataclass
from typing import Optional

import open_clip
import pandas as pd
import torch
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image

import open_clip_3t  # noqa: F401  (registers the 3T configs before any model name is resolved)
from open_clip_3t._openclip import check_remote_code, load_state_dict, trusting_remote_code
# params.txt beside the run's checkpoints/ names the model and, for pretrained image towers, their normalisation
from open_clip_3t.export import _model_name_from_run, image_normalisation_of_run
from open_clip_3t.files import write_atomic
from open_clip_3t.model import checkpoint_layout, tower_keys
from open_clip_3t.plan import resolve_plan
from open_clip_3t.shards import expand_shards, image_bytes, iter_samples
from open_clip_3t.weights import check_model_weights, checkpoint_keys, checkpoint_unreadable, first_nonfinite

from .eval_sets import ZeroShotTask, add_eval_args, check_eval_args, class_folders, folder_dataloader
from .metrics import (ThirdTowerPair, build_classifier, encode_pairs, logit_scale_of, mix_log_probs,
                      retrieval_metrics, topk_correct, zero_shot_batches)

PRECISIONS = ("fp32", "amp", "amp_bf16", "amp_bfloat16", "bf16", "fp16", "pure_bf16", "pure_fp16")


# --- models ---------------------------------------------------------------------------------------------------

@dataclass
class ModelSpec:
    label: str                 # how the model is named in the table
    name: str                  # OpenCLIP model name, or local-dir:DIR
    checkpoint: Optional[str]  # training checkpoint (None for local-dir: and hf-hub:)


def model_folder(name, flag):
    """A local-dir: or hf-hub: model, checked before any model is built (docs/untrusted_models.md): its weights read
    as tensors, its tokenizer and text tower need no code of their own (unless trusted)."""
    check_model_weights(name, flag)
    check_remote_code(name)
    return ModelSpec(name, name, None)


def resolve_spec(spec, model_name, flag, model_flag):
    """A model given as local-dir:DIR, an exported folder, an hf-hub: id, or a checkpoint file (+ its model name)."""
    if spec.startswith("hf-hub:"):
        return model_folder(spec, flag)
    if spec.startswith("local-dir:") or os.path.isdir(spec):
        folder = spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise FileNotFoundError(f"{flag} {spec}: {folder} holds no open_clip_config.json; pass a folder written "
                                    f"by `python -m open_clip_3t.export` (or any OpenCLIP local-dir folder)")
        return model_folder(f"local-dir:{folder}", flag)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{flag} {spec}: no such checkpoint file or folder; pass epoch_N.pt, an exported "
                                f"folder or local-dir:DIR")
    reason = checkpoint_unreadable(spec)
    if reason:
        raise ValueError(f"{flag} {spec} does not load ({reason}): it is truncated or not a checkpoint; pass an intact "
                         f"epoch_N.pt, an exported folder or local-dir:DIR")
    model_name = model_name or _model_name_from_run(spec)
    if model_name is None:
        raise ValueError(f"cannot tell which model {spec} holds (no params.txt beside its run): pass {model_flag} NAME")
    check_remote_code(model_name)
    return ModelSpec(f"{model_name} {spec}", model_name, spec)


def eval_plan(spec: ModelSpec, third_tower_weights=None, pair=None):
    """The plan of evaluating `spec`: f and g only (no tower h is built); with `pair` (True: the only tower, or a
    tower's name), also that tower, for the model's own third-tower pair: from --third-tower-weights, else from the
    checkpoint when it holds it, else from the config's weights. Checked before any model is built."""
    if spec.checkpoint is None:
        if pair:
            raise ValueError(f"--third-tower-pair needs a 3T training checkpoint (with its heads), not {spec.label}: "
                             f"pass --checkpoint logs/RUN/checkpoints/epoch_N.pt of a 3T run")
        return resolve_plan(spec.name, build_by_default=False)
    held, head_type = checkpoint_layout(checkpoint_keys(spec.checkpoint))
    plan = resolve_plan(spec.name, third_tower=False, checkpoint_head_type=head_type, build_by_default=False)
    if not pair:
        return plan
    if plan.family != "3t":
        raise ValueError(f"--third-tower-pair needs a 3T training checkpoint (with its heads), not {spec.label}: "
                         f"pass --checkpoint logs/RUN/checkpoints/epoch_N.pt of a 3T run")
    try:
        name = plan.section.tower(None if pair is True else pair).name
    except ValueError as e:
        raise ValueError(f"--third-tower-pair: {e}") from None
    if third_tower_weights is not None and not os.path.isfile(third_tower_weights):
        raise FileNotFoundError(f"--third-tower-weights {third_tower_weights}: no such file; pass h's timm weights "
                                f"file")
    plan = resolve_plan(spec.name, section=plan.section, checkpoint_towers=held or (),
                        third_tower={n: None if n == name else False for n in plan.tower_names},
                        third_tower_weights=None if third_tower_weights is None else {name: third_tower_weights})
    if plan.tower(name).source == "random":
        raise ValueError(f"--third-tower-pair: {spec.checkpoint} was trained from a cache and holds no weights of "
                         f"{'h' if len(plan.towers) == 1 else 'the tower ' + name}, and {spec.name} names none: pass "
                         f"--third-tower-weights FILE (the file the cache was built from)")
    return plan


def load_model(spec: ModelSpec, device, precision, plan=None):
    """(model in eval mode, its eval preprocessing, its tokenizer), as `plan` (default: `eval_plan(spec)`) says.
    A checkpoint is evaluated with the image normalisation its run trained with (its params.txt)."""
    plan = plan or eval_plan(spec)
    normalisation = image_normalisation_of_run(spec.checkpoint) if spec.checkpoint else {}
    if spec.checkpoint is None:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.name, device=device, precision=precision)
    elif plan.built:  # a tower h too, for its third-tower pair
        model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=spec.checkpoint,
                                                                     device=device, precision=precision,
                                                                     **normalisation, **plan.model_kwargs())
    elif plan.family == "3t":
        # Evaluation needs f and g only: build without any third tower and load the checkpoint minus the towers'
        # weights (a checkpoint trained with a tower online holds them; create_model(pretrained=...) would load them
        # strictly).
        towers = {tower_keys(name).tower for name in plan.tower_names}
        state_dict = {k: v for k, v in load_state_dict(spec.checkpoint).items() if k.split(".")[0] not in towers}
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, device=device, precision=precision, **plan.model_kwargs(), **normalisation)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ValueError(f"checkpoint {spec.checkpoint} does not fit {spec.name} "
                             f"({first[1].strip() if len(first) > 1 else first[0]}): pass the --model it was trained "
                             f"with") from None
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=spec.checkpoint,
                                                                     device=device, precision=precision,
                                                                     **normalisation)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise ValueError(f"{spec.checkpoint or spec.name} holds non-finite weights (first: {bad}): the run diverged; "
                         f"evaluate a checkpoint from before that")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(spec.name)


# --- retrieval shards -----------------------------------------------------------------------------------------

def bad_shard(shard, error):
    return ValueError(f"--val-data shard {shard} is truncated or not a tar file ({error}): replace it, or leave it "
                      f"out of --val-data")


def check_shard(shard):
    """Walk a shard's tar headers (no member data read): a truncated or non-tar file is refused before any model is
    loaded. For an uncompressed .tar, each member's data must also end within the file."""
    size = os.path.getsize(shard)
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if shard.endswith(".tar") and member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} ends after the end of the file")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise bad_shard(shard, f"{type(e).__name__}: {e}") from None


def val_shards(spec):
    """Shard paths of a --val-data spec ('val/{00000..00009}.tar', '::'-joined lists); all must exist and be
    intact tars."""
    shards = expand_shards(spec, flag="--val-data")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"--val-data: shard {missing[0]} not found ({len(missing)} of {len(shards)} missing); "
                                f"pass existing local .tar shards, e.g. 'data/val/{{00000..00009}}.tar'")
    for shard in shards:
        check_shard(shard)
    return shards


def read_pairs(shards):
    """Yields (RGB PIL image, caption) from LAION-style shards, in shard order then tar order, grouped into samples
    as OpenCLIP's training pipeline groups them; samples without an image or a txt are skipped, as it skips them."""
    for shard in shards:
        stats = {}
        for sample in iter_samples(shard, stats):
            image = image_bytes(sample)
            if image is not None and "txt" in sample:
                yield Image.open(io.BytesIO(image)).convert("RGB"), sample["txt"].decode("utf-8")
        if stats["truncated"]:  # changed since check_shard
            raise bad_shard(shard, stats["truncated"])


def pair_batches(shards, preprocess, tokenizer, batch_size, num_samples=None):
    """(images, tokenized captions) batches of the first `num_samples` pairs (all when None)."""
    images, texts, n = [], [], 0
    for image, text in read_pairs(shards):
        if num_samples is not None and n >= num_samples:
            break
        images.append(preprocess(image))
        texts.append(text)
        n += 1
        if len(images) == batch_size:
            yield torch.stack(images), tokenizer(texts)
            images, texts = [], []
    if images:
        yield torch.stack(images), tokenizer(texts)


# --- scores and table -----------------------------------------------------------------------------------------

def model_scores(model, preprocess, tokenizer, tasks, shards, args):
    """One model's raw scores: {task prefix: (scores (N, C), targets (N,))} and the (N, N) retrieval scores."""
    zeroshot = {}
    for task in tasks:
        classifier = build_classifier(model, tokenizer, task.classnames, task.templates, args.device, args.precision)
        loader = folder_dataloader(task.root, preprocess, args.batch_size, args.workers)
        batches = list(zero_shot_batches(model, classifier, loader, args.device, args.precision))
        zeroshot[task.prefix] = (torch.cat([s for s, _ in batches]), torch.cat([t for _, t in batches]))
    retrieval = None
    if shards:
        batches = pair_batches(shards, preprocess, tokenizer, args.batch_size, args.val_num_samples)
        image, text, _ = encode_pairs(model, batches, args.device, args.precision)
        retrieval = logit_scale_of(model) * image @ text.t()
    return {"zeroshot": zeroshot, "retrieval": retrieval}


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


def evaluate_models(spec, tasks, shards, args, combine_spec=None, alphas=None, plan=None) -> pd.DataFrame:
    """The results table: one row for `spec`, or one row per alpha of its convex combination with `combine_spec`,
    or with its own third-tower pair when its `plan` (see eval_plan) builds a tower h."""
    ks = args.retrieval_k
    plan = plan or eval_plan(spec)
    model, preprocess, tokenizer = load_model(spec, args.device, args.precision, plan)
    logging.info(f"evaluating {spec.label}")
    scores = model_scores(model, preprocess, tokenizer, tasks, shards, args)
    if plan.built:
        logging.info(f"evaluating the third-tower pair of {spec.label}")
        other = model_scores(ThirdTowerPair(model), preprocess, tokenizer, tasks, shards, args)
        label = f"{spec.label} + third-tower pair"
    elif combine_spec is None:
        return pd.DataFrame([{"model": spec.label, **single_row(scores, ks)}])
    else:
        logging.info(f"evaluating {combine_spec.label}")
        other = model_scores(*load_model(combine_spec, args.device, args.precision), tasks, shards, args)
        label = f"{spec.label} + {combine_spec.label}"
    return pd.DataFrame([{"model": label, "alpha": float(a), **combined_row(scores, other, a, ks)} for a in alphas])


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
                                     allow_abbrev=False)
    parser.add_argument("--model", default=None,
                        help="OpenCLIP/3T model name of --checkpoint (default: read from the run's params.txt), or "
                             "local-dir:DIR for an exported folder, or hf-hub:ORG/REPO.")
    parser.add_argument("--checkpoint", default=None, metavar="FILE", help="Training checkpoint (epoch_N.pt).")
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
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="Dataloader workers for the zero-shot folders.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument("--out", required=True, metavar="DIR", help="Writes DIR/results.csv and DIR/results.md.")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="Run code that comes with a model's tokenizer or Hugging Face text tower (refused by "
                             "default): only for models you trust. See docs/untrusted_models.md.")
    return parser, parser.parse_args(argv)


def check_args(args):
    """Every input checked before a model is built; returns (spec, its plan, combine_spec, tasks, shards)."""
    if args.checkpoint is not None:
        spec = resolve_spec(args.checkpoint, args.model, "--checkpoint", "--model")
    elif args.model is not None and (args.model.startswith(("local-dir:", "hf-hub:")) or os.path.isdir(args.model)):
        spec = resolve_spec(args.model, None, "--model", "--model")
    else:
        raise ValueError("nothing to evaluate: pass --checkpoint FILE (with --model NAME unless the run's params.txt "
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
            df = evaluate_models(spec, tasks, shards, args, combine_spec, args.alphas, plan)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    paths = write_results(df, args.out)
    print(markdown_table(df), end="")
    print(f"wrote {' and '.join(paths)}")
    return df


if __name__ == "__main__":
    main()
