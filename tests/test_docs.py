"""Every Python and shell block of README.md and docs/ is correct as written.

Each page's blocks run in document order in a workspace holding tiny stand-ins for the files the docs name (a 3T-tiny
run under logs/, shards under data/, h.pth): Python blocks in one namespace per page, shell blocks with bash. A block
runs as written unless RUN_WITH lists the substitutions it needs (only model size, device and data paths), or
NOT_RUN says why it cannot run here (hub weights, a SLURM cluster, GPUs, hours); those are still checked cheaply:
every flag they pass exists in the command's --help, and every variable they set in the script they submit. A block
in neither table runs as written, so a block added later is covered, or fails here until it is classified."""
import contextlib
import importlib
import importlib.metadata
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from functools import lru_cache

import open_clip
import pytest
import torch

from open_clip_3t import export_clip
from open_clip_3t.toy.synthetic import write_classification_folder, write_shards
from tests.docs_blocks import REPO, blocks, commands, pages, substitute

LANGUAGES = {"python", "bash", "text", "json"}  # text: layouts, formulas, log excerpts; json: config excerpts


@dataclass
class NotRun:
    reason: str
    check: object = None  # an extra check(block), beyond the flags and the variables


def ci_command():
    """The last line of .ci/run: the command CI runs."""
    return (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]


def check_is_ci(block):
    assert commands(block.text) == [ci_command()], f"{block}: README's test command differs from .ci/run's"


def check_installs_like_ci(block):
    install = ci_command().rsplit(" && ", 1)[0]
    assert commands(block.text)[0].startswith(install + " && "), f"{block}: README's install differs from .ci/run's"


def check_slurm_fixture_api(block):
    compile(block.text, str(block), "exec")
    api = (REPO / "tests" / "slurm_cluster.py").read_text()
    for name in re.findall(r"slurm_cluster\.(\w+)\(", block.text):
        assert re.search(rf"def {name}\(", api), f"{block}: slurm_cluster has no method {name}"


def check_gpu_check(block):
    for command in commands(block.text):
        words = split_commands(command)[0]
        check_flags(block, ("scripts/gpu_check.py",), words[words.index("scripts/gpu_check.sh") + 1:])


# (page, first line of the block) -> substitutions: model size, device and data paths only.
RUN_WITH = {
    ("README.md", "import open_clip"): [('"3T-ViT-B-16"', '"3T-tiny"'),
                                         ('"vit_base_patch16_224.augreg_in21k.pth"', '"h.pth"')],
    ("docs/api.md", 'model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms('):
        [('"3T-ViT-B-16",', '"3T-tiny",'), ('"/weights/in21k_b16.pth"', '"h.pth"'),
         ('get_tokenizer("3T-ViT-B-16")', 'get_tokenizer("3T-tiny")')],
    ("docs/api.md", 'sigmoid_model = open_clip.create_model("3T-ViT-B-16-SigLIP", '
                    'third_tower_weights="/weights/in21k_b16.pth",'):
        [('"3T-ViT-B-16-SigLIP"', '"3T-tiny-sigmoid"'), ('"/weights/in21k_b16.pth"', '"h.pth"')],
    ("docs/api.md", 'open_clip_3t.export_clip("logs/run/checkpoints/epoch_20.pt", "released/")   # model name from '
                    "the run's params.txt"): [('model_name="3T-ViT-B-16"', 'model_name="3T-tiny"')],
    ("docs/api.md", "python -m open_clip_3t.export logs/run/checkpoints/epoch_20.pt --out released/ "
                    "[--model 3T-ViT-B-16] [--overwrite]"):
        [("[--model 3T-ViT-B-16] [--overwrite]", "--model 3T-tiny --overwrite")],
    ("docs/cache.md", "# 1. build (any number of ranks / SLURM array tasks; rerun to resume)"): [
        ("/data/laion400m/{00000..41407}.tar", "data/laion400m/{00000..00001}.tar"), ("3T-ViT-B-16", "3T-tiny"),
        ("vit_base_patch16_224.augreg_in21k.pth", "h.pth"), ("/data/cache/", "cache/"),
        ("--device cuda --precision fp16 --batch-size 256 --workers 12",
         "--device cpu --precision fp32 --batch-size 8 --workers 0"),
        ("[--checksum]", "--checksum"),
        ("[--third-tower-cache-missing error|skip|online] ...",
         "--third-tower-cache-missing error --train-num-samples 32 --batch-size 16 --epochs 1 --workers 0 --device cpu "
         "--precision fp32")],
    ("docs/cache.md", "from safetensors.numpy import load_file"):
        [("DIR/laion400m/00012.tar", "cache/laion400m-vitb16/laion400m/00001.tar")],
    ("docs/evaluation.md", "# a training checkpoint (the model name is read from the run's params.txt; or pass "
                           "--model NAME)"): [("{00000..00009}", "{00000..00001}"),
                                              ("vit_base_patch16_224.augreg_in21k.pth", "h.pth")],
    ("docs/training.md", "python -m open_clip_3t.toy.synthetic shards --out data/train --num-samples 2000 "
                         "--samples-per-shard 500 --image-size 32"):
        [("--num-samples 2000 --samples-per-shard 500", "--num-samples 64 --samples-per-shard 16"),
         ("--batch-size 64 --epochs 5", "--batch-size 16 --epochs 1")],
}

NOT_RUN = {
    ("README.md", "# 1. install and run the main job on its embedded default (no data or weights to download)"):
        NotRun("a fresh virtualenv from the package index, then the 5-minute quickstart: .ci/run installs exactly "
               "this way and tests/test_quickstart.py runs the quickstart (--tiny)", check_installs_like_ci),
    ("README.md", "# 2. install and run the tests"): NotRun("it is CI itself: .ci/run runs this command", check_is_ci),
    ("docs/evaluation.md", "python -m training.main --model 3T-ViT-B-16 --train-data '/data/laion/{00000..41407}.tar' "
                           "... \\"):
        NotRun("LAION shards and ImageNet's validation set (--imagenet-val needs its 1000 classes); training-time "
               "evaluation runs in tests/test_evaluation.py and tests/test_training.py"),
    ("docs/evaluation.md", "CHECKPOINT=logs/3t-run/checkpoints/epoch_32.pt COMBINE_WITH=logs/lit-run/checkpoints/"
                           "epoch_32.pt \\"):
        NotRun("a SLURM cluster: tests/test_evaluation.py runs eval.sbatch without SLURM and on the local cluster"),
    ("docs/evaluation.md", "mkdir -p results"):
        NotRun("CIFAR-10 and MSCOCO are downloaded from the internet; the same commands on local data run in "
               "tests/test_clip_benchmark.py"),
    ("docs/evaluation.md", "python -m open_clip_3t.toy.synthetic classification --out data/shape_test --attribute "
                           "shape --num-per-class 50"):
        NotRun("tests/test_clip_benchmark.py runs this block (smaller sets) and compares the two evaluators"),
    ("docs/local_slurm.md", "sudo scripts/slurm/local_cluster.sh start     # first run installs the packages "
                            "(~13 MB, <10 s)"):
        NotRun("root, apt packages and SLURM daemons: tests/test_local_cluster.py (the coordinator runs it)"),
    ("docs/local_slurm.md", "sudo LOCAL_SLURM_NODES=2 scripts/slurm/local_cluster.sh start   # nodes n1, n2: two "
                            "slurmd daemons"):
        NotRun("root, apt packages and SLURM daemons: tests/test_local_cluster.py starts one- and two-node clusters"),
    ("docs/cache.md", "python -m open_clip_3t.cache merge /scratch/node1/cache /scratch/node2/cache "
                      "--third-tower-cache /data/cache/laion400m-vitb16"):
        NotRun("two caches of LAION shards: tests/test_cache_index.py merges two parts and refuses what does not fit"),
    ("docs/training.md", "# on every node (c10d rendezvous: the agents agree on the ranks; node 0 hosts nothing "
                         "special)"):
        NotRun("two nodes with GPUs: tests/test_multinode.py runs two torchrun agents (c10d and static) on CPU"),
    ("docs/training.md", "python scripts/benchmark_startup.py                       # 1000, 5000 and 41408 shards, "
                         "3 launches each (~25 min)"):
        NotRun("about 20 minutes; its figures are on the page"),
    ("docs/local_slurm.md", "# tests/conftest.py re-exports the session fixture:"):
        NotRun("a test body that needs the SLURM cluster fixture", check_slurm_fixture_api),
    ("docs/quickstart.md", "python -m open_clip_3t.toy.quickstart [--out quickstart_out] [--tiny]"):
        NotRun("5 minutes of training: tests/test_quickstart.py runs it with --tiny"),
    ("docs/results.md", "python scripts/replicate.py --out replication_out --seeds 0 1 2 --threads 1"):
        NotRun("hours on 2 CPU cores (its wall time is on the page): tests/test_replicate.py checks every run's "
               "training command, tests/test_quickstart.py trains through the same functions"),
    ("docs/training.md", "torchrun --nproc_per_node 8 -m training.main -- \\"):
        NotRun("8 GPUs, LAION shards, ImageNet and in21k weights"),
    ("docs/training.md", "torchrun --standalone --nproc_per_node 2 -m training.main -- --device cpu --dist-backend "
                         "gloo --precision fp32 ..."):
        NotRun("`...` stands for a run's data flags: tests/test_training.py::test_torchrun_two_cpu_processes runs "
               "this command with tiny shards"),
    ("docs/training.md", "# 3T ViT-B/16, h from a local in21k file, 4 nodes x 8 GPUs"):
        NotRun("a SLURM cluster with GPUs"),
    ("docs/training.md", "python -m training.main --model 3T-ViT-B-16-SigLIP --siglip --loss-dist-impl bidir \\"):
        NotRun("LAION shards, in21k weights and SigLIP's tokenizer from the hub: tests/test_training.py trains "
               "3T-tiny-sigmoid with --siglip on tiny shards"),
    ("docs/training.md", "MODEL=3T-tiny THIRD_TOWER_WEIGHTS=h.pth TRAIN_DATA='data/train/{00000..00003}.tar' "
                         "EPOCHS=2 BATCH_SIZE=16 \\"):
        NotRun("a SLURM cluster: tests/test_slurm_launchers.py submits it to the local cluster, "
               "tests/test_slurm_stub.py runs the script without SLURM"),
    ("docs/training.md", "python -m training.main --model 3T-ViT-B-16-K2 --train-data "
                         "'/data/laion400m/{00000..41407}.tar' \\"):
        NotRun("LAION shards and two towers' hub weights: tests/test_training.py trains 3T-tiny-K2 from two caches, "
               "from one cache with the other tower online, and refuses swapped caches"),
    ("docs/cache.md", "python -m open_clip_3t.cache build --train-data '/data/laion400m/{00000..41407}.tar' --model "
                      "3T-ViT-B-16-K2 \\"):
        NotRun("LAION shards and two towers' hub weights: tests/test_cache.py builds one cache per tower of "
               "3T-tiny-K2 and joins both, tests/test_training.py trains from them"),
    ("docs/training.md", "python scripts/benchmark.py --model 3T-mini --device cpu --batch-size 128 --steps 60 "
                         "--rounds 10"):
        NotRun("minutes per run on CPU, and a GPU for the last line"),
    ("docs/training.md", "TRAIN_DATA='/data/laion400m/{00000..41407}.tar' TRAIN_NUM_SAMPLES=400000000 "
                         "THIRD_TOWER_WEIGHTS=/weights/in21k_b16.pth \\"):
        NotRun("a preemptible SLURM partition with GPUs: tests/test_slurm_launchers.py requeues train.sbatch on the "
               "local cluster (scontrol requeue, then USR1) and checks the weights against an uninterrupted job"),
    ("docs/training.md", "bash scripts/gpu_check.sh gpu_check_out      # writes gpu_check_out/report.md and "
                         "gpu_check_out/report.json"):
        NotRun("a GPU and 8 minutes: tests/test_gpu_check.py runs the check tiny on CPU", check_gpu_check),
    ("docs/untrusted_models.md", "python -m training.eval --model hf-hub:ORG/REPO --zeroshot-data data/pets_test "
                                 "--out results/hub --trust-remote-code"):
        NotRun("a model from the hub: tests/test_hostile.py runs --trust-remote-code on a tokenizer that brings code"),
    ("docs/release.md", "python -m open_clip_3t.publish released/ my-lab/3t-vit-b16-laion400m [--private]"):
        NotRun("the hub and a login: tests/test_release.py runs publish with huggingface_hub's network calls "
               "replaced and checks the upload"),
    ("docs/release.md", "import open_clip"):
        NotRun("the hub: tests/test_release.py loads a published export through hf-hub: from an offline cache"),
    ("docs/untrusted_models.md", "from huggingface_hub import snapshot_download"):
        NotRun("the network (a hub repo at one commit): tests/test_hostile.py loads hf-hub: ids from an offline cache"),
}


# --- the cheap checks of blocks that do not run -----------------------------------------------------------------

@lru_cache(maxsize=None)
def help_text(*command):
    """The --help output of ("-m", MODULE, [SUB]), (SCRIPT.py, [SUB]) or (CONSOLE_SCRIPT, [SUB]), run in this
    process (imports are shared: milliseconds, not a new interpreter's seconds)."""
    prog, *rest = command
    if prog == "-m":
        argv, run = [rest[0], *rest[1:]], lambda: runpy.run_module(rest[0], run_name="__main__", alter_sys=True)
    elif prog.endswith(".py"):
        argv, run = [prog, *rest], lambda: runpy.run_path(str(REPO / prog), run_name="__main__")
    else:
        entry = importlib.metadata.entry_points(group="console_scripts", name=prog)
        assert entry, f"{prog} is not installed (pip install -e '.[test]')"
        argv, run = [prog, *rest], next(iter(entry)).load()
    out, saved, code = io.StringIO(), sys.argv, 0
    try:
        sys.argv = argv + ["--help"]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # runpy's "found in sys.modules", torchrun's fault handler
            run()  # argparse exits after the help; torchrun's wrapper turns that exit into a return
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = saved
    assert code in (0, None) and "usage:" in out.getvalue(), f"{' '.join(argv)} --help failed: {out.getvalue()[-2000:]}"
    return out.getvalue()


def check_flags(block, command, args):
    """Every --flag of `args` exists in `command`'s --help (a leading subcommand is followed when it is one)."""
    text = help_text(*command)
    if args and not args[0].startswith("-") and re.search(rf"{{[\w,-]*\b{re.escape(args[0])}\b[\w,-]*}}", text):
        command, args = command + (args[0],), args[1:]
        text = help_text(*command)
    for arg in args:
        flag = arg.strip("[]").split("=")[0]
        if flag.startswith("--") and len(flag) > 2 and "$" not in flag:
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), \
                f"{block}: {flag} is not a flag of `{' '.join(command)}` (see its --help)"


def split_commands(command):
    lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    parts, current = [], []
    for word in lexer:
        if word in ("&&", "||", ";", "|", "&"):
            parts.append(current)
            current = []
        else:
            current.append(word)
    return [p for p in parts + [current] if p]


def check_command(block, words):
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        name, _, value = words.pop(0).partition("=")
        env[name] = value
    words = words[1:] if words[:1] == ["sudo"] else words
    if not words:
        return
    prog, args = words[0], words[1:]
    if prog in ("python", "python3") and args[:1] == ["-m"]:
        check_flags(block, ("-m", args[1]), args[2:])
    elif prog in ("python", "python3") and args[:1] == ["-c"]:
        compile(args[1], str(block), "exec")
    elif prog in ("python", "python3"):
        check_flags(block, (args[0],), args[1:])
    elif prog == "torchrun":
        module = args.index("-m")
        check_flags(block, ("torchrun",), args[:module])
        rest = args[module + 2:]
        check_flags(block, ("-m", args[module + 1]), rest[1:] if rest[:1] == ["--"] else rest)
    elif prog == "clip_benchmark":
        check_flags(block, ("clip_benchmark",), args)
    elif prog in ("sbatch", "bash") or prog.endswith(".sh"):
        script = next(w for w in [prog] + args if w.endswith((".sbatch", ".sh")))
        if not script.startswith("scripts/"):
            return  # the reader's own script (e.g. my_launcher.sbatch)
        code = "\n".join(line for line in (REPO / script).read_text().splitlines()
                         if not line.lstrip().startswith("#"))  # the code, not its comments
        for name in env:
            assert re.search(rf"\b{name}\b", code), f"{block}: {script} does not read ${name}"
        if "EXTRA_ARGS" in env:
            check_flags(block, ("-m", "training.main"), shlex.split(env["EXTRA_ARGS"]))
        if prog.endswith(".sh") and args:
            assert re.search(rf"^\s*{re.escape(args[0])}\)", code, re.M), f"{block}: {script} has no `{args[0]}`"


def check_not_run(block, entry):
    if block.lang == "python":
        compile(block.text, str(block), "exec")
    else:
        for command in commands(block.text):
            for words in split_commands(command):
                check_command(block, words)
    if entry.check is not None:
        entry.check(block)


# --- running the blocks that do -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory, h_weights):
    """The files the docs name, tiny: 3T-tiny and 3T-baseline-LiT-tiny runs, shards, zero-shot folders, h.pth."""
    ws = tmp_path_factory.mktemp("docs_workspace")
    shutil.copy(h_weights, ws / "h.pth")
    torch.manual_seed(0)
    three_t = open_clip.create_model("3T-tiny", third_tower_weights=h_weights).state_dict()
    torch.save(three_t, ws / "state_dict.pt")
    lit = open_clip.create_model("3T-baseline-LiT-tiny").state_dict()
    for run, model, state_dict, epochs in (("run", "3T-tiny", three_t, (20, 32)), ("3t-run", "3T-tiny", three_t, (32,)),
                                            ("lit-run", "3T-baseline-LiT-tiny", lit, (32,))):
        (ws / "logs" / run / "checkpoints").mkdir(parents=True)
        (ws / "logs" / run / "params.txt").write_text(f"model: {model}\nprecision: fp32\n")
        for epoch in epochs:  # as open_clip_train saves them: DDP prefixes
            torch.save({"epoch": epoch, "state_dict": {"module." + k: v for k, v in state_dict.items()}},
                       ws / "logs" / run / "checkpoints" / f"epoch_{epoch}.pt")
    write_shards(str(ws / "data" / "laion400m"), 32, samples_per_shard=16, seed=0, image_size=32)
    write_shards(str(ws / "data" / "val"), 12, samples_per_shard=6, seed=0, split="val", image_size=32)
    write_classification_folder(str(ws / "data" / "pets_test"), "colour", 1, seed=0, image_size=32)
    write_classification_folder(str(ws / "data" / "places365_val"), "shape", 1, seed=0, image_size=32)
    return ws


PAGE_SETUP = {  # what a page assumes the reader made earlier
    "docs/evaluation.md": lambda ws: export_clip(ws / "logs" / "run" / "checkpoints" / "epoch_20.pt", ws / "released"),
    "docs/untrusted_models.md": lambda ws: export_clip(ws / "logs" / "run" / "checkpoints" / "epoch_20.pt",
                                                       ws / "released"),
}


def python_namespace():
    """The names the docs' Python blocks take from the reader's own code: a batch, h's embeddings, a rank."""
    tokenizer = open_clip.get_tokenizer("3T-tiny")
    return {"images": torch.randn(4, 3, 32, 32), "texts": tokenizer(["a red circle", "two blue squares", "a star",
                                                                     "three green crosses"]),
            "h_emb": torch.randn(4, 64), "rank": 0, "world_size": 1,
            "classnames": ["red", "blue"], "templates": ["a {} shape.", "a picture of {} shapes."]}


def run_bash(block, text, cwd):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", text], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"{block} failed:\n{text}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.parametrize("page", pages())
def test_page_blocks(page, workspace, tmp_path, monkeypatch):
    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    PAGE_SETUP.get(page, lambda ws: None)(ws)
    monkeypatch.chdir(ws)
    namespace = python_namespace()
    for block in blocks(page):
        assert block.lang in LANGUAGES, f"{block}: tag the block with one of {sorted(LANGUAGES)}"
        if block.lang in ("text", "json"):
            continue
        if block.key in NOT_RUN:
            check_not_run(block, NOT_RUN[block.key])
            continue
        text = substitute(block.text, RUN_WITH.get(block.key, []), str(block))
        if block.lang == "python":
            exec(compile(text, str(block), "exec"), namespace)
        else:
            run_bash(block, text, ws)


def test_every_table_entry_names_a_block():
    keys = {b.key for b in blocks()}
    stale = [k for k in list(RUN_WITH) + list(NOT_RUN) if k not in keys]
    assert not stale, f"entries for blocks that no longer exist (update the tables): {stale}"
    assert not set(RUN_WITH) & set(NOT_RUN)
    assert len(keys) == len(blocks()), "two blocks of a page start with the same line: the tables cannot tell them apart"


# --- the prose: names and links --------------------------------------------------------------------------------

def prose(page):
    return re.sub(r"^ *```.*?^ *```", "", (REPO / page).read_text(encoding="utf-8"), flags=re.S | re.M)


def resolves(dotted):
    """`open_clip_3t.cache.format.make_manifest`: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


@pytest.mark.parametrize("page", pages())
def test_names_paths_and_links_in_the_prose_exist(page):
    text = prose(page)
    names = set(re.findall(r"(?:`|python -m )((?:open_clip_3t|training)(?:\.\w+)+)", text))
    bad = [n for n in names if not resolves(n)]
    assert not bad, f"{page} names what does not exist: {bad}"
    paths = set(re.findall(r"`((?:open_clip_3t|training|scripts|tests|docs)/[\w./-]*\w)", text))
    links = {os.path.normpath(os.path.join(os.path.dirname(page), link))
             for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text)}
    missing = [p for p in paths | links if not (REPO / p).exists()]
    assert not missing, f"{page} points at files that do not exist: {missing}"


def test_the_checks_catch_wrong_flags_and_variables():
    """The cheap checks of NOT_RUN blocks can fail: a flag the command lacks, a variable the script never reads."""
    from tests.docs_blocks import Block
    for text, message in (("python -m training.eval --pretrained x --no-such-flag", "--no-such-flag"),
                          ("python -m open_clip_3t.cache build --cache DIR", "--cache is not a flag"),
                          ("torchrun --nproc-per-gpu 2 -m training.main -- --device cpu", "--nproc-per-gpu"),
                          ("NO_SUCH_VAR=1 sbatch scripts/slurm/train.sbatch", "NO_SUCH_VAR"),
                          ("clip_benchmark eval --model x --no-amp", "--no-amp")):
        with pytest.raises(AssertionError, match=re.escape(message)):
            check_not_run(Block("docs/x.md", 1, "bash", text + "\n"), NotRun("test"))
