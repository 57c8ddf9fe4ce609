"""Measurements that explain 3T results, read from a third tower's cache (design notes, section 6).

- `duplicate_rate`: how often a training batch holds near-identical h embeddings (cosine > 0.99). The two transfer
  terms are contrastive: such pairs are negatives that cannot be told apart, a task with a floor.
- `view_agreement`: whether h's cached view of an image (its deterministic eval crop) differs from the view f
  trains on (OpenCLIP's random resized crop), which is what h sees when it runs online.
- `centroid_probe`: how much of a class a trained image tower's embedding holds, with no prompt and no text tower:
  when zero-shot accuracy is low, it tells whether f never learned the attribute or g does not name it.
"""
import io
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..cache.format import expand_shards, load_sidecar, sidecar_path
from ..shards import iter_samples


def cached_embeddings(cache_dir, train_spec=None):
    """(float32 embeddings [N, D], keys) of every sidecar in the cache (of train_spec's shards when given)."""
    if train_spec is not None:
        paths = [sidecar_path(cache_dir, url) for url in expand_shards(train_spec)]
    else:
        paths = sorted(Path(cache_dir).rglob("*.safetensors"))
    embeddings, keys = [], []
    for path in paths:
        e, k, _, _ = load_sidecar(str(path))
        embeddings.append(np.asarray(e, np.float32))
        keys += k
    return np.concatenate(embeddings), keys


def duplicate_rate(embeddings, batch_size, threshold=0.99, seed=0):
    """In random batches of `batch_size` of the embeddings (N, D): pairs per batch with cosine > threshold, and the
    percentage of samples that have such a twin in their batch (a last partial batch is left out)."""
    embeddings = F.normalize(torch.as_tensor(embeddings, dtype=torch.float32), dim=1)
    order = torch.randperm(len(embeddings), generator=torch.Generator().manual_seed(seed))
    pairs, with_twin, batches = 0, 0, 0
    for start in range(0, len(order) - batch_size + 1, batch_size):
        e = embeddings[order[start:start + batch_size]]
        close = (e @ e.T > threshold) & ~torch.eye(batch_size, dtype=torch.bool)
        pairs += int(close.sum()) // 2
        with_twin += int(close.any(1).sum())
        batches += 1
    if batches == 0:
        raise ValueError(f"fewer than {batch_size} embeddings: no full batch")
    return {"twin pairs per batch": pairs / batches, "samples with a twin (%)": 100 * with_twin / (batches * batch_size)}


def first_shard_images(train_spec, limit):
    """(key, PIL image) of the first `limit` samples of the first training shard, in tar order."""
    from PIL import Image
    out = []
    for sample in iter_samples(expand_shards(train_spec)[0]):
        if "jpg" in sample:
            out.append((sample["__key__"], Image.open(io.BytesIO(sample["jpg"])).convert("RGB")))
            if len(out) == limit:
                break
    return out


@torch.no_grad()
def view_agreement(weights, train_spec, cache_dir, model="3T-mini", limit=512, seed=0):
    """Cosine between h's embedding of f's training view (OpenCLIP's train transform, then h's own input
    conversion, as when h runs online) and h's cached embedding of the same image; for scale, the mean cosine
    between cached embeddings of different images."""
    import open_clip

    import open_clip_3t  # noqa: F401  (registers the 3T configs)
    logging.disable(logging.WARNING)  # "no pretrained weights loaded" for f and g: right, they are not used here
    try:
        three_t, f_train_view, _ = open_clip.create_model_and_transforms(model, third_tower_weights=weights)
    finally:
        logging.disable(logging.NOTSET)
    three_t.eval()
    cached, keys = cached_embeddings(cache_dir, train_spec)
    row_of = {k: i for i, k in enumerate(keys)}
    samples = first_shard_images(train_spec, limit)
    torch.manual_seed(seed)
    online = three_t.encode_third(torch.stack([f_train_view(image) for _, image in samples]))
    stored = torch.from_numpy(cached[[row_of[k] for k, _ in samples]])
    same = F.cosine_similarity(online.float(), stored, dim=1)
    stored = F.normalize(stored, dim=1)
    others = stored @ stored.T
    n = len(stored)
    return {"cos(f's view, cached view)": float(same.mean()),
            "cos(two images, cached)": float((others.sum() - others.diagonal().sum()) / (n * (n - 1)))}


def centroid_probe(features, labels, folds=5, seed=0):
    """Nearest-class-centroid accuracy (%) of L2-normalised features (N, D) with integer labels (N,), stratified
    k-fold: each class's samples are dealt over the folds in a random order (at most as many folds as the smallest
    class has samples, so every class keeps a centroid), and each fold is classified by the other folds' centroids."""
    features = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1)
    labels = torch.as_tensor(labels)
    classes, counts = labels.unique(return_counts=True)
    if int(counts.min()) < 2:
        raise ValueError(f"centroid_probe: class {int(classes[counts.argmin()])} has one sample: a probe needs at "
                         f"least two per class (write more images per class)")
    folds = min(folds, int(counts.min()))
    generator = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(labels), dtype=torch.long)
    for c in classes:
        members = (labels == c).nonzero().flatten()
        fold[members[torch.randperm(len(members), generator=generator)]] = torch.arange(len(members)) % folds
    correct = 0
    for k in range(folds):
        held_out = fold == k
        centroids = torch.stack([features[~held_out & (labels == c)].mean(0) for c in classes])
        predicted = classes[(features[held_out] @ F.normalize(centroids, dim=1).T).argmax(1)]
        correct += int((predicted == labels[held_out]).sum())
    return 100 * correct / len(labels)
