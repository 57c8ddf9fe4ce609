"""Training data: OpenCLIP's get_data, plus the third-tower cache join and the evaluation sets when asked.

Shards, braceexpand, `::` sources with upsampling factors, resampling, CSV and ImageNet stay OpenCLIP's code.
Two modules written alongside this one are optional and imported lazily by name:
- training/cached_data.py: `get_cached_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False,
  tokenizer=None) -> DataInfo` whose batches are (images, texts, third_embeddings);
- training/evaluation.py: `add_eval_args(parser)`, `get_eval_data(args, preprocess_val, tokenizer) -> dict` and
  `evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None) -> dict`.
"""
import copy
import importlib

from open_clip_3t._openclip import openclip_get_data


def _optional_module(name):
    """Import training.<name>, or None if that module does not exist (an error inside it still raises)."""
    try:
        return importlib.import_module(f"training.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"training.{name}":
            return None
        raise


def evaluation_module():
    return _optional_module("evaluation")


def cached_data_module():
    module = _optional_module("cached_data")
    if module is None or not hasattr(module, "get_cached_wds_dataset"):
        raise RuntimeError("--third-tower-cache needs training/cached_data.py (get_cached_wds_dataset), which is "
                           "not installed in this checkout: train without --third-tower-cache (h online)")
    return module


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """`open_clip_train.data.get_data`, with the train set joined to cached h embeddings under --third-tower-cache
    and the evaluation sets of training/evaluation.py added."""
    preprocess_train, preprocess_val = preprocess_fns
    if args.third_tower_cache:
        train = cached_data_module().get_cached_wds_dataset(
            args, preprocess_train, is_train=True, epoch=epoch, floor=False, tokenizer=tokenizer)
        others = copy.copy(args)
        others.train_data = None  # OpenCLIP builds everything else (val, ImageNet)
        data = openclip_get_data(others, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        data["train"] = train
    else:
        data = openclip_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)

    evaluation = evaluation_module()
    if evaluation is not None and hasattr(evaluation, "get_eval_data"):
        data.update(evaluation.get_eval_data(args, preprocess_val, tokenizer))
    return data
