"""Every touch of `open_clip` internals the library makes lives here. Written against open_clip_torch 3.3.

OpenCLIP 3.3 has no plugin hook: `open_clip.factory.create_model` hard-codes the model class and passes every config
key to its constructor. So `register` replaces `create_model` and `create_loss` (keeping their names, signatures and
docstrings) with the 3T-aware versions of open_clip_3t/factory.py, which let OpenCLIP build a 3T model as usual with
its `CLIP` and `CustomTextCLIP` classes swapped for our subclasses for the duration of that call. The trainer's seams
(open_clip_train) live in training/_open_clip_train.py: the library never imports open_clip_train.
"""
import contextlib
import functools
import json
import logging
import sys
from pathlib import Path

import open_clip
import open_clip.factory as oc_factory
from open_clip.model import CLIP, CustomTextCLIP

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

class ModelConfigError(ValueError):
    """A local-dir: model config that cannot be read: the message is one line naming the file and the fix."""


def _check_local_config(path):
    """Refuse (ModelConfigError) a local-dir: folder's open_clip_config.json that OpenCLIP could not read, or would
    read as a config of nothing (json.load and config['model_cfg'] fail with lines that name no file)."""
    fix = "copy it again from where it came from (for an exported model: export it again)"
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError) as e:
        raise ModelConfigError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:100]}): it is cut short or "
                               f"damaged; {fix}") from None
    cfg = config.get("model_cfg", config) if isinstance(config, dict) else None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), dict) for k in ("vision_cfg", "text_cfg")):
        raise ModelConfigError(f"{path} is not an OpenCLIP model config (no model_cfg with vision_cfg and text_cfg): "
                               f"{fix}")


def read_model_config(model_name):
    """The full model config (OpenCLIP schema + three_towers section) of a registered name or local-dir:, or None
    (hf-hub: names are not fetched: a released 3T model is a plain CLIP). A local-dir: config that cannot be read
    raises ModelConfigError."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    if schema == "hf-hub" or schema == "local-dir" and not (Path(identifier) / "open_clip_config.json").is_file():
        return None
    if schema == "local-dir":
        _check_local_config(Path(identifier) / "open_clip_config.json")
    return oc_factory.get_model_config(model_name if schema else model_name.replace("/", "-"))


def read_three_towers_section(model_name):
    """The `three_towers` section of a model's config, or None if it has none. Read by two callers only: the
    factory hook (is this a 3T model?) and open_clip_3t/plan.py (everything else)."""
    cfg = read_model_config(model_name)
    return None if cfg is None else cfg.get(SECTION)


def model_exists(model_name):
    """Whether OpenCLIP knows `model_name`: a registered config, or a local-dir: folder with its config (hf-hub:
    names are taken on trust: checking one needs the network)."""
    return oc_factory.parse_model_name(model_name)[0] == "hf-hub" or read_model_config(model_name) is not None


def checkpoint_path_for(model_name, pretrained):
    """The file OpenCLIP would load full weights from, if it is a local file (None for hub tags)."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    if schema == "local-dir":
        return oc_factory._find_checkpoint_in_dir(Path(identifier))
    if pretrained and Path(pretrained).is_file():
        return pretrained
    return None


def load_openclip_checkpoint(model, path, strict=True):
    """OpenCLIP's own loader (format conversion, pos-embed resize) into `model`."""
    return oc_factory.load_checkpoint(model, path, strict=strict)


def load_state_dict(path):
    """OpenCLIP's state-dict reader: handles safetensors, {'state_dict': ...} and 'module.' prefixes."""
    return oc_factory.load_state_dict(path, weights_only=False)


@contextlib.contextmanager
def reading_shapes_only(meta_state_dict):
    """Within the block, OpenCLIP's checkpoint reader (`open_clip.factory.load_state_dict`, which its
    `load_checkpoint` calls) returns `meta_state_dict(path)` (meta tensors): a model built on the meta device then
    goes through OpenCLIP's whole loading path (format conversions, position-embedding resizing, the final
    `load_state_dict`) and fails where a real load would, without reading tensor data."""
    original = oc_factory.load_state_dict
    oc_factory.load_state_dict = lambda path, *args, **kwargs: meta_state_dict(path)
    try:
        yield
    finally:
        oc_factory.load_state_dict = original


def openclip_model_class(cfg, force_custom_text=False):
    """The class OpenCLIP 3.3's factory builds for a model config (its rule, in create_model)."""
    if cfg.get("custom_text") or force_custom_text or "hf_model_name" in cfg.get("text_cfg", {}):
        return open_clip.CoCa if "multimodal_cfg" in cfg else CustomTextCLIP
    return CLIP


# --- building 3T models in OpenCLIP's factory ---------------------------------------------------------------------

@contextlib.contextmanager
def factory_builds(classes):
    """Within the block, OpenCLIP's factory instantiates classes[name] where it would build its class `name`
    ("CLIP", "CustomTextCLIP")."""
    saved = {name: getattr(oc_factory, name) for name in classes}
    for name, cls in classes.items():
        setattr(oc_factory, name, cls)
    try:
        yield
    finally:
        for name, cls in saved.items():
            setattr(oc_factory, name, cls)


@contextlib.contextmanager
def hide_no_weights_warning(active):
    """OpenCLIP warns 'No pretrained weights loaded' when we load the checkpoint ourselves: drop that one line."""
    def keep(record):
        return not record.getMessage().startswith("No pretrained weights loaded")
    root = logging.getLogger()
    if active:
        root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


ORIGINAL = {}  # OpenCLIP's own create_model and create_loss, once register() ran


def _wrapper(replacement, original):
    """`replacement` under `original`'s name, signature and docstring (`__wrapped__` is OpenCLIP's function)."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return replacement(*args, **kwargs)
    return wrapper


def register(create_model, create_loss):
    """Register the 3T configs and put `create_model` / `create_loss` (which call ORIGINAL's for models they do not
    change) in place of OpenCLIP's, under OpenCLIP's names, signatures and docstrings. Idempotent (re-import,
    importlib.reload)."""
    check_openclip_version()
    if CONFIG_DIR not in oc_factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)
    installed = getattr(oc_factory.create_model, "_open_clip_3t_original", None)
    if installed is not None:  # already wrapped (perhaps by an earlier copy of this module)
        ORIGINAL.update(installed)
        return
    ORIGINAL.update(create_model=oc_factory.create_model, create_loss=oc_factory.create_loss)
    wrapped_model = _wrapper(create_model, ORIGINAL["create_model"])
    wrapped_loss = _wrapper(create_loss, ORIGINAL["create_loss"])
    wrapped_model._open_clip_3t_original = dict(ORIGINAL)
    # OpenCLIP re-exports these by value, and open_clip_train.main imports them by name: patch every binding.
    for module in (oc_factory, open_clip, sys.modules.get("open_clip_train.main")):
        if module is not None:
            module.create_model, module.create_loss = wrapped_model, wrapped_loss
