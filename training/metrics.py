"""Zero-shot and retrieval metrics of 3T, CLIP and LiT models, shared by training-time evaluation
(training/train.py `evaluate`) and the standalone evaluator (training/eval.py).

Definitions (shared by training-time and standalone evaluation):
- A model's scores are `s * f(image) . g(text)` with L2-normalised features and s = exp(model.logit_scale), the
  model's own learned temperature (OpenCLIP's zero-shot uses a fixed 100; rankings, hence metrics, are identical).
  A class's text embedding is the normalised mean of its normalised template embeddings
  (`open_clip.build_zero_shot_classifier`).
- Rank of the true class (or caption, or image) = number of candidates scoring >= it, so ties count against
  the model (a collapsed model scores 0, never 100%). Top-k accuracy and R@k = fraction with rank <= k.
- Convex combination of two models (the paper's 3T + LiT ensemble): p = a * p_A + (1 - a) * p_B with
  p = softmax(scores) over classes (zero-shot), over texts per image (image->text) or over images per text
  (text->image); evaluated in log space, log p = logaddexp(log a + log p_A, log(1 - a) + log p_B), in float64.
  This is the same p, ranked the same, and exact at a = 0 and a = 1 (log 0 = -inf drops a model).
- A 3T model's third-tower pair (`ThirdTowerPair`) predicts with h_g(h(image)) against g_h(g(text)) and the
  temperature of L(g_h, h_g); combined with the model's main pair (f, g) in the same way, it is the paper's
  test-time use of 3T's own third tower (no separately trained LiT).
"""
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from open_clip import build_zero_shot_classifier, get_input_dtype

from open_clip_3t.loss import transfer_terms

from ._open_clip_train import openclip_autocast
from .eval_sets import DEFAULT_RETRIEVAL_K


def unwrap_model(model):
    """The CLIP inside DDP (`.module`) and/or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def logit_scale_of(model) -> float:
    return float(unwrap_model(model).logit_scale.detach().float().exp())


class ThirdTowerPair(torch.nn.Module):
    """A 3T model's third-tower pair as a CLIP-like model (encode_image, encode_text, logit_scale), so the scoring
    code below evaluates it like any CLIP: image -> h_g(h(image)), text -> g_h(g(text)), temperature = that of
    L(g_h, h_g). The heads see the unnormalised h and g embeddings, as in training. `tower`: which frozen tower h
    (default: the only one the model holds), which the model must hold."""

    def __init__(self, model, tower=None):
        super().__init__()
        model = unwrap_model(model)
        held = [name for name, h in model.third_towers.items() if h is not None]
        if tower is None and len(held) == 1:
            tower = held[0]
        if tower not in held:
            raise ValueError(f"the third-tower pair needs the 3T model's tower {tower or 'h'}: build it with its "
                             f"weights (third_tower_weights=FILE) or load a checkpoint trained with it online")
        self.three_towers, self.tower = model, tower
        _, _, self.g_h, self.h_g = model.heads(tower)
        self.logit_scale = getattr(model, transfer_terms(tower)[1].scale)  # L(g_h, h_g)'s temperature

    def encode_image(self, image, normalize=False):
        h = self.three_towers.encode_third(image, self.tower)
        features = self.h_g(h.to(next(self.h_g.parameters()).dtype))
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text(self, text, normalize=False):
        features = self.g_h(self.three_towers.encode_text(text))
        return F.normalize(features, dim=-1) if normalize else features


def ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each row's target = number of entries scoring >= it (ties count against; NaN rows last)."""
    target = scores.gather(1, targets.view(-1, 1).to(scores.device))
    rank = (scores >= target).sum(1)
    rank[scores.isnan().any(1)] = scores.shape[1] + 1
    return rank.cpu()


def topk_correct(scores: torch.Tensor, targets: torch.Tensor, ks=(1, 5)) -> List[int]:
    """How many rows have their target within the top k, for each k (torch only: works with any numpy)."""
    rank = ranks(scores, targets)
    return [int((rank <= k).sum()) for k in ks]


def retrieval_metrics(image_to_text: torch.Tensor, text_to_image: Optional[torch.Tensor] = None,
                      ks: Sequence[int] = DEFAULT_RETRIEVAL_K) -> dict:
    """R@k, mean and median rank (OpenCLIP's keys) for pairs (image i, text i).

    image_to_text[i, j]: score of text j for image i; text_to_image[j, i]: score of image i for text j
    (default: the transpose of image_to_text)."""
    if text_to_image is None:
        text_to_image = image_to_text.t()
    diagonal = torch.arange(image_to_text.shape[0])
    metrics = {}
    for name, scores in (("image_to_text", image_to_text), ("text_to_image", text_to_image)):
        rank = ranks(scores, diagonal)
        metrics[f"{name}_mean_rank"] = rank.double().mean().item()
        # OpenCLIP: floor(median of 0-based ranks) + 1
        metrics[f"{name}_median_rank"] = float(math.floor((rank - 1).double().quantile(0.5).item()) + 1)
        for k in ks:
            metrics[f"{name}_R@{k}"] = (rank <= k).double().mean().item()
    return metrics


def mix_log_probs(scores_a: torch.Tensor, scores_b: torch.Tensor, alpha: float, dim: int = -1) -> torch.Tensor:
    """log(alpha * softmax(scores_a) + (1 - alpha) * softmax(scores_b)) along `dim`, in float64."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: the convex combination needs 0 <= alpha <= 1")
    log_a = torch.tensor(alpha, dtype=torch.float64).log()
    log_b = torch.tensor(1.0 - alpha, dtype=torch.float64).log()
    return torch.logaddexp(log_a + torch.log_softmax(scores_a.double(), dim),
                           log_b + torch.log_softmax(scores_b.double(), dim))


def build_classifier(model, tokenizer, classnames, templates, device, precision):
    """(embed_dim, num_classes) normalised class embeddings, via OpenCLIP's build_zero_shot_classifier."""
    model = unwrap_model(model)
    with torch.inference_mode(), openclip_autocast(precision, torch.device(device).type)():
        classifier = build_zero_shot_classifier(model, tokenizer=tokenizer, classnames=classnames,
                                                templates=templates, num_classes_per_batch=10, device=device)
    return classifier.float()


def zero_shot_batches(model, classifier, dataloader, device, precision):
    """Yields (scores, targets) per batch: scores = s * normalised image features @ classifier, on CPU, float32."""
    model = unwrap_model(model)
    device = torch.device(device)
    autocast = openclip_autocast(precision, device.type)
    input_dtype = get_input_dtype(precision)
    scale = logit_scale_of(model)
    classifier = classifier.to(device)
    with torch.inference_mode():
        for batch in dataloader:
            images, targets = batch[0], batch[1]
            images = images.to(device=device, dtype=input_dtype)
            with autocast():
                features = model.encode_image(images, normalize=True)
            yield (scale * features.float() @ classifier).cpu(), targets.cpu()


def zero_shot_accuracy(model, classifier, dataloader, device, precision, ks=(1, 5)) -> List[float]:
    """Top-k accuracies over a dataloader of (images, class indices)."""
    correct, n = [0] * len(ks), 0
    for scores, targets in zero_shot_batches(model, classifier, dataloader, device, precision):
        correct = [c + b for c, b in zip(correct, topk_correct(scores, targets, ks))]
        n += len(targets)
    if n == 0:
        raise ValueError("zero-shot evaluation set is empty: check the folder's class sub-folders hold images")
    return [c / n for c in correct]


def encode_pairs(model, batches, device, precision):
    """Normalised image and text features (CPU, float32) of an iterable of (images, tokenized texts, ...) batches,
    and the mean in-batch CLIP loss (OpenCLIP's clip_val_loss)."""
    model = unwrap_model(model)
    device = torch.device(device)
    autocast = openclip_autocast(precision, device.type)
    input_dtype = get_input_dtype(precision)
    scale = logit_scale_of(model)
    image_features, text_features, loss_sum, n = [], [], 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            images, texts = batch[0], batch[1]  # a third item (e.g. cached h embeddings) is not needed here
            images = images.to(device=device, dtype=input_dtype)
            with autocast():
                image = model.encode_image(images, normalize=True).float()
                text = model.encode_text(texts.to(device), normalize=True).float()
            logits = scale * image @ text.t()
            labels = torch.arange(len(images), device=device)
            loss_sum += float((F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2) * len(images)
            n += len(images)
            image_features.append(image.cpu())
            text_features.append(text.cpu())
    if n == 0:
        raise ValueError("retrieval evaluation set is empty: check --val-data")
    return torch.cat(image_features), torch.cat(text_features), loss_sum / n
