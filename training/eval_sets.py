"""Evaluation sets and their flags, shared by the trainer and the standalone evaluator: zero-shot classification
folders in ImageNet layout (`--zeroshot-data DIR [DIR ...]`, with class names and prompt templates), `--retrieval-k`,
and the standalone evaluator's retrieval shards (`--val-data`).

`get_eval_data(args, preprocess_val, tokenizer)` gives the trainer extra entries for OpenCLIP's `data` dict.
Every image that does not decode stops the evaluation with an EvalDataError naming its file (or shard and sample).
"""
import io
import os
from dataclasses import dataclass
from typing import List, Optional

import torch
from PIL import Image

from open_clip_3t.shards import IMAGE_EXTS, expand_shards, iter_samples, sample_extensions, tar_damage

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


class EvalDataError(ValueError):
    """Evaluation data that cannot be read: the message is one line naming the file (or shard and sample) and the fix."""


def one_line(error):
    """An error's message on one line, also when a DataLoader worker raised it (torch then puts the worker's
    traceback in the message, whose last line is 'module.Class: message')."""
    lines = str(error).strip().splitlines() or [""]
    return lines[-1].split(": ", 1)[1] if len(lines) > 1 and ": " in lines[-1] else lines[0]


def _image_error(e):
    text = "not an image file PIL can read" if type(e).__name__ == "UnidentifiedImageError" else \
        (str(e).strip().splitlines() or [""])[0][:120]
    return f"{type(e).__name__}: {text}"


def _read_lines(path, what):
    """The non-blank lines of a UTF-8 text file whose last line ends with a newline (a file cut inside its last line
    would otherwise name a class, or give a template, by the cut text)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{path} is not a UTF-8 text file of {what} ({e.reason} at byte {e.start}): write "
                            f"{what} there, one per line") from None
    if text.strip() and not text.endswith("\n"):
        raise EvalDataError(f"{path} does not end with a newline, so its last line ({text.splitlines()[-1][:40]!r}) may "
                            f"be cut short: check it, and end the file with a newline")
    return [line.rstrip("\r") for line in text.split("\n") if line.strip()]


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
        classnames = _read_lines(classnames_path, "class names")
        templates = _read_lines(templates_path, "prompt templates")
        if any("{}" in name for name in classnames):
            raise ValueError(f"{classnames_path} holds prompt templates ({next(n for n in classnames if '{}' in n)!r}), "
                             f"not class names: write one class name per line, in sorted sub-folder order")
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
        empty = [c for c in folders_found if not _has_image(os.path.join(root, c))]
        if empty:
            raise ValueError(f"--zeroshot-data {root}: class sub-folder {empty[0]} holds no image "
                             f"({len(empty)} such): put its images there, or remove the folder and its class name")
        tasks.append(ZeroShotTask(name, root, classnames, templates))
    return tasks


def _has_image(folder):
    from torchvision.datasets.folder import IMG_EXTENSIONS
    for _, _, files in os.walk(folder, followlinks=True):
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in files):
            return True
    return False


def check_eval_args(args):
    """Validate the evaluation flags before expensive work (returns the zero-shot tasks)."""
    ks = getattr(args, "retrieval_k", None) or DEFAULT_RETRIEVAL_K
    if any(k < 1 for k in ks):
        raise ValueError(f"--retrieval-k {' '.join(map(str, ks))}: every k must be >= 1")
    return zeroshot_tasks(getattr(args, "zeroshot_data", None), getattr(args, "zeroshot_classnames", None),
                          getattr(args, "zeroshot_templates", None))


def load_image(path):
    """An RGB image of a zero-shot folder (torchvision's loader), or EvalDataError naming the file."""
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise EvalDataError(f"{path} does not decode as an image ({_image_error(e)}): replace it, or remove it from the "
                            f"folder") from None


def folder_dataloader(root, preprocess, batch_size, workers):
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(root, transform=preprocess, loader=load_image)
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


# --- retrieval shards (the standalone evaluator's --val-data) ---------------------------------------------------

def bad_shard(shard, error):
    return EvalDataError(f"--val-data shard {shard} is truncated or not a tar file ({error}): replace it, or leave it "
                         f"out of --val-data")


def val_shards(spec):
    """Shard paths of a --val-data spec ('val/{00000..00009}.tar', '::'-joined lists); all must exist and be whole
    tars: every tar header is walked (no member data read), each member must end within the file and, for an
    uncompressed tar, the end-of-archive marker must follow the last member (a tar cut between two members would
    otherwise read as a shorter, whole one)."""
    shards = expand_shards(spec, flag="--val-data")
    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise FileNotFoundError(f"--val-data: shard {missing[0]} not found ({len(missing)} of {len(shards)} missing); "
                                f"pass existing local .tar shards, e.g. 'data/val/{{00000..00009}}.tar'")
    for shard in shards:
        damage = tar_damage(shard, walk=True)
        if damage:
            raise bad_shard(shard, damage)
    return shards


def read_pairs(shards):
    """Yields (RGB PIL image, caption) from LAION-style shards, in shard order then tar order, grouped into samples
    as OpenCLIP's training pipeline groups them; samples without an image or a txt are skipped, as it skips them."""
    for shard in shards:
        stats, pairs = {}, 0
        for sample in iter_samples(shard, stats):
            ext = next((e for e in IMAGE_EXTS if e in sample), None)
            if ext is None or "txt" not in sample:
                continue
            member = ext
            try:
                image = Image.open(io.BytesIO(sample[ext])).convert("RGB")
                member = "txt"
                text = sample["txt"].decode("utf-8")
            except Exception as e:
                raise EvalDataError(f"--val-data shard {shard}, sample {sample['__key__']}: its .{member} does not "
                                    f"decode ({_image_error(e)}): replace the shard, or leave it out of --val-data") \
                    from None
            pairs += 1
            yield image, text
        if stats["truncated"]:  # changed since val_shards checked it
            raise bad_shard(shard, stats["truncated"])
        if not pairs:
            raise EvalDataError(f"--val-data shard {shard} holds no sample with an image and a caption (.txt): pass "
                                f"LAION-style shards, or leave it out of --val-data")


def count_pairs(shards):
    """How many (image, caption) pairs `read_pairs` will yield from `shards`, from their tar headers alone."""
    return sum(1 for shard in shards for exts in sample_extensions(shard)
               if "txt" in exts and any(e in exts for e in IMAGE_EXTS))


def pair_batches(shards, preprocess, tokenizer, batch_size, num_samples=None):
    """(images, tokenized captions) batches of the first `num_samples` pairs (all when None)."""
    images, texts, n = [], [], 0
    for image, text in read_pairs(shards):
        if num_samples is not None and n >= num_samples:
            break
        images.append(preprocess(image))
        texts.append(text)
        n += 1
        if len(images) == batch_size:
            yield torch.stack(images), tokenizer(texts)
            images, texts = [], []
    if images:
        yield torch.stack(images), tokenizer(texts)
