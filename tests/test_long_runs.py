"""Long runs (training/resumable_data.py, training/long_run.py): the same command and seed give the same weights; a
run interrupted at any step (kill -9, SIGTERM, a write killed mid-checkpoint, a full disk) and resumed with --resume
latest ends with the weights of the run that never stopped; a run that diverges stops and writes nothing
non-finite. Tiny 3T runs on 32 px shards, CPU, fp32; data workers where the order across workers matters."""
import os
import random
import re
import signal
import subprocess
import sys
import time
from argparse import Namespace

import open_clip
import pytest
import torch
from open_clip_train.data import tarfile_to_samples_nothrow as READ_SHARD  # OpenCLIP's tar reader

from open_clip_3t import cache
from open_clip_3t.toy.synthetic import write_shards
from tests.conftest import REPO

PY = sys.executable
EPOCH_STEPS = 12  # 96 samples / batch 8


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("long_runs")
    write_shards(str(root / "train"), num_samples=96, samples_per_shard=16, seed=0, image_size=32)
    return root


def command(data, h_weights, logs, name, *extra, workers=2):
    return [PY, "-m", "training.main", "--model", "3T-tiny", "--third-tower-weights", h_weights,
            "--train-data", str(data / "train" / "{00000..00005}.tar"), "--train-num-samples", "96",
            "--batch-size", "8", "--epochs", "2", "--lr", "1e-3", "--warmup", "1", "--workers", str(workers),
            "--seed", "0", "--precision", "fp32", "--device", "cpu", "--logs", str(logs), "--name", name,
            "--log-every-n-steps", "1", *extra]


def env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}


def run(cmd, cwd, expect=0, timeout=300):
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout)
    assert proc.returncode == expect, (proc.returncode, proc.stderr[-3000:])
    return proc


def weights(run_dir, name="epoch_2.pt"):
    return torch.load(run_dir / "checkpoints" / name, map_location="cpu", weights_only=False)["state_dict"]


def max_difference(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def interrupt(cmd, cwd, log, at_step, sig):
    """Start `cmd` in its own process group; once its out.log shows `at_step` steps, send `sig` to the whole group
    (the trainer and its data workers, as SLURM signals every process of a job step). Returns the exit status."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while log.read_text().count("Train Epoch") < at_step if log.exists() else True:
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run never reached the step to interrupt"
            time.sleep(0.05)
        os.killpg(proc.pid, sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def reference(data, h_weights, tmp_path_factory):
    """Uninterrupted runs: online (twice, to show the same command gives the same weights), cached, resampled."""
    tmp = tmp_path_factory.mktemp("reference")
    cache.build(str(data / "train" / "{00000..00005}.tar"), "3T-tiny", str(tmp / "cache"), h_weights, batch_size=8,
                workers=0, quiet=True)
    variants = {"online": [], "cached": ["--third-tower-cache", str(tmp / "cache")],
                "resampled": ["--dataset-resampled"]}
    runs = {}
    for name, flags in [*variants.items(), ("online-again", [])]:
        run(command(data, h_weights, tmp / "logs", name, *flags), tmp)
        runs[name] = weights(tmp / "logs" / name)
    return runs, variants


def test_the_same_command_and_seed_give_the_same_weights(reference):
    runs, _ = reference
    assert max_difference(runs["online"], runs["online-again"]) == 0.0
    # and the variants did train differently (a comparison of untouched models would prove nothing)
    assert max_difference(runs["online"], runs["resampled"]) > 1e-4


@pytest.mark.parametrize("variant, sig", [("online", signal.SIGKILL), ("online", signal.SIGTERM),
                                          ("cached", signal.SIGTERM), ("resampled", signal.SIGKILL)])
def test_interrupted_and_resumed_equals_uninterrupted(reference, variant, sig, data, h_weights, tmp_path):
    runs, variants = reference
    at_step = random.Random(f"{variant}{sig}").randint(3, 2 * EPOCH_STEPS - 3)  # a random step, the same each time
    cmd = command(data, h_weights, tmp_path / "logs", "run", *variants[variant], "--save-every-n-steps",
                  "1" if sig == signal.SIGKILL else "0")
    status = interrupt(cmd, tmp_path, tmp_path / "logs" / "run" / "out.log", at_step, sig)
    checkpoints = sorted(os.listdir(tmp_path / "logs" / "run" / "checkpoints"))
    if sig == signal.SIGTERM:  # saved at the next step boundary, then exit 75 for the launcher to requeue
        assert status == 75 and any("_step_" in c for c in checkpoints), (status, checkpoints)
    else:
        assert status == -signal.SIGKILL and checkpoints, (status, checkpoints)
    proc = run(cmd + ["--resume", "latest"], tmp_path)
    log = (tmp_path / "logs" / "run" / "out.log").read_text()
    assert "resumes at batch" in log or "(epoch 1)" in log, proc.stderr[-2000:]
    assert max_difference(weights(tmp_path / "logs" / "run"), runs[variant]) <= 1e-5


def test_two_ranks_stopped_by_sigterm_and_resumed_equal_uninterrupted(data, h_weights, tmp_path):
    """torchrun, 2 gloo ranks, 2 data workers each: every rank stops at the same step, one checkpoint holds both
    ranks' data positions, and the resumed pair ends with the weights of the pair that never stopped."""
    def cmd(logs, name, *extra):
        base = command(data, h_weights, logs, name, *extra)
        # torchrun would take --logs for its own --logs-specs: training.main's flags come after "--" in a wrapper
        return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                str(tmp_path / "main.py"), "--", *base[3:], "--batch-size", "4", "--dist-backend", "gloo"]
    (tmp_path / "main.py").write_text("import sys\nfrom training.main import main\nmain(sys.argv[1:])\n")
    run(cmd(tmp_path / "ref", "pair"), tmp_path)
    status = interrupt(cmd(tmp_path / "logs", "pair"), tmp_path, tmp_path / "logs" / "pair" / "out.log", 7,
                       signal.SIGTERM)
    assert status != 0
    saved = [c for c in os.listdir(tmp_path / "logs" / "pair" / "checkpoints") if "_step_" in c]
    assert len(saved) == 1
    positions = torch.load(tmp_path / "logs" / "pair" / "checkpoints" / saved[0], weights_only=False)["resume"]
    assert positions["world_size"] == 2 and len(positions["positions"]) == 2
    run(cmd(tmp_path / "logs", "pair", "--resume", "latest"), tmp_path)
    assert max_difference(weights(tmp_path / "logs" / "pair"), weights(tmp_path / "ref" / "pair")) <= 1e-5


# --- divergence ---------------------------------------------------------------------------------------------------

def test_a_diverging_run_stops_and_writes_nothing_nonfinite(data, h_weights, tmp_path):
    from open_clip_3t.weights import first_nonfinite
    cmd = command(data, h_weights, tmp_path / "logs", "div", "--save-every-n-steps", "1", "--lr", "1e8", workers=0)
    proc = run(cmd, tmp_path, expect=1)  # an absurd learning rate
    last = proc.stderr.strip().splitlines()[-1]
    match = re.fullmatch(r"training\.main: error: the run diverged at epoch 0, step (\d+) of 12 \(global step \d+\): "
                         r"the loss term (\w+) is not finite; no checkpoint was written after it: resume from the "
                         r"last one \(--resume latest\) with a lower --lr, or pass --skip-nonfinite-steps K", last)
    assert match, proc.stderr[-2000:]
    diverged_at = int(match.group(1))
    folder = tmp_path / "logs" / "div" / "checkpoints"
    saved = sorted(os.listdir(folder))
    assert saved == [f"epoch_0_step_{k}.pt" for k in range(max(1, diverged_at - 2), diverged_at)], saved
    for name in saved:
        assert first_nonfinite(torch.load(folder / name, weights_only=False)["state_dict"]) is None, name


NAN_AT_STEP_6 = """
import sys, torch
import open_clip_3t.loss as loss
forward, calls = loss._WeightedTerms.forward, []
def nan_once(self, *args, **kwargs):
    out = forward(self, *args, **kwargs)
    calls.append(1)
    if len(calls) == 6:  # the 6th step's loss (a fault injected from the test)
        out = {k: v * float("nan") for k, v in out.items()} if isinstance(out, dict) else out * float("nan")
    return out
loss._WeightedTerms.forward = nan_once
from training.main import main
main(sys.argv[1:])
"""


def test_after_a_divergence_resume_latest_goes_on_from_the_last_finite_checkpoint(reference, data, h_weights,
                                                                                   tmp_path):
    """A loss that turns NaN at step 6 stops the run there (steps 4 and 5 saved, nothing after); resumed without
    the fault, the run ends with the weights of the run that never diverged."""
    runs, _ = reference
    (tmp_path / "nan.py").write_text(NAN_AT_STEP_6)
    cmd = command(data, h_weights, tmp_path / "logs", "run", "--save-every-n-steps", "1")
    proc = subprocess.run([PY, str(tmp_path / "nan.py"), *cmd[3:]], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1 and "the run diverged at epoch 0, step 6 of 12" in proc.stderr, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / "logs" / "run" / "checkpoints")) == ["epoch_0_step_4.pt", "epoch_0_step_5.pt"]
    run(cmd + ["--resume", "latest"], tmp_path)
    assert "Train Epoch: 0 resumes at batch 5 of 12" in (tmp_path / "logs" / "run" / "out.log").read_text()
    assert max_difference(weights(tmp_path / "logs" / "run"), runs["online"]) <= 1e-5


class Batches(list):
    num_batches = 4
    num_samples = 32


def test_skip_nonfinite_steps_skips_at_most_k_updates_in_a_row(caplog):
    """A loss that is NaN at the 2nd of 4 steps: with --skip-nonfinite-steps 1 that update is skipped (the weights
    stay exactly as they were) and logged, and training goes on; with 0 the run stops naming the epoch, step and term."""
    from open_clip.loss import ClipLoss
    from training.long_run import Diverged
    from training.train import train_one_epoch

    class NaNAtStep(ClipLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            NaNAtStep.calls += 1
            return {k: v * float("nan") for k, v in out.items()} if NaNAtStep.calls == 2 else out

    def train(skip):
        NaNAtStep.calls = 0
        torch.manual_seed(0)
        model = open_clip.create_model("3T-baseline-CLIP-tiny", output_dict=True)
        images = torch.randn(32, 3, 32, 32)
        texts = open_clip.get_tokenizer("3T-baseline-CLIP-tiny")([f"{i} red circles" for i in range(32)])
        snapshots = []
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        step = optimizer.step
        optimizer.step = lambda *a, **k: (step(*a, **k), snapshots.append(model.visual.conv1.weight.clone()))[0]
        args = Namespace(device="cpu", precision="fp32", seed=0, rank=0, world_size=1, distributed=False,
                         distill=False, accum_freq=1, skip_scheduler=True, horovod=False, grad_clip_norm=None,
                         log_every_n_steps=1, batch_size=8, wandb=False, skip_nonfinite_steps=skip)
        batches = Batches([(images[i:i + 8], texts[i:i + 8]) for i in range(0, 32, 8)])
        data = {"train": Namespace(dataloader=batches, set_epoch=lambda epoch: None)}
        train_one_epoch(model, data, NaNAtStep(), 0, optimizer, None, None, None, args)
        return snapshots

    with caplog.at_level("WARNING"):
        snapshots = train(skip=1)
    assert len(snapshots) == 3  # steps 1, 3, 4 updated; step 2 did not
    assert not torch.equal(snapshots[0], snapshots[1])  # the updates after the skipped one went on
    assert "skipped the update of epoch 0, step 2 of 4 (global step 2): the loss term contrastive_loss is not " \
           "finite (1 in a row, --skip-nonfinite-steps 1)" in caplog.text
    with pytest.raises(Diverged, match=r"diverged at epoch 0, step 2 of 4 \(global step 2\): the loss term "
                                       r"contrastive_loss is not finite"):
        train(skip=0)


def test_export_and_evaluation_refuse_a_checkpoint_with_nonfinite_weights(h_weights, tmp_path):
    from open_clip_3t import export_clip
    from training import eval as standalone
    model = open_clip.create_model("3T-tiny", third_tower_weights=h_weights)
    state = model.state_dict()
    state["g_h.weight"][0, 0] = float("inf")
    state["visual.proj"][1, 2] = float("nan")
    torch.save({"epoch": 1, "state_dict": state}, tmp_path / "epoch_1.pt")
    with pytest.raises(ValueError, match=rf"checkpoint {tmp_path}/epoch_1.pt holds non-finite weights \(first: "
                                         r"visual.proj\): the run diverged"):
        export_clip(tmp_path / "epoch_1.pt", tmp_path / "out", model_name="3T-tiny")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"epoch_1.pt holds non-finite weights \(first: visual.proj\)"):
        standalone.load_model(standalone.ModelSpec("x", "3T-tiny", str(tmp_path / "epoch_1.pt")), "cpu", "fp32")


# --- checkpoint faults --------------------------------------------------------------------------------------------

KILL_DURING_THIRD_SAVE = """
import os, signal, sys
import training.long_run as long_run
calls = []
def write_atomic(path, data, exclusive=False):
    calls.append(path)
    if len(calls) == 3:  # half of the third checkpoint on disk under its temporary name, then the node dies
        import io, torch
        from open_clip_3t.files import tmp_name
        buffer = io.BytesIO()
        data(buffer)
        with open(tmp_name(path), "wb") as f:
            f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    return original(path, data, exclusive)
original, long_run.write_atomic = long_run.write_atomic, write_atomic
from training.main import main
main(sys.argv[1:])
"""


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_to_resume_from(reference, data, h_weights,
                                                                                  tmp_path):
    runs, _ = reference
    (tmp_path / "killer.py").write_text(KILL_DURING_THIRD_SAVE)
    cmd = command(data, h_weights, tmp_path / "logs", "run", "--save-every-n-steps", "2")
    proc = subprocess.run([PY, str(tmp_path / "killer.py"), *cmd[3:]], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=300, start_new_session=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    folder = tmp_path / "logs" / "run" / "checkpoints"
    names = sorted(os.listdir(folder))
    assert [n for n in names if n.endswith(".pt")] == ["epoch_0_step_2.pt", "epoch_0_step_4.pt"], names
    assert any(".tmp." in n for n in names)  # the half-written one never got the real name
    run(cmd + ["--resume", "latest"], tmp_path)
    assert max_difference(weights(tmp_path / "logs" / "run"), runs["online"]) <= 1e-5


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs (a full disk on demand); skipped where mounting is not allowed (not root)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_ends_with_one_line_and_the_run_resumes_where_there_is_room(reference, small_disk, data,
                                                                               h_weights, tmp_path):
    runs, _ = reference
    cmd = command(data, h_weights, small_disk, "run", "--save-every-n-steps", "1", "--keep-step-checkpoints", "5")
    proc = run(cmd, tmp_path, expect=1)
    last = proc.stderr.strip().splitlines()[-1]
    folder = small_disk / "run" / "checkpoints"
    match = re.fullmatch(rf"training\.main: error: checkpoint folder {folder} has (\d+) bytes free, "
                         rf"epoch_0_step_(\d+)\.pt needs about (\d+): free space there \(or move --logs\) and resume "
                         rf"with --resume latest; the previous checkpoints are untouched", last)
    assert match, proc.stderr[-2000:]
    assert int(match.group(1)) < int(match.group(3))
    saved = sorted(n for n in os.listdir(folder) if n.endswith(".pt"))
    failed_at = int(match.group(2))
    assert saved == sorted(f"epoch_0_step_{k}.pt" for k in range(1, failed_at)) and not \
        [n for n in os.listdir(folder) if ".tmp" in n], saved
    # room again: move the run to a roomier disk and resume; it ends as if never stopped
    subprocess.run(["cp", "-a", str(small_disk / "run"), str(tmp_path / "logs")], check=True)
    run(command(data, h_weights, tmp_path / "logs", "run", "--resume", "latest"), tmp_path)
    assert max_difference(weights(tmp_path / "logs" / "run"), runs["online"]) <= 1e-5


# --- the stream itself: the same batches from any resume point, without reading what was consumed -----------------

def stream(shards, resume=None, workers=0, resampled=False, opened=None, seeked=None, monkeypatch=None):
    """Every batch of epoch 0 of OpenCLIP's train pipeline made resumable (training/data.py get_data), with a small
    sample-shuffle buffer (20, first yield at 5) so that 160 samples outrun it; `opened` collects the shards read as
    a stream (from their start), `seeked` the (shard, samples) read by seeking to them."""
    import open_clip_train.data as oc_data
    from open_clip_3t import shards as shards_module
    from training.data import get_data
    monkeypatch.setattr(oc_data, "_SAMPLE_SHUFFLE_SIZE", 20)
    monkeypatch.setattr(oc_data, "_SAMPLE_SHUFFLE_INITIAL", 5)
    if opened is not None:
        monkeypatch.setattr(oc_data, "tarfile_to_samples_nothrow",
                            lambda src: (opened.append(src[0]["url"]), READ_SHARD(src))[1])
    if seeked is not None:
        read_at = shards_module.read_samples_at
        monkeypatch.setattr(shards_module, "read_samples_at", lambda url, wanted, group: (
            seeked.append((url, len(wanted))), read_at(url, wanted, group))[1])
    _, preprocess_train, preprocess_val = open_clip.create_model_and_transforms("3T-baseline-CLIP-tiny")
    args = Namespace(train_data=shards, val_data=None, dataset_type="webdataset", dataset_resampled=resampled,
                     train_num_samples=160, train_data_upsampling_factors=None, seed=0, workers=workers, world_size=1,
                     rank=0, batch_size=4, third_tower_cache=None, imagenet_val=None, imagenet_v2=None,
                     zeroshot_data=None, resume_position=resume)
    data = get_data(args, (preprocess_train, preprocess_val), epoch=0,
                    tokenizer=open_clip.get_tokenizer("3T-baseline-CLIP-tiny"))
    data["train"].set_epoch(0)
    return list(data["train"].dataloader)


def resume_point(batches, consumed, workers):
    """What a step checkpoint after `consumed` batches holds: each worker's position after its last consumed batch."""
    positions = {}
    for batch in batches[:consumed]:
        positions[int(batch[-1]["worker"])] = batch[-1]
    return {"epoch": 0, "batches": consumed, "world_size": 1, "workers": max(1, workers), "positions": [positions]}


@pytest.mark.parametrize("workers, resampled", [(0, False), (2, False), (2, True)])
def test_the_stream_resumes_at_any_batch_with_the_same_batches(workers, resampled, tmp_path, monkeypatch):
    write_shards(str(tmp_path), num_samples=160, samples_per_shard=8, seed=0, image_size=32)
    shards = f"{tmp_path}/{{00000..00019}}.tar"
    full = stream(shards, workers=workers, resampled=resampled, monkeypatch=monkeypatch)
    assert len(full) == 40 and not any(isinstance(b, str) for b in full)
    assert len({tuple(b[1][0].tolist()) for b in full}) > 30  # real, varied batches
    for consumed in (1, 17, 36):
        resumed = stream(shards, resume_point(full, consumed, workers), workers, resampled, monkeypatch=monkeypatch)
        assert len(resumed) == 40 and all(isinstance(b, str) for b in resumed[:consumed])
        for a, b in zip(full[consumed:], resumed[consumed:]):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # same images (augmented alike), same texts


def test_resuming_late_in_an_epoch_reads_only_the_buffered_samples_and_the_shard_it_was_in(tmp_path, monkeypatch):
    """At 90% of an epoch of 20 shards, the resumed stream reads as a stream only the shard it was inside (and those
    after it); of the consumed shards it reads just the samples its shuffle buffer held, seeking to them, and opens
    none of the others."""
    write_shards(str(tmp_path), num_samples=160, samples_per_shard=8, seed=0, image_size=32)
    shards = f"{tmp_path}/{{00000..00019}}.tar"
    early, late, seeked = [], [], []
    full = stream(shards, opened=early, monkeypatch=monkeypatch)
    point = resume_point(full, 36, 0)
    position = point["positions"][0][0]
    cursor = int(position["cursor"][0])
    held = {}
    for shard, _ in position["buffer"].tolist():
        held[int(shard)] = held.get(int(shard), 0) + 1
    before = {s: n for s, n in held.items() if s < cursor}
    resumed = stream(shards, point, opened=late, seeked=seeked, monkeypatch=monkeypatch)
    order = [url for url in early]  # the pass's shard order (shard numbers are places in it)
    assert len(early) == 20 and late == order[cursor:], (late, cursor)
    assert sorted(seeked) == sorted((order[s], n) for s, n in before.items()) and len(before) >= 2, (seeked, before)
    for a, b in zip(full[36:], resumed[36:]):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


SIGNAL_AT_START = """
import os, signal, sys
import training.main as tm
install = tm.install_signal_handlers
def install_then_signal():
    install()
    os.kill(os.getpid(), signal.SIGUSR1)  # the time-limit signal arrives during start-up
tm.install_signal_handlers = install_then_signal
tm.main(sys.argv[1:])
"""


def test_a_signal_before_the_first_step_stops_without_saving(data, h_weights, tmp_path):
    """Nothing trained in this job: nothing to save, and exit 76 (not 75), so that a launcher does not requeue it."""
    (tmp_path / "start.py").write_text(SIGNAL_AT_START)
    cmd = command(data, h_weights, tmp_path / "logs", "run", workers=0)
    proc = subprocess.run([PY, str(tmp_path / "start.py"), *cmd[3:]], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 76, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "training.main: stopped by a signal before its first step: " \
                                                   "nothing to save"
    assert os.listdir(tmp_path / "logs" / "run" / "checkpoints") == []
