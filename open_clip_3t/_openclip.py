"""Every touch of OpenCLIP internals lives here. Written against open_clip_torch 3.3.

OpenCLIP 3.3 has no plugin hook: `open_clip.factory.create_model` hard-codes the model class and passes every
config key to its constructor. So we wrap `create_model` (and `create_loss`): for a config with a
`three_towers` section the wrapper lets OpenCLIP build the model as usual (class choice, precision, device,
preprocess cfg, checkpoint loading, pos-embed resize) with its `CLIP` and `CustomTextCLIP` classes swapped for our
3T subclasses for the duration of that call. Every other model takes OpenCLIP's own path, untouched.
"""
import contextlib
import glob
import inspect
import logging
import os
import sys
from pathlib import Path

import open_clip
import open_clip.factory as oc_factory
import torch
from open_clip.model import CLIP, CustomTextCLIP

from .loss import ThreeTowersLoss, ThreeTowersSigLipLoss
from .model import ThreeTowersCLIP, ThreeTowersCustomTextCLIP, is_three_towers_key, tower_keys, towers_in
from .third_tower import ThreeTowersCfg, by_tower

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


def model_exists(model_name):
    """Whether OpenCLIP knows `model_name`: a registered config, or a local-dir: folder with its config (hf-hub:
    names are taken on trust: checking one needs the network)."""
    schema, identifier = oc_factory.parse_model_name(model_name)
    if schema == "hf-hub":
        return True
    if schema == "local-dir":
        return (Path(identifier) / "open_clip_config.json").is_file()
    return oc_factory.get_model_config(model_name.replace("/", "-")) is not None


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


def checkpoint_unreadable(path):
    """Why torch cannot read the checkpoint file `path` (e.g. truncated by a job that died while writing it, or
    not a checkpoint at all), as one short line; None if it reads. Cheap: a zip checkpoint (torch.save's format) is
    memory-mapped, so its directory and pickle are read, not its tensors; a .safetensors file's header is read."""
    from .third_tower import error_line
    try:
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(str(path), framework="pt"):
                pass
        else:
            with open(path, "rb") as f:
                zipped = f.read(4) == b"PK\x03\x04"
            torch.load(path, map_location="cpu", mmap=zipped, weights_only=True)
    except Exception as e:
        return error_line(e)
    return None


def load_openclip_checkpoint(model, path, strict=True):
    """OpenCLIP's own loader (format conversion, pos-embed resize) into `model`."""
    return oc_factory.load_checkpoint(model, path, strict=strict)


def load_state_dict(path):
    """OpenCLIP's state-dict reader: handles safetensors, {'state_dict': ...} and 'module.' prefixes."""
    return oc_factory.load_state_dict(path, weights_only=False)


# --- the factory wrapper --------------------------------------------------------------------------------------

_original = {}


# OpenCLIP's class -> ours. OpenCLIP picks the class from the config (`custom_text`, an `hf_model_name` text tower,
# `multimodal_cfg` for CoCa); we swap the class it picks, so that choice stays OpenCLIP's.
THREE_TOWERS_CLASSES = {"CLIP": ThreeTowersCLIP, "CustomTextCLIP": ThreeTowersCustomTextCLIP}


@contextlib.contextmanager
def _factory_builds_three_towers():
    """Within the block, OpenCLIP's factory instantiates our 3T subclass where it would build a CLIP or a
    CustomTextCLIP."""
    saved = {name: getattr(oc_factory, name) for name in THREE_TOWERS_CLASSES}
    for name, cls in THREE_TOWERS_CLASSES.items():
        setattr(oc_factory, name, cls)
    try:
        yield
    finally:
        for name, cls in saved.items():
            setattr(oc_factory, name, cls)


def openclip_model_class(cfg, force_custom_text=False):
    """The class OpenCLIP 3.3's factory builds for a model config (its rule, in create_model)."""
    if cfg.get("custom_text") or force_custom_text or "hf_model_name" in cfg.get("text_cfg", {}):
        return open_clip.CoCa if "multimodal_cfg" in cfg else CustomTextCLIP
    return CLIP


@contextlib.contextmanager
def _hide_no_weights_warning(active):
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


def _create_model(model_name, pretrained=None, *args, **kwargs):
    """`open_clip.create_model`, building a 3T model for configs with a three_towers section."""
    if three_towers_config(model_name) is None:
        return _original["create_model"](model_name, pretrained, *args, **kwargs)

    call = inspect.signature(_original["create_model"]).bind(model_name, pretrained, *args, **kwargs)
    call.apply_defaults()
    opts = dict(call.arguments)
    model_kwargs = opts.pop("model_kwargs")
    check_supported(model_name, {**model_config(model_name), **model_kwargs}, opts["force_custom_text"])

    checkpoint = checkpoint_path_for(model_name, pretrained) if opts["load_weights"] else None
    if checkpoint is not None:
        keys = checkpoint_keys(checkpoint)
        towers = towers_in(keys)  # [] for a plain checkpoint of f and g
        if towers:
            # A full 3T checkpoint carries a tower's weights when it was trained with that tower online: never fetch
            # them again; a tower it lacks was trained from a cache and is not built. What the caller asks for a
            # tower (third_tower=..., or weights to build it from) wins.
            names = ThreeTowersCfg.from_dict(model_kwargs.get(SECTION) or three_towers_config(model_name)).names
            asked = by_tower(model_kwargs.get("third_tower"), names, "third_tower")
            weights = by_tower(model_kwargs.get("third_tower_weights"), names, "third_tower_weights")
            held = {name for name in names if any(k.startswith(tower_keys(name).tower + ".") for k in keys)}
            for name in names:
                if asked[name] is None:
                    asked[name] = True if weights[name] else "random" if name in held else False
            model_kwargs["third_tower"] = asked
        # We load the checkpoint ourselves (below), since a strict load cannot take what legitimately differs.
        # OpenCLIP then sees no checkpoint and would fetch f's and g's own pretrained weights (a Hugging Face text
        # tower's, by default): the checkpoint replaces them, so do not read them.
        opts["load_weights"], opts["require_pretrained"] = False, False
        opts["pretrained_text"], opts["pretrained_image"] = False, False

    with _factory_builds_three_towers(), _hide_no_weights_warning(checkpoint is not None):
        model = _original["create_model"](**opts, **model_kwargs)

    if checkpoint is not None:
        result = load_openclip_checkpoint(model, checkpoint, strict=False)
        # A plain checkpoint lacks the heads (they stay new); a 3T checkpoint trained from cached embeddings
        # lacks that tower (built from its own weights); a model built without a tower ignores its weights.
        tower_modules = {tower_keys(name).tower for name in model.tower_names}
        unbuilt = {tower_keys(name).tower for name, h in model.third_towers.items() if h is None}
        missing = [k for k in result.missing_keys if not (is_three_towers_key(k, model.tower_names) and (
            not towers or k.split(".")[0] in tower_modules))]
        unexpected = [k for k in result.unexpected_keys if k.split(".")[0] not in unbuilt]
        if missing or unexpected:
            raise ValueError(f"checkpoint {checkpoint} does not fit {model_name} (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}): pass a 3T checkpoint of this model or a plain checkpoint of its f "
                             f"and g")
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


def create_loss(args):
    """The 3T loss for `python -m training.main` args (OpenCLIP's: --siglip, --loss-dist-impl, --local-loss,
    --gather-with-grad; ours: --three-towers-loss-weights, --three-towers-transfer), over the config's defaults."""
    cfg = ThreeTowersCfg.from_dict(three_towers_config(args.model))
    weights = getattr(args, "three_towers_loss_weights", None) or cfg.loss_weights
    transfer = getattr(args, "three_towers_transfer", None) or cfg.transfer
    common = {"weights": weights, "transfer": transfer, "towers": cfg.names}
    if getattr(args, "horovod", False):
        raise ValueError("3T does not support Horovod: use torchrun / SLURM with torch.distributed")
    if getattr(args, "siglip", False):
        return ThreeTowersSigLipLoss(rank=args.rank, world_size=args.world_size,
                                     dist_impl=getattr(args, "loss_dist_impl", None), **common)
    return ThreeTowersLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                           rank=args.rank, world_size=args.world_size, **common)


def _create_loss(args):
    """`open_clip.create_loss`, returning the 3T loss for 3T models."""
    if three_towers_config(args.model) is None:
        return _original["create_loss"](args)
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


# --- trainer (training/) --------------------------------------------------------------------------------------
# `python -m training.main` runs open_clip_train.main.main (distributed set-up, logging, optimizer, scheduler,
# checkpoints, resume) with a few of its helpers replaced. That function imports its helpers by name, so a
# replacement means rebinding the name in the `open_clip_train.main` module, for the duration of one call.

TRAINER_HELPERS = ("parse_args", "create_model_and_transforms", "get_data", "train_one_epoch", "evaluate", "pt_load",
                   "setup_logging")


def openclip_parse_args(argv):
    """OpenCLIP's own argument parser (every open_clip_train flag, its defaults and lr/beta defaults)."""
    from open_clip_train.params import parse_args
    return parse_args(argv)


def launch_rank():
    """This process's global rank as the launcher (torchrun, srun, mpirun) set it, read as OpenCLIP reads it; usable
    before any process group exists."""
    from open_clip_train.distributed import world_info_from_env
    return world_info_from_env()[1]


def openclip_get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """OpenCLIP's data pipeline: webdataset shards (braceexpand, `::`, resampling), CSV, synthetic, ImageNet."""
    from open_clip_train.data import get_data
    return get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)


def openclip_pt_load(path, map_location=None):
    """OpenCLIP's checkpoint reader for --resume (local files and fsspec URLs)."""
    from open_clip_train.file_utils import pt_load
    return pt_load(path, map_location=map_location)


def openclip_run_checkpoints(checkpoint_dir):
    """(the *.pt files of a run's checkpoints/ folder, newest first in the order OpenCLIP's --resume latest ranks
    them: a natural sort of the names, so epoch_latest.pt, epoch_10.pt, epoch_9.pt; the name --save-most-recent
    writes)."""
    import open_clip_train.main as oc_main
    paths = glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.pt"))
    return sorted(paths, key=oc_main.natural_key, reverse=True), oc_main.LATEST_CHECKPOINT_NAME


def openclip_evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
    from open_clip_train.train import evaluate
    return evaluate(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)


def openclip_setup_logging(log_file, level, include_host=False):
    """OpenCLIP's setup_logging, without its override of every existing logger's level: OpenCLIP 3.3 sets them all
    to `level`, which turns on torch's own INFO loggers (dynamo and fake-tensor statistics printed at exit). Loggers
    left at NOTSET still follow the root logger, as OpenCLIP wants; a library's own setting stays (for torch:
    WARNING, or what TORCH_LOGS asks for)."""
    from open_clip_train.logger import setup_logging
    # A placeholder (a dotted name's parent nobody created yet) becomes a real logger there: it was at NOTSET.
    levels = {name: getattr(lg, "level", logging.NOTSET) for name, lg in logging.root.manager.loggerDict.items()}
    setup_logging(log_file, level, include_host)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def openclip_autocast(precision, device_type):
    from open_clip_train.precision import get_autocast
    return get_autocast(precision, device_type=device_type)


class _DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """OpenCLIP 3.3 passes `device_ids=[device]` even for a CPU model, which torch refuses: drop it on CPU."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


@contextlib.contextmanager
def openclip_trainer(**helpers):
    """Yields open_clip_train.main.main with the named helpers (see TRAINER_HELPERS) replaced by ours."""
    import open_clip_train.main as oc_main
    for name in helpers:
        if name not in TRAINER_HELPERS or not hasattr(oc_main, name):
            raise ImportError(f"open_clip_train.main has no helper {name!r} to replace: this trainer was written "
                              f"for open_clip_torch 3.3 (found {open_clip.__version__})")
    saved = {name: getattr(oc_main, name) for name in helpers}
    saved_ddp = torch.nn.parallel.DistributedDataParallel
    try:
        for name, fn in helpers.items():
            setattr(oc_main, name, fn)
        torch.nn.parallel.DistributedDataParallel = _DistributedDataParallel
        yield oc_main.main
    finally:
        for name, fn in saved.items():
            setattr(oc_main, name, fn)
        torch.nn.parallel.DistributedDataParallel = saved_ddp


# --- third-tower cache (open_clip_3t/cache/, training/cached_data.py) -------------------------------------
# The cache join edits the webdataset pipeline OpenCLIP 3.3's get_wds_dataset builds, instead of copying that
# function: shuffling, resampling, `::` sources, workers and node split all stay OpenCLIP's. We identify stages by
# the functions OpenCLIP and webdataset (<=0.2.86) use, and fail loudly if the pipeline looks different.

def openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
    from open_clip_train.data import get_wds_dataset
    return get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)


def openclip_has_caption_and_image(sample):
    """OpenCLIP's sample filter (open_clip_train.data.filter_no_caption_or_no_image): the samples it trains on."""
    from open_clip_train.data import filter_no_caption_or_no_image
    return filter_no_caption_or_no_image(sample)


def _wds_train_stages(data_info):
    """The stage list of a DataInfo from OpenCLIP's get_wds_dataset(is_train=True), and the index of its tar reader,
    to_tuple and batched stages; fails loudly on a pipeline of another shape."""
    import webdataset as wds
    from open_clip_train.data import tarfile_to_samples_nothrow
    from webdataset.filters import FilterFunction, _batched, _to_tuple

    def fail(what):
        raise RuntimeError(f"OpenCLIP's webdataset pipeline is not the one open_clip_3t's training data stages were "
                           f"written for (open_clip_torch 3.3, webdataset<=0.2.86): {what}; found open_clip_torch "
                           f"{open_clip.__version__}, webdataset {getattr(wds, '__version__', '?')}")

    loader = data_info.dataloader
    if not isinstance(loader, wds.DataPipeline) or not isinstance(loader.pipeline[0], torch.utils.data.DataLoader):
        fail("the train dataloader is not a wds.WebLoader")
    dataset = loader.pipeline[0].dataset
    if not isinstance(dataset, wds.DataPipeline):
        fail("the WebLoader's dataset is not a wds.DataPipeline")
    stages = dataset.pipeline

    def find(what, test):
        found = [i for i, s in enumerate(stages) if test(s)]
        if len(found) != 1:
            fail(f"expected one {what} stage, found {len(found)}")
        return found[0]

    tar = find("tarfile_to_samples_nothrow", lambda s: s is tarfile_to_samples_nothrow)
    to_tuple = find("to_tuple", lambda s: isinstance(s, FilterFunction) and s.f is _to_tuple)
    batched = find("batched", lambda s: isinstance(s, FilterFunction) and s.f is _batched)
    if stages[to_tuple].args[:2] != ("image", "text") or not tar < to_tuple < batched:
        fail("expected to_tuple('image', 'text') between the tar stage and the batched stage")
    return stages, tar, to_tuple, batched


def wds_join_field(data_info, join_stage, fields):
    """Insert `join_stage` (samples -> samples with each of `fields` set) right after the tar-to-samples stage of a
    DataInfo from OpenCLIP's get_wds_dataset(is_train=True), and make batches (image, text, *fields)."""
    import webdataset as wds
    stages, tar, to_tuple, _ = _wds_train_stages(data_info)
    stages[to_tuple] = wds.to_tuple("image", "text", *fields)
    stages.insert(tar + 1, join_stage)
    return data_info


def wds_watch(data_info, urls_stage, samples_stage):
    """Insert `urls_stage` (shard urls -> the same) right before the tar reader and `samples_stage` (samples ->
    the same) right before the batcher of a DataInfo from OpenCLIP's get_wds_dataset(is_train=True). Each data
    worker runs both, once per pass over its shards (a fresh pass each time webdataset's with_epoch repeats)."""
    stages, tar, _, batched = _wds_train_stages(data_info)
    stages.insert(batched, samples_stage)
    stages.insert(tar, urls_stage)
    return data_info


def openclip_is_webdataset(args):
    """Whether OpenCLIP reads args.train_data as webdataset shards (--dataset-type webdataset, or auto and .tar)."""
    from open_clip_train.data import get_dataset_fn, get_wds_dataset
    return get_dataset_fn(args.train_data, args.dataset_type) is get_wds_dataset
