"""scripts/benchmark.py: its memory figures are exact where they can be computed by hand."""
import importlib.util
import os

import open_clip
import torch

from tests.conftest import REPO

spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO, "scripts", "benchmark.py"))
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)

MiB = 2**20


def test_cpu_step_peak_counts_what_is_held_at_once():
    kept = []

    def step():
        kept.append(torch.empty(MiB, dtype=torch.uint8))  # held: 1 MiB
        scratch = torch.empty(3 * MiB, dtype=torch.uint8)  # held: 4 MiB, the peak
        del scratch  # 1 MiB
        torch.empty(2 * MiB, dtype=torch.uint8)  # made and dropped at once: 3 MiB

    before = torch.empty(8 * MiB, dtype=torch.uint8)  # allocated before the step: not counted
    assert benchmark.cpu_step_peak(step) == 4 * MiB
    assert benchmark.cpu_step_peak(lambda: None) == 0
    del before


def test_cpu_step_peak_does_not_depend_on_what_ran_before():
    """A step that frees an older block and allocates one as large peaks at that block, whether the older block was
    allocated outside any profiling or by an earlier profiled step (the profiler reports only the latter's free)."""
    held = [torch.empty(4 * MiB, dtype=torch.uint8)]

    def step():
        held.pop()
        held.append(torch.empty(4 * MiB, dtype=torch.uint8))
    assert [benchmark.cpu_step_peak(step) for _ in range(3)] == [4 * MiB] * 3


def test_benchmark_reports_time_and_memory_for_every_variant(capsys):
    out = benchmark.main(["--model", "3T-tiny", "--device", "cpu", "--batch-size", "4",
                          "--steps", "2", "--rounds", "1", "--warmup", "1"])
    printed = capsys.readouterr().out
    names = {"clip", "3t-fed", "3t-online", "3t-k2-fed", "distill", "siglip", "siglip-3t-fed", "siglip-3t-online",
             "h-forward"}
    assert set(out["median_s"]) == names and set(out["memory_bytes"]) == names
    assert all(t > 0 for t in out["median_s"].values())
    assert all(peak > 0 for peak, _ in out["memory_bytes"].values())
    assert "step peak / clip's" in printed and "3T fed-in / CLIP" in printed
    assert "step peak / siglip's" in printed and "SigLIP-3T online / (SigLIP + h fwd)" in printed
    assert out["siglip_online_ratio"] == out["median_s"]["siglip-3t-online"] / (
        out["median_s"]["siglip"] + out["median_s"]["h-forward"])

    # Persistent state by hand, fp32: each trainable parameter has its weight, gradient and AdamW's two moments
    # (4 x 4 bytes per element) plus AdamW's 0-D step counter (4 bytes); h's frozen weights are held once.
    model = open_clip.create_model("3T-tiny", third_tower="random")
    head_names = ("f_h", "g_h", "h_f", "h_g", "logit_scale_image_third", "logit_scale_text_third")
    heads = [p for n, p in model.named_parameters() if n.startswith(head_names)]
    h = list(model.third_tower.parameters())
    state = {name: bytes_ for name, (_, bytes_) in out["memory_bytes"].items()}
    assert state["3t-fed"] - state["clip"] == sum(16 * p.numel() + 4 for p in heads)
    assert state["3t-online"] - state["3t-fed"] == sum(4 * p.numel() for p in h)
    # K = 2 fed in: two towers' heads and temperatures, neither tower held
    assert state["3t-k2-fed"] - state["clip"] == 2 * (state["3t-fed"] - state["clip"])
    assert "3T K=2 fed-in / CLIP" in printed and out["k2_fed_ratio"] == out["median_s"]["3t-k2-fed"] / out[
        "median_s"]["clip"]
    # One step on two gloo ranks: every feature set of both towers (and f's and g's) in one all_gather, where
    # OpenCLIP's ClipLoss calls two; --gather-with-grad's backward is gloo's emulation of one reduce_scatter
    assert out["collectives"] == {"default": {"clip": [2, 0], "3t-k2-fed": [1, 0]},
                                  "local_loss+gather_with_grad": {"clip": [2, 4], "3t-k2-fed": [1, 2]}}
    assert "default                     clip 2 (2 + 0), 3t-k2-fed 1 (1 + 0)" in printed
    assert state["distill"] == state["clip"] and state["h-forward"] == 0
    # SigLIP: one more 0-D parameter (the bias); SigLIP-3T adds the heads, two temperatures and two biases.
    assert state["siglip"] - state["clip"] == 16 + 4
    assert state["siglip-3t-fed"] - state["siglip"] == sum(16 * p.numel() + 4 for p in heads) + 2 * (16 + 4)
    assert state["siglip-3t-online"] - state["siglip-3t-fed"] == sum(4 * p.numel() for p in h)


def test_h_runs_before_f_and_g_hold_their_activations():
    """The forward with h online peaks at the fed-in forward's peak plus h's output (batch x width, fp32), not
    plus h's transient activations: h runs before f and g keep theirs for the backward."""
    torch.manual_seed(0)
    model = open_clip.create_model("3T-tiny", third_tower="random", output_dict=True).train()
    image, text = torch.randn(8, 3, 32, 32), torch.randint(1, 1000, (8, 32))
    third = model.encode_third(image)
    h_transient = benchmark.cpu_step_peak(lambda: model.encode_third(image))
    fed = benchmark.cpu_step_peak(lambda: model(image, text, third_embeddings=third))
    online = benchmark.cpu_step_peak(lambda: model(image, text))
    h_output = third.numel() * 4
    assert h_transient > 2 * h_output  # so that running h last would show
    assert fed <= online <= fed + h_output
