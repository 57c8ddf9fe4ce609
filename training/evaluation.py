"""Evaluation of 3T, CLIP and LiT models: zero-shot classification and image-text retrieval.

The trainer (training/main.py) uses three names from here:
- `add_eval_args(parser)`: the evaluation flags (`--zeroshot-data DIR [DIR ...]`, `--retrieval-k`, ...);
- `get_eval_data(args, preprocess_val, tokenizer)`: extra entries for OpenCLIP's `data` dict;
- `evaluate(model, data, epoch, args, tb_writer, tokenizer)`: OpenCLIP's `evaluate`, same signature and logging.
The standalone evaluator (training/eval.py) uses the scoring functions below.

Why `evaluate` replaces `open_clip_train.train.evaluate` instead of calling it:
- OpenCLIP 3.3's zero-shot `accuracy()` converts a 1-element array with `float()`, which numpy >= 2.4 refuses;
  our accuracy is computed with torch.
- OpenCLIP knows only ImageNet; we add any folder in ImageNet layout (`--zeroshot-data`).
- Retrieval R@k is computed for the `--retrieval-k` values (OpenCLIP: 1, 5, 10 only) with the same keys.

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
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, build_zero_shot_classifier, get_input_dtype

from open_clip_3t._openclip import openclip_autocast
from open_clip_3t.loss import transfer_terms

CLASSNAMES_FILE = "classnames.txt"
TEMPLATES_FILE = "templates.txt"
DEFAULT_RETRIEVAL_K = (1, 5, 10)


# --- flags ----------------------------------------------------------------------------------------------------

def add_eval_args(parser):
    """Evaluation flags (OpenCLIP's own --imagenet-val, --val-data, --val-frequency, --zeroshot-frequency apply)."""
    group = parser.add_argument_group("evaluation (open_clip_3t)")
    group.add_argument("--zeroshot-data", type=str, nargs="+", default=None, metavar="DIR",
                       help="Zero-shot classification sets in ImageNet layout: one sub-folder per class (sorted "
                            "sub-folder order = class index), classnames.txt (one name per line, in that order) and "
                            "templates.txt (one prompt per line, {} marks the class name). Run every "
                            "--zeroshot-frequency epochs; metrics <folder name>-zeroshot-top1/top5.")
    group.add_argument("--zeroshot-classnames", type=str, nargs="+", default=None, metavar="FILE",
                       help="Class-name file(s) replacing DIR/classnames.txt: one for every --zeroshot-data folder, "
                            "or one per folder in the same order.")
    group.add_argument("--zeroshot-templates", type=str, nargs="+", default=None, metavar="FILE",
                       help="Template file(s) replacing DIR/templates.txt: one for all folders or one per folder.")
    group.add_argument("--retrieval-k", type=int, nargs="+", default=list(DEFAULT_RETRIEVAL_K), metavar="K",
                       help="k values of the image<->text retrieval recall R@k on --val-data (default: 1 5 10).")
    return parser


# --- zero-shot folders ----------------------------------------------------------------------------------------

@dataclass
class ZeroShotTask:
    """A folder dataset in ImageNet layout with its class names and prompt templates."""
    name: str
    root: str
    classnames: List[str]
    templates: list  # format strings with {} (or callables, as OpenCLIP's ImageNet templates)
    prefix: str = ""  # metric keys PREFIX-top1 / PREFIX-top5; default NAME-zeroshot

    def __post_init__(self):
        self.prefix = self.prefix or f"{self.name}-zeroshot"


@dataclass
class ZeroShotData:
    """DataInfo-like entry of the `data` dict: OpenCLIP's code only reads `.dataloader` (and calls `set_epoch`)."""
    dataloader: torch.utils.data.DataLoader
    classnames: List[str]
    templates: List[str]
    sampler: Optional[object] = None
    shared_epoch: Optional[object] = None

    def set_epoch(self, epoch):
        pass  # evaluation data is not shuffled


def _read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n").rstrip("\r") for line in f if line.strip()]


def _pick_file(overrides, index, default):
    if not overrides:
        return default
    return overrides[0] if len(overrides) == 1 else overrides[index]


def class_folders(root):
    """Class sub-folders in ImageFolder's class-index order (sorted names)."""
    return sorted(e.name for e in os.scandir(root) if e.is_dir())


def zeroshot_tasks(folders, classnames_files=None, templates_files=None) -> List[ZeroShotTask]:
    """Check and read the zero-shot folders, their class names and templates; cheap, so call it before any model
    or data loading. Raises ValueError / FileNotFoundError with a one-line message naming the input and the fix."""
    folders = list(folders or [])
    if not folders and (classnames_files or templates_files):
        raise ValueError("--zeroshot-classnames/--zeroshot-templates replace the files of --zeroshot-data folders: "
                         "pass --zeroshot-data DIR too")
    for flag, files in (("--zeroshot-classnames", classnames_files), ("--zeroshot-templates", templates_files)):
        if files and len(files) not in (1, len(folders)):
            raise ValueError(f"{flag}: got {len(files)} files for {len(folders)} --zeroshot-data folders; "
                             f"pass one file for all folders or one per folder")
    tasks, names = [], {}
    for i, root in enumerate(folders):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--zeroshot-data {root}: no such folder; pass a folder in ImageNet layout "
                                    f"(one sub-folder per class, {CLASSNAMES_FILE}, {TEMPLATES_FILE})")
        name = os.path.basename(os.path.normpath(root))
        if name in names:
            raise ValueError(f"--zeroshot-data {names[name]} and {root} are both named {name!r} (metrics are keyed "
                             f"by folder name): rename or symlink one of them")
        names[name] = root
        classnames_path = _pick_file(classnames_files, i, os.path.join(root, CLASSNAMES_FILE))
        templates_path = _pick_file(templates_files, i, os.path.join(root, TEMPLATES_FILE))
        if not os.path.isfile(classnames_path):
            raise FileNotFoundError(f"{classnames_path} not found: write the class names there, one per line in the "
                                    f"sorted order of the class sub-folders, or pass --zeroshot-classnames FILE")
        if not os.path.isfile(templates_path):
            raise FileNotFoundError(f"{templates_path} not found: write the prompt templates there, one per line with "
                                    f"{{}} where the class name goes (e.g. 'a photo of a {{}}.'), or pass "
                                    f"--zeroshot-templates FILE")
        classnames, templates = _read_lines(classnames_path), _read_lines(templates_path)
        bad = [t for t in templates if "{}" not in t]
        if not templates or bad:
            found = f"found {bad[0]!r}" if bad else "the file is empty"
            raise ValueError(f"{templates_path}: every line must be a prompt template with {{}} where the class name "
                             f"goes ({found}); fix the file")
        folders_found = class_folders(root)
        if len(classnames) != len(folders_found):
            raise ValueError(f"{classnames_path} lists {len(classnames)} class names but {root} has "
                             f"{len(folders_found)} class sub-folders: write one name per sub-folder, in sorted "
                             f"sub-folder order")
        tasks.append(ZeroShotTask(name, root, classnames, templates))
    return tasks


def check_eval_args(args):
    """Validate the evaluation flags before expensive work (returns the zero-shot tasks)."""
    ks = getattr(args, "retrieval_k", None) or DEFAULT_RETRIEVAL_K
    if any(k < 1 for k in ks):
        raise ValueError(f"--retrieval-k {' '.join(map(str, ks))}: every k must be >= 1")
    return zeroshot_tasks(getattr(args, "zeroshot_data", None), getattr(args, "zeroshot_classnames", None),
                          getattr(args, "zeroshot_templates", None))


def folder_dataloader(root, preprocess, batch_size, workers):
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(root, transform=preprocess)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    loader.num_samples = len(dataset)
    loader.num_batches = len(loader)
    return loader


def get_eval_data(args, preprocess_val, tokenizer=None) -> dict:
    """`{"zeroshot/NAME": ZeroShotData}` for every --zeroshot-data folder, to merge into OpenCLIP's data dict."""
    data = {}
    for task in check_eval_args(args):
        loader = folder_dataloader(task.root, preprocess_val, args.batch_size, args.workers)
        data[f"zeroshot/{task.name}"] = ZeroShotData(loader, task.classnames, task.templates)
    return data


# --- scoring --------------------------------------------------------------------------------------------------

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


# --- training-time evaluation ---------------------------------------------------------------------------------

def _due(epoch, frequency, epochs):
    """OpenCLIP's schedule: every `frequency` epochs and after the last one; never when frequency is 0."""
    return bool(frequency) and (epoch % frequency == 0 or epoch == epochs)


def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None) -> dict:
    """open_clip_train.train.evaluate's replacement (same signature, keys and logging), on rank 0 only.

    Zero-shot ImageNet (`imagenet-val`, `imagenet-v2` entries; keys imagenet-zeroshot-val-top1/5, ...) and every
    `zeroshot/NAME` folder (NAME-zeroshot-top1/5) every --zeroshot-frequency epochs; retrieval on `val`
    (image_to_text_R@k, text_to_image_R@k, mean/median ranks, clip_val_loss) every --val-frequency epochs.
    """
    metrics = {}
    if getattr(args, "rank", 0) != 0:
        return metrics
    model = unwrap_model(model)
    model.eval()  # a ThreeTowersCLIP in eval mode is a plain CLIP: h and the heads never run
    device, precision = args.device, args.precision
    epochs = getattr(args, "epochs", 0)

    zeroshot = {k: v for k, v in data.items() if k in ("imagenet-val", "imagenet-v2") or k.startswith("zeroshot/")}
    if zeroshot and _due(epoch, getattr(args, "zeroshot_frequency", 1), epochs):
        if tokenizer is None:
            tokenizer = open_clip.get_tokenizer(args.model)
        imagenet = [k for k in ("imagenet-val", "imagenet-v2") if k in zeroshot]
        if imagenet:
            logging.info("Starting zero-shot imagenet.")
            classifier = build_classifier(model, tokenizer, IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES,
                                          device, precision)
            for key in imagenet:
                top1, top5 = zero_shot_accuracy(model, classifier, data[key].dataloader, device, precision)
                prefix = "imagenet-zeroshot-val" if key == "imagenet-val" else "imagenetv2-zeroshot-val"
                metrics[f"{prefix}-top1"], metrics[f"{prefix}-top5"] = top1, top5
        for key in sorted(k for k in zeroshot if k.startswith("zeroshot/")):
            name = key.split("/", 1)[1]
            logging.info(f"Starting zero-shot {name}.")
            entry = data[key]
            classifier = build_classifier(model, tokenizer, entry.classnames, entry.templates, device, precision)
            top1, top5 = zero_shot_accuracy(model, classifier, entry.dataloader, device, precision)
            metrics[f"{name}-zeroshot-top1"], metrics[f"{name}-zeroshot-top5"] = top1, top5

    if "val" in data and _due(epoch, getattr(args, "val_frequency", 1), epochs):
        image, text, loss = encode_pairs(model, data["val"].dataloader, device, precision)
        scores = logit_scale_of(model) * image @ text.t()
        ks = getattr(args, "retrieval_k", None) or DEFAULT_RETRIEVAL_K
        metrics.update(retrieval_metrics(scores, ks=ks))
        metrics.update({"clip_val_loss": loss, "epoch": epoch, "num_samples": len(image)})

    if not metrics:
        return metrics
    logging.info(f"Eval Epoch: {epoch} " + "\t".join(f"{k}: {round(v, 4):.4f}" for k, v in metrics.items()))
    log_data = {"val/" + name: value for name, value in metrics.items()}
    if getattr(args, "save_logs", False):
        if tb_writer is not None:
            for name, value in log_data.items():
                tb_writer.add_scalar(name, value, epoch)
        with open(os.path.join(args.checkpoint_path, "results.jsonl"), "a+") as f:
            f.write(json.dumps(metrics) + "\n")
    if getattr(args, "wandb", False):
        import wandb
        step = None
        if "train" in data:
            step = data["train"].dataloader.num_batches // getattr(args, "accum_freq", 1) * epoch
        wandb.log({**log_data, "epoch": epoch}, step=step)
    return metrics
