"""Evaluation sets and their flags, shared by the trainer and the standalone evaluator: zero-shot classification
folders in ImageNet layout (`--zeroshot-data DIR [DIR ...]`, with class names and prompt templates), and `--retrieval-k`.

`get_eval_data(args, preprocess_val, tokenizer)` gives the trainer extra entries for OpenCLIP's `data` dict.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import torch

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
