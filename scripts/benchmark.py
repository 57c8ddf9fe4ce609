"""Step time and memory of 3T and SigLIP-3T against their baselines and OpenCLIP's distillation, same f, g and batch.

    python scripts/benchmark.py --model 3T-mini --device cpu --batch-size 128 --steps 60 --rounds 10
    python scripts/benchmark.py --model 3T-ViT-B-16 --device cuda --batch-size 256 --steps 30   # h: random weights
    python scripts/benchmark.py --model 3T-ViT-B-16-SigLIP --device cpu --batch-size 16 --steps 20 --rounds 10

Variants, one training step each (forward, loss, backward, AdamW step) on one batch of random data:
  clip        the CLIP baseline: f and g, OpenCLIP's ClipLoss
  3t-fed      3T with h's embeddings fed in (as from a cache): f, g, four heads, three loss terms; h not built
  3t-online   3T with h run online in the step
  3t-k2-fed   3T with K = 2 frozen towers, both fed in (as from their two caches): the model's tower twice, named a
              and b, each with its four heads and two terms (five terms in all); no tower built
  distill     OpenCLIP's --distill: the student CLIP + DistillClipLoss with a teacher CLIP whose image tower is h's
              architecture (as large as h) and whose text tower is g's
  siglip      the SigLIP baseline: f and g with a bias, OpenCLIP's SigLipLoss (initialised as OpenCLIP's --siglip)
  siglip-3t-fed, siglip-3t-online   SigLIP-3T (three sigmoid terms, each with its temperature and bias), h fed in
              or online
  h-forward   h's forward alone (no grad), to compare 3t-online with clip + h-forward (and siglip-3t-online with
              siglip + h-forward)
The softmax rows drop the config's init_logit_bias and the sigmoid rows add one (-10 if it has none), so one config
(3T-ViT-B-16, or 3T-ViT-B-16-SigLIP for SigLIP's own towers) gives every row the same f and g.
Timing: warm-up steps first, then rounds in which the variants take turns (rotating order) so that drift
(clocks, other load) hits all of them alike; each step is synchronised and the median step time is reported.
On CPU the script re-executes itself with glibc's malloc keeping freed memory (STEADY_MALLOC), as CUDA's does.
Collectives: two gloo processes on CPU (this script run with --collectives-rank, batch 2 per rank) run one step of
clip and of 3t-k2-fed each and count every torch.distributed collective called in it, under OpenCLIP's default loss
flags and under --local-loss --gather-with-grad (the SLURM launcher's): 3T sends every feature set of every tower in
one all_gather, where OpenCLIP's ClipLoss calls two (images, texts). With --gather-with-grad the backward adds the
gradient of that gather: one reduce_scatter under NCCL, which gloo emulates with one scatter per rank (2 here).
Memory: the peak allocated during one step above what was allocated before it (on CUDA the caching allocator's
peak statistics; on CPU the profiler's allocation events of the blocks the step allocates, each a signed size, summed
in time order), and the persistent weights + gradients + optimizer state of the variant.
"""
import argparse
import contextlib
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import time

import open_clip
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from open_clip.loss import SigLipLoss  # noqa: E402

from open_clip_3t import ThreeTowersLoss, ThreeTowersSigLipLoss  # noqa: E402  (registers the 3T family)
from open_clip_3t._openclip import SECTION, openclip_model_class, read_model_config  # noqa: E402
from training._open_clip_train import openclip_autocast  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="3T-tiny", help="a 3T model config (3T-tiny, 3T-ViT-B-16, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    p.add_argument("--rounds", type=int, default=5, help="rounds the timed steps are split into")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first")
    p.add_argument("--precision", default=None, choices=["fp32", "amp", "amp_bf16"],
                   help="default: amp on CUDA, fp32 on CPU")
    p.add_argument("--third-tower-weights", default=None, help="h's weights (default: random, nothing is read)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures to this file")
    p.add_argument("--system-malloc", action="store_true",
                   help="on CPU, time with glibc's default malloc (see STEADY_MALLOC) instead of a steady heap")
    p.add_argument("--no-collectives", action="store_true", help="skip counting the collectives of a step")
    p.add_argument("--collectives-rank", type=int, default=None, help=argparse.SUPPRESS)  # internal: one counting rank
    p.add_argument("--collectives-port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if open_clip_3t_section(args.model) is None:
        p.error(f"--model {args.model} is not a 3T model: pass one of "
                f"{[m for m in open_clip.list_models() if m.startswith('3T-')]}")
    if args.steps < args.rounds or args.batch_size < 2:
        p.error("--steps must be >= --rounds and --batch-size >= 2")
    args.precision = args.precision or ("amp" if args.device.startswith("cuda") else "fp32")
    return args


# On CPU, glibc's malloc maps each large block afresh and unmaps it on free, so every step page-faults its
# activations in again (kernel time that grows with the step's allocations, not its compute); CUDA's caching
# allocator keeps freed blocks. Run as a script on CPU, the benchmark re-executes itself once with these set (glibc
# reads them at start-up) so that freed memory stays in the heap, as on CUDA; --system-malloc keeps the default.
STEADY_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(2**34), "MALLOC_TRIM_THRESHOLD_": str(2**36),
                 "MALLOC_TOP_PAD_": str(2**30)}


def exec_with_steady_malloc(args):
    if (args.device == "cpu" and not args.system_malloc and sys.platform.startswith("linux")
            and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items())):
        os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **STEADY_MALLOC})


def open_clip_3t_section(name):
    cfg = read_model_config(name)
    return None if cfg is None else cfg.get(SECTION)


HEAD_MODULES = ("f_h.", "g_h.", "h_f.", "h_g.")
K2_TOWERS = ("a", "b")


def two_towers(section):
    """A three_towers section with the (single) tower of `section` twice, named a and b: K = 2 on the same f and g."""
    shared = ("head_type", "head_dim", "transfer")
    tower = {k: v for k, v in section.items() if k not in shared + ("loss_weights",)}
    return {"towers": [{"name": name, **tower} for name in K2_TOWERS], **{k: section[k] for k in shared if k in section}}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def state_bytes(model, optimizer):
    params = [p for p in model.parameters()]
    total = sum(p.numel() * p.element_size() for p in params)
    total += sum(p.numel() * p.element_size() for p in params if p.requires_grad)  # gradients
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 (Kineto prints its start/stop and a 'no GPU' line there from C++)."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def cpu_step_peak(fn):
    """Peak bytes that fn() allocated and held at once: the CPU counterpart of the step peak on CUDA, from the
    profiler's allocation events (+size on malloc, -size on free). Only frees of memory fn() itself allocated count:
    the profiler reports the free of an older block only if an earlier profiled call allocated it, so counting those
    would make the figure depend on what ran before (e.g. gradients that another variant's profiled step allocated)."""
    from torch._C._profiler import _EventType  # the profiler's event tree: torch has no public CPU peak statistic

    with quiet_stderr(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.ptr))
    held = peak = 0
    live = {}  # ptr -> size of the blocks fn() allocated and has not freed
    for _, size, ptr in sorted(events, key=lambda e: e[0]):
        if size > 0:
            live[ptr] = size
        elif ptr in live:
            size = -live.pop(ptr)
        else:
            continue  # a block allocated before fn()
        held += size
        peak = max(peak, held)
    return peak


class Variant:
    def __init__(self, name, model, loss, inputs, teacher=None, train=True):
        self.name, self.model, self.loss, self.inputs, self.teacher, self.train = name, model, loss, inputs, teacher, train
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-5) if train else None
        self.times = []

    def step(self, autocast):
        if not self.train:  # h's forward alone
            with torch.no_grad(), autocast():
                self.model.encode_third(self.inputs["image"])
            return
        self.optimizer.zero_grad(set_to_none=True)
        with autocast():
            out = self.model(**self.inputs)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_out = self.teacher(self.inputs["image"], self.inputs["text"])
                out.update({f"dist_{k}": v for k, v in teacher_out.items()})
            total = sum(self.loss(**out, output_dict=True).values())
        total.backward()
        self.optimizer.step()


def build_variants(args, device):
    torch.manual_seed(args.seed)
    cfg = read_model_config(args.model)
    section = cfg[SECTION]
    plain_class = openclip_model_class(cfg)  # CLIP, or CustomTextCLIP for custom text towers (SigLIP's configs)
    plain_cfg = {k: v for k, v in cfg.items() if k not in (SECTION, "custom_text")}
    softmax = {"init_logit_bias": None}
    sigmoid = {"init_logit_scale": math.log(10), "init_logit_bias": cfg.get("init_logit_bias") or -10.0}  # --siglip's
    h_kwargs = {"third_tower_weights": args.third_tower_weights} if args.third_tower_weights else {"third_tower": "random"}

    online = open_clip.create_model(args.model, device=device, output_dict=True, **h_kwargs, **softmax)
    with torch.device("meta"):  # names the plain model's modules and parameters (f and g), holding no weights
        reference = plain_class(**plain_cfg)
    f_and_g = [n for n, _ in reference.named_children()] + [
        n for n, _ in reference.named_parameters(recurse=False) if not n.startswith("logit_")]
    del reference

    def with_online_f_and_g(model):
        """The model with online's f and g in place of its own: every variant trains the same f and g, and one copy
        of their weights and gradients serves all (each variant keeps its own optimizer state), so that eight
        variants fit in the memory five took."""
        for name in f_and_g:
            setattr(model, name, getattr(online, name))
        return model

    def plain(**kwargs):
        return with_online_f_and_g(plain_class(**{**plain_cfg, **kwargs}, output_dict=True).to(device))

    def three_towers(**kwargs):
        model = open_clip.create_model(args.model, device=device, output_dict=True, third_tower=False, **kwargs)
        model.load_state_dict({k: v for k, v in online.state_dict().items() if k.startswith(HEAD_MODULES)},
                              strict=False)  # online's heads
        return with_online_f_and_g(model)

    clip = plain(**softmax)
    fed = three_towers(**softmax)
    fed_k2 = with_online_f_and_g(open_clip.create_model(args.model, device=device, output_dict=True, third_tower=False,
                                                        three_towers=two_towers(section), **softmax))
    student = plain(**softmax)
    teacher_vision = {"image_size": plain_cfg["vision_cfg"].get("image_size", 224),
                      "timm_model_name": section["timm_model_name"], "timm_model_pretrained": False,
                      "timm_pool": "", "timm_proj": "linear"}
    teacher = plain_class(**{**plain_cfg, "vision_cfg": teacher_vision, **softmax}, output_dict=True).to(device).eval()
    teacher.requires_grad_(False)  # its own towers: a teacher as large as h, and g's architecture
    siglip = plain(**sigmoid)
    fed_sigmoid = three_towers(**sigmoid)
    online_sigmoid = three_towers(**sigmoid)
    online_sigmoid.third_tower = online.third_tower  # the same frozen h

    size = plain_cfg["vision_cfg"].get("image_size", 224)
    ctx = plain_cfg["text_cfg"].get("context_length", 77)
    vocab = plain_cfg["text_cfg"].get("vocab_size", 49408)
    images = torch.randn(args.batch_size, 3, size, size, device=device)
    texts = torch.randint(1, vocab - 1, (args.batch_size, ctx), device=device)
    texts[:, -1] = vocab - 1  # an end-of-text token (the largest id) where the text tower pools
    autocast = openclip_autocast(args.precision, device.type)
    for model in (online, fed, fed_k2, clip, student, siglip, fed_sigmoid, online_sigmoid):
        model.train()
    with torch.no_grad(), autocast():
        third = online.encode_third(images).float()

    pair = {"image": images, "text": texts}
    variants = [
        Variant("clip", clip, open_clip.ClipLoss(), pair),
        Variant("3t-fed", fed, ThreeTowersLoss(), {**pair, "third_embeddings": third}),
        Variant("3t-online", online, ThreeTowersLoss(), pair),
        Variant("3t-k2-fed", fed_k2, ThreeTowersLoss(towers=K2_TOWERS),
                {**pair, "third_embeddings": {"a": third, "b": third.roll(1, 0)}}),
        Variant("distill", student, open_clip.DistillClipLoss(), pair, teacher=teacher),
        Variant("siglip", siglip, SigLipLoss(), pair),
        Variant("siglip-3t-fed", fed_sigmoid, ThreeTowersSigLipLoss(), {**pair, "third_embeddings": third}),
        Variant("siglip-3t-online", online_sigmoid, ThreeTowersSigLipLoss(), pair),
        Variant("h-forward", online, None, {"image": images}, train=False),
    ]
    n_params = {"f+g": sum(p.numel() for p in clip.parameters()),
                "heads": sum(p.numel() for n, p in fed.named_parameters() if n.startswith(HEAD_MODULES)),
                "h": sum(p.numel() for p in online.third_tower.parameters()),
                "teacher": sum(p.numel() for p in teacher.parameters())}
    return variants, autocast, n_params


COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter", "reduce_scatter_tensor",
               "broadcast", "all_to_all", "all_to_all_single", "scatter", "gather", "reduce", "send", "recv", "isend",
               "irecv", "batch_isend_irecv")


def count_collectives_on_rank(args):
    """One of two gloo ranks (CPU): one training step of clip and of 3t-k2-fed under each loss setting, counting the
    torch.distributed collectives each calls. Prints {setting: {variant: [forward calls, backward calls]}}."""
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.collectives_port))
    dist.init_process_group("gloo", rank=args.collectives_rank, world_size=2)
    cfg = read_model_config(args.model)
    plain_cfg = {k: v for k, v in cfg.items() if k not in (SECTION, "custom_text")}
    torch.manual_seed(args.seed)
    clip = openclip_model_class(cfg)(**plain_cfg, init_logit_bias=None, output_dict=True).train()
    k2 = open_clip.create_model(args.model, output_dict=True, third_tower=False, init_logit_bias=None,
                                three_towers=two_towers(cfg[SECTION])).train()
    size, ctx = plain_cfg["vision_cfg"].get("image_size", 224), plain_cfg["text_cfg"].get("context_length", 77)
    pair = {"image": torch.randn(2, 3, size, size), "text": torch.randint(1, 1000, (2, ctx))}
    third = {name: torch.randn(2, cfg[SECTION]["embed_dim"]) for name in K2_TOWERS}
    calls = []
    real = {name: getattr(dist, name) for name in COLLECTIVES}

    def counted(name):
        return lambda *a, **k: calls.append(name) or real[name](*a, **k)
    counts = {}
    try:
        for name in COLLECTIVES:
            setattr(dist, name, counted(name))
        for setting, flags in (("default", {}), ("local_loss+gather_with_grad",
                                                 {"local_loss": True, "gather_with_grad": True})):
            dist_args = {"rank": args.collectives_rank, "world_size": 2, **flags}
            counts[setting] = {}
            for variant, model, loss, inputs in (
                    ("clip", clip, open_clip.ClipLoss(**dist_args), pair),
                    ("3t-k2-fed", k2, ThreeTowersLoss(towers=K2_TOWERS, **dist_args),
                     {**pair, "third_embeddings": third})):
                model.zero_grad(set_to_none=True)
                del calls[:]
                total = sum(loss(**model(**inputs), output_dict=True).values())
                forward = len(calls)
                total.backward()
                counts[setting][variant] = [forward, len(calls) - forward]
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
        dist.destroy_process_group()
    print(json.dumps(counts))


def count_collectives(args):
    """{setting: {variant: [forward, backward] collective calls}} of one step on two gloo ranks (see the docstring)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--seed", str(args.seed),
           "--collectives-port", str(port), "--collectives-rank"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = [subprocess.Popen(cmd + [str(rank)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for rank in range(2)]
    results = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, err) in zip(procs, results):
        if proc.returncode:
            raise RuntimeError(f"counting collectives failed: {err.strip().splitlines()[-1] if err.strip() else ''}")
    counts = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    if counts[0] != counts[1]:
        raise RuntimeError(f"the two ranks called different collectives: {counts}")
    return counts[0]


def main(argv=None):
    args = parse_args(argv)
    if args.collectives_rank is not None:
        return count_collectives_on_rank(args)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as open_clip_train.main does
        torch.backends.cudnn.benchmark = True
    # Counted first, in two child processes that build their own model: after the timing this process holds every
    # variant (and, on CPU, a heap that keeps freed memory), and ViT-B/16-sized children would not fit beside it.
    collectives = None if args.no_collectives else count_collectives(args)
    variants, autocast, n_params = build_variants(args, device)
    print(f"model {args.model}, batch {args.batch_size}, precision {args.precision}, device {device}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, "
          f"torch threads {torch.get_num_threads()}")
    if device.type == "cpu":
        steady = all(os.environ.get(k) == v for k, v in STEADY_MALLOC.items())
        print(f"cpu malloc: {'steady heap (STEADY_MALLOC)' if steady else 'system default'}")
    print("parameters: " + ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in n_params.items()))

    for v in variants:
        for _ in range(args.warmup):
            v.step(autocast)
    sync(device)

    memory = {}
    for v in variants:
        persistent = state_bytes(v.model, v.optimizer) if v.train else 0
        if device.type == "cuda":
            sync(device)
            before = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            v.step(autocast)
            sync(device)
            memory[v.name] = (torch.cuda.max_memory_allocated(device) - before, persistent)
        else:
            memory[v.name] = (cpu_step_peak(lambda: v.step(autocast)), persistent)

    per_round = args.steps // args.rounds
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        for v in order:
            for _ in range(per_round):
                sync(device)
                t0 = time.perf_counter()
                v.step(autocast)
                sync(device)
                v.times.append(time.perf_counter() - t0)

    median = {v.name: statistics.median(v.times) for v in variants}
    print(f"\n{'variant':<22}{'median step (ms)':>18}{'vs clip':>10}{'step peak (MiB)':>18}{'state (MiB)':>14}")
    rows = list(median.items()) + [(f"{base} + h-forward", median[base] + median["h-forward"])
                                   for base in ("clip", "siglip")]
    for name, t in rows:
        mem = memory.get(name)
        mem_cols = f"{mem[0] / 2**20:>18.1f}{mem[1] / 2**20:>14.1f}" if mem else f"{'-':>18}{'-':>14}"
        print(f"{name:<22}{t * 1e3:>18.2f}{t / median['clip']:>10.3f}{mem_cols}")

    def peak_ratio(name, base):
        return memory[name][0] / memory[base][0]
    print(f"step peak / clip's: 3t-fed {peak_ratio('3t-fed', 'clip'):.3f}, "
          f"3t-online {peak_ratio('3t-online', 'clip'):.3f}, distill {peak_ratio('distill', 'clip'):.3f}")
    print(f"step peak / siglip's: siglip-3t-fed {peak_ratio('siglip-3t-fed', 'siglip'):.3f}, "
          f"siglip-3t-online {peak_ratio('siglip-3t-online', 'siglip'):.3f}  (target <= 1.01)")
    ratios = {"fed_ratio": median["3t-fed"] / median["clip"], "k2_fed_ratio": median["3t-k2-fed"] / median["clip"],
              "online_ratio": median["3t-online"] / (median["clip"] + median["h-forward"]),
              "siglip_fed_ratio": median["siglip-3t-fed"] / median["siglip"],
              "siglip_online_ratio": median["siglip-3t-online"] / (median["siglip"] + median["h-forward"])}
    print()
    for label, value, target in (
            ("3T fed-in / CLIP", ratios["fed_ratio"], 1.03),
            ("3T K=2 fed-in / CLIP", ratios["k2_fed_ratio"], 1.04),
            ("3T online / (CLIP + h fwd)", ratios["online_ratio"], 1.02),
            ("SigLIP-3T fed-in / SigLIP", ratios["siglip_fed_ratio"], 1.03),
            ("SigLIP-3T online / (SigLIP + h fwd)", ratios["siglip_online_ratio"], 1.02),
            ("distill / CLIP", median["distill"] / median["clip"], None),
            ("SigLIP / CLIP", median["siglip"] / median["clip"], None)):
        print(f"{label:<36}= {value:.3f}" + (f"  (target <= {target})" if target else ""))
    result = {"median_s": median, "memory_bytes": memory, **ratios}
    if collectives is not None:
        result["collectives"] = collectives
        print("\ncollectives per step, 2 gloo ranks (forward + backward calls):")
        for setting, by_variant in result["collectives"].items():
            print(f"  {setting:<28}" + ", ".join(f"{variant} {sum(n)} ({n[0]} + {n[1]})"
                                                for variant, n in by_variant.items()))
    if args.json:
        write_json(args, device, result)
    return result


def write_json(args, device, result):
    """The figures as JSON (scripts/gpu_check.py reads them): times in s, memory in bytes, ratios."""
    median, memory = result["median_s"], result["memory_bytes"]
    base = {"3t-fed": "clip", "3t-k2-fed": "clip", "3t-online": "clip", "distill": "clip", "siglip-3t-fed": "siglip",
            "siglip-3t-online": "siglip"}
    figures = {
        "model": args.model, "batch_size": args.batch_size, "precision": args.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "timed_steps": args.steps, "median_step_s": median,
        "step_peak_bytes": {name: peak for name, (peak, _) in memory.items()},
        "state_bytes": {name: state for name, (_, state) in memory.items()},
        "step_peak_over_base": {name: memory[name][0] / memory[b][0] for name, b in base.items()},
        "fed_over_clip": result["fed_ratio"], "k2_fed_over_clip": result["k2_fed_ratio"],
        "online_over_clip_plus_h": result["online_ratio"], "collectives_per_step": result.get("collectives"),
        "siglip_fed_over_siglip": result["siglip_fed_ratio"],
        "siglip_online_over_siglip_plus_h": result["siglip_online_ratio"],
        "distill_over_clip": median["distill"] / median["clip"],
    }
    with open(args.json, "w") as f:
        json.dump(figures, f, indent=1)


if __name__ == "__main__":
    exec_with_steady_malloc(parse_args())
    main()
