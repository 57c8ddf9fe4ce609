"""Three Towers (3T): an OpenCLIP model (towers f and g) + a frozen third tower h + four heads + a temperature
(and, for SigLIP, a bias) per loss term.

    L_3T = 1/3 * ( L(f, g) + L(f_h, h_f) + L(g_h, h_g) )          (see loss.py)

`ThreeTowers` adds all of that to either OpenCLIP class: `ThreeTowersCLIP` (OpenCLIP's `CLIP`, built-in text tower)
and `ThreeTowersCustomTextCLIP` (`CustomTextCLIP`: custom and Hugging Face text towers, the SigLIP configs).
f and g keep that class's module and state-dict names, so filtering a 3T checkpoint to f, g, `logit_scale` (and
`logit_bias`) gives that class's plain checkpoint. In eval mode the model *is* the plain one: h and the heads never run.
"""
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP, CustomTextCLIP
from torch import nn

from .loss import MODEL_OUTPUTS, TERMS
from .third_tower import ThirdTower, ThreeTowersCfg

HEADS = ("f_h", "h_f", "g_h", "h_g")
# The temperatures and biases of the transfer terms (L(f, g) uses the base class's own `logit_scale`/`logit_bias`).
TRANSFER_TEMPERATURES_AND_BIASES = tuple(name for term in TERMS[1:] for name in (term.scale, term.bias))
# State-dict prefixes of everything that is not the plain OpenCLIP model (dropped at export).
HEAD_KEYS = tuple(f"{name}." for name in HEADS) + TRANSFER_TEMPERATURES_AND_BIASES
THREE_TOWERS_KEYS = ("third_tower.",) + HEAD_KEYS
_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # torch >= 2.3


def make_head(in_dim: int, out_dim: int, head_type: str = "linear") -> nn.Module:
    if head_type == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def apply_head(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """head(x) in the head's dtype: under --precision fp16/bf16 f and g may be half while the heads stay fp32 (see
    _openclip), and h's embedding may come from a cache in fp16."""
    return head(x.to(next(head.parameters()).dtype))


class ThreeTowers:
    """Mixin that trains an OpenCLIP model (the class after it in the bases) with a third, frozen, pretrained image
    tower h.

    third_tower: True builds h with its pretrained weights, "random" builds it without reading weights (they come
    from a full 3T checkpoint), False does not build it (training from cached h embeddings, evaluation, export).
    """

    def __init__(self, embed_dim: int, vision_cfg, text_cfg, three_towers: dict, third_tower=True,
                 third_tower_weights: Optional[str] = None, init_logit_scale: float = np.log(1 / 0.07),
                 init_logit_bias: Optional[float] = None, **model_kwargs):
        cfg = ThreeTowersCfg.from_dict(three_towers)
        if third_tower_weights is not None:
            cfg.weights = third_tower_weights
        # h is checked first: a bad name or weights file fails before f and g are built.
        h = ThirdTower(cfg, load_weights=third_tower != "random") if third_tower is not False else None
        super().__init__(embed_dim, vision_cfg, text_cfg, init_logit_scale=init_logit_scale,
                         init_logit_bias=init_logit_bias, **model_kwargs)
        self.three_towers_cfg = cfg
        self.third_tower = h  # stays in eval mode through model.train() (see ThirdTower.train)

        head_dim = cfg.head_dim or embed_dim
        self.f_h = make_head(embed_dim, head_dim, cfg.head_type)      # f -> space shared with h
        self.h_f = make_head(cfg.embed_dim, head_dim, cfg.head_type)  # h -> space shared with f
        self.g_h = make_head(embed_dim, head_dim, cfg.head_type)      # g -> space shared with h
        self.h_g = make_head(cfg.embed_dim, head_dim, cfg.head_type)  # h -> space shared with g
        # Each transfer term gets a learnable temperature, and under SigLIP (init_logit_bias set) a learnable bias,
        # initialised as the base class initialises its own.
        for term in TERMS[1:]:
            setattr(self, term.scale, nn.Parameter(torch.full_like(self.logit_scale, init_logit_scale)))
            if self.logit_bias is not None:
                setattr(self, term.bias, nn.Parameter(torch.full_like(self.logit_bias, init_logit_bias)))

    def clamp_logit_scales_(self, max_scale: float = np.log(100)):
        """Clamp every term's temperature to [0, ln 100] in place, as OpenCLIP does after each step."""
        with torch.no_grad():
            for term in TERMS:
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

    def encode_third(self, image: torch.Tensor) -> torch.Tensor:
        """h's pre-logits embedding of a batch preprocessed for f."""
        if self.third_tower is None:
            raise RuntimeError("this 3T model was built without its third tower (third_tower=False): "
                               "pass precomputed embeddings as third_embeddings=...")
        mean, std = self._f_normalisation(image.device)
        return self.third_tower(self.third_tower.from_f_input(image, mean, std))

    def forward(self, image: Optional[torch.Tensor] = None, text: Optional[torch.Tensor] = None,
                third_embeddings: Optional[torch.Tensor] = None):
        if not self.training or image is None or text is None:
            return super().forward(image, text)  # the plain model: h is never run

        # h runs first: it keeps no activations, so its transient memory is freed before f and g hold theirs for
        # the backward. Run after them, it would stack on top of them and raise the step's peak.
        h = self.encode_third(image) if third_embeddings is None else third_embeddings
        f = self.encode_image(image)
        g = self.encode_text(text)
        out = {
            "image_features": F.normalize(f, dim=-1),
            "text_features": F.normalize(g, dim=-1),
            "logit_scale": self.logit_scale.exp(),
            "image_third_features": F.normalize(apply_head(self.f_h, f), dim=-1),
            "third_image_features": F.normalize(apply_head(self.h_f, h), dim=-1),
            "text_third_features": F.normalize(apply_head(self.g_h, g), dim=-1),
            "third_text_features": F.normalize(apply_head(self.h_g, h), dim=-1),
        }
        out.update({term.scale: getattr(self, term.scale).exp() for term in TERMS[1:]})
        if self.logit_bias is not None:
            out.update({term.bias: getattr(self, term.bias) for term in TERMS})
        return out if self.output_dict else tuple(out[key] for key in MODEL_OUTPUTS if key in out)


class ThreeTowersCLIP(ThreeTowers, CLIP):
    """3T on OpenCLIP's `CLIP` (built-in text tower at the top level: `transformer.`, `token_embedding.`, ...)."""


class ThreeTowersCustomTextCLIP(ThreeTowers, CustomTextCLIP):
    """3T on OpenCLIP's `CustomTextCLIP` (text tower under `text.`: custom or Hugging Face; every SigLIP config)."""


def is_three_towers_key(key: str) -> bool:
    return key.startswith(THREE_TOWERS_KEYS)


def clip_state_dict(state_dict: dict) -> dict:
    """The plain-OpenCLIP part of a 3T state dict: f, g, `logit_scale` (and `logit_bias`)."""
    return {k: v for k, v in state_dict.items() if not is_three_towers_key(k)}
