"""Pretrain a small timm image model on a synthetic labelled set, to serve as the frozen 3T third tower.

The task is one class per combination of the chosen attributes (e.g. shape x colour: 56 classes), or with
--multitask one classifier per attribute on a shared trunk (the toy's "ImageNet-21k": every attribute at once).
The checkpoint is a plain state_dict, loadable the way a real ImageNet-21k checkpoint is:
    timm.create_model(model_name, pretrained=True, num_classes=0, img_size=image_size,
                      pretrained_cfg_overlay=dict(file=out_file))
A sidecar out_file + ".json" records the model, preprocessing, class names and accuracies.

    python -m open_clip_3t.toy.pretrain --labelled data/pretrain --out tower.pth --model test_vit --image-size 32 --epochs 15
    python -m open_clip_3t.toy.pretrain --labelled data/pretrain --out broad.pth --model test_resnet \
        --attributes shape colour size position background count --multitask
"""
import itertools
import json
import math
import os
import time

import numpy as np
import timm
import torch
import torch.nn.functional as F

from ..files import write_atomic
from .synthetic import ATTRIBUTES, LABELLED_FILE, ArgumentParser, positive_int

MEAN = STD = (0.5, 0.5, 0.5)  # timm's test models' pretrained_cfg values


def load_labelled_set(path):
    """(uint8 images (N, H, W, 3), int64 labels, class names, attribute names) from a labelled dir or .npz."""
    if os.path.isdir(path):
        path = os.path.join(path, LABELLED_FILE)
    with np.load(path) as d:
        return d["images"], d["labels"], d["class_names"].tolist(), d["attributes"].tolist()


def task_targets(labels, set_attributes, attributes):
    """Per-attribute value indices (N, len(attributes)) of a labelled set whose labels index the product of
    set_attributes (itertools.product order, i.e. C order): any subset of its attributes can be a task."""
    missing = [a for a in attributes if a not in set_attributes]
    if missing:
        raise ValueError(f"attribute(s) {missing} are not labelled in this set (it has {', '.join(set_attributes)}): "
                         f"write a labelled set with them")
    per_attribute = np.unravel_index(labels, [len(ATTRIBUTES[a]) for a in set_attributes])
    return np.stack([per_attribute[set_attributes.index(a)] for a in attributes], axis=1)


def preprocess(images, image_size):
    """uint8 (N, H, W, 3) -> normalised float (N, 3, image_size, image_size)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)
    if x.shape[-1] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def create_model(model_name, num_classes, image_size, **kwargs):
    """timm.create_model, passing img_size only to models that take it (ViTs)."""
    try:
        return timm.create_model(model_name, num_classes=num_classes, img_size=image_size, **kwargs)
    except TypeError:
        return timm.create_model(model_name, num_classes=num_classes, **kwargs)


class Task:
    """What the tower learns: one class per combination of `attributes` (softmax over their product), or with
    multitask one softmax per attribute over a shared trunk (outputs concatenated, in `attributes` order)."""

    def __init__(self, attributes, multitask):
        self.attributes, self.multitask = list(attributes), multitask
        self.sizes = [len(ATTRIBUTES[a]) for a in self.attributes]

    @property
    def num_outputs(self):
        return sum(self.sizes) if self.multitask else int(np.prod(self.sizes))

    @property
    def output_names(self):
        if self.multitask:
            return [f"{a}={v}" for a in self.attributes for v in ATTRIBUTES[a]]
        return [" ".join(c) for c in itertools.product(*(ATTRIBUTES[a] for a in self.attributes))]

    def loss(self, logits, targets):
        """targets: (B, A) per-attribute value indices."""
        if not self.multitask:
            return F.cross_entropy(logits, self.flat(targets))
        parts = logits.split(self.sizes, dim=1)
        return sum(F.cross_entropy(p, targets[:, j]) for j, p in enumerate(parts)) / len(parts)

    def flat(self, targets):
        """Product-class index of per-attribute targets (C order, as itertools.product)."""
        index = torch.zeros_like(targets[:, 0])
        for j, size in enumerate(self.sizes):
            index = index * size + targets[:, j]
        return index

    def predict(self, logits):
        """(B, A) predicted value index per attribute."""
        if self.multitask:
            return torch.stack([p.argmax(1) for p in logits.split(self.sizes, dim=1)], dim=1)
        flat, out = logits.argmax(1), []
        for size in reversed(self.sizes):
            out.append(flat % size)
            flat = flat // size
        return torch.stack(out[::-1], dim=1)


@torch.no_grad()
def accuracies(model, task, x, y, batch_size=512):
    """(fraction with every attribute right, {attribute: fraction right})."""
    model.eval()
    correct = torch.cat([task.predict(model(x[i:i + batch_size])) == y[i:i + batch_size]
                         for i in range(0, len(x), batch_size)]).float()
    return correct.all(1).float().mean().item(), {a: correct[:, j].mean().item() for j, a in enumerate(task.attributes)}


def pretrain_third_tower(labelled_set, out_file, model_name="test_vit", image_size=32, epochs=15, batch_size=128,
                         lr=1e-3, weight_decay=0.05, heldout_fraction=0.1, seed=0, device="cpu", progress=True,
                         attributes=None, multitask=False, num_samples=None):
    """Train model_name from scratch on the labelled set, save its state_dict to out_file; return the summary dict.

    attributes: the task's attributes (default: all the set's); multitask: one classifier per attribute instead of
    one over their product; num_samples: use the set's first N samples only."""
    out_file = str(out_file)
    if not timm.is_model(model_name):
        raise ValueError(f"unknown timm model {model_name!r}")
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    images, labels, _, set_attributes = load_labelled_set(labelled_set)
    if num_samples is not None:
        if not 0 < num_samples <= len(images):
            raise ValueError(f"num_samples={num_samples}: the set has {len(images)} samples")
        images, labels = images[:num_samples], labels[:num_samples]
    task = Task(attributes or set_attributes, multitask)
    targets = task_targets(labels, set_attributes, task.attributes)
    x, y = preprocess(images, image_size).to(device), torch.from_numpy(targets).to(device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
    n_heldout = max(1, int(len(x) * heldout_fraction))
    (x_held, y_held), (x_train, y_train) = (x[perm[:n_heldout]], y[perm[:n_heldout]]), (x[perm[n_heldout:]], y[perm[n_heldout:]])

    torch.manual_seed(seed)
    model = create_model(model_name, task.num_outputs, image_size).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.1)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), device=device)
        total = 0.0
        for i in range(0, len(x_train), batch_size):
            idx = order[i:i + batch_size]
            loss = task.loss(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(idx)
        if progress:
            seconds = time.time() - start
            print(f"  epoch {epoch + 1}/{epochs}  loss {total / len(x_train):.3f}  "
                  f"heldout acc {accuracies(model, task, x_held, y_held)[0]:.3f}  {seconds:.0f}s, "
                  f"{(epoch + 1) * len(x_train) / seconds:.0f} samples/s", flush=True)

    (train_acc, _), (heldout_acc, heldout_per_attribute) = (accuracies(model, task, x_train, y_train),
                                                            accuracies(model, task, x_held, y_held))
    summary = {
        "model_name": model_name, "image_size": image_size, "num_classes": task.num_outputs,
        "class_names": task.output_names, "attributes": task.attributes, "multitask": multitask,
        "mean": list(MEAN), "std": list(STD), "num_samples": len(x),
        "train_accuracy": train_acc, "heldout_accuracy": heldout_acc,
        "heldout_accuracy_per_attribute": heldout_per_attribute, "epochs": epochs, "seed": seed,
    }
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_atomic(out_file, lambda f: torch.save(state_dict, f))
    write_atomic(out_file + ".json", json.dumps(summary, indent=1))
    return summary


def main(argv=None):
    parser = ArgumentParser(prog="python -m open_clip_3t.toy.pretrain", description=__doc__.split("\n")[0])
    parser.add_argument("--labelled", required=True, help="directory from `synthetic labelled` (or its .npz)")
    parser.add_argument("--out", required=True, help="checkpoint file to write (plain state_dict)")
    parser.add_argument("--model", default="test_vit", help="timm model name")
    parser.add_argument("--image-size", type=positive_int, default=32)
    parser.add_argument("--epochs", type=positive_int, default=15)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--attributes", nargs="+", choices=list(ATTRIBUTES), default=None,
                        help="the task's attributes (default: all those the set is labelled with)")
    parser.add_argument("--multitask", action="store_true",
                        help="one classifier per attribute on a shared trunk, instead of one over their product")
    parser.add_argument("--num-samples", type=positive_int, default=None, help="use the set's first N samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=len(os.sched_getaffinity(0)), help="torch CPU threads")
    args = parser.parse_args(argv)
    if not os.path.exists(args.labelled):
        parser.error(f"labelled set {args.labelled} does not exist")
    if not timm.is_model(args.model):
        parser.error(f"unknown timm model {args.model!r}")
    torch.set_num_threads(args.threads)
    try:
        summary = pretrain_third_tower(args.labelled, args.out, args.model, args.image_size, args.epochs,
                                       args.batch_size, args.lr, seed=args.seed, device=args.device,
                                       attributes=args.attributes, multitask=args.multitask,
                                       num_samples=args.num_samples)
    except ValueError as e:
        parser.error(str(e))
    per_attribute = ", ".join(f"{a} {v:.3f}" for a, v in summary["heldout_accuracy_per_attribute"].items())
    print(f"train acc {summary['train_accuracy']:.3f}  heldout acc {summary['heldout_accuracy']:.3f} "
          f"({per_attribute}; {summary['num_classes']} outputs) -> {args.out}")


if __name__ == "__main__":
    main()
