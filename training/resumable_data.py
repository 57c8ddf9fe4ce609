"""OpenCLIP's webdataset training stream, made a function of (seed, epoch, rank, worker) that can resume at any batch.

OpenCLIP's train pipeline, in each data worker: the worker's shards (detshuffle2(seed, epoch), split by node and by
worker; or ResampledShards2 draws) -> tar reader -> sample shuffle -> decode, augment -> batches, repeated in passes
until the epoch's batches are drawn. `ResumableStream` replaces four of its stages (training/_open_clip_train.py
`wds_make_resumable` does the surgery) and keeps everything else OpenCLIP's:
- read:    the tar reader, one shard at a time, each sample tagged with its place (shard number in this pass, sample
           number in that shard);
- shuffle: webdataset's sample shuffle (the same buffer, the same picks), seeded from (seed, epoch, rank, worker,
           pass) instead of the clock;
- seed_samples: before OpenCLIP's augmentation, the RNGs are seeded from the sample's place, so a sample's random
           crop does not depend on what the worker did before it;
- batch:   OpenCLIP's batches (webdataset's collation, without its one-sample look-ahead), each carrying the worker's
           position after it: the shuffle buffer's members as places, the shuffle's random state and the reader's
           cursor. It also stops an epoch that could never end (a pass with no batch; with resampling, shards drawn
           in a row without one usable sample).
A step checkpoint stores, per worker, the position of the last batch the step consumed. Resumed from it, a worker
first yields a placeholder (SKIPPED) for each batch already consumed, reading nothing; then it reads only the samples
its shuffle buffer held (seeking to them in the shards they came from; a consumed shard none of them came from is not
opened) and goes on from its cursor, reading the shard it was inside from its start: the same batches, in the same
order, with the same augmentations, as if the run had never stopped.
"""
import random

import numpy as np
import torch

from open_clip_3t import shards

SKIPPED = "open_clip_3t: a batch consumed before the run resumed"


class TrainingDataError(RuntimeError):
    """Training data that can never fill an epoch, or a resume point the data no longer has: one line naming the
    input to check."""


def mix(*numbers):
    """A 63-bit seed from non-negative integers (numpy's SeedSequence: well spread, the same on every platform)."""
    return int(np.random.SeedSequence([int(n) for n in numbers]).generate_state(1, np.uint64)[0] >> 1)


def worker_info():
    """(this data worker's number, the number of workers); (0, 1) in the main process."""
    info = torch.utils.data.get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def pick(buf, rng):
    """One sample out of the shuffle buffer: webdataset's pick (a random slot, filled by the last sample)."""
    k = rng.randint(0, len(buf) - 1)
    sample = buf[k]
    buf[k] = buf[-1]
    buf.pop()
    return sample


class ResumableStream:
    """The four stages (see the module docstring), sharing one worker's state. `resume`: {"epoch": e, "positions":
    {worker: position}} of this rank (positions as the batches carried them), or {"epoch": e, "skip": {worker: n}}
    to skip n batches per worker without an exact position (the number of workers changed); None to start fresh."""

    def __init__(self, seed, rank, shared_epoch, resampled, num_shards, hint, resume=None):
        self.seed, self.rank, self.shared_epoch, self.resampled, self.hint = seed, rank, shared_epoch, resampled, hint
        self.max_urls = max(10 * num_shards, 2000)  # resampling: shards drawn in a row without a usable sample
        self.resume = resume
        self._epoch = None  # the rest is one worker's state, set in that worker

    # --- passes ---------------------------------------------------------------------------------------------

    def _begin_pass(self):
        """Called when a pass's batches are first asked for (the outermost stage starts first)."""
        epoch = self.shared_epoch.get_value()
        worker, _ = worker_info()
        self._skip, self._restore = 0, None
        if epoch != self._epoch:
            self._epoch, self._pass, self._batches = epoch, 0, 0
            self._urls_since_sample = 0
            resume = self.resume if self.resume and self.resume["epoch"] == epoch else {}
            self._restore = resume.get("positions", {}).get(worker)
            if self._restore is not None:
                self._pass, self._skip = int(self._restore["pass"]), int(self._restore["batches"])
            else:
                self._skip = resume.get("skip", {}).get(worker, 0)
        else:
            self._pass += 1
        self._buf, self._cursor, self._exhausted, self._pass_samples = [], (-1, -1), False, 0
        self._rng = random.Random(mix(self.seed, epoch, self.rank, worker, self._pass))

    def _where(self):
        worker, workers = worker_info()
        return "the data loader" if workers == 1 and torch.utils.data.get_worker_info() is None else \
            f"data-loader worker {worker}"

    def position(self):
        """This worker's position after its latest batch (everything a resumed run needs to go on from there)."""
        worker, workers = worker_info()
        places = [s["__pos__"] for s in self._buf]
        return {"worker": worker, "workers": workers, "epoch": self._epoch, "pass": self._pass,
                "batches": self._batches, "rng": np.asarray(self._rng.getstate()[1], dtype=np.int64),
                "buffer": np.asarray(places, dtype=np.int64).reshape(-1, 2),
                "cursor": np.asarray(self._cursor, dtype=np.int64), "exhausted": self._exhausted}

    # --- the stages -----------------------------------------------------------------------------------------

    def read(self, urls, read_shard, group=None):
        """urls ({"url": ...} dicts) -> samples tagged __pos__ = (shard number in the pass, sample number in it).
        `read_shard`: OpenCLIP's tar reader (a list of url dicts -> samples); `group`: its grouping of tar members
        into samples. On resume, a shard consumed before the cursor is opened only for the samples the shuffle buffer
        held: those alone are read (its tar headers are read, the rest of its data seeked over; a remote or damaged
        shard is read as a stream up to the last of them). The shard the cursor is in is read from its start."""
        needed, cursor = {}, (-1, -1)
        if self._restore is not None:
            for shard, pos in np.asarray(self._restore["buffer"]).tolist():
                needed.setdefault(shard, set()).add(pos)
            cursor = tuple(int(x) for x in np.asarray(self._restore["cursor"]).tolist())
        for index, src in enumerate(urls):
            keep = needed.get(index, set())
            before = index < cursor[0]
            if before and not keep:
                continue  # consumed before the resume, none of it in the buffer: not opened
            self._urls_since_sample += 1
            if self.resampled and self._urls_since_sample > self.max_urls:
                raise TrainingDataError(f"training data: {self._where()} drew {self.max_urls} shards in a row "
                                        f"(--dataset-resampled) without one usable sample, so the epoch could never "
                                        f"end: {self.hint}")
            found = shards.read_samples_at(src["url"], keep, group) if before and group is not None else None
            if found is not None:
                for pos in sorted(found):
                    found[pos]["__pos__"] = (index, pos)
                    yield found[pos]
                continue
            last = max(keep) if before else None
            for pos, sample in enumerate(read_shard([src])):
                if last is not None and pos > last:
                    break
                if (index, pos) <= cursor and pos not in keep:
                    continue
                sample["__pos__"] = (index, pos)
                yield sample

    def shuffle(self, samples, bufsize=1000, initial=100):
        """webdataset's sample shuffle (filters._shuffle: fill to `initial`, then take two in and give one out until
        `bufsize`, then one in one out; drain at the end), with this pass's seeded random state; on resume, the
        buffer and random state are restored from the samples `read` yields first."""
        initial, buf, rng = min(initial, bufsize), self._buf, self._rng
        if self._restore is not None:
            places = [tuple(p) for p in np.asarray(self._restore["buffer"]).tolist()]
            held = {}
            for sample in samples:
                held[sample["__pos__"]] = sample
                if len(held) == len(places):
                    break
            if len(held) < len(places):
                missing = sorted(set(places) - set(held))[0]
                raise TrainingDataError(f"cannot resume: {self._where()} no longer finds sample {missing[1]} of the "
                                        f"shard drawn {missing[0]}th in this pass (the training data changed since "
                                        f"the checkpoint): resume from an epoch checkpoint, or restore the data")
            buf.extend(held[p] for p in places)
            rng.setstate((3, tuple(int(x) for x in np.asarray(self._restore["rng"]).tolist()), None))
            self._cursor = tuple(int(x) for x in np.asarray(self._restore["cursor"]).tolist())
            self._exhausted = bool(self._restore["exhausted"])
        if not self._exhausted:
            for sample in samples:
                buf.append(sample)
                self._cursor = sample["__pos__"]
                if len(buf) < bufsize:
                    try:
                        buf.append(next(samples))
                        self._cursor = buf[-1]["__pos__"]
                    except StopIteration:
                        pass
                if len(buf) >= initial:
                    yield pick(buf, rng)
            self._exhausted = True
        while buf:
            yield pick(buf, rng)

    def seed_samples(self, samples):
        """Seed torch's, numpy's and Python's RNGs from each sample's place, right before OpenCLIP augments it."""
        worker, _ = worker_info()
        for sample in samples:
            self._urls_since_sample = 0  # a usable sample: it passed OpenCLIP's filter and decoder
            self._pass_samples += 1
            shard, pos = sample["__pos__"]
            seed = mix(self.seed, self._epoch, self.rank, worker, self._pass, shard, pos)
            torch.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2 ** 32)
            yield sample

    def batch(self, samples, batchsize, collation_fn, partial=False):
        """Batches of `batchsize` samples (webdataset's batched, yielding as soon as a batch is full), each with
        this worker's position appended; on resume, first a placeholder for each batch already consumed."""
        self._begin_pass()
        resumed = self._skip > 0 or self._restore is not None
        for _ in range(self._skip):
            self._batches += 1
            yield SKIPPED
        self._skip = 0
        batch = []
        for sample in samples:
            batch.append(sample)
            if len(batch) == batchsize:
                self._batches += 1
                yield (*collation_fn(batch), self.position())
                batch = []
        if batch and partial:
            yield (*collation_fn(batch), self.position())
        if not self.resampled and not resumed and self._pass_samples < batchsize:
            raise TrainingDataError(f"training data: a full pass over the shards of {self._where()} gave "
                                    f"{self._pass_samples} usable sample(s), fewer than one batch of {batchsize}, so "
                                    f"the epoch could never end: {self.hint}")
