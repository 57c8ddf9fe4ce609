"""Every touch of `open_clip_train` internals lives here (the library's own seams are open_clip_3t/_openclip.py).
Written against open_clip_torch 3.3, and refused on another version.

`python -m training.main` runs `open_clip_train.main.main` (distributed set-up, logging, optimizer, scheduler,
checkpoints, resume) with a few of its helpers replaced. That function imports its helpers by name, so a
replacement means rebinding the name in the `open_clip_train.main` module, for the duration of one call.
"""
import contextlib
import datetime
import functools
import glob
import logging
import os
import socket
import types

import open_clip
import torch

from open_clip_3t._openclip import check_openclip_version

check_openclip_version()

TRAINER_HELPERS = ("parse_args", "create_model_and_transforms", "get_data", "train_one_epoch", "evaluate", "pt_load",
                   "setup_logging")


def openclip_parse_args(argv):
    """OpenCLIP's own argument parser (every open_clip_train flag, its defaults and lr/beta defaults)."""
    from open_clip_train.params import parse_args
    return parse_args(argv)


class _Built(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def openclip_parser():
    """OpenCLIP's own ArgumentParser, for one help text with our flags: open_clip_train.params.parse_args builds it
    and parses at once, so it is taken at its parse_args call (argparse swapped in that module only, for one call)."""
    import argparse

    from open_clip_train import params

    class Capture(argparse.ArgumentParser):
        def parse_args(self, args=None, namespace=None):
            raise _Built(self)

    params.argparse = types.SimpleNamespace(**{**vars(argparse), "ArgumentParser": Capture})
    try:
        params.parse_args([])
    except _Built as built:
        return built.parser
    finally:
        params.argparse = argparse
    raise RuntimeError("open_clip_train.params.parse_args did not parse: OpenCLIP changed (see check_openclip_version)")


def launch_rank():
    """This process's global rank as the launcher (torchrun, srun, mpirun) set it, read as OpenCLIP reads it; usable
    before any process group exists."""
    from open_clip_train.distributed import world_info_from_env
    return world_info_from_env()[1]


def openclip_get_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """OpenCLIP's data pipeline: webdataset shards (braceexpand, `::`, resampling), CSV, synthetic, ImageNet."""
    from open_clip_train.data import get_data
    return get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)


def openclip_pt_load(path, map_location=None):
    """OpenCLIP's checkpoint reader for --resume (local files and fsspec URLs)."""
    from open_clip_train.file_utils import pt_load
    return pt_load(path, map_location=map_location)


def openclip_run_checkpoints(checkpoint_dir):
    """(the *.pt files of a run's checkpoints/ folder, newest first in the order OpenCLIP's --resume latest ranks
    them: a natural sort of the names, so epoch_latest.pt, epoch_10.pt, epoch_9.pt; the name --save-most-recent
    writes)."""
    import open_clip_train.main as oc_main
    paths = glob.glob(os.path.join(glob.escape(checkpoint_dir), "*.pt"))
    return sorted(paths, key=oc_main.natural_key, reverse=True), oc_main.LATEST_CHECKPOINT_NAME


def openclip_evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
    from open_clip_train.train import evaluate
    return evaluate(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)


def openclip_setup_logging(log_file, level, include_host=False):
    """OpenCLIP's setup_logging, without its override of every existing logger's level: OpenCLIP 3.3 sets them all
    to `level`, which turns on torch's own INFO loggers (dynamo and fake-tensor statistics printed at exit). Loggers
    left at NOTSET still follow the root logger, as OpenCLIP wants; a library's own setting stays (for torch:
    WARNING, or what TORCH_LOGS asks for)."""
    from open_clip_train.logger import setup_logging
    # A placeholder (a dotted name's parent nobody created yet) becomes a real logger there: it was at NOTSET.
    levels = {name: getattr(lg, "level", logging.NOTSET) for name, lg in logging.root.manager.loggerDict.items()}
    setup_logging(log_file, level, include_host)
    for name, lvl in levels.items():
        logging.getLogger(name).setLevel(lvl)


def openclip_autocast(precision, device_type):
    from open_clip_train.precision import get_autocast
    return get_autocast(precision, device_type=device_type)


class _DistributedDataParallel(torch.nn.parallel.DistributedDataParallel):
    """OpenCLIP 3.3 passes `device_ids=[device]` even for a CPU model, which torch refuses: drop it on CPU."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


class _TorchSavingWith(types.ModuleType):
    """`torch` as open_clip_train.main sees it, with `save` replaced: OpenCLIP 3.3 writes its epoch checkpoints with a
    bare torch.save (a half-written epoch_N.pt when a job dies mid-write)."""

    def __init__(self, save):
        super().__init__("torch")
        self.save = save

    def __getattr__(self, name):
        return getattr(torch, name)


class RendezvousError(RuntimeError):
    """Ranks that cannot meet: the message is one line naming the address and the fix."""


def rendezvous_store(rank, world_size, seconds):
    """The TCPStore of an env:// rendezvous (MASTER_ADDR:MASTER_PORT, hosted by rank 0), met within `seconds` or a
    RendezvousError: torch would retry for its process-group timeout (30 min), an unresolvable name included."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    where = f"rank {rank} of {world_size} on {socket.gethostname()}"
    if not addr or not port:
        raise RendezvousError(f"rendezvous: {where}: MASTER_ADDR and MASTER_PORT are not set: set them to an address "
                              f"of the first node and a free port there (scripts/slurm/train.sbatch does)")
    try:
        socket.getaddrinfo(addr, int(port), type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise RendezvousError(f"rendezvous: {where}: MASTER_ADDR={addr} does not resolve ({e.strerror}): set "
                              f"MASTER_ADDR to an address every node reaches, e.g. the first node's NodeAddr from "
                              f"`scontrol show node NAME` (scripts/slurm/train.sbatch takes it from there)") from None
    try:
        store = torch.distributed.TCPStore(addr, int(port), world_size, is_master=rank == 0,
                                           timeout=datetime.timedelta(seconds=seconds), multi_tenant=True)
    except (RuntimeError, ValueError) as e:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise RendezvousError(f"rendezvous: {where} did not meet the other ranks at MASTER_ADDR:MASTER_PORT = "
                              f"{addr}:{port} within {seconds:g} s ({reason}): check that every node reaches that "
                              f"address and that the port is free on the first node, or raise "
                              f"--rendezvous-timeout") from None
    from torch.distributed.constants import default_pg_timeout
    store.set_timeout(default_pg_timeout)  # after the meeting, the store waits as long as torch's own would
    return store


def _bounded_init_process_group(init_process_group, seconds):
    """torch.distributed.init_process_group whose env:// rendezvous with an explicit rank (OpenCLIP's srun path) is
    met within `seconds`. torchrun's (no rank given: its agent's store) and other init methods are left alone."""
    @functools.wraps(init_process_group)
    def bounded(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, store=None, **kwargs):
        if store is None and init_method in (None, "env://") and rank >= 0 and world_size > 1:
            store, init_method = rendezvous_store(rank, world_size, seconds), None
        return init_process_group(backend=backend, init_method=init_method, timeout=timeout, world_size=world_size,
                                  rank=rank, store=store, **kwargs)
    return bounded


@contextlib.contextmanager
def openclip_trainer(save_checkpoint=None, rendezvous_timeout=600, **helpers):
    """Yields open_clip_train.main.main with the named helpers (see TRAINER_HELPERS) replaced by ours, its checkpoints
    written by `save_checkpoint(obj, path)`, and its process group's rendezvous bounded by `rendezvous_timeout`
    seconds (OpenCLIP 3.3 passes torch no timeout)."""
    import open_clip_train.main as oc_main
    for name in helpers:
        if name not in TRAINER_HELPERS or not hasattr(oc_main, name):
            raise ImportError(f"open_clip_train.main has no helper {name!r} to replace: this trainer was written "
                              f"for open_clip_torch 3.3 (found {open_clip.__version__})")
    saved = {name: getattr(oc_main, name) for name in helpers}
    saved_ddp, saved_torch = torch.nn.parallel.DistributedDataParallel, oc_main.torch
    saved_init = torch.distributed.init_process_group
    try:
        for name, fn in helpers.items():
            setattr(oc_main, name, fn)
        torch.nn.parallel.DistributedDataParallel = _DistributedDataParallel
        if save_checkpoint is not None:
            oc_main.torch = _TorchSavingWith(save_checkpoint)
        torch.distributed.init_process_group = _bounded_init_process_group(saved_init, rendezvous_timeout)
        yield oc_main.main
    finally:
        for name, fn in saved.items():
            setattr(oc_main, name, fn)
        torch.nn.parallel.DistributedDataParallel, oc_main.torch = saved_ddp, saved_torch
        torch.distributed.init_process_group = saved_init


# --- the webdataset train pipeline (training/data.py, training/cached_data.py) --------------------------------
# The cache join edits the webdataset pipeline OpenCLIP 3.3's get_wds_dataset builds, instead of copying that
# function: shuffling, resampling, `::` sources, workers and node split all stay OpenCLIP's. We identify stages by
# the functions OpenCLIP and webdataset (<=0.2.86) use, and fail loudly if the pipeline looks different.

def openclip_get_wds_dataset(args, preprocess_img, is_train, epoch=0, floor=False, tokenizer=None):
    from open_clip_train.data import get_wds_dataset
    return get_wds_dataset(args, preprocess_img, is_train, epoch=epoch, floor=floor, tokenizer=tokenizer)


def openclip_has_caption_and_image(sample):
    """OpenCLIP's sample filter (open_clip_train.data.filter_no_caption_or_no_image): the samples it trains on."""
    from open_clip_train.data import filter_no_caption_or_no_image
    return filter_no_caption_or_no_image(sample)


def _wds_train_stages(data_info):
    """The stage list of a DataInfo from OpenCLIP's get_wds_dataset(is_train=True), and the index of its tar reader,
    to_tuple and batched stages; fails loudly on a pipeline of another shape."""
    import webdataset as wds
    from open_clip_train.data import tarfile_to_samples_nothrow
    from webdataset.filters import FilterFunction, _batched, _to_tuple

    def fail(what):
        raise RuntimeError(f"OpenCLIP's webdataset pipeline is not the one open_clip_3t's training data stages were "
                           f"written for (open_clip_torch 3.3, webdataset<=0.2.86): {what}; found open_clip_torch "
                           f"{open_clip.__version__}, webdataset {getattr(wds, '__version__', '?')}")

    loader = data_info.dataloader
    if not isinstance(loader, wds.DataPipeline) or not isinstance(loader.pipeline[0], torch.utils.data.DataLoader):
        fail("the train dataloader is not a wds.WebLoader")
    dataset = loader.pipeline[0].dataset
    if not isinstance(dataset, wds.DataPipeline):
        fail("the WebLoader's dataset is not a wds.DataPipeline")
    stages = dataset.pipeline

    def find(what, test):
        found = [i for i, s in enumerate(stages) if test(s)]
        if len(found) != 1:
            fail(f"expected one {what} stage, found {len(found)}")
        return found[0]

    tar = find("tarfile_to_samples_nothrow", lambda s: s is tarfile_to_samples_nothrow)
    to_tuple = find("to_tuple", lambda s: isinstance(s, FilterFunction) and s.f is _to_tuple)
    batched = find("batched", lambda s: isinstance(s, FilterFunction) and s.f is _batched)
    if stages[to_tuple].args[:2] != ("image", "text") or not tar < to_tuple < batched:
        fail("expected to_tuple('image', 'text') between the tar stage and the batched stage")
    return stages, tar, to_tuple, batched


def wds_join_field(data_info, join_stage, fields):
    """Insert `join_stage` (samples -> samples with each of `fields` set) right after the tar-to-samples stage of a
    DataInfo from OpenCLIP's get_wds_dataset(is_train=True), and make batches (image, text, *fields)."""
    import webdataset as wds
    stages, tar, to_tuple, _ = _wds_train_stages(data_info)
    stages[to_tuple] = wds.to_tuple("image", "text", *fields)
    stages.insert(tar + 1, join_stage)
    return data_info


def wds_make_resumable(data_info, stream, seed, rank, worker_init_fn=None):
    """Put the stages of `stream` (training/resumable_data.py ResumableStream) in place of the tar reader, the sample
    shuffle and the batcher of a DataInfo from OpenCLIP's get_wds_dataset(is_train=True), and its augmentation
    seeding right before the stage that augments (map_dict). The DataLoader's worker seeds (which OpenCLIP's
    ResampledShards2 draws from) are made a function of (seed, rank), and its workers start with
    `worker_init_fn`."""
    import functools

    from open_clip_train.data import group_by_keys_nothrow, tarfile_to_samples_nothrow
    from webdataset.filters import FilterFunction, _map_dict, _shuffle, default_collation_fn

    from .resumable_data import mix

    stages, tar, to_tuple, batched = _wds_train_stages(data_info)
    shuffles = [i for i, s in enumerate(stages) if isinstance(s, FilterFunction) and s.f is _shuffle]
    maps = [i for i, s in enumerate(stages) if isinstance(s, FilterFunction) and s.f is _map_dict]
    if len(shuffles) != 1 or len(maps) != 1 or not tar < shuffles[0] < maps[0] < to_tuple:
        raise RuntimeError(f"OpenCLIP's webdataset pipeline is not the one open_clip_3t's resumable stream was written "
                           f"for (open_clip_torch 3.3, webdataset<=0.2.86): found open_clip_torch "
                           f"{open_clip.__version__}")
    shuffle, batcher = stages[shuffles[0]], stages[batched]
    (batchsize,), partial = batcher.args, batcher.kw.get("partial", True)
    stages[batched] = functools.partial(stream.batch, batchsize=batchsize, partial=partial,
                                        collation_fn=batcher.kw.get("collation_fn", default_collation_fn))
    stages.insert(maps[0], stream.seed_samples)
    stages[shuffles[0]] = functools.partial(stream.shuffle, **shuffle.kw)
    stages[tar] = functools.partial(stream.read, read_shard=tarfile_to_samples_nothrow, group=group_by_keys_nothrow)
    loader = data_info.dataloader.pipeline[0]
    loader.generator = torch.Generator().manual_seed(mix(seed, rank))
    loader.worker_init_fn = worker_init_fn
    return data_info


def openclip_is_webdataset(args):
    """Whether OpenCLIP reads args.train_data as webdataset shards (--dataset-type webdataset, or auto and .tar)."""
    from open_clip_train.data import get_dataset_fn, get_wds_dataset
    return get_dataset_fn(args.train_data, args.dataset_type) is get_wds_dataset
