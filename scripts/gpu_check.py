"""The GPU check of issue 13 as one prepared command: `scripts/gpu_check.sh OUT_DIR` (this file does the work).

On one machine with one NVIDIA GPU and nothing to download, within a time budget (450 s, so that the whole command
with its start-up stays under 8 minutes), it runs these steps, each in its own process:

    environment      torch sees the GPU; versions, GPU name, CPU cores
    data             generated LAION-style shards (256-px JPEG, synthetic shapes) and random weights for h
    step_benchmark   scripts/benchmark.py at ViT-B/16, batch 256, amp_bf16: CLIP, 3T fed-in, 3T online, distill,
                     SigLIP, SigLIP-3T fed-in and online, h forward; median step time and CUDA step peak memory
    cache_benchmark  scripts/benchmark_cache.py: the cache build (one decode worker per core, h in bf16) against h's
                     pure inference, the decode stage per worker; the cache it builds feeds train_3t
    train_3t         50 steps of 3T-ViT-B-16 from that cache, amp_bf16, under torchrun (NCCL), one checkpoint
    export           that checkpoint exported as a plain OpenCLIP folder; 3T's features of fixed inputs
    reload           vanilla OpenCLIP (open_clip_3t never imported) loads the folder: its features equal 3T's
    train_clip       the same 50 steps with --model ViT-B-16 (the reference of the training samples/s target)
    report           the targets and the report, from the figures above (in this process)

and writes OUT_DIR/report.md and OUT_DIR/report.json: the figures, and which targets of the issue passed (and the
same step targets for SigLIP-3T against SigLIP). A step
that fails (non-zero exit, a figure missing or not finite, the budget spent) stops the check: the command exits 1
with one line naming the step, and OUT_DIR holds FAILED.md/FAILED.json (the step, its error, what finished before)
instead of a report. OUT_DIR/logs/STEP.log keeps each step's output. Big files (shards, cache, checkpoint) go to a
temporary work folder (--workdir), deleted after a complete check.

GPU_CHECK_TINY=1 runs the same steps tiny on CPU (3T-tiny and 3T-baseline-CLIP-tiny, fp32, gloo): the test suite runs it to check
the logic; its figures mean nothing. Each setting below can be overridden by GPU_CHECK_<NAME>, e.g.
GPU_CHECK_BUDGET_S=600.

This module imports only the standard library: torch and the project are imported by the steps' own processes (the
`_data`, `_export` and `_reload` entry points below).
"""
import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
CAPTIONS = ["a red circle on a blue background", "two small green squares", "a photo of a yellow star", "a dot"]


@dataclasses.dataclass
class Settings:
    device: str = "cuda"
    model: str = "3T-ViT-B-16"
    clip_model: str = "ViT-B-16"
    precision: str = "amp_bf16"            # training and step benchmark
    cache_precision: str = "bf16"          # h's compute precision in the cache build
    batch: int = 256                       # per process
    train_steps: int = 50
    bench_steps: int = 30                  # timed steps per variant of the step benchmark
    bench_rounds: int = 5
    bench_warmup: int = 3
    image_size: int = 256                  # generated JPEGs
    unique_images: int = 512               # drawn once, then repeated under new keys (drawing is slow; decoding is not)
    samples_per_shard: int = 512          # >= 2 batches per shard, as real shards have (a batch never spans shards)
    workers: int = os.cpu_count() or 1     # decode workers of the cache build; data workers of training (shared)
    decode_shards_per_worker: int = 2
    inference_samples: int = 2048          # batches held on the device for h's pure inference
    nproc: int = 1                         # training processes (GPUs)
    backend: str = "nccl"
    budget_s: int = 450


TINY = dict(device="cpu", model="3T-tiny", clip_model="3T-baseline-CLIP-tiny", precision="fp32", cache_precision="fp32", batch=8,
            train_steps=4, bench_steps=2, bench_rounds=1, bench_warmup=1, image_size=64, unique_images=16,
            samples_per_shard=16, workers=2, decode_shards_per_worker=2, inference_samples=32, nproc=1,
            backend="gloo", budget_s=900)

# (name, kind, limit): the targets of issue 13, and the step targets for SigLIP-3T against SigLIP; each is met when
# its value is <= limit ("max") or >= limit ("min").
TARGETS = [
    ("3T fed-in / CLIP step time", "max", 1.03),
    ("3T online / (CLIP + h forward) step time", "max", 1.02),
    ("3T fed-in / CLIP step peak memory", "max", 1.01),
    ("3T online / CLIP step peak memory", "max", 1.01),
    ("cache build / h pure inference samples/s (steady)", "min", 0.9),
    ("3T from the cache / ViT-B-16 training samples/s", "min", 0.97),
    ("SigLIP-3T fed-in / SigLIP step time", "max", 1.03),
    ("SigLIP-3T online / (SigLIP + h forward) step time", "max", 1.02),
    ("SigLIP-3T fed-in / SigLIP step peak memory", "max", 1.01),
    ("SigLIP-3T online / SigLIP step peak memory", "max", 1.01),
]
VARIANTS = ("clip", "3t-fed", "3t-online", "3t-k2-fed", "distill", "siglip", "siglip-3t-fed", "siglip-3t-online",
            "h-forward")


def settings_from_env(environ=None):
    env = os.environ if environ is None else environ
    values = dict(TINY) if env.get("GPU_CHECK_TINY") == "1" else {}
    for field in dataclasses.fields(Settings):
        raw = env.get(f"GPU_CHECK_{field.name.upper()}")
        if raw is not None:
            values[field.name] = int(raw) if field.type is int else raw
    return Settings(**values)


class StepFailed(Exception):
    def __init__(self, step, message):
        super().__init__(message)
        self.step, self.message = step, message


def finite(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require(step, figures, *paths, positive=True):
    """Fail `step` unless each dotted path of `figures` holds a finite number (> 0 unless positive=False)."""
    for path in paths:
        value = figures
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not finite(value) or (positive and value <= 0):
            raise StepFailed(step, f"figure {path} is {value!r}, not a {'positive ' if positive else ''}number")


class Check:
    def __init__(self, settings, out, work):
        self.s, self.out, self.work = settings, out, work
        self.start = time.monotonic()
        self.deadline = self.start + settings.budget_s
        self.finished = []     # [{"step", "seconds"}]
        self.figures = {}
        self.shards = None  # the --train-data spec of the generated shards (step data)
        self.h_weights = os.path.join(work, "random_h.pth")

    def run(self, step, cmd, cwd=None):
        """Run one step's command in its own process group, output to OUT/logs/STEP.log; fail the step on a non-zero
        exit or on the budget running out (the whole group is killed)."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise StepFailed(step, f"not started: the check's {self.s.budget_s} s budget is spent")
        env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
        log_path = os.path.join(self.out, "logs", f"{step}.log")
        print(f"gpu_check: {step} ...", file=sys.stderr, flush=True)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=cwd or REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepFailed(step, f"killed: it ran past the check's {self.s.budget_s} s budget "
                                       f"(see {log_path})") from None
        if rc != 0:
            raise StepFailed(step, f"exit status {rc}: {last_line(log_path)} (see {log_path})")

    def step(self, name, fn):
        started = time.monotonic()
        try:
            fn(name)
        except StepFailed:
            raise
        except Exception as e:  # figures of an unexpected shape, a file that is not there: still this step's failure
            raise StepFailed(name, f"{type(e).__name__}: {e}") from e
        self.finished.append({"step": name, "seconds": round(time.monotonic() - started, 1)})

    def python(self, step, *args, cwd=None):
        self.run(step, [sys.executable, *args], cwd=cwd)

    def read_json(self, step, path):
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            raise StepFailed(step, f"wrote no readable figures ({path}: {e})") from None

    # --- the steps ------------------------------------------------------------------------------------------

    def environment(self, step):
        path = os.path.join(self.work, "environment.json")
        self.python(step, __file__, "_environment", path)
        self.figures[step] = self.read_json(step, path)

    def data(self, step):
        path = os.path.join(self.work, "data.json")
        self.python(step, __file__, "_data", self.work, path)
        info = self.read_json(step, path)
        require(step, info, "shards", "samples")
        self.shards = os.path.join(self.work, "shards", f"{{00000..{info['shards'] - 1:05d}}}.tar")
        self.figures[step] = info

    def step_benchmark(self, step):
        s, path = self.s, os.path.join(self.work, "step_benchmark.json")
        self.python(step, os.path.join(SCRIPTS, "benchmark.py"), "--model", s.model, "--device", s.device,
                    "--batch-size", str(s.batch), "--steps", str(s.bench_steps), "--rounds", str(s.bench_rounds),
                    "--warmup", str(s.bench_warmup), "--precision", s.precision, "--json", path,
                    "--no-collectives")  # counted on CPU gloo ranks: not a GPU figure
        figures = self.read_json(step, path)
        require(step, figures, *(f"median_step_s.{v}" for v in VARIANTS), *(f"step_peak_bytes.{v}" for v in VARIANTS),
                "fed_over_clip", "online_over_clip_plus_h", "siglip_fed_over_siglip",
                "siglip_online_over_siglip_plus_h")
        self.figures[step] = figures

    def cache_benchmark(self, step):
        s, path = self.s, os.path.join(self.work, "cache_benchmark.json")
        self.python(step, os.path.join(SCRIPTS, "benchmark_cache.py"), "--model", s.model,
                    "--third-tower-weights", self.h_weights, "--train-data", self.shards, "--batch-size", str(s.batch),
                    "--workers", str(s.workers), "--device", s.device, "--precision", s.cache_precision,
                    "--inference-samples", str(s.inference_samples), "--loader-repeats", "1",
                    "--decode-repeats", "1", "--decode-shards-per-worker", str(s.decode_shards_per_worker),
                    "--out", os.path.join(self.work, "cache"), "--workdir", self.work, "--json", path)
        figures = self.read_json(step, path)
        require(step, figures, "build_samples_per_s", "build_steady_samples_per_s", "h_inference_samples_per_s",
                "decode_samples_per_s.1", f"decode_samples_per_s.{s.workers}", "decode_samples_per_worker_cpu_s.1",
                "predicted_build_samples_per_s", "build_steady_over_inference")
        if figures["samples"] != self.figures["data"]["samples"]:
            raise StepFailed(step, f"the build embedded {figures['samples']} of {self.figures['data']['samples']} "
                                   f"samples")
        self.figures[step] = figures

    def train(self, step, name, model, *flags):
        """torchrun of `python -m training.main` in WORK (its default ./logs), then its log's figures. OpenCLIP rounds
        an epoch up to a multiple of the data workers (each draws as many batches): their number divides the steps."""
        s = self.s
        workers = max(d for d in range(1, max(1, s.workers // s.nproc) + 1) if s.train_steps % d == 0)
        self.python(step, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(s.nproc),
                    "-m", "training.main", "--name", name, "--model", model, "--train-data", self.shards,
                    "--dataset-type", "webdataset", "--dataset-resampled",
                    "--train-num-samples", str(s.train_steps * s.batch * s.nproc), "--batch-size", str(s.batch),
                    "--epochs", "1", "--precision", s.precision, "--workers", str(workers),
                    "--device", s.device, "--dist-backend", s.backend, "--lr", "5e-4", "--warmup", "5",
                    "--wd", "0.1", "--log-every-n-steps", "1", "--seed", "0", *flags, cwd=self.work)
        run_dir = os.path.join(self.work, "logs", name)
        figures = training_figures(step, os.path.join(run_dir, "out.log"), s.train_steps, s.batch)
        figures.update(run_dir=run_dir, data_workers=workers)
        self.figures[step] = figures

    def train_3t(self, step):
        self.train(step, "3t", self.s.model, "--third-tower-weights", self.h_weights, "--third-tower-cache",
                   os.path.join(self.work, "cache"), "--save-frequency", "1")
        checkpoint = os.path.join(self.work, "logs", "3t", "checkpoints", "epoch_1.pt")
        if not os.path.isfile(checkpoint):
            raise StepFailed(step, f"no checkpoint {checkpoint}")
        self.figures[step]["checkpoint_bytes"] = os.path.getsize(checkpoint)

    def train_clip(self, step):
        self.train(step, "clip", self.s.clip_model, "--save-frequency", "0")

    def export(self, step):
        path = os.path.join(self.work, "export.json")
        self.python(step, __file__, "_export", self.work, path)
        self.figures[step] = self.read_json(step, path)

    def reload(self, step):
        path = os.path.join(self.work, "reload.json")
        self.python(step, __file__, "_reload", self.work, path)
        figures = self.read_json(step, path)
        require(step, figures, "max_abs_diff_image", "max_abs_diff_text", positive=False)
        if figures["class"] != "CLIP" or figures["plugin_imported"] or not figures["equal"]:
            raise StepFailed(step, f"vanilla OpenCLIP's reload does not match 3T: {figures}")
        self.figures[step] = figures

    def report(self, step):
        """The targets and the report (written by main once everything stands)."""
        f = self.figures
        bench, cache_ = f["step_benchmark"], f["cache_benchmark"]
        peak = bench["step_peak_over_base"]
        training = f["train_3t"]["samples_per_s"] / f["train_clip"]["samples_per_s"]
        values = [bench["fed_over_clip"], bench["online_over_clip_plus_h"], peak["3t-fed"], peak["3t-online"],
                  cache_["build_steady_over_inference"], training,
                  bench["siglip_fed_over_siglip"], bench["siglip_online_over_siglip_plus_h"], peak["siglip-3t-fed"],
                  peak["siglip-3t-online"]]
        targets = [{"target": name, "value": round(value, 4), "limit": limit, "kind": kind,
                    "passed": value <= limit if kind == "max" else value >= limit}
                   for (name, kind, limit), value in zip(TARGETS, values)]
        self.result = {
            "complete": True,
            "mode": "tiny-cpu" if os.environ.get("GPU_CHECK_TINY") == "1" else "gpu" if self.s.device == "cuda" else
            self.s.device,
            "settings": dataclasses.asdict(self.s), "total_seconds": round(time.monotonic() - self.start, 1),
            "steps": list(self.finished), "targets": targets,
            "targets_passed": f"{sum(t['passed'] for t in targets)}/{len(targets)}", "figures": self.figures}
        self.markdown = markdown(self.result)


STEPS = ("environment", "data", "step_benchmark", "cache_benchmark", "train_3t", "export", "reload", "train_clip",
         "report")


def training_figures(step, log_path, steps, batch):
    """Steps, losses and samples/s of one training run, from its out.log (a step per line)."""
    try:
        text = open(log_path).read()
    except OSError as e:
        raise StepFailed(step, f"no training log: {e}") from None
    times = [float(t) for t in re.findall(r"Train Epoch: \d+ \[.*?Batch \(t\): ([0-9.]+),", text)]
    losses = [float(v) for v in re.findall(r"Train Epoch: \d+ \[.*? Loss: ([-+0-9.eE]+|nan|inf) ", text)]
    if len(times) != steps or len(losses) != steps:
        raise StepFailed(step, f"{len(times)} training steps logged in {log_path}, expected {steps}")
    if not all(math.isfinite(v) for v in losses):
        raise StepFailed(step, f"non-finite loss in {log_path}: {losses}")
    world = re.search(r"total (\d+)\.", text)
    world_size = int(world.group(1)) if world else 1
    timed = times[max(1, steps // 5):]  # the first fifth warms up (allocator, autotuning, data workers)
    median = statistics.median(timed)
    return {"steps": steps, "world_size": world_size, "distributed": world is not None,
            "median_step_s": median, "samples_per_s": batch * world_size / median,
            "first_loss": losses[0], "last_loss": losses[-1]}


def last_line(path):
    lines = [line.strip() for line in open(path, errors="replace").read().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# --- the report ---------------------------------------------------------------------------------------------------

def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def markdown(report):
    f, s = report["figures"], report["settings"]
    env, bench, cache_ = f["environment"], f["step_benchmark"], f["cache_benchmark"]
    t3, tc, rl = f["train_3t"], f["train_clip"], f["reload"]
    mib = 2 ** 20
    lines = [f"# open_clip_3t GPU check ({report['mode']})", "",
             f"{env['device_name']}, torch {env['torch']} (CUDA {env['cuda']}), {env['cpu_cores']} CPU cores, "
             f"/dev/shm {(env['shm_bytes'] or 0) / 2 ** 30:.1f} GiB; {report['total_seconds']:.0f} s in all. "
             f"Targets passed: {report['targets_passed']}.", ""]
    if report["mode"] != "gpu":
        lines += ["Not a GPU run: these figures test the check's logic and say nothing about the targets.", ""]
    lines += ["## Targets (issue 13)", "", "| target | value | limit | passed |", "|---|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']:.3f} | {'<=' if t['kind'] == 'max' else '>='} {t['limit']} | "
              f"{'yes' if t['passed'] else 'NO'} |" for t in report["targets"]]
    lines += ["", f"## 1. Step benchmark: {bench['model']}, batch {bench['batch_size']}, {bench['precision']}", "",
              "| variant | median step (ms) | vs CLIP | step peak (MiB) | state (MiB) |", "|---|---|---|---|---|"]
    for name, seconds in bench["median_step_s"].items():
        lines.append(f"| {name} | {seconds * 1e3:.1f} | {seconds / bench['median_step_s']['clip']:.3f} | "
                     f"{bench['step_peak_bytes'][name] / mib:.0f} | {bench['state_bytes'][name] / mib:.0f} |")
    lines += ["", f"## 2. Cache build: {cache_['third_tower']} in {cache_['precision']}, {cache_['workers']} decode "
                  f"workers, {cache_['samples']} samples of {s['image_size']} px", "",
              "| figure | samples/s |", "|---|---|",
              f"| h pure inference | {cache_['h_inference_samples_per_s']:.0f} |",
              f"| build (steady) | {cache_['build_steady_samples_per_s']:.0f} |",
              f"| build (whole, with start-up) | {cache_['build_samples_per_s']:.0f} |",
              f"| predicted: min(workers x decode per worker CPU-s, h) | "
              f"{cache_['predicted_build_samples_per_s']:.0f} |"]
    for k, rate in cache_["decode_samples_per_s"].items():
        lines.append(f"| decode stage, {k} worker(s) | {rate:.0f} ({cache_['decode_samples_per_s_per_worker'][k]:.0f} "
                     f"per worker, {cache_['decode_samples_per_worker_cpu_s'][k]:.0f} per worker CPU-s) |")
    if "loader_cached_over_plain" in cache_:
        lines.append(f"| training loader with the cache join / without | {cache_['loader_cached_over_plain']:.3f} |")
    lines += ["", f"## 3. Training: {s['train_steps']} steps, batch {s['batch']} x {t3['world_size']} process(es), "
                  f"{t3['data_workers']} data workers each, {s['precision']}, torchrun ({s['backend']}"
                  f"{'' if t3['distributed'] else '; one process: OpenCLIP creates no process group'})", "",
              "| run | median step (ms) | samples/s | first loss | last loss |", "|---|---|---|---|---|"]
    for name, run in ((f"{s['model']} from the cache", t3), (s["clip_model"], tc)):
        lines.append(f"| {name} | {run['median_step_s'] * 1e3:.1f} | {run['samples_per_s']:.0f} | "
                     f"{run['first_loss']:.4f} | {run['last_loss']:.4f} |")
    lines += ["", f"Checkpoint {t3['checkpoint_bytes'] / mib:.0f} MiB, exported to a plain OpenCLIP folder and "
                  f"reloaded by vanilla OpenCLIP ({rl['class']}, open_clip_3t not imported): features equal to 3T's "
                  f"(max abs difference: image {rl['max_abs_diff_image']:.2e}, text {rl['max_abs_diff_text']:.2e}).",
              "", "## Steps", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {x['step']} | {x['seconds']} |" for x in report["steps"]]
    return "\n".join(lines) + "\n"


def fail_report(check, error, out):
    report = {"complete": False, "failed_step": error.step, "error": error.message, "finished_steps": check.finished,
              "figures_so_far": check.figures, "settings": dataclasses.asdict(check.s)}
    write_atomic(os.path.join(out, "FAILED.json"), json.dumps(report, indent=1) + "\n")
    done = ", ".join(x["step"] for x in check.finished) or "none"
    write_atomic(os.path.join(out, "FAILED.md"),
                 f"# open_clip_3t GPU check FAILED at step `{error.step}`\n\n{error.message}\n\nSteps finished before "
                 f"it: {done}. No figures of this run are a result: rerun the check once the step is fixed.\n")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in CHILD_STEPS:  # one step's own process
        return CHILD_STEPS[argv[0]](settings_from_env(), *argv[1:])
    parser = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n")[0])
    parser.add_argument("out", help="folder for report.md/report.json (or FAILED.md/FAILED.json) and logs/")
    parser.add_argument("--workdir", default=None,
                        help="folder for shards, cache, checkpoint (default: a temporary one)")
    args = parser.parse_args(argv)
    settings = settings_from_env()
    out = os.path.abspath(args.out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    for name in ("report.md", "report.json", "FAILED.md", "FAILED.json"):  # never leave an old verdict behind
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    work = os.path.abspath(args.workdir) if args.workdir else tempfile.mkdtemp(prefix="gpu_check_")
    os.makedirs(work, exist_ok=True)
    check = Check(settings, out, work)
    try:
        for name in STEPS:
            check.step(name, getattr(check, name))
    except StepFailed as e:
        fail_report(check, e, out)
        print(f"gpu_check: FAILED at step {e.step}: {e.message}; see {out}/FAILED.md (work folder kept: {work})",
              file=sys.stderr)
        return 1
    write_atomic(os.path.join(out, "report.md"), check.markdown)
    write_atomic(os.path.join(out, "report.json"), json.dumps(check.result, indent=1) + "\n")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"gpu_check: complete in {check.result['total_seconds']:.0f} s, targets passed "
          f"{check.result['targets_passed']}: {out}/report.md")
    return 0


# --- the steps that run in their own process (imports of torch and the project happen only here) ---------------

def _environment(settings, path):
    from importlib.metadata import version

    import torch
    cuda = torch.cuda.is_available()
    if settings.device == "cuda" and not cuda:
        sys.exit(f"torch {torch.__version__} sees no CUDA device (built for CUDA {torch.version.cuda}, "
                 f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}): check the driver and that this "
                 f"venv's torch is a CUDA build, or run the tiny CPU mode with GPU_CHECK_TINY=1")
    if settings.device == "cuda" and torch.cuda.device_count() < settings.nproc:
        sys.exit(f"GPU_CHECK_NPROC={settings.nproc} training processes but {torch.cuda.device_count()} GPU(s)")
    info = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "open_clip": version("open_clip_torch"), "timm": version("timm"), "cpu_cores": os.cpu_count(),
            "gpus": torch.cuda.device_count() if cuda else 0,
            "device_name": torch.cuda.get_device_name(0) if settings.device == "cuda" else "CPU",
            "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory if settings.device == "cuda" else 0,
            # DataLoader workers hand batches over in /dev/shm: a container's small default fails the loaders
            "shm_bytes": shutil.disk_usage("/dev/shm").total if os.path.isdir("/dev/shm") else None}
    _write_json(path, info)


def _draw(args):
    """(JPEG bytes, caption) of generated sample `index`: a 4:2:0 JPEG at quality 90, as web images mostly are."""
    import io

    from open_clip_3t.toy.synthetic import draw_sample
    index, image_size = args
    image, _, caption = draw_sample(index, seed=0, split="train", image_size=image_size)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), caption


def _data(settings, work, path):
    """Shards enough for the training epoch (train_steps x batch x nproc samples) and for decode_shards_per_worker
    shards to each decode worker, their images drawn in parallel; and a file of random weights for h's architecture
    (the cache build and training read h from a file: nothing is downloaded)."""
    import io
    import multiprocessing
    import tarfile

    import timm
    import torch

    from open_clip_3t import cache
    train_samples = settings.train_steps * settings.batch * settings.nproc
    shards = max(math.ceil(train_samples / settings.samples_per_shard),
                 settings.workers * settings.decode_shards_per_worker)
    with multiprocessing.Pool(settings.workers) as pool:
        pool_items = pool.map(_draw, [(i, settings.image_size) for i in range(settings.unique_images)])
    folder = os.path.join(work, "shards")
    os.makedirs(folder, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(os.path.join(folder, f"{shard:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(shard * settings.samples_per_shard, (shard + 1) * settings.samples_per_shard):
                jpeg, caption = pool_items[i % len(pool_items)]
                for ext, data in (("jpg", jpeg), ("txt", caption.encode())):
                    member = tarfile.TarInfo(f"{i:09d}.{ext}")
                    member.size = len(data)
                    tar.addfile(member, io.BytesIO(data))
    cfg = cache.cached_tower(settings.model)
    torch.save(timm.create_model(cfg.timm_model_name, pretrained=False, **cfg.timm_kwargs).state_dict(),
               os.path.join(work, "random_h.pth"))
    _write_json(path, {"shards": shards, "samples": shards * settings.samples_per_shard,
                       "train_samples": train_samples, "unique_images": len(pool_items),
                       "jpeg_bytes_per_image": sum(len(j) for j, _ in pool_items) / len(pool_items)})


def _inputs(size, context_length, device):
    import open_clip
    import torch
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(len(CAPTIONS), 3, size, size, generator=generator).to(device)
    return images, open_clip.tokenize(CAPTIONS, context_length=context_length).to(device)


def _export(settings, work, path):
    """Export train_3t's checkpoint; save 3T's (eval-mode, fp32) features of fixed inputs for `_reload`."""
    import open_clip
    import torch

    import open_clip_3t
    checkpoint = os.path.join(work, "logs", "3t", "checkpoints", "epoch_1.pt")
    folder = open_clip_3t.export_clip(checkpoint, os.path.join(work, "export"))
    model = open_clip.create_model(settings.model, pretrained=checkpoint, device=settings.device).eval()
    images, texts = _inputs(model.visual.image_size[0], model.context_length, settings.device)
    with torch.no_grad():
        features = {"image": model.encode_image(images, normalize=True).cpu(),
                    "text": model.encode_text(texts, normalize=True).cpu()}
    torch.save(features, os.path.join(work, "features_3t.pt"))
    files = sorted(os.listdir(folder))
    _write_json(path, {"folder": str(folder), "files": files,
                       "bytes": sum(os.path.getsize(os.path.join(folder, n)) for n in files),
                       "model_class": type(model).__name__, "third_tower_built": model.third_tower is not None})


def _reload(settings, work, path):
    """Vanilla OpenCLIP, in a process that never imports open_clip_3t, loads the export: features equal 3T's."""
    import open_clip
    import torch
    model, _, _ = open_clip.create_model_and_transforms("local-dir:" + os.path.join(work, "export"),
                                                        device=settings.device)
    model.eval()
    images, texts = _inputs(model.visual.image_size[0], model.context_length, settings.device)
    with torch.no_grad():
        image, text = model.encode_image(images, normalize=True).cpu(), model.encode_text(texts, normalize=True).cpu()
    reference = torch.load(os.path.join(work, "features_3t.pt"))
    diff_image = (image - reference["image"]).abs().max().item()
    diff_text = (text - reference["text"]).abs().max().item()
    _write_json(path, {"class": type(model).__name__, "plugin_imported": "open_clip_3t" in sys.modules,
                       "max_abs_diff_image": diff_image, "max_abs_diff_text": diff_text,
                       "equal": max(diff_image, diff_text) <= 1e-5})


def _write_json(path, figures):
    write_atomic(path, json.dumps(figures, indent=1) + "\n")


CHILD_STEPS = {"_environment": _environment, "_data": _data, "_export": _export, "_reload": _reload}

if __name__ == "__main__":
    sys.exit(main())
