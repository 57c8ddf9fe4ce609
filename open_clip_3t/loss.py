"""The 3T loss: the mean of three symmetric CLIP losses, each with its own temperature.

    L_3T = w1/3 * L(f, g) + w2/3 * L(f_h, h_f) + w3/3 * L(g_h, h_g)
    L(a, b) = 1/2 * ( CE(s * a b^T, I) + CE(s * b a^T, I) )

Built on OpenCLIP's ClipLoss (labels, local_loss, gather_with_grad semantics); the six feature sets of a
step are gathered across ranks in a single collective.
"""
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

try:
    import torch.distributed as dist
    import torch.distributed.nn
except ImportError:  # pragma: no cover - torch without distributed support
    dist = None

# ThreeTowersCLIP's training outputs in the order of its tuple output (OpenCLIP's default output_dict=False).
MODEL_OUTPUTS = ("image_features", "text_features", "logit_scale", "image_third_features", "third_image_features",
                 "text_third_features", "third_text_features", "logit_scale_image_third", "logit_scale_text_third")
TERMS = (  # loss name, its two feature sets, its temperature
    ("contrastive_loss", "image_features", "text_features", "logit_scale"),
    ("image_third_loss", "image_third_features", "third_image_features", "logit_scale_image_third"),
    ("text_third_loss", "text_third_features", "third_text_features", "logit_scale_text_third"),
)


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


class ThreeTowersLoss(ClipLoss):
    def __init__(self, local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1,
                 weights=(1.0, 1.0, 1.0), transfer="contrastive", use_horovod=False):
        if use_horovod:
            raise ValueError("ThreeTowersLoss does not support Horovod: use torchrun / SLURM with torch.distributed")
        if len(weights) != 3:
            raise ValueError(f"weights={weights!r}: give three loss weights, for L(f,g), L(f_h,h_f), L(g_h,h_g)")
        if transfer not in ("contrastive", "l2"):
            raise ValueError(f"transfer={transfer!r}: use 'contrastive' or 'l2'")
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size)
        self.weights = tuple(float(w) for w in weights)
        self.transfer = transfer

    def pair_loss(self, a, b, all_a, all_b, scale):
        """Symmetric CLIP loss of one pair; all_a/all_b are the gathered features (a, b when world_size == 1)."""
        if self.world_size > 1 and self.local_loss:
            logits_a, logits_b = scale * a @ all_b.T, scale * b @ all_a.T
        else:
            logits_a = scale * all_a @ all_b.T
            logits_b = logits_a.T
        labels = self.get_ground_truth(a.device, logits_a.shape[0])
        return (F.cross_entropy(logits_a, labels) + F.cross_entropy(logits_b, labels)) / 2

    def forward(self, *model_tuple, output_dict=False, **model_out):
        """`loss(**model(images, texts))` for a model built with output_dict=True (as OpenCLIP's trainer builds it),
        or `loss(*model(images, texts))` for OpenCLIP's default tuple output, as with OpenCLIP's ClipLoss."""
        if model_tuple:
            if len(model_tuple) != len(MODEL_OUTPUTS) or model_out:
                raise TypeError(f"ThreeTowersLoss got {len(model_tuple)} positional values: pass the model's whole "
                                f"output, loss(*model(images, texts)), or its dict, loss(**model(images, texts))")
            model_out = dict(zip(MODEL_OUTPUTS, model_tuple))
        terms = [(name, w, model_out[a], model_out[b], model_out[s])
                 for (name, a, b, s), w in zip(TERMS, self.weights) if w]
        is_l2 = [self.transfer == "l2" and name != "contrastive_loss" for name, *_ in terms]

        contrastive = [t for t, l2 in zip(terms, is_l2) if not l2]
        if self.world_size > 1 and contrastive:
            flat = [x for _, _, a, b, _ in contrastive for x in (a, b)]
            flat = gather_packed(flat, self.local_loss, self.gather_with_grad, self.rank, self.world_size)
            gathered = iter(zip(flat[0::2], flat[1::2]))
        else:
            gathered = iter((a, b) for _, _, a, b, _ in contrastive)

        losses = {}
        for (name, w, a, b, scale), l2 in zip(terms, is_l2):
            if l2:  # the paper's ablation: regress one embedding on the other
                loss = (a - b).pow(2).sum(dim=1).mean()
            else:
                loss = self.pair_loss(a, b, *next(gathered), scale)
            losses[name] = w * loss / 3
        return losses if output_dict else sum(losses.values())


def create_loss(args):
    """The 3T loss for `python -m training.main` args: config defaults, overridden by the 3T flags if given."""
    from ._openclip import three_towers_config
    from .third_tower import ThreeTowersCfg
    cfg = ThreeTowersCfg.from_dict(three_towers_config(args.model))
    weights = getattr(args, "three_towers_loss_weights", None) or cfg.loss_weights
    transfer = getattr(args, "three_towers_transfer", None) or cfg.transfer
    return ThreeTowersLoss(local_loss=args.local_loss, gather_with_grad=args.gather_with_grad, cache_labels=True,
                           rank=args.rank, world_size=args.world_size, weights=weights, transfer=transfer,
                           use_horovod=getattr(args, "horovod", False))
