"""The third tower h: a frozen pretrained timm image model, read at its pre-logits embedding."""
import contextlib
import logging
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence

import timm
import timm.models._builder as timm_builder
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ThreeTowersCfg:
    """The `three_towers` section of a 3T model config."""
    timm_model_name: str                     # e.g. "vit_base_patch16_224.augreg_in21k"
    embed_dim: int                           # width of h's pre-logits embedding (the input of heads h_f, h_g)
    timm_model_pretrained: bool = True       # load h's weights from timm's hub (ignored when `weights` is set)
    weights: Optional[str] = None            # local weights file for h (timm's pretrained_cfg_overlay file door)
    image_size: Optional[int] = None         # h's input size; default: timm's pretrained_cfg
    mean: Optional[Sequence[float]] = None   # h's normalisation; default: timm's pretrained_cfg
    std: Optional[Sequence[float]] = None
    interpolation: Optional[str] = None      # "bicubic" / "bilinear"; default: timm's pretrained_cfg
    crop_pct: Optional[float] = None         # h's eval center crop (used by the cache); default: timm's
    timm_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. {"img_size": 32}
    head_type: str = "linear"                # "linear" or "mlp" for f_h, g_h, h_f, h_g
    head_dim: Optional[int] = None           # width of the two shared 3T spaces; default: the CLIP embed_dim
    loss_weights: Sequence[float] = (1.0, 1.0, 1.0)  # L(f,g), L(f_h,h_f), L(g_h,h_g)
    transfer: str = "contrastive"            # "contrastive" or "l2" for the two transfer terms

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the three_towers config section: valid keys are {sorted(known)}")
        cfg = cls(**d)
        if cfg.head_type not in ("linear", "mlp"):
            raise ValueError(f"three_towers.head_type={cfg.head_type!r}: use 'linear' or 'mlp'")
        if cfg.transfer not in ("contrastive", "l2"):
            raise ValueError(f"three_towers.transfer={cfg.transfer!r}: use 'contrastive' or 'l2'")
        return cfg


def check_timm_model(cfg: ThreeTowersCfg):
    """Fail fast, before any weights are read, on a bad third-tower name or weights file."""
    arch = cfg.timm_model_name.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"third tower {cfg.timm_model_name!r} is not a timm model: pick a name from "
                         f"timm.list_models() (e.g. 'vit_base_patch16_224.augreg_in21k')")
    if cfg.weights is not None and not os.path.isfile(cfg.weights):
        raise FileNotFoundError(f"third-tower weights file {cfg.weights!r} does not exist: pass an existing file "
                                f"(three_towers.weights in the config, or third_tower_weights=...)")


class WeightsError(ValueError):
    """Pretrained weights that cannot be read or do not fill the model: the message is one line naming the fix."""


def error_line(error):
    """'Type: first sentence' of an exception raised while reading a weights or checkpoint file."""
    text = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
    if "weights_only" in text:  # torch's advice to unpickle unsafely is never the fix for a bad weights file
        text = "not a file that torch.load or safetensors can read"
    return f"{type(error).__name__}: {text[:200]}"


@contextlib.contextmanager
def _recording_timm_loads(records, what, source, name):
    """Within the block, timm's pretrained-weights load (timm 1.0: `timm.models._builder.load_pretrained`, which
    loads with strict=False once the classifier is dropped) appends the keys it could not match to `records`;
    a file it cannot read or load becomes a one-line WeightsError."""
    original = getattr(timm_builder, "load_pretrained", None)
    if original is None:
        raise ImportError(f"timm {timm.__version__} has no timm.models._builder.load_pretrained: open_clip_3t's strict "
                          f"weight check was written for timm 1.0")

    def load_pretrained(model, *args, **kwargs):
        hook = model.register_load_state_dict_post_hook(lambda module, keys: records.append(keys))
        try:
            return original(model, *args, **kwargs)
        except Exception as e:
            lines = str(e).strip().splitlines()
            if lines and lines[0].startswith("Error(s) in loading state_dict"):  # a shape that does not fit
                raise WeightsError(f"{what} {source} do not fit timm's {name} ({lines[1].strip()[:300]}): pass "
                                   f"weights of that model, saved from timm.create_model('{name}', ...)") from None
            raise WeightsError(f"{what} {source} cannot be read ({error_line(e)}): pass a state dict saved with "
                               f"torch.save(model.state_dict(), FILE) or a .safetensors file") from None
        finally:
            hook.remove()

    timm_builder.load_pretrained = load_pretrained
    quiet = logging.getLogger(timm_builder.__name__)  # its "Missing/Unexpected keys" lines: we report them ourselves
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        timm_builder.load_pretrained = original
        quiet.setLevel(level)


def create_timm_model(name, weights=None, pretrained=True, what="weights", **kwargs):
    """`timm.create_model(name, num_classes=0, **kwargs)` with pretrained weights (the local file `weights` through
    timm's `pretrained_cfg_overlay` door, else timm's hub), loaded strictly: every parameter and buffer of the model
    comes from the weights, or WeightsError (one line). timm itself would keep random weights with a log line."""
    source = weights if weights else f"(timm's hub weights of {name})"
    records = []
    overlay = dict(file=weights) if weights else None
    with _recording_timm_loads(records, what, source, name):
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)
    if pretrained and records:  # no record: a custom loader (e.g. .npz) that loads every weight or raises
        missing, unexpected = list(records[-1].missing_keys), list(records[-1].unexpected_keys)
        if missing or unexpected:
            total = len(model.state_dict())
            extra = f"; {len(unexpected)} tensors of the file are not in the model (e.g. {unexpected[:3]})" \
                if unexpected else ""
            raise WeightsError(f"{what} {source} do not fit timm's {name}: {len(missing)} of its {total} weights are "
                               f"not in the file (e.g. {missing[:3]}){extra}; pass weights of that model, saved from "
                               f"timm.create_model('{name}', ...)")
    return model


def on_meta_device(build):
    """Run `build()` (which reads weights files) with the model on the meta device: the checks of a strict load,
    without memory or compute for the model. A failure there is confirmed on the CPU, since a timm checkpoint
    filter may create tensors that cannot be mixed with meta ones."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op"
            build()
    except WeightsError:
        build()


class ThirdTower(nn.Module):
    """h: frozen, always in eval mode, fed through its own preprocessing, output = pre-logits embedding."""

    def __init__(self, cfg: ThreeTowersCfg, load_weights: bool = True):
        super().__init__()
        check_timm_model(cfg)
        pretrained = load_weights and (cfg.weights is not None or cfg.timm_model_pretrained)
        self.model = create_timm_model(cfg.timm_model_name, cfg.weights, pretrained, "third-tower weights",
                                       **cfg.timm_kwargs)
        self.model.requires_grad_(False)
        self.model.eval()

        width = getattr(self.model, "head_hidden_size", self.model.num_features)
        if width != cfg.embed_dim:
            raise ValueError(f"third tower {cfg.timm_model_name} has a {width}-d pre-logits embedding but "
                             f"three_towers.embed_dim is {cfg.embed_dim}: set embed_dim to {width}")

        # timm's pretrained_cfg is not updated when img_size is overridden: the config's size wins.
        data_cfg = timm.data.resolve_model_data_config(self.model)
        size = cfg.image_size or data_cfg["input_size"][-1]
        self.image_size = (size, size)
        self.interpolation = cfg.interpolation or data_cfg.get("interpolation", "bicubic")
        self.crop_pct = cfg.crop_pct if cfg.crop_pct is not None else data_cfg.get("crop_pct", 1.0)
        self.mean = tuple(cfg.mean or data_cfg["mean"])
        self.std = tuple(cfg.std or data_cfg["std"])
        self.register_buffer("_mean", torch.tensor(self.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(self.std).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # h is frozen: dropout, batch-norm statistics etc. stay in eval mode

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pre-logits embedding of images already preprocessed for h (see `from_f_input`, `eval_transform`)."""
        x = pixels.to(next(self.model.parameters()).dtype)
        # A ViT's pre-logits token is a view into its last [batch, tokens, width] state: copy it out so that
        # holding the embedding through the step does not keep all the tokens alive.
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True).contiguous()

    @torch.no_grad()
    def from_f_input(self, image: torch.Tensor, f_mean: torch.Tensor, f_std: torch.Tensor) -> torch.Tensor:
        """Turn f's normalised batch into h's input: undo f's mean/std, resize to h's size, apply h's mean/std."""
        x = image.float() * f_std + f_mean  # resize in fp32: antialiased bicubic has no half CPU kernel
        if tuple(x.shape[-2:]) != self.image_size:
            mode = self.interpolation if self.interpolation in ("bilinear", "bicubic") else "bilinear"
            x = F.interpolate(x, size=self.image_size, mode=mode, antialias=True, align_corners=False)
        return (x - self._mean) / self._std

    def eval_transform(self, normalize: bool = True):
        """h's own deterministic eval preprocessing of a PIL image (resize, center crop, normalise). With
        normalize=False it stops at uint8 pixels, a quarter of the bytes to move to the device, where `normalize`
        finishes it (timm's prefetcher split)."""
        return timm.data.create_transform(
            input_size=(3, *self.image_size), interpolation=self.interpolation, mean=self.mean, std=self.std,
            crop_pct=self.crop_pct, is_training=False, normalize=normalize)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels of `eval_transform(normalize=False)` -> h's input, in fp32 on the pixels' device: the
        operations of torchvision's ToTensor and Normalize, so the result is bit-identical to eval_transform()."""
        return pixels.float().div(255).sub(self._mean).div(self._std)
