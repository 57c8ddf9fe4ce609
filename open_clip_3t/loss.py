"""The 3T loss: the mean of three contrastive losses, each with its own temperature (and bias, under SigLIP).

    L_3T = w1/3 * L(f, g) + w2/3 * L(f_h, h_f) + w3/3 * L(g_h, h_g)

L(a, b) is the symmetric CLIP loss (`ThreeTowersLoss`, built on OpenCLIP's ClipLoss)
    L(a, b) = 1/2 * ( CE(s * a b^T, I) + CE(s * b a^T, I) )
or the sigmoid loss (`ThreeTowersSigLipLoss`, OpenCLIP's SigLipLoss, `--siglip`)
    L(a, b) = -1/B * sum_ij logsigmoid(z_ij * (s * a_i . b_j + bias)),   z_ij = 1 if i == j else -1.
The two transfer terms may instead be the paper's L2 ablation, |a - b|^2 averaged over the batch.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, SigLipLoss
from torch import nn

try:
    import torch.distributed as dist
    import torch.distributed.nn
except ImportError:  # pragma: no cover - torch without distributed support
    dist = None


class Term(NamedTuple):
    """One loss term: the two model outputs it compares, and the names of its temperature and bias (each both a
    model parameter, holding the log-temperature / the bias, and a model output, holding the temperature / bias)."""
    name: str
    a: str
    b: str
    scale: str
    bias: str


TERMS = (  # L(f, g) keeps OpenCLIP's own names, so it is exactly CLIP's (or SigLIP's) loss
    Term("contrastive_loss", "image_features", "text_features", "logit_scale", "logit_bias"),
    Term("image_third_loss", "image_third_features", "third_image_features",
         "logit_scale_image_third", "logit_bias_image_third"),
    Term("text_third_loss", "text_third_features", "third_text_features",
         "logit_scale_text_third", "logit_bias_text_third"),
)
TRANSFERS = ("contrastive", "l2")
# The model's training outputs in the order of its tuple output (OpenCLIP's default output_dict=False): the first
# nine, or all twelve for a model with init_logit_bias (SigLIP).
MODEL_OUTPUTS = ("image_features", "text_features", "logit_scale", "image_third_features", "third_image_features",
                 "text_third_features", "third_text_features", *(term.scale for term in TERMS[1:]),
                 *(term.bias for term in TERMS))


def l2_loss(a, b):
    """The paper's L2-transfer ablation: regress one embedding on the other."""
    return (a - b).pow(2).sum(dim=1).mean()


class _ThreeTerms(nn.Module):
    """The weighted mean of the terms; subclasses say how one contrastive pair is scored (`pair_losses`)."""

    def __init__(self, weights=(1.0, 1.0, 1.0), transfer="contrastive", **kwargs):
        if len(weights) != len(TERMS):
            raise ValueError(f"weights={weights!r}: give three loss weights, for L(f,g), L(f_h,h_f), L(g_h,h_g)")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer={transfer!r}: use 'contrastive' or 'l2'")
        super().__init__(**kwargs)
        self.weights = tuple(float(w) for w in weights)
        self.transfer = transfer

    def forward(self, *model_tuple, output_dict=False, **model_out):
        """`loss(**model(images, texts))` for a model built with output_dict=True (as OpenCLIP's trainer builds it),
        or `loss(*model(images, texts))` for OpenCLIP's default tuple output, as with OpenCLIP's own losses."""
        if model_tuple:
            if len(model_tuple) not in (len(MODEL_OUTPUTS) - len(TERMS), len(MODEL_OUTPUTS)) or model_out:
                raise TypeError(f"{type(self).__name__} got {len(model_tuple)} positional values: pass the model's "
                                f"whole output, loss(*model(images, texts)), or its dict, loss(**model(images, texts))")
            model_out = dict(zip(MODEL_OUTPUTS, model_tuple))
        terms = [(term, w) for term, w in zip(TERMS, self.weights) if w]  # weight 0 drops a term
        l2 = {term.name for term, _ in terms if self.transfer == "l2" and term is not TERMS[0]}
        pairs = self.pair_losses([term for term, _ in terms if term.name not in l2], model_out)
        losses = {term.name: w * (l2_loss(model_out[term.a], model_out[term.b]) if term.name in l2
                                  else pairs[term.name]) / len(TERMS)
                  for term, w in terms}
        return losses if output_dict else sum(losses.values())


def gather_packed(features, local_loss=False, gather_with_grad=False, rank=0, world_size=1):
    """All-gather a list of [B, d_i] tensors in one collective, with OpenCLIP's gather_features semantics:
    with gather_with_grad the gradient flows through every rank's slice; without it only the local slice
    keeps its gradient (unless local_loss, where the gathered copies are used only as negatives)."""
    widths = [f.shape[1] for f in features]
    dtype = features[0].dtype
    for f in features[1:]:
        dtype = torch.promote_types(dtype, f.dtype)
    packed = torch.cat([f.to(dtype) for f in features], dim=1)
    if gather_with_grad:
        everyone = torch.cat(torch.distributed.nn.all_gather(packed), dim=0)
    else:
        parts = [torch.empty_like(packed) for _ in range(world_size)]
        dist.all_gather(parts, packed)
        if not local_loss:
            parts[rank] = packed
        everyone = torch.cat(parts, dim=0)
    return list(everyone.split(widths, dim=1))


class ThreeTowersLoss(_ThreeTerms, ClipLoss):
    """3T with the softmax CLIP loss; the feature sets of every contrastive term are gathered in one collective."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 weights=(1.0, 1.0, 1.0), transfer="contrastive", use_horovod=False):
        if use_horovod:
            raise ValueError("ThreeTowersLoss does not support Horovod: use torchrun / SLURM with torch.distributed")
        super().__init__(weights, transfer, local_loss=local_loss, gather_with_grad=gather_with_grad,
                         cache_labels=cache_labels, rank=rank, world_size=world_size)

    def clip_loss(self, a, b, all_a, all_b, scale):
        """Symmetric CLIP loss of one pair; all_a/all_b are the gathered features (a, b when world_size == 1)."""
        if self.world_size > 1 and self.local_loss:
            logits_a, logits_b = scale * a @ all_b.T, scale * b @ all_a.T
        else:
            logits_a = scale * all_a @ all_b.T
            logits_b = logits_a.T
        labels = self.get_ground_truth(a.device, logits_a.shape[0])
        return (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2

    def pair_losses(self, terms, model_out):
        local = [x for term in terms for x in (model_out[term.a], model_out[term.b])]
        everyone = local
        if self.world_size > 1 and terms:
            everyone = gather_packed(local, self.local_loss, self.gather_with_grad, self.rank, self.world_size)
        return {term.name: self.clip_loss(*local[2 * i:2 * i + 2], *everyone[2 * i:2 * i + 2], model_out[term.scale])
                for i, term in enumerate(terms)}


class ThreeTowersSigLipLoss(_ThreeTerms):
    """3T with the sigmoid loss: each term is OpenCLIP's SigLipLoss with that term's own temperature and bias, so
    every `--loss-dist-impl` (bidir, shift, reduce, gather) exchanges features exactly as for plain SigLIP."""

    def __init__(self, rank=0, world_size=1, dist_impl=None, weights=(1.0, 1.0, 1.0), transfer="contrastive"):
        super().__init__(weights, transfer)
        self.siglip = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)

    def pair_losses(self, terms, model_out):
        missing = [term.bias for term in terms if term.bias not in model_out]
        if missing:
            raise ValueError(f"the sigmoid 3T loss needs the model outputs {missing}: give the model config "
                             f"init_logit_bias (as OpenCLIP's SigLIP configs do)")
        return {term.name: self.siglip(model_out[term.a], model_out[term.b], model_out[term.scale],
                                       model_out[term.bias])
                for term in terms}
