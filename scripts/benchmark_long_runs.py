"""What long-run safety costs: resume time early vs late in an epoch, and the per-step price of the divergence check
and of step checkpoints.

    python scripts/benchmark_long_runs.py --out bench_long                          # both parts
    python scripts/benchmark_long_runs.py --out bench_long --skip-step-costs        # resume part only

1. Resume cost wherever it lands. LAION-style shards (--shards, default 200, --samples-per-shard each) are written,
   and a 3T-tiny run (python -m training.main, --workers data workers, OpenCLIP's own sample-shuffle buffer) trains
   until it has saved step checkpoints at 10% and at 90% of its epoch. From each, a fresh run resumes (--resume
   latest) and is stopped at its first trained step. Printed per point: launch -> first step after the resume
   (seconds, median of --rounds), the shards the resumed data workers read as a stream (OpenCLIP's tar reader,
   wrapped) and the consumed shards they read only the shuffle buffer's samples of, by seeking (first round).
   Target: time at 90% <= 1.3 x time at 10%.
2. Step costs at --model size (default 3T-ViT-B-16, h with random weights, --device): one training step (forward,
   loss, backward, AdamW) timed with and without the divergence check (every loss term's finiteness, the gradient
   norm, the verdict); and one step checkpoint (model + optimizer state, written atomically to --out). Printed as
   ratios to the step: the check's per step, the checkpoint's amortised over the default interval
   (--save-every-minutes 30) and over --save-every-n-steps values.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

OPEN_RECORDER = """
import os, sys
import open_clip_train.data as data
import open_clip_3t.shards as shards
reader, read_at, log = data.tarfile_to_samples_nothrow, shards.read_samples_at, os.environ["OPENED_LOG"]
def recording(src):  # a shard read as a stream, from its start
    with open(log, "a") as f:
        f.write(f"stream {src[0]['url']} 0\\n")
    return reader(src)
def recording_at(url, wanted, group):  # a consumed shard: only the samples the shuffle buffer held, by seeking
    with open(log, "a") as f:
        f.write(f"seek {url} {len(wanted)}\\n")
    return read_at(url, wanted, group)
data.tarfile_to_samples_nothrow, shards.read_samples_at = recording, recording_at
from training.main import main
main(sys.argv[1:])
"""


def train_command(args, logs, name, *extra):
    return [sys.executable, os.path.join(args.out, "recorder.py"), "--model", "3T-tiny",
            "--third-tower-weights", os.path.join(args.out, "h.pth"),
            "--train-data", os.path.join(args.out, "data", f"{{00000..{args.shards - 1:05d}}}.tar"),
            "--train-num-samples", str(args.shards * args.samples_per_shard), "--batch-size", str(args.batch_size),
            "--epochs", "1", "--lr", "1e-3", "--warmup", "1", "--workers", str(args.workers), "--seed", "0",
            "--precision", "fp32", "--device", "cpu", "--logs", logs, "--name", name, "--log-every-n-steps", "1",
            *extra]


def until_line(cmd, log_file, needle, env, timeout=1800):
    """Run `cmd` until `needle` shows in `log_file` (LOGS/NAME/out.log); returns seconds from launch, then stops the
    run. Its stderr goes to LOGS/NAME.stderr (a pipe nobody reads would fill up and block the run's logging)."""
    start = time.monotonic()
    err_path = os.path.dirname(log_file) + ".stderr"
    os.makedirs(os.path.dirname(err_path), exist_ok=True)
    with open(err_path, "w") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    try:
        while True:
            if os.path.exists(log_file) and needle(open(log_file).read()):
                return time.monotonic() - start
            if proc.poll() is not None:
                raise SystemExit(f"the run ended before the line awaited: {open(err_path).read()[-2000:]}")
            if time.monotonic() - start > timeout:
                raise SystemExit("timed out")
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()


def resume_costs(args):
    import timm
    import torch

    from open_clip_3t.toy.synthetic import write_shards
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "recorder.py"), "w") as f:
        f.write(OPEN_RECORDER)
    if not os.path.exists(os.path.join(args.out, "data", "sizes.json")):
        print(f"writing {args.shards} shards of {args.samples_per_shard} samples ...", flush=True)
        write_shards(os.path.join(args.out, "data"), args.shards * args.samples_per_shard, args.samples_per_shard,
                     seed=0, image_size=32)
    torch.manual_seed(0)
    torch.save(timm.create_model("test_vit", num_classes=7, img_size=32).state_dict(), os.path.join(args.out, "h.pth"))
    steps = args.shards * args.samples_per_shard // args.batch_size
    early, late = steps // 10, 9 * steps // 10
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "OPENED_LOG": os.devnull}
    logs = os.path.join(args.out, "logs")
    shutil.rmtree(logs, ignore_errors=True)
    print(f"training to step {late} of {steps} (step checkpoints every {early} steps) ...", flush=True)
    folder = os.path.join(logs, "reference", "checkpoints")
    until_line(train_command(args, logs, "reference", "--save-every-n-steps", str(early),
                             "--keep-step-checkpoints", "100"), os.path.join(logs, "reference", "out.log"),
               lambda text: f"epoch_0_step_{late}.pt" in text, env)
    points = (("10%", early), ("90%", late))
    times, opened = {label: [] for label, _ in points}, {label: [] for label, _ in points}
    for r in range(args.rounds):  # alternate the two points, so that drift in the machine's load hits both alike
        for label, step in points if r % 2 == 0 else points[::-1]:
            name = f"resume-{label[:-1]}-{r}"
            os.makedirs(os.path.join(logs, name, "checkpoints"))
            shutil.copy(os.path.join(folder, f"epoch_0_step_{step}.pt"), os.path.join(logs, name, "checkpoints"))
            record = os.path.join(args.out, f"{name}.opened")
            if os.path.exists(record):  # from an earlier benchmark in this folder
                os.remove(record)
            times[label].append(until_line(train_command(args, logs, name, "--resume", "latest"),
                                           os.path.join(logs, name, "out.log"),
                                           lambda text: "Train Epoch: 0 [" in text, {**env, "OPENED_LOG": record}))
            lines = [line.split() for line in open(record)] if os.path.exists(record) else []
            opened[label].append((sum(kind == "stream" for kind, _, _ in lines),
                                  sum(kind == "seek" for kind, _, _ in lines),
                                  sum(int(n) for kind, _, n in lines if kind == "seek")))
    rows = [(label, step, statistics.median(times[label]), opened[label][0]) for label, step in points]
    print(f"\nresume of a 3T-tiny run, {args.shards} shards x {args.samples_per_shard} samples, {args.workers} data "
          f"workers, batch {args.batch_size}, {steps} steps per epoch; median of {args.rounds} rounds")
    print("| resumed at | step | launch -> first step after the resume (s) | shards read as a stream (from their start) "
          "| consumed shards read by seeking to the buffered samples (samples) |")
    print("|---|---|---|---|---|")
    for label, step, seconds, (streamed, seeked, samples) in rows:
        print(f"| {label} | {step} | {seconds:.2f} | {streamed} of {args.shards} | {seeked} ({samples}) |")
    print(f"ratio 90% / 10%: {rows[1][2] / rows[0][2]:.3f} (target <= 1.3)")


def step_costs(args):
    import open_clip
    import torch

    import open_clip_3t
    from training.long_run import Watch, save_checkpoint, total_grad_norm
    torch.manual_seed(0)
    model = open_clip.create_model(args.model, third_tower="random", output_dict=True).to(args.device).train()
    loss = open_clip_3t.ThreeTowersLoss(towers=model.tower_names)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    images = torch.randn(args.step_batch, 3, size, size, device=args.device)
    texts = open_clip.get_tokenizer(args.model)(["a photo of two red circles"] * args.step_batch).to(args.device)
    watch_args = argparse.Namespace(rank=0, world_size=1, save_every_n_steps=0, save_every_minutes=30,
                                    skip_nonfinite_steps=0)
    watch = Watch(watch_args, 0, 1000, torch.device(args.device))

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(check):
        optimizer.zero_grad()
        losses = loss(**model(images, texts), output_dict=True)
        sum(losses.values()).backward()
        if check == "loss":  # the default: the loss terms, every step
            watch.check(losses, None, 0)
        elif check == "grad":  # --skip-nonfinite-steps (--grad-clip-norm computes the norm for clipping anyway)
            watch.check(losses, total_grad_norm(model.parameters()), 0)
        optimizer.step()

    variants = ("none", "loss", "grad")
    for _ in range(2):
        step("grad")
    times = {v: [] for v in variants}
    for r in range(args.step_rounds):  # rotate the order, so that drift hits every variant alike
        for check in variants[r % 3:] + variants[:r % 3]:
            sync()
            t0 = time.perf_counter()
            step(check)
            sync()
            times[check].append(time.perf_counter() - t0)
    plain, checked, with_norm = (statistics.median(times[v]) for v in variants)
    checkpoint = {"epoch": 0, "state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}
    path = os.path.join(args.out, "step_checkpoint.pt")
    t0 = time.perf_counter()
    save_checkpoint(checkpoint, path)
    save = time.perf_counter() - t0
    size_mb = os.path.getsize(path) / 2 ** 20
    os.remove(path)
    print(f"\none training step of {args.model} on {args.device}, batch {args.step_batch}, median of "
          f"{args.step_rounds} (rotating): {plain:.3f} s without the divergence check, {checked:.3f} s with it (loss "
          f"terms, the default), {with_norm:.3f} s with it reading the gradient norm too")
    print(f"divergence check per step: ratio {checked / plain:.4f} (default); {with_norm / plain:.4f} with the "
          f"gradient norm (--skip-nonfinite-steps; under --grad-clip-norm the norm is computed for clipping anyway)")
    print(f"step checkpoint (model + AdamW state, {size_mb:.0f} MiB, written atomically to {args.out}): {save:.2f} s")
    print(f"step checkpoints by the clock (default --save-every-minutes 30): ratio {1 + save / 1800:.4f}")
    for n in (100, 1000):
        print(f"step checkpoints every {n} steps at this step time: ratio {1 + save / (n * plain):.4f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="working folder (shards, runs, a checkpoint)")
    parser.add_argument("--shards", type=int, default=200)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="3T-ViT-B-16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--step-rounds", type=int, default=9)
    parser.add_argument("--skip-resume", action="store_true")
    parser.add_argument("--skip-step-costs", action="store_true")
    args = parser.parse_args(argv)
    if not args.skip_resume:
        resume_costs(args)
    if not args.skip_step_costs:
        step_costs(args)


if __name__ == "__main__":
    main()
