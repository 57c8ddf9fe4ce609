"""Training data: OpenCLIP's get_data, plus the third-tower cache join and our evaluation sets.

Shards, braceexpand, `::` sources with upsampling factors, resampling, CSV and ImageNet stay OpenCLIP's code.
"""
import copy

from open_clip_3t._openclip import openclip_get_data

from .cached_data import get_cached_wds_dataset
from .evaluation import get_eval_data


def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """`open_clip_train.data.get_data`, with the train set joined to cached h embeddings under --third-tower-cache
    (batches (images, texts, third_embeddings)) and the --zeroshot-data folders added."""
    preprocess_train, preprocess_val = preprocess_fns
    if args.third_tower_cache:
        train = get_cached_wds_dataset(args, preprocess_train, is_train=True, epoch=epoch, tokenizer=tokenizer)
        others = copy.copy(args)
        others.train_data = None  # OpenCLIP builds everything else (val, ImageNet)
        data = openclip_get_data(others, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        data["train"] = train
    else:
        data = openclip_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
    data.update(get_eval_data(args, preprocess_val, tokenizer))
    return data
