"""The third tower h: a frozen pretrained timm image model, read at its pre-logits embedding."""
import contextlib
import logging
import os
import re
import warnings
from dataclasses import dataclass, field, fields
from typing import List, Optional, Sequence

import timm
import timm.models._builder as timm_builder
import torch
import torch.nn.functional as F
from torch import nn

from .loss import loss_terms


DEFAULT_TOWER = "third"  # the name of the tower of a single-tower section: 3T's names as they always were
TOWER_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")


@dataclass
class ThirdTowerCfg:
    """One frozen tower h of a `three_towers` section: its timm model, weights and preprocessing, and its name."""
    timm_model_name: str                     # e.g. "vit_base_patch16_224.augreg_in21k"
    embed_dim: int                           # width of h's pre-logits embedding (the input of heads h_f, h_g)
    name: str = DEFAULT_TOWER                # keys its heads, temperatures, loss terms, log lines and cache
    timm_model_pretrained: bool = True       # load h's weights from timm's hub (ignored when `weights` is set)
    weights: Optional[str] = None            # local weights file for h (timm's pretrained_cfg_overlay file door)
    image_size: Optional[int] = None         # h's input size; default: timm's pretrained_cfg
    mean: Optional[Sequence[float]] = None   # h's normalisation; default: timm's pretrained_cfg
    std: Optional[Sequence[float]] = None
    interpolation: Optional[str] = None      # "bicubic" / "bilinear"; default: timm's pretrained_cfg
    crop_pct: Optional[float] = None         # h's eval center crop (used by the cache); default: timm's
    timm_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. {"img_size": 32}


@dataclass
class ThreeTowersCfg:
    """The `three_towers` section of a 3T model config: K frozen towers, either listed (`"towers": [{"name": ...,
    <ThirdTowerCfg fields>}, ...]`) or, for K = 1, given by the ThirdTowerCfg fields in the section itself (then
    named "third"); plus what every tower shares: the heads and the loss."""
    towers: List[ThirdTowerCfg]
    head_type: str = "linear"                # "linear" or "mlp" for every tower's heads f_h, g_h, h_f, h_g
    head_dim: Optional[int] = None           # width of each tower's two shared spaces; default: the CLIP embed_dim
    loss_weights: Optional[Sequence[float]] = None  # one per term, L(f,g) then L(f_h,h_f), L(g_h,h_g) of each tower
    transfer: str = "contrastive"            # "contrastive" or "l2" for the transfer terms

    @property
    def names(self):
        return [tower.name for tower in self.towers]

    def tower(self, name=None):
        """The tower called `name`; without a name, the only one."""
        if name is None and len(self.towers) == 1:
            return self.towers[0]
        found = [t for t in self.towers if t.name == name]
        if not found:
            which = "name one" if name is None else f"there is no tower {name!r}"
            raise ValueError(f"this 3T model has the third towers {self.names}: {which} of them")
        return found[0]

    @classmethod
    def from_dict(cls, d):
        d = dict(d)
        shared = {f.name for f in fields(cls)} - {"towers"}
        per_tower = {f.name for f in fields(ThirdTowerCfg)}
        if "towers" in d:
            inline = sorted(set(d) & per_tower)
            if inline:
                raise ValueError(f"three_towers section lists its towers and also has the tower key(s) {inline}: "
                                 f"move them into each entry of three_towers.towers")
            towers = d.pop("towers")
            if not isinstance(towers, list) or not towers:
                raise ValueError("three_towers.towers must be a non-empty list of towers, each with a name")
        else:
            towers = [{k: d.pop(k) for k in list(d) if k in per_tower}]
        unknown = sorted(set(d) - shared) + sorted({k for t in towers for k in t} - per_tower)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the three_towers config section: valid keys are "
                             f"{sorted(shared)} and, per tower, {sorted(per_tower)}")
        if len(towers) > 1 and any("name" not in t for t in towers):
            raise ValueError("three_towers.towers: give every tower a short name (e.g. \"name\": \"in21k\"); it keys "
                             "the tower's heads, temperatures, loss terms, log lines and cache")
        lacking = [t.get("name", DEFAULT_TOWER) for t in towers if not {"timm_model_name", "embed_dim"} <= set(t)]
        if lacking:
            raise ValueError(f"three_towers: tower {lacking[0]!r} needs timm_model_name and embed_dim")
        cfg = cls(towers=[ThirdTowerCfg(**t) for t in towers], **d)
        names = cfg.names
        bad = [n for n in names if not isinstance(n, str) or not TOWER_NAME.fullmatch(n)]
        if bad:
            raise ValueError(f"three_towers: tower name {bad[0]!r} is not a short name: use 1-16 lower-case letters "
                             f"and digits, starting with a letter (e.g. in21k)")
        if set(names) & {"f", "g", "h"}:  # a tower h called f, g or h would share its heads' names with another's
            raise ValueError(f"three_towers: a tower may not be called {sorted(set(names) & {'f', 'g', 'h'})[0]!r} (the "
                             f"heads of a tower N are f_N, N_f, g_N, N_g): give it another name")
        if len(set(names)) != len(names):
            raise ValueError(f"three_towers: the tower names {names} repeat: give each tower its own name")
        if cfg.head_type not in ("linear", "mlp"):
            raise ValueError(f"three_towers.head_type={cfg.head_type!r}: use 'linear' or 'mlp'")
        if cfg.transfer not in ("contrastive", "l2"):
            raise ValueError(f"three_towers.transfer={cfg.transfer!r}: use 'contrastive' or 'l2'")
        n_terms = 1 + 2 * len(names)
        if cfg.loss_weights is None:
            cfg.loss_weights = [1.0] * n_terms
        elif len(cfg.loss_weights) != n_terms:
            raise ValueError(f"three_towers.loss_weights has {len(cfg.loss_weights)} values: give {n_terms}, one "
                             f"per term: {', '.join(term.name for term in loss_terms(names))}")
        return cfg


def parse_named(words, names, flag):
    """{tower name: value} from command-line words NAME=VALUE (a single bare VALUE names the only tower); a dict
    passes through. Raises ValueError (one line) on a name that is not a tower or a tower named twice."""
    if isinstance(words, dict):
        return {name: value for name, value in by_tower(words, names, flag).items() if value is not None}
    words = [words] if isinstance(words, str) else list(words)
    found = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not (sep and TOWER_NAME.fullmatch(name)):
            if len(words) > 1 or len(names) > 1:
                raise ValueError(f"{flag} {word}: this model has the third towers {names}: write NAME=VALUE for each")
            name, value = names[0], word
        if name not in names:
            raise ValueError(f"{flag} {word}: {name!r} is not a third tower of this model, which has {names}")
        if name in found:
            raise ValueError(f"{flag}: tower {name} is given twice; give each tower once")
        found[name] = value
    return found


def by_tower(value, names, what):
    """`value` for each tower: a {name: value} dict (towers it leaves out get None), or one value that applies to
    the only tower (or, for True/False/"random", to every tower)."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what}: {unknown} are not third towers of this model, which has {names}")
        return {n: value.get(n) for n in names}
    if value is None or isinstance(value, bool) or value == "random" or len(names) == 1:
        return {n: value for n in names}
    raise ValueError(f"{what}={value!r}: this model has the third towers {names}: give {{name: value}} for them")


def check_timm_model(cfg: ThirdTowerCfg):
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

    def __init__(self, cfg: ThirdTowerCfg, load_weights: bool = True):
        super().__init__()
        check_timm_model(cfg)
        pretrained = load_weights and (cfg.weights is not None or cfg.timm_model_pretrained)
        self.model = create_timm_model(cfg.timm_model_name, cfg.weights, pretrained, "third-tower weights",
                                       **cfg.timm_kwargs)
        self.model.requires_grad_(False)
        self.model.eval()

        width = getattr(self.model, "head_hidden_size", self.model.num_features)
        if width != cfg.embed_dim:
            where = "three_towers.embed_dim" if cfg.name == DEFAULT_TOWER else f"the embed_dim of tower {cfg.name}"
            raise ValueError(f"third tower {cfg.timm_model_name} has a {width}-d pre-logits embedding but "
                             f"{where} is {cfg.embed_dim}: set embed_dim to {width}")

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
