"""Every touch of `open_clip` internals the library makes lives here. Written against open_clip_torch 3.3.

OpenCLIP 3.3 has no plugin hook: `open_clip.factory.create_model` hard-codes the model class and passes every config
key to its constructor. So `register` replaces `create_model` and `create_loss` (keeping their names, signatures and
docstrings) with the 3T-aware versions of open_clip_3t/factory.py, which let OpenCLIP build a 3T model as usual with
its `CLIP` and `CustomTextCLIP` classes swapped for our subclasses for the duration of that call. The trainer's seams
(open_clip_train) live in training/_open_clip_train.py: the library never imports open_clip_train.

`register` also puts `get_tokenizer` and `create_model` behind the rule of docs/untrusted_models.md: code that comes
with a model (a config's `tokenizer_kwargs.trust_remote_code`, an `auto_map` in a tokenizer's or a Hugging Face text
tower's files) is refused in one line unless the caller trusts it (`trust_remote_code=True`, or a command's
--trust-remote-code, which sets `trusting_remote_code` for the run).
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

from .trust import TRUST_FIX, RemoteCodeError, refused, remote_code_trusted, trusting_remote_code  # noqa: F401

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


def config_source(model_name):
    """The file a model's config comes from, as errors name it."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    if schema == "local-dir":
        return str(Path(identifier) / "open_clip_config.json")
    if schema == "hf-hub":
        return f"open_clip_config.json of hf-hub:{identifier}"
    name = identifier.replace("/", "-")
    found = [p for base in oc_factory._MODEL_CONFIG_PATHS
             for p in ([Path(base)] if Path(base).is_file() else Path(base).glob("*.json")) if p.stem == name]
    return str(found[-1]) if found else f"the config of {model_name}"


# timm.create_model keywords that read weights from somewhere: a tower's weights come only through its `weights`
# key (or --third-tower-weights), which is loaded strictly and hashed by the cache.
TIMM_WEIGHT_KEYS = ("pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


def _check_timm_kwargs(section, model_name):
    towers = section.get("towers") if isinstance(section, dict) else None
    listed = [(f"towers[{i}].", t) for i, t in enumerate(towers)] if isinstance(towers, list) else [("", section)]
    for where, tower in listed:
        kwargs = tower.get("timm_kwargs") if isinstance(tower, dict) else None
        found = [k for k in TIMM_WEIGHT_KEYS if k in (kwargs if isinstance(kwargs, dict) else {})]
        if found:
            raise ValueError(f"{config_source(model_name)}: {SECTION}.{where}timm_kwargs.{found[0]} would have timm "
                             f"read the tower's weights around its strictly checked `weights` key: remove it and name "
                             f"the weights file with `weights` (or --third-tower-weights)")


def read_three_towers_section(model_name):
    """The `three_towers` section of a model's config, or None if it has none. Read by two callers only: the
    factory hook (is this a 3T model?) and open_clip_3t/plan.py (everything else). A section whose timm_kwargs
    would load weights around the tower's `weights` key is refused (ValueError, one line)."""
    cfg = read_model_config(model_name)
    section = None if cfg is None else cfg.get(SECTION)
    if section is not None:
        _check_timm_kwargs(section, model_name)
    return section


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


def model_weights_file(model_name, cache_dir=None):
    """The full-model weights file OpenCLIP's create_model loads for a local-dir: or hf-hub: name (for hf-hub:, the
    file it fetches into the Hugging Face cache, after the config: FileNotFoundError if that cannot be had), or None."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    if schema == "local-dir":
        return checkpoint_path_for(model_name, None)
    if schema == "hf-hub":
        fetch_hub_config(model_name, cache_dir)
        try:
            return oc_factory.download_pretrained_from_hf(identifier, cache_dir=cache_dir)
        except Exception:  # not reachable: OpenCLIP says so when it loads the model
            return None
    return None


def load_state_dict(path):
    """OpenCLIP's state-dict reader: handles safetensors, {'state_dict': ...} and 'module.' prefixes. Never
    unpickles code (weights_only=True)."""
    return oc_factory.load_state_dict(path, weights_only=True)


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


# --- code that comes with a model (the rule is in trust.py) --------------------------------------------------

class _AutoWithTrust:
    """transformers' AutoConfig / AutoModel as open_clip.hf_model calls them, with trust_remote_code decided here
    (OpenCLIP 3.3 passes none: transformers then asks on a terminal, for 15 s, whether to run a repo's code)."""

    def __init__(self, auto, trusted):
        self.auto, self.trusted = auto, trusted

    def __getattr__(self, name):
        return getattr(self.auto, name)

    def _load(self, method, source, *args, **kwargs):
        kwargs["trust_remote_code"] = self.trusted
        try:
            return getattr(self.auto, method)(source, *args, **kwargs)
        except ValueError as e:
            refusal = None if self.trusted else refused(e, "the Hugging Face text tower (text_cfg.hf_model_name)",
                                                        getattr(source, "_name_or_path", source), "config.json")
            if refusal is None:
                raise
            raise refusal from None

    def from_pretrained(self, source, *args, **kwargs):
        return self._load("from_pretrained", source, *args, **kwargs)

    def from_config(self, config, *args, **kwargs):
        return self._load("from_config", config, *args, **kwargs)


@contextlib.contextmanager
def hf_text_tower_trust(trusted):
    """Within the block, OpenCLIP's Hugging Face text towers (open_clip.hf_model) load with trust_remote_code=
    `trusted`."""
    hf_model = sys.modules.get("open_clip.hf_model")
    if hf_model is None or getattr(hf_model, "transformers", None) is None:  # no transformers: no HF tower
        yield
        return
    saved = hf_model.AutoConfig, hf_model.AutoModel
    hf_model.AutoConfig, hf_model.AutoModel = (_AutoWithTrust(getattr(a, "auto", a), trusted) for a in saved)
    try:
        yield
    finally:
        hf_model.AutoConfig, hf_model.AutoModel = saved


def fetch_hub_config(model_name, cache_dir=None):
    """The model_cfg of an hf-hub: name (its open_clip_config.json, fetched or from the Hugging Face cache);
    FileNotFoundError (one line) when it cannot be had."""
    identifier = oc_factory.parse_model_name(model_name)[1]
    try:
        cfg = oc_factory._get_hf_config(identifier, cache_dir=cache_dir)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise FileNotFoundError(f"{model_name}: cannot fetch its open_clip_config.json ({type(e).__name__}: {first}): "
                                f"check the id, the network, or HF_HUB_OFFLINE and the Hugging Face cache") from None
    return cfg.get("model_cfg", cfg)


def _tokenizer_cfg(model_name, cache_dir=None):
    """(text_cfg, the Hugging Face tokenizer OpenCLIP 3.3's get_tokenizer would load, or None): its rules."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    try:
        if schema == "local-dir":
            cfg = json.loads((Path(identifier) / "open_clip_config.json").read_text())["model_cfg"]
        elif schema == "hf-hub":
            cfg = fetch_hub_config(model_name, cache_dir)
        else:
            cfg = oc_factory.get_model_config(identifier) or {}
    except FileNotFoundError:
        cfg = {} if schema != "hf-hub" else None
    except (OSError, ValueError, KeyError, TypeError):  # OpenCLIP says what is wrong with it
        cfg = {}
    if cfg is None:  # an hf-hub: repo without a config: OpenCLIP reads the repo itself as a tokenizer
        return {}, identifier
    text_cfg = cfg.get("text_cfg") if isinstance(cfg, dict) and isinstance(cfg.get("text_cfg"), dict) else {}
    if not text_cfg.get("hf_tokenizer_name"):
        return text_cfg, None
    return text_cfg, identifier if schema == "local-dir" else text_cfg["hf_tokenizer_name"]


def get_tokenizer(model_name="", context_length=None, cache_dir=None, **kwargs):
    """`open_clip.get_tokenizer` that never runs code that comes with the model unless trusted: a config's
    text_cfg.tokenizer_kwargs.trust_remote_code is refused, and a Hugging Face tokenizer loads with
    trust_remote_code=False (an auto_map in its files refused in one line). trust_remote_code=True: OpenCLIP's."""
    explicit = kwargs.get("trust_remote_code")
    if explicit is True:
        return ORIGINAL["get_tokenizer"](model_name, context_length, cache_dir, **kwargs)
    trusted = remote_code_trusted(explicit)
    text_cfg, tokenizer = _tokenizer_cfg(model_name, cache_dir)
    config_kwargs = text_cfg.get("tokenizer_kwargs")
    if not trusted and isinstance(config_kwargs, dict) and config_kwargs.get("trust_remote_code"):
        raise RemoteCodeError(f"{config_source(model_name)}: text_cfg.tokenizer_kwargs.trust_remote_code asks to run "
                              f"code that comes with the model's tokenizer: refused; {TRUST_FIX}")
    if tokenizer is None:  # not a Hugging Face tokenizer: nothing that loads code (nor takes trust_remote_code)
        kwargs.pop("trust_remote_code", None)
        return ORIGINAL["get_tokenizer"](model_name, context_length, cache_dir, **kwargs)
    kwargs["trust_remote_code"] = trusted
    try:
        return ORIGINAL["get_tokenizer"](model_name, context_length, cache_dir, **kwargs)
    except ValueError as e:
        refusal = None if trusted else refused(e, "the tokenizer", tokenizer, "tokenizer_config.json")
        if refusal is None:
            raise
        raise refusal from None


def _create_model_with_trust(create_model):
    """`create_model` taking trust_remote_code= (OpenCLIP 3.3 would pass it to the model's constructor): its
    Hugging Face text tower loads with that trust (default: the run's, False)."""
    def guarded(*args, trust_remote_code=None, **kwargs):
        with hf_text_tower_trust(remote_code_trusted(trust_remote_code)):
            return create_model(*args, **kwargs)
    return guarded


def check_remote_code(model_name, trusted=None, cache_dir=None):
    """Before any model is built: RemoteCodeError (one line) if loading `model_name`'s tokenizer or Hugging Face
    text tower would run code that comes with it, which the loads themselves would refuse later (`trusted`: default
    the run's). Cheap: the tokenizer and the tower's config.json, never weights; any other failure is left for those
    loads to report."""
    if remote_code_trusted(trusted):
        return
    text_cfg, tokenizer = _tokenizer_cfg(model_name, cache_dir)
    tower = text_cfg.get("hf_model_name")
    loads = [lambda: get_tokenizer(model_name, cache_dir=cache_dir, trust_remote_code=False)] \
        if tokenizer or text_cfg.get("tokenizer_kwargs") else []
    if tower:
        auto = sys.modules["open_clip.hf_model"].AutoConfig
        auto = getattr(auto, "auto", auto)  # transformers' own, also inside hf_text_tower_trust
        loads.append(lambda: _AutoWithTrust(auto, False).from_pretrained(tower, cache_dir=cache_dir))
    for load in loads:
        try:
            load()
        except RemoteCodeError:
            raise
        except Exception:
            pass


ORIGINAL = {}  # OpenCLIP's own create_model, create_loss and get_tokenizer, once register() ran


def _wrapper(replacement, original):
    """`replacement` under `original`'s name, signature and docstring (`__wrapped__` is OpenCLIP's function)."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        return replacement(*args, **kwargs)
    return wrapper


def register(create_model, create_loss):
    """Register the 3T configs and put `create_model` / `create_loss` (which call ORIGINAL's for models they do not
    change) and `get_tokenizer` (above) in place of OpenCLIP's, under OpenCLIP's names, signatures and docstrings;
    `create_model` also takes trust_remote_code=. Idempotent (re-import, importlib.reload)."""
    check_openclip_version()
    if CONFIG_DIR not in oc_factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(CONFIG_DIR)
    installed = getattr(oc_factory.create_model, "_open_clip_3t_original", None)
    if installed is not None:  # already wrapped (perhaps by an earlier copy of this module)
        ORIGINAL.update(installed)
        return
    ORIGINAL.update(create_model=oc_factory.create_model, create_loss=oc_factory.create_loss,
                    get_tokenizer=oc_factory.get_tokenizer)
    wrapped = {"create_model": _wrapper(_create_model_with_trust(create_model), ORIGINAL["create_model"]),
               "create_loss": _wrapper(create_loss, ORIGINAL["create_loss"]),
               "get_tokenizer": _wrapper(get_tokenizer, ORIGINAL["get_tokenizer"])}
    wrapped["create_model"]._open_clip_3t_original = dict(ORIGINAL)
    # OpenCLIP re-exports these by value, and open_clip_train imports them by name: patch every binding.
    for module in (oc_factory, open_clip, sys.modules.get("open_clip_train.main"),
                   sys.modules.get("open_clip_train.zero_shot")):
        for name, function in wrapped.items():
            if module is not None and hasattr(module, name):
                setattr(module, name, function)
