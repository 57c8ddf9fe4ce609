"""Progress of the long loops (each evaluation task, in training and in `python -m training.eval`; the cache build):
tqdm's bar, with the total and an ETA, when stderr is a terminal; one line per 10% otherwise (a SLURM log, a pipe) or
with `--quiet`, so that a log stays readable and an ImageNet-sized task never looks hung.

    bar = progress(total, "zero-shot pets", " batches", quiet=args.quiet)   # update(n), set_postfix_str, close
    for batch in tracked(loader, len(loader), "zero-shot pets", " batches"): ...
"""
import sys
import time

from tqdm import tqdm

LINE = "{desc}: {percentage:3.0f}% ({n_fmt}/{total_fmt}{unit}) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
UNKNOWN = "{desc}: {n_fmt}{unit} [{elapsed}, {rate_fmt}{postfix}]"  # no total (yet)
EVERY = 10  # percent between two lines


def _stderr(line):
    print(line, file=sys.stderr, flush=True)


class PercentLines:
    """tqdm's counters written as one line each time another EVERY percent is done, and one at the end (close);
    `total` may be set again while running (an estimate that improves)."""

    def __init__(self, total, desc, unit, emit):
        self.total, self.desc, self.unit, self.emit = total, desc, unit, emit
        self.n, self.postfix, self.shown, self.start = 0, "", -1, time.monotonic()

    def line(self):
        return tqdm.format_meter(self.n, self.total or None, time.monotonic() - self.start, prefix=self.desc,
                                 unit=self.unit, postfix=self.postfix or None,
                                 bar_format=LINE if self.total else UNKNOWN)

    def update(self, n=1):
        self.n += n
        if self.total:
            step = int(100 * self.n / self.total) // EVERY
            if self.shown < step < 100 // EVERY:  # 100%: at close, with the last postfix
                self.shown = step
                self.emit(self.line())

    def set_postfix_str(self, text, refresh=True):
        self.postfix = text

    def write(self, text, file=None):
        self.emit(text)

    def close(self):
        if self.total is not None or self.n:  # the last line: where it ended (not said twice)
            self.emit(self.line())
        self.total, self.n = None, 0


def progress(total, desc, unit=" it", quiet=False, emit=None):
    """A progress counter over `total` units (None: not known). quiet: False for a bar on a terminal (lines
    elsewhere), "lines" for lines everywhere (--quiet), True for nothing at all (library calls). Lines go to `emit`
    (default: stderr; the trainer passes logging.info, so that they reach its log file too)."""
    if quiet is True:
        return tqdm(total=total, disable=True)
    if quiet is False and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit=unit.strip() or "it", file=sys.stderr, dynamic_ncols=True,
                    leave=False)
    return PercentLines(total, desc, unit, emit or _stderr)


def tracked(iterable, total, desc, unit=" batches", quiet=False, emit=None):
    """`iterable`, counted by a `progress` counter that closes when the loop ends (or stops early)."""
    bar = progress(total, desc, unit, quiet, emit)
    try:
        for item in iterable:
            yield item
            bar.update(1)
    finally:
        bar.close()
