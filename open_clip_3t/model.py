"""Three Towers (3T): an OpenCLIP model (towers f and g) + K frozen pretrained towers h_1..h_K, each with four heads,
and a temperature (and, for SigLIP, a bias) per loss term.

    L_3T = 1/(1 + 2K) * ( L(f, g) + sum_k [ L(f_hk, hk_f) + L(g_hk, hk_g) ] )       (see loss.py)

K = 1 is the paper's 3T: 1/3 * (L(f, g) + L(f_h, h_f) + L(g_h, h_g)). `ThreeTowers` adds all of that to either
OpenCLIP class: `ThreeTowersCLIP` (OpenCLIP's `CLIP`, built-in text tower) and `ThreeTowersCustomTextCLIP`
(`CustomTextCLIP`: custom and Hugging Face text towers, the SigLIP configs). f and g keep that class's module and
state-dict names, so filtering a 3T checkpoint to f, g, `logit_scale` (and `logit_bias`) gives that class's plain
checkpoint. In eval mode the model *is* the plain one: the towers h and the heads never run.

Names: the tower called N in the config is the module `N_tower`, with heads `f_N`, `N_f`, `g_N`, `N_g` and
temperatures `logit_scale_image_N`, `logit_scale_text_N`. The single tower of a section without a tower list is
called "third" and keeps the paper's head names f_h, h_f, g_h, h_g: its keys are those 3T has always had.
"""
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from .loss import loss_terms, model_outputs, transfer_terms
from .config import DEFAULT_TOWER, ThreeTowersSection, by_tower
from .third_tower import ThirdTower

_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3


class TowerKeys(NamedTuple):
    """The attribute (= state-dict) names of one frozen tower h and its four heads."""
    tower: str
    f_h: str  # f -> the space shared with h
    h_f: str  # h -> the space shared with f
    g_h: str  # g -> the space shared with h
    h_g: str  # h -> the space shared with g


def tower_keys(name: str) -> TowerKeys:
    h = "h" if name == DEFAULT_TOWER else name
    return TowerKeys(f"{name}_tower", f"f_{h}", f"{h}_f", f"g_{h}", f"{h}_g")


def transfer_heads(towers) -> dict:
    """{transfer term name: the two heads it trains}, for every tower."""
    heads = {}
    for name in towers:
        keys, (image, text) = tower_keys(name), transfer_terms(name)
        heads.update({image.name: (keys.f_h, keys.h_f), text.name: (keys.g_h, keys.h_g)})
    return heads


def three_towers_names(towers) -> set:
    """Every top-level attribute 3T adds for these towers: the towers, their heads, temperatures and biases."""
    terms = loss_terms(towers)[1:]
    return {*(key for name in towers for key in tower_keys(name)), *(t.scale for t in terms), *(t.bias for t in terms)}


def towers_in(keys) -> list:
    """The tower names of a 3T state dict, from its keys (every tower has an image-term temperature); [] for a
    plain OpenCLIP state dict."""
    prefix = "logit_scale_image_"
    return [key[len(prefix):] for key in keys if key.startswith(prefix)]


def checkpoint_layout(keys):
    """(the towers whose weights a 3T state dict holds, the type of its heads: "linear" or "mlp") from its keys;
    (None, None) for a plain OpenCLIP state dict. A tower trained from a cache has heads but no weights."""
    keys = list(keys)
    names = towers_in(keys)
    if not names:
        return None, None
    held = [n for n in names if any(k.startswith(tower_keys(n).tower + ".") for k in keys)]
    f_h = tower_keys(names[0]).f_h + "."  # every tower's heads have the same type
    return held, "mlp" if any(k.startswith(f_h + "0.") for k in keys) else "linear"


def make_head(in_dim: int, out_dim: int, head_type: str = "linear") -> nn.Module:
    if head_type == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def apply_head(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """head(x) in the head's dtype: under --precision fp16/bf16 f and g may be half while the heads stay fp32 (see
    _openclip), and h's embedding may come from a cache in fp16."""
    return head(x.to(next(head.parameters()).dtype))


class ThreeTowers:
    """Mixin that trains an OpenCLIP model (the class after it in the bases) with K frozen pretrained image towers.

    third_tower: True builds every tower with its pretrained weights, "random" builds them without reading weights
    (they come from a full 3T checkpoint), False builds none (training from cached embeddings, evaluation, export);
    or {name: one of these} per tower. third_tower_weights: a local weights file for the only tower, or
    {name: file}.
    """

    def __init__(self, embed_dim: int, vision_cfg, text_cfg, three_towers: dict, third_tower=True,
                 third_tower_weights=None, init_logit_scale: float = np.log(1 / 0.07),
                 init_logit_bias: Optional[float] = None, **model_kwargs):
        cfg = ThreeTowersSection.from_dict(three_towers)
        cfg = cfg.replace(weights=by_tower(third_tower_weights, cfg.names, "third_tower_weights"))
        build = by_tower(third_tower, cfg.names, "third_tower")
        # The towers are checked first: a bad name or weights file fails before f and g are built.
        towers = {t.name: None if build[t.name] is False else ThirdTower(t, load_weights=build[t.name] != "random")
                  for t in cfg.towers}
        super().__init__(embed_dim, vision_cfg, text_cfg, init_logit_scale=init_logit_scale,
                         init_logit_bias=init_logit_bias, **model_kwargs)
        self.three_towers_cfg = cfg
        self.tower_names = tuple(cfg.names)
        self.loss_terms = loss_terms(self.tower_names)
        head_dim = cfg.head_dim or embed_dim
        for t in cfg.towers:
            keys = tower_keys(t.name)
            setattr(self, keys.tower, towers[t.name])  # stays in eval mode through model.train() (ThirdTower.train)
            setattr(self, keys.f_h, make_head(embed_dim, head_dim, cfg.head_type))
            setattr(self, keys.h_f, make_head(t.embed_dim, head_dim, cfg.head_type))
            setattr(self, keys.g_h, make_head(embed_dim, head_dim, cfg.head_type))
            setattr(self, keys.h_g, make_head(t.embed_dim, head_dim, cfg.head_type))
        # Each transfer term gets a learnable temperature, and under SigLIP (init_logit_bias set) a learnable bias,
        # initialised as the base class initialises its own.
        for term in self.loss_terms[1:]:
            setattr(self, term.scale, nn.Parameter(torch.full_like(self.logit_scale, init_logit_scale)))
            if self.logit_bias is not None:
                setattr(self, term.bias, nn.Parameter(torch.full_like(self.logit_bias, init_logit_bias)))

    @property
    def third_towers(self) -> dict:
        """{tower name: its frozen module, or None where the model was built without it}."""
        return {name: getattr(self, tower_keys(name).tower) for name in self.tower_names}

    def heads(self, tower: str):
        """The heads f_h, h_f, g_h, h_g of the tower called `tower`."""
        keys = tower_keys(tower)
        return tuple(getattr(self, k) for k in (keys.f_h, keys.h_f, keys.g_h, keys.h_g))

    def clamp_logit_scales_(self, max_scale: float = np.log(100)):
        """Clamp every term's temperature to [0, ln 100] in place, as OpenCLIP does after each step."""
        with torch.no_grad():
            for term in self.loss_terms:
                getattr(self, term.scale).clamp_(0, max_scale)

    def _f_normalisation(self, device):
        """f's mean/std as [1, 3, 1, 1] tensors, made once per device (the factory sets them after __init__).
        Under torch.compile they are graph constants: caching them there would make dynamo recompile the step."""
        pp = getattr(self.visual, "preprocess_cfg", {})
        key = (tuple(pp.get("mean", OPENAI_DATASET_MEAN)), tuple(pp.get("std", OPENAI_DATASET_STD)), device)
        if _is_compiling():
            return tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in key[:2])
        if getattr(self, "_f_norm_key", None) != key:
            self._f_norm = tuple(torch.tensor(v, device=device).view(1, 3, 1, 1) for v in key[:2])
            self._f_norm_key = key
        return self._f_norm

    def encode_third(self, image: torch.Tensor, tower: Optional[str] = None) -> torch.Tensor:
        """The pre-logits embedding by the tower called `tower` (default: the only one) of a batch preprocessed
        for f."""
        name = self.three_towers_cfg.tower(tower).name
        h = self.third_towers[name]
        if h is None:
            raise RuntimeError(f"this 3T model was built without its third tower {name!r} (third_tower=False): "
                               f"pass precomputed embeddings as third_embeddings=...")
        mean, std = self._f_normalisation(image.device)
        return h(h.from_f_input(image, mean, std))

    def third_embeddings(self, image: torch.Tensor, given=None) -> dict:
        """{tower name: embedding of the batch}: taken from `given` ({name: tensor}, or one tensor for a model with
        one tower), computed online for the towers it leaves out."""
        if given is not None and not isinstance(given, dict):
            given = {self.three_towers_cfg.tower().name: given}
        given = by_tower(given or {}, self.tower_names, "third_embeddings")
        return {name: self.encode_third(image, name) if h is None else h for name, h in given.items()}

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                third_embeddings=None):
        if not self.training or image is None or text is None:
            return super().forward(image, text)  # the plain model: no tower h is ever run

        # The towers run first: they keep no activations, so their transient memory is freed before f and g hold
        # theirs for the backward. Run after them, it would stack on top of them and raise the step's peak.
        h = self.third_embeddings(image, third_embeddings)
        f = self.encode_image(image)
        g = self.encode_text(text)
        out = {
            "image_features": F.normalize(f, dim=-1),
            "text_features": F.normalize(g, dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        for name in self.tower_names:
            (f_h, h_f, g_h, h_g), (image_term, text_term) = self.heads(name), transfer_terms(name)
            out[image_term.a] = F.normalize(apply_head(f_h, f), dim=-1)
            out[image_term.b] = F.normalize(apply_head(h_f, h[name]), dim=-1)
            out[text_term.a] = F.normalize(apply_head(g_h, g), dim=-1)
            out[text_term.b] = F.normalize(apply_head(h_g, h[name]), dim=-1)
        out.update({term.scale: getattr(self, term.scale).exp() for term in self.loss_terms[1:]})
        if self.logit_bias is not None:
            out.update({term.bias: getattr(self, term.bias) for term in self.loss_terms})
        return out if self.output_dict else tuple(out[k] for k in model_outputs(self.tower_names) if k in out)


class ThreeTowersCLIP(ThreeTowers, CLIP):
    """3T on OpenCLIP's `CLIP` (built-in text tower at the top level: `transformer.`, `token_embedding.`, ...)."""


class ThreeTowersCustomTextCLIP(ThreeTowers, CustomTextCLIP):
    """3T on OpenCLIP's `CustomTextCLIP` (text tower under `text.`: custom or Hugging Face; every SigLIP config)."""


def is_three_towers_key(key: str, towers=(DEFAULT_TOWER,)) -> bool:
    """Whether a state-dict key belongs to 3T (a tower, a head, a transfer temperature or bias) for these towers."""
    return key.split(".")[0] in three_towers_names(towers)


def clip_state_dict(state_dict: dict) -> dict:
    """The plain-OpenCLIP part of a 3T state dict (any number of towers): f, g, `logit_scale` (and `logit_bias`)."""
    names = three_towers_names(towers_in(state_dict))
    return {k: v for k, v in state_dict.items() if k.split(".")[0] not in names}
