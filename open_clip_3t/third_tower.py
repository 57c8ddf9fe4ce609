"""The third tower h: a frozen pretrained timm image model, read at its pre-logits embedding through its own
preprocessing."""
import os

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .config import DEFAULT_TOWER, ThirdTowerCfg
from .weights import create_timm_model


def check_timm_model(cfg: ThirdTowerCfg):
    """Fail fast, before any weights are read, on a bad third-tower name or weights file."""
    arch = cfg.timm_model_name.split(".")[0]
    if not timm.is_model(arch):
        raise ValueError(f"third tower {cfg.timm_model_name!r} is not a timm model: pick a name from "
                         f"timm.list_models() (e.g. 'vit_base_patch16_224.augreg_in21k')")
    if cfg.weights is not None and not os.path.isfile(cfg.weights):
        raise FileNotFoundError(f"third-tower weights file {cfg.weights!r} does not exist: pass an existing file "
                                f"(three_towers.weights in the config, or third_tower_weights=...)")


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
