"""The 3T loss: the mean of the contrastive losses of f and g and of each frozen tower's two transfer terms, each
term with its own temperature (and bias, under SigLIP). With K frozen towers h_1..h_K (names k):

    L_3T = 1/(1 + 2K) * ( w_0 L(f, g) + sum_k [ w_k1 L(f_hk, hk_f) + w_k2 L(g_hk, hk_g) ] )

which for K = 1 and unit weights is the paper's 1/3 * (L(f, g) + L(f_h, h_f) + L(g_h, h_g)).
L(a, b) is the symmetric CLIP loss (`ThreeTowersLoss`, built on OpenCLIP's ClipLoss)
    L(a, b) = 1/2 * ( CE(s * a b^T, I) + CE(s * b a^T, I) )
or the sigmoid loss (`ThreeTowersSigLipLoss`, OpenCLIP's SigLipLoss, `--siglip`)
    L(a, b) = -1/B * sum_ij logsigmoid(z_ij * (s * a_i . b_j + bias)),   z_ij = 1 if i == j else -1.
The transfer terms may instead be the paper's L2 ablation, |a - b|^2 averaged over the batch.
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


# L(f, g) keeps OpenCLIP's own names, so it is exactly CLIP's (or SigLIP's) loss.
CONTRASTIVE = Term("contrastive_loss", "image_features", "text_features", "logit_scale", "logit_bias")
DEFAULT_TOWERS = ("third",)  # the single tower of today's configs: its terms are image_third_loss, text_third_loss
TRANSFERS = ("contrastive", "l2")


def transfer_terms(tower):
    """L(f_h, h_f) and L(g_h, h_g) of the frozen tower named `tower`."""
    return tuple(Term(f"{side}_{tower}_loss", f"{side}_{tower}_features", f"{tower}_{side}_features",
                      f"logit_scale_{side}_{tower}", f"logit_bias_{side}_{tower}") for side in ("image", "text"))


def loss_terms(towers=DEFAULT_TOWERS):
    """Every term, in the order of the loss weights: L(f, g), then the two transfer terms of each tower."""
    return (CONTRASTIVE, *(term for tower in towers for term in transfer_terms(tower)))


def model_outputs(towers=DEFAULT_TOWERS):
    """The training outputs of a 3T model in the order of its tuple output (OpenCLIP's default output_dict=False):
    f's and g's features and temperature, each transfer term's two feature sets, the transfer temperatures, then
    (only for a model with init_logit_bias, i.e. SigLIP) every term's bias."""
    terms = loss_terms(towers)
    return ("image_features", "text_features", "logit_scale", *(x for t in terms[1:] for x in (t.a, t.b)),
            *(t.scale for t in terms[1:]), *(t.bias for t in terms))


def l2_loss(a, b):
    """The paper's L2-transfer ablation: regress one embedding on the other."""
    return (a - b).pow(2).sum(dim=1).mean()


class _WeightedTerms(nn.Module):
    """The weighted mean of the terms; subclasses say how one contrastive pair is scored (`pair_losses`).
    towers: the names of the model's frozen towers; weights: one per term (default 1: the mean of the terms)."""

    def __init__(self, weights=None, transfer="contrastive", towers=DEFAULT_TOWERS, **kwargs):
        terms = loss_terms(towers)
        weights = (1.0,) * len(terms) if weights is None else weights
        if len(weights) != len(terms):
            raise ValueError(f"weights={tuple(weights)!r}: give {len(terms)} loss weights, one per term: "
                             f"{', '.join(term.name for term in terms)}")
        if transfer not in TRANSFERS:
            raise ValueError(f"transfer={transfer!r}: use 'contrastive' or 'l2'")
        super().__init__(**kwargs)
        self.towers, self.terms, self.outputs = tuple(towers), terms, model_outputs(towers)
        self.weights = tuple(float(w) for w in weights)
        self.transfer = transfer

    def forward(self, *model_tuple, output_dict=False, **model_out):
        """`loss(**model(images, texts))` for a model built with output_dict=True (as OpenCLIP's trainer builds it),
        or `loss(*model(images, texts))` for OpenCLIP's default tuple output, as with OpenCLIP's own losses."""
        if model_tuple:
            if len(model_tuple) not in (len(self.outputs) - len(self.terms), len(self.outputs)) or model_out:
                raise TypeError(f"{type(self).__name__} got {len(model_tuple)} positional values: pass the model's "
                                f"whole output, loss(*model(images, texts)), or its dict, loss(**model(images, texts))")
            model_out = dict(zip(self.outputs, model_tuple))
        terms = [(term, w) for term, w in zip(self.terms, self.weights) if w]  # weight 0 drops a term
        l2 = {term.name for term, _ in terms if self.transfer == "l2" and term is not CONTRASTIVE}
        pairs = self.pair_losses([term for term, _ in terms if term.name not in l2], model_out)
        losses = {term.name: w * (l2_loss(model_out[term.a], model_out[term.b]) if term.name in l2
                                  else pairs[term.name]) / len(self.terms)
                  for term, w in terms}
        return losses if output_dict else sum(losses.values())

    @property
    def term_factors(self):
        """{term name: w / (1 + 2K)}: each term's share of the loss, so that `losses[name] / factor` is the term's own
        value L (what the trainer logs, so that a term means the same in every run and family). Terms of weight 0
        are not computed, and not listed."""
        return {term.name: w / len(self.terms) for term, w in zip(self.terms, self.weights) if w}


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


class ThreeTowersLoss(_WeightedTerms, ClipLoss):
    """3T with the softmax CLIP loss; the feature sets of every contrastive term, of every tower, are gathered across
    ranks in one collective."""

    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 weights=None, transfer="contrastive", use_horovod=False, towers=DEFAULT_TOWERS):
        if use_horovod:
            raise ValueError("ThreeTowersLoss does not support Horovod: use torchrun / SLURM with torch.distributed")
        super().__init__(weights, transfer, towers, local_loss=local_loss, gather_with_grad=gather_with_grad,
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


class ThreeTowersSigLipLoss(_WeightedTerms):
    """3T with the sigmoid loss: each term is OpenCLIP's SigLipLoss with that term's own temperature and bias, so
    every `--loss-dist-impl` (bidir, shift, reduce, gather) exchanges features exactly as for plain SigLIP: one
    exchange per term (the one-collective gather is the softmax loss's)."""

    def __init__(self, rank=0, world_size=1, dist_impl=None, weights=None, transfer="contrastive",
                 towers=DEFAULT_TOWERS):
        super().__init__(weights, transfer, towers)
        self.siglip = SigLipLoss(rank=rank, world_size=world_size, dist_impl=dist_impl)

    def pair_losses(self, terms, model_out):
        missing = [term.bias for term in terms if term.bias not in model_out]
        if missing:
            raise ValueError(f"the sigmoid 3T loss needs the model outputs {missing}: give the model config "
                             f"init_logit_bias (as OpenCLIP's SigLIP configs do)")
        return {term.name: self.siglip(model_out[term.a], model_out[term.b], model_out[term.scale],
                                       model_out[term.bias])
                for term in terms}
