"""Every touch of OpenCLIP internals lives here. Written against open_clip_torch 3.3.

OpenCLIP 3.3 has no plugin hook: `open_clip.factory.create_model` hard-codes the model class and passes every
config key to its constructor. So we wrap `create_model` (and `create_loss`): for a config with a
`three_towers` section the wrapper lets OpenCLIP build the model as usual (precision, device, preprocess cfg,
checkpoint loading, pos-embed resize) with the CLIP class swapped for ours for the duration of that call.
Every other model takes OpenCLIP's own path, untouched.
"""
import contextlib
import inspect
import os
import sys
from pathlib import Path

import open_clip
import open_clip.factory as oc_factory
import torch

SUPPORTED_OPENCLIP = ((3, 3), (3, 4))  # [min, max) as (major, minor)
CONFIG_DIR = Path(__file__).parent / "model_configs"
SECTION = "three_towers"


def check_openclip_version(version=None):
    """Refuse an OpenCLIP whose internals we have not checked."""
    version = version or open_clip.__version__
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    lo, hi = SUPPORTED_OPENCLIP
    if not lo <= major_minor < hi:
        raise ImportError(
            f"open_clip_3t needs open_clip_torch 3.3.x but found {version}: "
            f"run `pip install 'open_clip_torch>=3.3,<3.4'`")


# --- reading configs and checkpoints ------------------------------------------------------------------------

def three_towers_config(model_name):
    """The `three_towers` section of a model's config (built-in name or local-dir:), or None if it has none."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    if schema == "hf-hub":
        return None  # released 3T models are exported as plain CLIPs; a hub repo is never 3T
    if schema == "local-dir" and not (Path(identifier) / "open_clip_config.json").is_file():
        return None  # let OpenCLIP raise its own error
    cfg = oc_factory.get_model_config(model_name if schema else model_name.replace("/", "-"))
    return None if cfg is None else cfg.get(SECTION)


def model_config(model_name):
    """The full model config (OpenCLIP schema + three_towers section) for a name or local-dir:."""
    schema, _ = oc_factory.parse_model_name(model_name)
    return oc_factory.get_model_config(model_name if schema else model_name.replace("/", "-"))


def checkpoint_path_for(model_name, pretrained):
    """The file OpenCLIP would load full weights from, if it is a local file (None for hub tags)."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    if schema == "local-dir":
        return oc_factory._find_checkpoint_in_dir(Path(identifier))
    if pretrained and os.path.isfile(pretrained):
        return pretrained
    return None


def checkpoint_keys(path):
    """Parameter names in a checkpoint file without reading its tensors (safetensors header / torch mmap)."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    else:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
        keys = list(sd.keys())
    return [k[len("module."):] if k.startswith("module.") else k for k in keys]


def load_openclip_checkpoint(model, path, strict=True):
    """OpenCLIP's own loader (format conversion, pos-embed resize) into `model`."""
    return oc_factory.load_checkpoint(model, path, strict=strict)


def load_state_dict(path):
    """OpenCLIP's state-dict reader: handles safetensors, {'state_dict': ...} and 'module.' prefixes."""
    return oc_factory.load_state_dict(path, weights_only=False)


# --- the factory wrapper --------------------------------------------------------------------------------------

_original = {}


@contextlib.contextmanager
def _factory_builds(model_class):
    """Within the block, OpenCLIP's factory instantiates `model_class` where it would build a CLIP."""
    saved = oc_factory.CLIP
    oc_factory.CLIP = model_class
    try:
        yield
    finally:
        oc_factory.CLIP = saved


def _check_supported(model_name, cfg, force_custom_text):
    if cfg.get("custom_text") or force_custom_text or "hf_model_name" in cfg.get("text_cfg", {}) \
            or "multimodal_cfg" in cfg:
        raise ValueError(f"{model_name}: 3T supports OpenCLIP's built-in text tower only; remove custom_text, "
                         f"hf_model_name and multimodal_cfg from its config")


def _create_model(model_name, pretrained=None, *args, **kwargs):
    """`open_clip.create_model`, building a `ThreeTowersCLIP` for configs with a three_towers section."""
    if three_towers_config(model_name) is None:
        return _original["create_model"](model_name, pretrained, *args, **kwargs)
    from .model import HEAD_KEYS, ThreeTowersCLIP, is_three_towers_key

    call = inspect.signature(_original["create_model"]).bind(model_name, pretrained, *args, **kwargs)
    call.apply_defaults()
    opts = dict(call.arguments)
    model_kwargs = opts.pop("model_kwargs")
    _check_supported(model_name, model_config(model_name), opts["force_custom_text"])

    checkpoint = checkpoint_path_for(model_name, pretrained) if opts["load_weights"] else None
    clip_init = None  # a plain CLIP checkpoint that initialises f and g only
    if checkpoint is not None:
        keys = checkpoint_keys(checkpoint)
        if not any(k.startswith(HEAD_KEYS) for k in keys):
            clip_init, opts["load_weights"], opts["require_pretrained"] = checkpoint, False, False
        elif "third_tower" not in model_kwargs and model_kwargs.get("third_tower_weights") is None:
            # A full 3T checkpoint carries h's weights when it was trained with h online: never fetch them again.
            has_h = any(k.startswith("third_tower.") for k in keys)
            model_kwargs["third_tower"] = "random" if has_h else False

    with _factory_builds(ThreeTowersCLIP):
        model = _original["create_model"](**opts, **model_kwargs)

    if clip_init is not None:
        result = load_openclip_checkpoint(model, clip_init, strict=False)
        foreign = list(result.unexpected_keys) + [k for k in result.missing_keys if not is_three_towers_key(k)]
        if foreign:
            raise ValueError(f"checkpoint {clip_init} does not fit {model_name}: mismatched keys {foreign[:5]}; "
                             f"pass a checkpoint of the same CLIP architecture")
    if model.third_tower is not None and opts["precision"] in ("fp16", "bf16", "pure_fp16", "pure_bf16"):
        # OpenCLIP's low-precision conversion touches only some layer types: cast h as a whole.
        model.third_tower.to(torch.float16 if "fp16" in opts["precision"] else torch.bfloat16)
    return model


def _create_loss(args):
    """`open_clip.create_loss`, returning a `ThreeTowersLoss` for 3T models."""
    if three_towers_config(args.model) is None:
        return _original["create_loss"](args)
    from .loss import create_loss
    return create_loss(args)


def register():
    """Register the 3T configs and wrap OpenCLIP's factory. Idempotent (re-import, importlib.reload)."""
    check_openclip_version()
    if CONFIG_DIR not in oc_factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)
    installed = getattr(oc_factory.create_model, "_open_clip_3t_original", None)
    if installed is not None:  # already wrapped (perhaps by an earlier copy of this module)
        _original.update(installed)
        return
    _original["create_model"] = oc_factory.create_model
    _original["create_loss"] = oc_factory.create_loss
    _create_model._open_clip_3t_original = _original
    # OpenCLIP re-exports these by value, and open_clip_train.main imports them by name: patch every binding.
    for module in (oc_factory, open_clip):
        module.create_model = _create_model
        module.create_loss = _create_loss
    if "open_clip_train.main" in sys.modules:
        sys.modules["open_clip_train.main"].create_loss = _create_loss
