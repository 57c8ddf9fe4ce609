"""Three Towers (3T): OpenCLIP's CLIP (towers f and g) + a frozen third tower h + four heads + two temperatures.

    L_3T = 1/3 * ( L(f, g) + L(f_h, h_f) + L(g_h, h_g) )          (see loss.py)

f and g keep OpenCLIP's module and state-dict names, so filtering a 3T checkpoint to f, g and `logit_scale`
gives a plain CLIP checkpoint. In eval mode the model *is* a CLIP: h and the heads are never run.
"""
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from open_clip.model import CLIP
from torch import nn

from .third_tower import ThirdTower, ThreeTowersCfg

# State-dict prefixes of everything that is not the plain CLIP (dropped at export).
THREE_TOWERS_KEYS = ("third_tower.", "f_h.", "g_h.", "h_f.", "h_g.",
                     "logit_scale_image_third", "logit_scale_text_third")
HEAD_KEYS = THREE_TOWERS_KEYS[1:]


def make_head(in_dim: int, out_dim: int, head_type: str = "linear") -> nn.Module:
    if head_type == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class ThreeTowersCLIP(CLIP):
    """A CLIP trained with a third, frozen, pretrained image tower h.

    third_tower: True builds h with its pretrained weights, "random" builds it without reading weights (they come
    from a full 3T checkpoint), False does not build it (training from cached h embeddings, evaluation, export).
    """

    def __init__(self, embed_dim: int, vision_cfg, text_cfg, three_towers: dict, third_tower=True,
                 third_tower_weights: Optional[str] = None, init_logit_scale: float = np.log(1 / 0.07), **clip_kwargs):
        if clip_kwargs.get("init_logit_bias") is not None:
            raise ValueError("3T uses the softmax CLIP loss: remove init_logit_bias from the model config")
        cfg = ThreeTowersCfg.from_dict(three_towers)
        if third_tower_weights is not None:
            cfg.weights = third_tower_weights
        # h is checked first: a bad name or weights file fails before f and g are built.
        h = ThirdTower(cfg, load_weights=third_tower != "random") if third_tower is not False else None
        super().__init__(embed_dim, vision_cfg, text_cfg, init_logit_scale=init_logit_scale, **clip_kwargs)
        self.three_towers_cfg = cfg
        self.third_tower = h  # stays in eval mode through model.train() (see ThirdTower.train)

        head_dim = cfg.head_dim or embed_dim
        self.f_h = make_head(embed_dim, head_dim, cfg.head_type)      # f -> space shared with h
        self.h_f = make_head(cfg.embed_dim, head_dim, cfg.head_type)  # h -> space shared with f
        self.g_h = make_head(embed_dim, head_dim, cfg.head_type)      # g -> space shared with h
        self.h_g = make_head(cfg.embed_dim, head_dim, cfg.head_type)  # h -> space shared with g
        # One learnable temperature per loss term; L(f, g) uses CLIP's own `logit_scale`.
        self.logit_scale_image_third = nn.Parameter(torch.full_like(self.logit_scale, init_logit_scale))
        self.logit_scale_text_third = nn.Parameter(torch.full_like(self.logit_scale, init_logit_scale))

    def clamp_logit_scales_(self, max_scale: float = np.log(100)):
        """Clamp all three temperatures to [0, ln 100] in place, as OpenCLIP does after each step."""
        with torch.no_grad():
            for p in (self.logit_scale, self.logit_scale_image_third, self.logit_scale_text_third):
                p.clamp_(0, max_scale)

    def _f_normalisation(self, device):
        """f's mean/std as [1, 3, 1, 1] tensors, made once per device (the factory sets them after __init__)."""
        pp = getattr(self.visual, "preprocess_cfg", {})
        key = (tuple(pp.get("mean", OPENAI_DATASET_MEAN)), tuple(pp.get("std", OPENAI_DATASET_STD)), device)
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
            return super().forward(image, text)  # plain CLIP: h is never run

        # h runs first: it keeps no activations, so its transient memory is freed before f and g hold theirs for
        # the backward. Run after them, it would stack on top of them and raise the step's peak.
        h = self.encode_third(image) if third_embeddings is None else third_embeddings
        f = self.encode_image(image)
        g = self.encode_text(text)
        h = h.to(f.dtype)
        out = {
            "image_features": F.normalize(f, dim=-1),
            "text_features": F.normalize(g, dim=-1),
            "logit_scale": self.logit_scale.exp(),
            "image_third_features": F.normalize(self.f_h(f), dim=-1),
            "third_image_features": F.normalize(self.h_f(h), dim=-1),
            "text_third_features": F.normalize(self.g_h(g), dim=-1),
            "third_text_features": F.normalize(self.h_g(h), dim=-1),
            "logit_scale_image_third": self.logit_scale_image_third.exp(),
            "logit_scale_text_third": self.logit_scale_text_third.exp(),
        }
        return out if self.output_dict else tuple(out.values())


def is_three_towers_key(key: str) -> bool:
    return key.startswith(THREE_TOWERS_KEYS)


def clip_state_dict(state_dict: dict) -> dict:
    """The plain-CLIP part of a 3T state dict: f, g and `logit_scale`."""
    return {k: v for k, v in state_dict.items() if not is_three_towers_key(k)}
