"""3T in OpenCLIP's factory: what `open_clip.create_model` and `open_clip.create_loss` do for a config with a
`three_towers` section (installed under OpenCLIP's names by open_clip_3t/_openclip.py; every other model takes
OpenCLIP's own path, untouched)."""
import inspect
import logging
import warnings

import open_clip
import torch

from ._openclip import (ORIGINAL, SECTION, checkpoint_path_for, factory_builds, hide_no_weights_warning,
                        load_openclip_checkpoint, openclip_model_class, read_model_config, read_three_towers_section,
                        reading_shapes_only)
from .loss import ThreeTowersLoss, ThreeTowersSigLipLoss
from .model import ThreeTowersCLIP, ThreeTowersCustomTextCLIP, checkpoint_layout, is_three_towers_key, tower_keys
from .plan import resolve_plan
from .weights import WeightsError, checkpoint_keys, load_error_line, meta_state_dict, misfit_line

# OpenCLIP's class -> ours. OpenCLIP picks the class from the config (`custom_text`, an `hf_model_name` text tower,
# `multimodal_cfg` for CoCa); we swap the class it picks, so that choice stays OpenCLIP's.
THREE_TOWERS_CLASSES = {"CLIP": ThreeTowersCLIP, "CustomTextCLIP": ThreeTowersCustomTextCLIP}


def check_supported(model_name, cfg, force_custom_text=False):
    """Refuse, in one line, a 3T config whose OpenCLIP class 3T does not cover."""
    if "multimodal_cfg" in cfg or openclip_model_class(cfg, force_custom_text).__name__ not in THREE_TOWERS_CLASSES:
        raise ValueError(f"{model_name}: 3T does not support CoCa (multimodal_cfg): its loss adds a "
                         f"captioning term and its forward a text decoder, which 3T's terms and export do not cover; "
                         f"remove multimodal_cfg (a CLIP or CustomTextCLIP config) or drop the three_towers section")
    if "hf_model_name" in cfg.get("text_cfg", {}):
        try:
            import transformers  # noqa: F401
        except ImportError:
            raise ImportError(f"{model_name}: its text tower is a Hugging Face model (text_cfg.hf_model_name): "
                              f"run `pip install transformers` (or `pip install open_clip_3t[hf]`)") from None


def create_model(model_name, pretrained=None, *args, **kwargs):
    """`open_clip.create_model`, building a 3T model for configs with a three_towers section."""
    section = read_three_towers_section(model_name)
    if section is None:
        return ORIGINAL["create_model"](model_name, pretrained, *args, **kwargs)

    call = inspect.signature(ORIGINAL["create_model"]).bind(model_name, pretrained, *args, **kwargs)
    call.apply_defaults()
    opts = dict(call.arguments)
    model_kwargs = opts.pop("model_kwargs")
    check_supported(model_name, {**read_model_config(model_name), **model_kwargs}, opts["force_custom_text"])

    checkpoint = checkpoint_path_for(model_name, pretrained) if opts["load_weights"] else None
    held, head_type = checkpoint_layout(checkpoint_keys(checkpoint)) if checkpoint else (None, None)
    # A full 3T checkpoint carries a tower's weights when it was trained with that tower online: never fetch them
    # again; a tower it lacks was trained from a cache and is not built. What the caller asks for a tower (third_tower=,
    # or weights to build it from) wins.
    given = model_kwargs.pop(SECTION, None)  # a section the caller passed keeps its head type
    plan = resolve_plan(model_name, section=given or section, third_tower=model_kwargs.pop("third_tower", None),
                        third_tower_weights=model_kwargs.pop("third_tower_weights", None),
                        checkpoint_towers=held, checkpoint_head_type=None if given else head_type,
                        build_by_default=held is None, precision=opts["precision"])
    model_kwargs.update(plan.model_kwargs())
    if checkpoint is not None:
        # We load the checkpoint ourselves (below), since a strict load cannot take what legitimately differs.
        # OpenCLIP then sees no checkpoint and would fetch f's and g's own pretrained weights (a Hugging Face text
        # tower's, by default): the checkpoint replaces them, so do not read them.
        opts["load_weights"], opts["require_pretrained"] = False, False
        opts["pretrained_text"], opts["pretrained_image"] = False, False

    with factory_builds(THREE_TOWERS_CLASSES), hide_no_weights_warning(checkpoint is not None):
        model = ORIGINAL["create_model"](**opts, **model_kwargs)

    if checkpoint is not None:
        result = load_openclip_checkpoint(model, checkpoint, strict=False)
        # A plain checkpoint lacks the heads (they stay new); a 3T checkpoint trained from cached embeddings
        # lacks that tower (built from its own weights); a model built without a tower ignores its weights.
        tower_modules = {tower_keys(name).tower for name in model.tower_names}
        unbuilt = {tower_keys(name).tower for name, h in model.third_towers.items() if h is None}
        missing = [k for k in result.missing_keys if not (is_three_towers_key(k, model.tower_names) and (
            held is None or k.split(".")[0] in tower_modules))]
        unexpected = [k for k in result.unexpected_keys if k.split(".")[0] not in unbuilt]
        if missing or unexpected:
            raise WeightsError(f"checkpoint {checkpoint} does not fit {model_name} "
                               f"({misfit_line(missing, unexpected)}): pass a 3T checkpoint of this model or a plain "
                               f"checkpoint of its f and g")
    if opts["precision"] in ("fp16", "bf16"):
        # OpenCLIP's fp16/bf16 casts f and g to half (every Linear; the whole model for a timm image tower) and keeps
        # its logit_scale fp32 where it can: the heads keep logit_scale's dtype, as the temperatures do (the forward
        # feeds each head in its own dtype).
        for name in model.tower_names:
            for head in model.heads(name):
                head.to(model.logit_scale.dtype)
    if opts["precision"] in ("fp16", "bf16", "pure_fp16", "pure_bf16"):
        # OpenCLIP's low-precision conversion touches only some layer types: cast each tower h as a whole.
        for h in model.third_towers.values():
            if h is not None:
                h.to(torch.float16 if "fp16" in opts["precision"] else torch.bfloat16)
    return model


def three_towers_loss(plan, args):
    """The 3T loss of a run's plan, with OpenCLIP's distributed choices from `args` (--siglip, --loss-dist-impl,
    --local-loss, --gather-with-grad, rank, world size)."""
    common = {"weights": plan.loss_weights, "transfer": plan.transfer, "towers": plan.tower_names}
    if getattr(args, "horovod", False):
        raise ValueError("3T does not support Horovod: use torchrun / SLURM with torch.distributed")
    if plan.loss == "sigmoid":
        return ThreeTowersSigLipLoss(rank=args.rank, world_size=args.world_size,
                                     dist_impl=getattr(args, "loss_dist_impl", None), **common)
    return ThreeTowersLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                           rank=args.rank, world_size=args.world_size, **common)


def create_loss(args):
    """`open_clip.create_loss`, returning the 3T loss for 3T models: the run's plan (`args.run_plan`, set by
    `python -m training.main`), or one resolved from args.model, --third-tower-loss-weights, --third-tower-transfer
    and --siglip."""
    plan = getattr(args, "run_plan", None) or resolve_plan(
        args.model, loss_weights=getattr(args, "third_tower_loss_weights", None),
        transfer=getattr(args, "third_tower_transfer", None), siglip=getattr(args, "siglip", False),
        build_by_default=False)
    if plan.family != "3t":
        return ORIGINAL["create_loss"](args)
    return three_towers_loss(plan, args)


# --- does a checkpoint fit a model? (checked before any real model is built) ------------------------------------

def checkpoint_misfit(model_name, checkpoint, strict=False, ignore=(), **create_kwargs):
    """Why the weights in `checkpoint` would not load into `model_name` (built with `create_kwargs`), as one short
    line; None if they would. Builds the model on the meta device and reads no tensor data (a safetensors header, a
    memory-mapped torch file). strict=False: as `create_model(model_name, pretrained=checkpoint)` loads them
    (OpenCLIP's conversions and position-embedding resizing, 3T's rules for plain and cached checkpoints);
    strict=True: as `load_state_dict(strict=True)` does, every weight by name and shape (--resume, a 3T evaluation, an
    export folder), except the file's tensors under the modules named in `ignore` (towers the model does not build)."""
    root, level = logging.getLogger(), logging.getLogger().level
    root.setLevel(logging.ERROR)  # the meta build's "creation process complete" and "no pretrained weights" lines
    # ... and a handler, so that they do not make logging.basicConfig() install one for good (every later line twice)
    quiet = logging.NullHandler()
    root.addHandler(quiet)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op"
            try:
                model = open_clip.create_model(model_name, load_weights=False, device="meta", pretrained_text=False,
                                               **create_kwargs)
            except Exception:  # a model that cannot be built here (e.g. a Hugging Face tower offline): the real
                return None    # build and load will say why
            if strict:
                ours = {k: list(v.shape) for k, v in model.state_dict().items()}
                file = {k: list(v.shape) for k, v in meta_state_dict(checkpoint).items()
                        if k.split(".")[0] not in ignore}
                shapes = [(k, file[k], ours[k]) for k in ours if k in file and file[k] != ours[k]]
                missing, unexpected = [k for k in ours if k not in file], [k for k in file if k not in ours]
                return misfit_line(missing, unexpected, shapes, len(ours)) or None
            try:
                with reading_shapes_only(meta_state_dict):
                    open_clip.create_model(model_name, pretrained=checkpoint, device="meta", **create_kwargs)
            except Exception as e:  # whatever the loading path raises is the reason a real load would fail
                described = isinstance(e, WeightsError) or str(e).startswith("Error(s) in loading state_dict")
                # another error (e.g. OpenCLIP's AssertionError on a position embedding): name what differs instead
                return load_error_line(e) if described else (
                    checkpoint_misfit(model_name, checkpoint, strict=True, **create_kwargs) or load_error_line(e))
            return None
    finally:
        root.removeHandler(quiet)
        root.setLevel(level)
