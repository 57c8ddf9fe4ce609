"""Command line of `python -m training.main`: every open_clip_train flag, plus the 3T flags below; and the run's
plan (open_clip_3t.plan.RunPlan), built and checked here once, before any process group, model or data loader exists,
then read by every later stage as `args.run_plan`.

Our flags are parsed first (exact names only, so they never swallow an abbreviated OpenCLIP flag); the rest goes
to OpenCLIP's own parser, which keeps its defaults and rejects unknown flags. Evaluation flags come from
training/eval_sets.py (`add_eval_args`).
"""
import argparse
import importlib
import os
import sys

from open_clip_3t._openclip import CONFIG_DIR, RemoteCodeError, check_remote_code, model_exists
from open_clip_3t.cache import CacheError, expand_shards, validate_plan
from open_clip_3t.config import DEFAULT_TOWER, parse_named
from open_clip_3t.factory import check_supported, checkpoint_misfit
from open_clip_3t.files import unwritable
from open_clip_3t.model import checkpoint_layout
from open_clip_3t.plan import resolve_plan
from open_clip_3t.shards import local_path, tar_damage
from open_clip_3t.third_tower import ThirdTower
from open_clip_3t.weights import (WeightsError, check_model_weights, checkpoint_keys, checkpoint_unreadable,
                                  create_timm_model, on_meta_device)

from ._open_clip_train import launch_rank, openclip_is_webdataset, openclip_parse_args
from .eval_sets import add_eval_args, check_eval_args
from .flags import add_three_towers_args, print_help


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m training.main", add_help=False, allow_abbrev=False)
    add_three_towers_args(parser)
    add_eval_args(parser)
    if "-h" in argv or "--help" in argv:
        print_help()
        raise SystemExit(0)
    ours, rest = parser.parse_known_args(argv)
    args = openclip_parse_args(rest)
    for name, value in vars(ours).items():
        setattr(args, name, value)
    args.run_plan = plan_run(args)
    return args


# --report-to NAME -> the module OpenCLIP's trainer imports for it, and the extra that installs it.
LOGGING_BACKENDS = {"tensorboard": ("torch.utils.tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_report_to(args):
    """A logging back-end that is not installed stops the run here, before its folder exists (OpenCLIP would stop
    with an AssertionError after creating it, so that the same --name is then refused)."""
    asked = [name for name in LOGGING_BACKENDS if name in args.report_to or "all" in args.report_to]
    for name in asked:
        module, extra = LOGGING_BACKENDS[name]
        try:
            importlib.import_module(module)
        except ImportError as e:
            fail(f"--report-to {args.report_to}: {name} is not installed ({type(e).__name__}: {e}): pip install "
                 f"'open_clip_3t[{extra}]' (or pip install {extra}), or drop {name} from --report-to")


SIGLIP_DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # open_clip.loss.SigLipLoss's dist_impl values


def fail(message, code=2):
    print(f"training.main: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check_train_data(args):
    """--train-data that names nothing readable would have OpenCLIP's loader retry its shards forever."""
    try:
        webdataset = openclip_is_webdataset(args)
    except ValueError as e:
        fail(f"--train-data {args.train_data}: {e}; pass --dataset-type webdataset or csv")
    if not webdataset:
        if args.dataset_type in ("csv", "auto") and not os.path.isfile(args.train_data):
            fail(f"--train-data {args.train_data}: no such file; pass an existing CSV file")
        return
    urls = expand_shards(args.train_data)
    absent = [u for u in urls if local_path(u) is not None and not os.path.isfile(local_path(u))]
    if absent and len(absent) == len(urls):
        fail(f"--train-data: none of its {len(urls)} shard(s) exist (first: {absent[0]}): fix the path or the brace "
             f"pattern, e.g. '/data/laion/{{00000..41407}}.tar'")
    if absent:  # OpenCLIP skips them (a warning each time one is read): kept, but said once up front
        print(f"training.main: warning: {len(absent)} of the {len(urls)} shards of --train-data do not exist (first: "
              f"{absent[0]}); training on the others", file=sys.stderr)
    if launch_rank() != 0:
        return
    # OpenCLIP reads a damaged shard up to the damage (a cut between two members: silently): two small reads per
    # shard (its first tar header, its end-of-archive marker) find the empty, cut and foreign ones up front.
    absent = set(absent)
    present = [u for u in urls if local_path(u) is not None and u not in absent]
    damaged = [(u, why) for u, why in ((u, tar_damage(local_path(u))) for u in present) if why]
    if damaged and len(damaged) == len(present):
        fail(f"--train-data: shard {damaged[0][0]} is not a whole tar file ({damaged[0][1]})"
             f"{f', nor are the other {len(damaged) - 1}' if len(damaged) > 1 else ''}: replace it (copy it again, or "
             f"rewrite it), or leave it out of --train-data")
    if damaged:
        print(f"training.main: warning: {len(damaged)} of the {len(urls)} shards of --train-data are not whole tar "
              f"files (first: {damaged[0][0]}: {damaged[0][1]}); OpenCLIP reads each up to the damage: replace them, "
              f"or leave them out of --train-data", file=sys.stderr)


def check_weights(plan):
    """Strict load of the local weights files (h's, a LiT tower's) on the meta device: a file for another
    architecture, or not a weights file, stops the run here instead of after the model is built. Global rank 0
    only (the others wait for it at the process group, and stop with it)."""
    try:
        for tower in plan.towers:
            if tower.build is True and tower.cfg.weights:
                on_meta_device(lambda: ThirdTower(tower.cfg))
        if plan.image_tower_weights:
            timm_name = plan.model_cfg["vision_cfg"]["timm_model_name"]
            on_meta_device(lambda: create_timm_model(timm_name, plan.image_tower_weights, what="--image-tower-weights"))
    except (WeightsError, CacheError, ValueError, FileNotFoundError) as e:
        fail(str(e))


CHECKPOINT_FIX = "pass a checkpoint saved with torch.save (e.g. a training run's epoch_N.pt) or a .safetensors file"


def check_model_files(args):
    """Weights files OpenCLIP will load (--pretrained, --distill-pretrained, a local-dir: model's) must load without
    unpickling code; the model's tokenizer and text tower must not need code that comes with them, unless
    --trust-remote-code. Before any model, process group or data loader."""
    for flag, path in (("--pretrained", args.pretrained), ("--distill-pretrained", args.distill_pretrained)):
        reason = checkpoint_unreadable(path) if path and os.path.isfile(path) else None
        if reason:
            fail(f"{flag} {path} does not load ({reason}): {CHECKPOINT_FIX}")
    try:
        if args.model.startswith("local-dir:"):
            check_model_weights(args.model)
        check_remote_code(args.model, args.trust_remote_code, args.cache_dir)
    except (WeightsError, RemoteCodeError) as e:
        fail(str(e))


def pretrained_towers(args):
    """(towers held, head type) of a full 3T checkpoint given as --pretrained FILE, else (None, None)."""
    if not args.pretrained or not os.path.isfile(args.pretrained) or checkpoint_unreadable(args.pretrained):
        return None, None
    return checkpoint_layout(checkpoint_keys(args.pretrained))


def plan_run(args):
    """The run's plan, from the flags and the model config; every inconsistent flag is refused here (one line, exit
    2), before any model, data or process group is created."""
    if args.train_num_samples is not None and args.train_num_samples < 1:
        fail(f"--train-num-samples {args.train_num_samples}: an epoch needs at least one sample; pass the number of "
             f"samples per epoch (e.g. the total of the shards' sizes)")
    try:
        exists = model_exists(args.model)
    except ValueError as e:  # a local-dir: config that cannot be read
        fail(f"--model {args.model}: {e}")
    if not exists:
        ours = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
        fail(f"--model {args.model} does not exist (no OpenCLIP or 3T config of that name): pick one of "
             f"open_clip.list_models(), e.g. {', '.join(ours)}")
    held, head_type = pretrained_towers(args)
    try:
        plan = resolve_plan(
            args.model, third_tower_weights=args.third_tower_weights, third_tower_cache=args.third_tower_cache,
            cache_missing=args.third_tower_cache_missing, loss_weights=args.third_tower_loss_weights,
            transfer=args.third_tower_transfer, head_type=args.third_tower_head or head_type,
            init_image_from=args.third_tower_init_image, siglip=args.siglip, lock_image=args.lock_image,
            image_tower_weights=args.image_tower_weights, precision=args.precision, checkpoint_towers=held, cli=True)
    except ValueError as e:
        fail(str(e))
    three_towers = plan.family == "3t"
    if not three_towers:
        used = [flag for flag, value in (
            ("--third-tower-weights", args.third_tower_weights),
            ("--third-tower-loss-weights", args.third_tower_loss_weights),
            ("--third-tower-transfer", args.third_tower_transfer),
            ("--third-tower-head", args.third_tower_head),
            ("--third-tower-init-image", args.third_tower_init_image),
            ("--third-tower-cache", args.third_tower_cache),
            ("--third-tower-random", args.third_tower_random)) if value]
        if used:
            fail(f"{', '.join(used)} apply to 3T models only, but --model {args.model} has no three_towers section: "
                 f"use a 3T model (e.g. --model 3T-ViT-B-16) or drop these flags")
    given = parse_named(args.third_tower_weights or {}, plan.tower_names, "--third-tower-weights") if three_towers else {}
    for flag, path in [("--third-tower-weights", p) for p in given.values()] + [
            ("--image-tower-weights", plan.image_tower_weights)]:
        if path is not None and not os.path.isfile(path):
            fail(f"{flag} {path}: no such file; pass an existing timm weights file")
    if args.third_tower_loss_weights is not None:
        if any(w < 0 for w in args.third_tower_loss_weights) or not any(args.third_tower_loss_weights):
            fail(f"--third-tower-loss-weights {args.third_tower_loss_weights}: weights must be >= 0, not all 0")
    for flag, value in (("--save-every-n-steps", args.save_every_n_steps),
                        ("--save-every-minutes", args.save_every_minutes),
                        ("--skip-nonfinite-steps", args.skip_nonfinite_steps)):
        if value < 0:
            fail(f"{flag} {value}: must be >= 0 (0 turns it off)")
    if args.keep_step_checkpoints < 1:
        fail(f"--keep-step-checkpoints {args.keep_step_checkpoints}: keep at least 1")
    if args.siglip and args.loss_dist_impl not in (None, *SIGLIP_DIST_IMPLS):
        fail(f"--loss-dist-impl {args.loss_dist_impl}: OpenCLIP's SigLIP exchanges features with one of "
             f"{', '.join(SIGLIP_DIST_IMPLS)}")
    model_cfg = plan.model_cfg
    if args.lock_text and not args.lock_text_freeze_layer_norm and "hf_model_name" not in model_cfg.get("text_cfg", {}):
        fail(f"--lock-text: OpenCLIP locks the LayerNorms of {args.model}'s text tower with the rest of it (and stops "
             f"with an AssertionError otherwise): add --lock-text-freeze-layer-norm")
    if three_towers:
        check_three_towers(args, plan)
    if args.resume not in (None, "latest") and "://" not in args.resume:
        reason = checkpoint_unreadable(args.resume) if os.path.isfile(args.resume) else "no such file"
        if reason:
            fail(f"--resume {args.resume} does not load ({reason}): pass a training checkpoint (epoch_N.pt), or "
                 f"--resume latest")
    check_model_files(args)
    if args.train_data:
        check_train_data(args)
    try:  # the zero-shot folders, their class names and templates (cheap: no image is read)
        check_eval_args(args)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    if plan.cached:
        plan = check_caches(args, plan)
    elif args.third_tower_cache_missing != "error":
        fail(f"--third-tower-cache-missing {args.third_tower_cache_missing} needs --third-tower-cache DIR")
    if plan.image_tower_weights is not None:
        if not model_cfg.get("vision_cfg", {}).get("timm_model_name"):
            fail(f"--image-tower-weights needs a timm image tower, but --model {args.model} has none: use a model "
                 f"whose vision_cfg has timm_model_name (e.g. 3T-baseline-LiT-ViT-B-16)")
        if args.pretrained_image:
            fail("--image-tower-weights and --pretrained-image both load the image tower: pass one of them")
    if three_towers:
        check_random_towers(args, plan)
    check_report_to(args)
    if launch_rank() == 0:
        check_weights(plan)
        check_checkpoint_files(args, plan)
        check_logs(args)
    return plan


def check_random_towers(args, plan):
    """A frozen tower whose weights nothing gives would train 3T against noise: only when asked for by name."""
    random = [t for t in plan.towers if t.source == "random"]
    if random and not args.third_tower_random:
        t = random[0]
        which = "its third tower" if len(plan.towers) == 1 else f"its third tower {t.name}"
        fail(f"--model {args.model}: {which} ({t.cfg.timm_model_name}) would train with random weights: its config "
             f"has timm_model_pretrained false and no weights file, and no --third-tower-weights, --third-tower-cache "
             f"or 3T --pretrained checkpoint gives them; pass --third-tower-weights "
             f"{'' if len(plan.towers) == 1 else t.name + '='}FILE, or --third-tower-random to train against a random "
             f"frozen tower on purpose")
    if args.third_tower_random and not random:
        fail(f"--third-tower-random: every third tower of {args.model} has weights ({'; '.join(map(str, plan.towers))})"
             f": drop the flag")


def meta_build_kwargs(args, plan):
    """create_model keywords that build the run's model with the same weight names and shapes, reading no weights."""
    kwargs = {"force_custom_text": args.force_custom_text, "force_image_size": args.force_image_size}
    if plan.family == "3t":
        kwargs.update(three_towers=plan.section,
                      third_tower={t.name: "random" if t.build else False for t in plan.towers})
    return kwargs


def check_checkpoint_files(args, plan):
    """--pretrained FILE and --resume FILE: readable, and of this model (checked on the meta device: no tensor read),
    so that a wrong file stops the run before its folder, model or process group exist."""
    path = args.pretrained
    if path and not os.path.isfile(path):
        if os.sep in path or path.endswith((".pt", ".pth", ".bin", ".safetensors", ".npz")):
            fail(f"--pretrained {path}: no such file; pass an existing checkpoint file, or one of OpenCLIP's "
                 f"pretrained tags (open_clip.list_pretrained())")
    elif path and not path.endswith((".npz", ".npy")):  # readable: check_model_files
        misfit = checkpoint_misfit(args.model, path, **meta_build_kwargs(args, plan))
        if misfit:
            fail(f"--pretrained {path} does not fit --model {args.model} ({misfit}): pass a checkpoint of that model "
                 f"(for 3T: a 3T checkpoint of it, or a plain one of its f and g), or the --model it was trained with")
    if args.resume not in (None, "latest") and "://" not in args.resume:
        misfit = checkpoint_misfit(args.model, args.resume, strict=True, **meta_build_kwargs(args, plan))
        if misfit:
            fail(f"--resume {args.resume} does not fit --model {args.model} ({misfit}): resume with the --model and "
                 f"third-tower flags it was trained with, or pass a checkpoint of this run")


def check_logs(args):
    """The run folder's file system takes files: a read-only or full one stops the run before anything is created."""
    if not args.logs or args.logs.lower() == "none":
        return
    reason = unwritable(args.logs)
    if reason:
        fail(f"--logs {args.logs}: cannot write there ({reason}): free space on that file system, or pass a --logs "
             f"folder on a writable one")


def check_three_towers(args, plan):
    """The flags that do not fit a 3T model, or this one."""
    if args.distill_model or args.distill_pretrained:
        fail("--distill-model/--distill-pretrained are for plain CLIP models: 3T's third tower already is the "
             "teacher; drop the distill flags")
    cfg = plan.model_cfg
    try:
        check_supported(args.model, cfg, args.force_custom_text)
    except (ValueError, ImportError) as e:
        fail(str(e))
    has_bias = cfg.get("init_logit_bias") is not None
    if args.siglip and not has_bias:  # OpenCLIP would add the biases, which the config then could not load back
        fail(f"--siglip: {args.model} has no init_logit_bias, so the biases --siglip adds would not load back into "
             f"it (export, evaluation, --pretrained); use a config with init_logit_bias (e.g. 3T-ViT-B-16-SigLIP, "
             f"3T-tiny-sigmoid) or drop --siglip")
    if has_bias and not args.siglip:
        fail(f"{args.model} has init_logit_bias (a SigLIP config): train it with --siglip, or use a config "
             f"without init_logit_bias for the softmax CLIP loss")
    if args.horovod:
        fail("--horovod is not supported with 3T: launch with torchrun or srun (torch.distributed)")
    if plan.init_image_from:
        name = plan.init_image_from
        h_arch = plan.tower(name).cfg.timm_model_name.split(".")[0]
        f_arch = (cfg["vision_cfg"].get("timm_model_name") or "").split(".")[0]
        h = "h's architecture" if len(plan.towers) == 1 else f"the architecture of its third tower {name}"
        if f_arch != h_arch:
            fail(f"--third-tower-init-image: {args.model}'s image tower f "
                 f"({f_arch or 'an OpenCLIP ViT'}) is not {h} ({h_arch}); use a 3T config whose "
                 f"vision_cfg.timm_model_name is {h_arch}")


def check_caches(args, plan):
    """The plan with each cached tower's cache checked against --train-data (its index; on global rank 0 also the
    fingerprint, i.e. the weights file's hash, and the shard sizes: a mismatch stops the run before any model is
    built) and its totals attached. Every rank reads a few files whatever the number of shards."""
    for tower in plan.towers:
        if tower.source == "cache" and not os.path.isdir(tower.cache):
            named = "" if tower.name == DEFAULT_TOWER else " --third-tower " + tower.name
            fail(f"--third-tower-cache {tower.cache}: no such directory; build it with "
                 f"`python -m open_clip_3t.cache build`{named}")
    if not args.train_data or args.dataset_type not in ("webdataset", "auto"):
        fail("--third-tower-cache joins embeddings to webdataset shards: pass --train-data SHARDS "
             "(and --dataset-type webdataset or auto)")
    try:
        return plan.with_cache_facts(validate_plan(plan, args.train_data, primary=launch_rank() == 0))
    except CacheError as e:
        fail(str(e))
