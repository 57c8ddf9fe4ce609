"""Hostile artifacts (issue 26): evaluating, finetuning or exporting a model someone else made never runs their code.

Each artifact carries a payload that writes a marker file when its code runs. Every test asserts that the marker is NOT
written and that the command ends with one line naming the bad file (and the key, for a config) and the fix, no
traceback. The controls prove the payloads are real (plain OpenCLIP, or torch.load(weights_only=False), writes the
marker), and the positive tests that --trust-remote-code / trust_remote_code=True switch OpenCLIP's behaviour back on.
"""
import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import save_file

import open_clip_3t
from open_clip_3t import cache, export_clip
from open_clip_3t._openclip import CONFIG_DIR, RemoteCodeError
from open_clip_3t.export import main as export_main
from open_clip_3t.toy.synthetic import write_classification_folder, write_shards
from tests.conftest import REPO
from tests.test_export import trained_checkpoint
from training.eval import main as eval_main
from training.main import main as train_main

TRUST_FIX = "pass --trust-remote-code (in Python: trust_remote_code=True) only if you trust its authors"


# --- the artifacts ------------------------------------------------------------------------------------------------

class Payload:
    """Pickled, it is `exec(code)`: torch.load(weights_only=False) of a file holding it writes the marker."""

    def __init__(self, marker):
        self.code = f"open({str(marker)!r}, 'w').write('ran')"

    def __reduce__(self):
        return exec, (self.code,)


def write_pickle(path, marker):
    """A 'checkpoint' whose unpickling runs code: a state dict (in OpenCLIP's checkpoint layout) holding a Payload."""
    torch.save({"epoch": 1, "state_dict": {"logit_scale": torch.zeros(()), "payload": Payload(marker)}}, path)
    return str(path)


def write_lying_safetensors(path):
    """A .safetensors file whose header says its one tensor holds 10^9 floats, in a file of 16 bytes of data."""
    header = json.dumps({"logit_scale": {"dtype": "F32", "shape": [10 ** 9], "data_offsets": [0, 4 * 10 ** 9]}})
    header += " " * (-len(header) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(header)) + header.encode() + bytes(16))
    return str(path)


def tiny_config(name="3T-baseline-CLIP-tiny"):
    return json.loads((CONFIG_DIR / f"{name}.json").read_text())


def write_folder(folder, model_cfg, weights=True):
    """A local-dir: folder: open_clip_config.json (+ open_clip_model.safetensors of the model, seeded)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    if weights:
        torch.manual_seed(0)
        plain = {k: v for k, v in model_cfg.items() if k != "three_towers"}
        model = open_clip.model.CLIP(**plain)
        weights = {k: v.contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(folder / "open_clip_model.safetensors"))
    return folder


TOKENIZER_CODE = """\
open({marker!r}, "w").write("ran")  # the payload: runs when transformers imports this file
from transformers import PreTrainedTokenizerFast


class HostileTokenizer(PreTrainedTokenizerFast):
    pass
"""


def write_hostile_tokenizer(folder, marker, config_switch=True, hf_tokenizer_name="hostile/model"):
    """The issue's artifact: an export folder whose config names a Hugging Face tokenizer (with, if `config_switch`,
    tokenizer_kwargs {"trust_remote_code": true}), beside a tokenizer_config.json whose auto_map names tok.py. The
    tokenizer works when trusted (a word-level tokenizer.json), so the positive tests can evaluate with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    cfg = tiny_config()
    cfg["text_cfg"]["hf_tokenizer_name"] = hf_tokenizer_name
    if config_switch:
        cfg["text_cfg"]["tokenizer_kwargs"] = {"trust_remote_code": True}
    folder = write_folder(folder, cfg)
    words = ["[PAD]", "[UNK]", "a", "photo", "of", "red", "green", "blue", "circle", "square", "star", "shape"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "HostileTokenizer", "auto_map": {"AutoTokenizer": [None, "tok.HostileTokenizer"]},
        "pad_token": "[PAD]", "unk_token": "[UNK]", "model_max_length": 32}))
    (folder / "tok.py").write_text(TOKENIZER_CODE.format(marker=str(marker)))
    return folder


def write_hub_cache(hf_home, repo, files, absent=("config.json",)):
    """Hugging Face's cache layout for `repo` at one commit, so that hf-hub:REPO loads offline (HF_HUB_OFFLINE=1):
    the files of the folder `files`, and `absent` recorded as not in the repo (as the hub's 404s are cached)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = Path(hf_home) / "hub" / f"models--{repo.replace('/', '--')}"
    for folder in ("refs", f"snapshots/{commit}", f".no_exist/{commit}"):
        (root / folder).mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    for path in Path(files).iterdir():
        (root / "snapshots" / commit / path.name).write_bytes(path.read_bytes())
    for name in absent:
        (root / ".no_exist" / commit / name).touch()


# --- how a command ends -------------------------------------------------------------------------------------------

def one_line(text, prefix):
    lines = text.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in text, text[-3000:]
    return lines[0][len(prefix):]


def train_stops(argv, capsys):
    with pytest.raises(SystemExit) as e:
        train_main(argv)
    assert e.value.code == 2
    return one_line(capsys.readouterr().err, "training.main: error: ")


def eval_stops(argv, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        eval_main([*argv, "--out", str(tmp_path / "results"), "--device", "cpu", "--workers", "0"])
    assert e.value.code == 2 and not (tmp_path / "results").exists()
    return one_line(capsys.readouterr().err, "python -m training.eval: error: ")


def export_stops(argv):
    with pytest.raises(SystemExit) as e:
        export_main(argv)
    return one_line(str(e.value.code), "error: ")


def cache_stops(argv, capsys):
    assert cache.main(argv) == 2
    return one_line(capsys.readouterr().err, f"python -m open_clip_3t.cache {argv[0]}: error: ")


def run_module(args, env=None, cwd=REPO):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": REPO, **(env or {})})


def train_argv(tmp_path, *flags):
    return ["--logs", str(tmp_path / "logs"), "--name", "run", "--device", "cpu", "--precision", "fp32", "--workers",
            "0", "--batch-size", "8", *flags]


@pytest.fixture
def marker(tmp_path):
    """Where a payload writes when its code runs (a test that expects it removes it)."""
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "a payload ran"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A zero-shot folder and a shard, for the commands that need evaluation or training data."""
    root = tmp_path_factory.mktemp("hostile_data")
    write_classification_folder(str(root / "shape"), "shape", 1, seed=0, image_size=32)
    shards = write_shards(str(root / "shards"), num_samples=8, samples_per_shard=8, seed=0, image_size=32)
    return root / "shape", shards[0]


# --- the tokenizer that brings its own code -----------------------------------------------------------------------

def test_control_plain_openclip_runs_the_tokenizers_code(tmp_path, marker):
    """The hole (OpenCLIP 3.3 without our import): get_tokenizer imports tok.py. Proves the artifact is hostile."""
    folder = write_hostile_tokenizer(tmp_path / "released", marker)
    proc = run_module(["-c", f"import open_clip; open_clip.get_tokenizer('local-dir:{folder}')"],
                      env={"HF_HOME": str(tmp_path / "hf")})
    assert marker.read_text() == "ran", proc.stderr[-2000:]
    marker.unlink()


@pytest.mark.parametrize("config_switch", [True, False], ids=["config-switch", "auto_map-only"])
def test_a_tokenizer_with_its_own_code_is_refused_as_local_dir(config_switch, tmp_path, marker, data, run_3t,
                                                                capsys):
    folder = write_hostile_tokenizer(tmp_path / "released", marker, config_switch)
    model = f"local-dir:{folder}"
    expected = (f"{folder}/open_clip_config.json: text_cfg.tokenizer_kwargs.trust_remote_code asks to run code that "
                f"comes with the model's tokenizer: refused; {TRUST_FIX}" if config_switch else
                f"{folder}/tokenizer_config.json: its auto_map names code that comes with the tokenizer {folder}: "
                f"refused; {TRUST_FIX}")
    assert eval_stops(["--model", model, "--zeroshot-data", str(data[0])], capsys, tmp_path) == expected
    assert eval_stops(["--model", str(folder), "--zeroshot-data", str(data[0])], capsys, tmp_path) == expected
    assert eval_stops(["--pretrained", str(run_3t), "--combine-with", model, "--zeroshot-data", str(data[0])], capsys,
                      tmp_path) == expected
    assert train_stops(train_argv(tmp_path, "--model", model, "--train-data", data[1], "--train-num-samples", "8"),
                       capsys) == expected
    for call in (lambda: open_clip.get_tokenizer(model),
                 lambda: open_clip.get_tokenizer(model, trust_remote_code=False),
                 lambda: open_clip.factory.get_tokenizer(model)):
        with pytest.raises(RemoteCodeError) as e:
            call()
        assert str(e.value) == expected
    assert not marker.exists()


def test_a_tokenizer_with_its_own_code_is_refused_as_an_hf_hub_id(tmp_path, marker, data):
    """The same folder as a Hugging Face repo in an offline cache: hf-hub:hostile/model."""
    folder = write_hostile_tokenizer(tmp_path / "repo", marker, hf_tokenizer_name="hostile/model")
    hf_home = tmp_path / "hf"
    write_hub_cache(hf_home, "hostile/model", folder)
    env = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    proc = run_module(["-m", "training.eval", "--model", "hf-hub:hostile/model", "--zeroshot-data", str(data[0]),
                       "--out", str(tmp_path / "results"), "--device", "cpu", "--workers", "0"], env)
    assert proc.returncode == 2 and one_line(proc.stderr, "python -m training.eval: error: ") == (
        f"open_clip_config.json of hf-hub:hostile/model: text_cfg.tokenizer_kwargs.trust_remote_code asks to run "
        f"code that comes with the model's tokenizer: refused; {TRUST_FIX}")
    assert not marker.exists() and not (tmp_path / "results").exists()
    # in Python: refused without trust; with trust_remote_code=True OpenCLIP's behaviour is back (the code runs)
    code = textwrap.dedent(f"""
        import os, open_clip, open_clip_3t
        from open_clip_3t._openclip import RemoteCodeError
        try:
            open_clip.get_tokenizer("hf-hub:hostile/model")
        except RemoteCodeError as e:
            print("refused:", e)
        print("marker after refusal:", os.path.exists({str(marker)!r}))
        ids = open_clip.get_tokenizer("hf-hub:hostile/model", trust_remote_code=True)(["a red circle"])
        print("trusted:", ids[0, :4].tolist(), os.path.exists({str(marker)!r}))
    """)
    out = run_module(["-c", code], env).stdout.splitlines()
    assert out[0].startswith("refused: open_clip_config.json of hf-hub:hostile/model: text_cfg.tokenizer_kwargs.")
    assert out[1:] == ["marker after refusal: False", "trusted: [2, 5, 8, 0] True"]
    marker.unlink()


def test_trust_remote_code_runs_the_tokenizer(tmp_path, marker, data):
    """--trust-remote-code (the command line) and trust_remote_code=True (Python) load the tokenizer with its code:
    the marker is written, and the evaluation runs with that tokenizer."""
    folder = write_hostile_tokenizer(tmp_path / "released", marker)
    env = {"HF_HOME": str(tmp_path / "hf")}
    proc = run_module(["-m", "training.eval", "--model", f"local-dir:{folder}", "--zeroshot-data", str(data[0]),
                       "--out", str(tmp_path / "results"), "--device", "cpu", "--workers", "0", "--trust-remote-code"],
                      env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert marker.read_text() == "ran" and (tmp_path / "results" / "results.csv").is_file()
    marker.unlink()
    code = (f"import os, open_clip, open_clip_3t\n"
            f"t = open_clip.get_tokenizer('local-dir:{folder}', trust_remote_code=True)\n"
            f"print(type(t.tokenizer).__name__, t(['a photo of a star'])[0, :5].tolist(), os.path.exists('{marker}'))")
    assert run_module(["-c", code], env).stdout.split("\n")[0] == "HostileTokenizer [2, 3, 4, 2, 10] True"
    marker.unlink()


# --- a Hugging Face text tower that brings its own code -----------------------------------------------------------

TOWER_CODE = """\
open({marker!r}, "w").write("ran")
from transformers import RobertaConfig, RobertaModel


class HostileConfig(RobertaConfig):
    model_type = "hostile"


class HostileModel(RobertaModel):
    config_class = HostileConfig
"""


def test_a_text_tower_with_its_own_code_is_refused(tmp_path, marker, data, capsys):
    tower = tmp_path / "tower"
    tower.mkdir()
    (tower / "config.json").write_text(json.dumps({
        "model_type": "hostile",
        "auto_map": {"AutoConfig": "modeling.HostileConfig", "AutoModel": "modeling.HostileModel"},
        "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 64}))
    (tower / "modeling.py").write_text(TOWER_CODE.format(marker=str(marker)))
    cfg = tiny_config()
    cfg["text_cfg"] = {"hf_model_name": str(tower), "hf_proj_type": "linear", "context_length": 16}
    folder = write_folder(tmp_path / "released", cfg, weights=False)
    expected = f"{tower}/config.json: its auto_map names code that comes with the Hugging Face text tower " \
               f"(text_cfg.hf_model_name) {tower}: refused; {TRUST_FIX}"
    for call in (lambda: open_clip.create_model(f"local-dir:{folder}"),
                 lambda: open_clip.create_model_and_transforms(f"local-dir:{folder}"),
                 lambda: open_clip.create_model_from_pretrained(f"local-dir:{folder}")):
        with pytest.raises(RemoteCodeError) as e:
            call()
        assert str(e.value) == expected
    assert eval_stops(["--model", f"local-dir:{folder}", "--zeroshot-data", str(data[0])], capsys, tmp_path) == expected
    assert train_stops(train_argv(tmp_path, "--model", f"local-dir:{folder}", "--train-data", data[1]),
                       capsys) == expected
    assert not marker.exists()
    code = (f"import os, open_clip, open_clip_3t\ntry:\n"
            f"    open_clip.create_model('local-dir:{folder}', trust_remote_code=True)\nexcept Exception:\n    pass\n"
            f"print(os.path.exists('{marker}'))")
    assert run_module(["-c", code], {"HF_HOME": str(tmp_path / "hf")}).stdout.strip() == "True"  # the switch works
    marker.unlink()


# --- pickles that run code ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_3t(tmp_path_factory, h_weights):
    """A 3T-tiny training run (checkpoint + params.txt), for the commands that need a real one beside a hostile file."""
    return trained_checkpoint(tmp_path_factory.mktemp("run_3t"), h_weights)[1]


def test_control_the_pickle_runs_code_when_unpickled(tmp_path, marker):
    torch.load(write_pickle(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()


def test_a_pickle_is_refused_as_every_weights_argument(tmp_path, marker, data, run_3t, h_weights, capsys):
    evil = write_pickle(tmp_path / "evil.pt", marker)
    unreadable = "(UnpicklingError: it pickles exec, which is never unpickled (only tensors are))"
    zeroshot = ["--zeroshot-data", str(data[0])]
    folder = write_folder(tmp_path / "folder", tiny_config(), weights=False)
    os.link(evil, folder / "open_clip_pytorch_model.bin")
    train = [(["--model", "3T-tiny", "--third-tower-weights", evil],
              f"third-tower weights {evil} cannot be read {unreadable}"),
             (["--model", "3T-baseline-LiT-tiny", "--lock-image", "--image-tower-weights", evil],
              f"--image-tower-weights {evil} cannot be read {unreadable}"),
             (["--model", "3T-tiny", "--third-tower-weights", h_weights, "--pretrained", evil],
              f"--pretrained {evil} does not load {unreadable}"),
             (["--model", "3T-baseline-CLIP-tiny", "--distill-model", "3T-baseline-CLIP-tiny", "--distill-pretrained",
               evil], f"--distill-pretrained {evil} does not load {unreadable}"),
             (["--model", "3T-tiny", "--third-tower-weights", h_weights, "--resume", evil],
              f"--resume {evil} does not load {unreadable}"),
             (["--model", f"local-dir:{folder}"],
              f"--model local-dir:{folder}: weights file {folder}/open_clip_pytorch_model.bin does not load "
              f"{unreadable}")]
    for flags, message in train:
        assert train_stops(train_argv(tmp_path, *flags, "--train-data", data[1]), capsys).startswith(message), flags
    evals = [(["--pretrained", evil, "--model", "3T-tiny"], f"--pretrained {evil} does not load {unreadable}"),
             (["--pretrained", str(run_3t), "--combine-with", evil, "--combine-model", "3T-tiny"],
              f"--combine-with {evil} does not load {unreadable}"),
             (["--pretrained", str(run_3t), "--third-tower-pair", "--third-tower-weights", evil],
              f"third-tower weights {evil} cannot be read {unreadable}"),
             (["--model", f"local-dir:{folder}"],
              f"--model local-dir:{folder}: weights file {folder}/open_clip_pytorch_model.bin does not load "
              f"{unreadable}")]
    for flags, message in evals:
        assert eval_stops([*flags, *zeroshot], capsys, tmp_path).startswith(message), flags
    assert export_stops([evil, "--out", str(tmp_path / "out"), "--model", "3T-tiny"]).startswith(
        f"checkpoint {evil} does not load {unreadable}")
    assert cache_stops(["build", "--train-data", data[1], "--model", "3T-tiny", "--third-tower-cache",
                        str(tmp_path / "cache"), "--third-tower-weights", evil], capsys).startswith(
        f"third-tower weights {evil} cannot be read {unreadable}")
    # a config's own weights key, and OpenCLIP's doors in Python
    cfg = tiny_config("3T-tiny")
    cfg["three_towers"]["weights"] = evil
    named = write_folder(tmp_path / "named", cfg, weights=False)
    assert train_stops(train_argv(tmp_path, "--model", f"local-dir:{named}", "--train-data", data[1]),
                       capsys).startswith(f"third-tower weights {evil} cannot be read {unreadable}")
    for call in (lambda: open_clip.create_model("3T-baseline-CLIP-tiny", pretrained=evil),
                 lambda: open_clip.create_model("3T-tiny", pretrained=evil),
                 lambda: open_clip.create_model("3T-tiny", third_tower_weights=evil),
                 lambda: open_clip.create_model(f"local-dir:{folder}"),
                 lambda: open_clip_3t.export_clip(evil, tmp_path / "out2", model_name="3T-tiny")):
        with pytest.raises(Exception):
            call()
    assert not marker.exists() and not (tmp_path / "logs").exists()


# --- safetensors whose header lies --------------------------------------------------------------------------------

def test_a_lying_safetensors_header_is_one_line_everywhere(tmp_path, marker, data, h_weights, capsys):
    lying = write_lying_safetensors(tmp_path / "lying.safetensors")
    bad = "(SafetensorError: Error while deserializing header: incomplete metadata, file not fully covered)"
    folder = write_folder(tmp_path / "folder", tiny_config(), weights=False)
    os.link(lying, folder / "open_clip_model.safetensors")
    assert train_stops(train_argv(tmp_path, "--model", "3T-tiny", "--third-tower-weights", lying, "--train-data",
                                  data[1]), capsys) == (
        f"third-tower weights {lying} cannot be read {bad}: pass a state dict saved with "
        f"torch.save(model.state_dict(), FILE) or a .safetensors file")
    assert train_stops(train_argv(tmp_path, "--model", "3T-tiny", "--third-tower-weights", h_weights, "--pretrained",
                                  lying, "--train-data", data[1]), capsys).startswith(f"--pretrained {lying} does not "
                                                                                      f"load {bad}")
    assert train_stops(train_argv(tmp_path, "--model", f"local-dir:{folder}", "--train-data", data[1]),
                       capsys).startswith(
        f"--model local-dir:{folder}: weights file {folder}/open_clip_model.safetensors does not load {bad}")
    zeroshot = ["--zeroshot-data", str(data[0])]
    assert eval_stops(["--pretrained", lying, "--model", "3T-tiny", *zeroshot], capsys, tmp_path).startswith(
        f"--pretrained {lying} does not load {bad}")
    assert eval_stops(["--model", f"local-dir:{folder}", *zeroshot], capsys, tmp_path).startswith(
        f"--model local-dir:{folder}: weights file {folder}/open_clip_model.safetensors does not load {bad}")
    assert export_stops([lying, "--out", str(tmp_path / "out"), "--model", "3T-tiny"]).startswith(
        f"checkpoint {lying} does not load {bad}")
    assert cache_stops(["build", "--train-data", data[1], "--model", "3T-tiny", "--third-tower-cache",
                        str(tmp_path / "cache"), "--third-tower-weights", lying], capsys).startswith(
        f"third-tower weights {lying} cannot be read {bad}")
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


# --- timm kwargs that read weights from elsewhere -----------------------------------------------------------------

@pytest.mark.parametrize("key, value", [("pretrained_cfg_overlay", lambda f: {"file": f}),
                                        ("checkpoint_path", lambda f: f), ("pretrained_cfg", lambda f: {"file": f})])
def test_timm_kwargs_that_name_a_weights_file_are_refused(key, value, tmp_path, marker, data, run_3t, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    evil = write_pickle(outside / "weights.pth", marker)
    cfg = tiny_config("3T-tiny")
    cfg["three_towers"]["timm_kwargs"] = {**cfg["three_towers"].get("timm_kwargs", {}), key: value(evil)}
    folder = write_folder(tmp_path / "released", cfg, weights=False)
    model = f"local-dir:{folder}"
    expected = (f"{folder}/open_clip_config.json: three_towers.timm_kwargs.{key} would have timm read the tower's "
                f"weights around its strictly checked `weights` key: remove it and name the weights file with "
                f"`weights` (or --third-tower-weights)")
    assert train_stops(train_argv(tmp_path, "--model", model, "--train-data", data[1]), capsys) == expected
    assert eval_stops(["--pretrained", str(run_3t), "--model", model, "--zeroshot-data", str(data[0])], capsys,
                      tmp_path) == expected
    assert export_stops([str(run_3t), "--out", str(tmp_path / "out"), "--model", model]) == expected
    assert cache_stops(["build", "--train-data", data[1], "--model", model, "--third-tower-cache",
                        str(tmp_path / "cache")], capsys) == f"model {model!r}: {expected}"
    with pytest.raises(ValueError) as e:
        open_clip.create_model(model)
    assert str(e.value) == expected
    shared = ("head_type", "loss_weights", "transfer")
    tower = {"name": "vit", **{k: v for k, v in cfg["three_towers"].items() if k not in shared}}
    listed = {**cfg, "three_towers": {"towers": [tower], **{k: cfg["three_towers"][k] for k in shared}}}
    write_folder(tmp_path / "listed", listed, weights=False)
    with pytest.raises(ValueError, match=rf"three_towers\.towers\[0\]\.timm_kwargs\.{key} would have timm read"):
        open_clip.create_model(f"local-dir:{tmp_path / 'listed'}")
    assert not marker.exists()


# --- an export folder that is a link ------------------------------------------------------------------------------

def test_export_never_writes_through_a_link(tmp_path, run_3t, monkeypatch):
    """--out as a symbolic link to an earlier export elsewhere is refused (the export would replace the link, or with
    --overwrite the folder it points to); a link inside an earlier export is replaced, never written through."""
    elsewhere = export_clip(run_3t, tmp_path / "team" / "release")
    before = {p.name: p.read_bytes() for p in elsewhere.iterdir()}
    link = tmp_path / "released"
    link.symlink_to(elsewhere)
    for overwrite in ([], ["--overwrite"]):
        assert export_stops([str(run_3t), "--out", str(link), *overwrite]) == (
            f"--out {link} is a symbolic link (to {elsewhere}): pass the folder itself, or a new path")
    assert link.is_symlink() and {p.name: p.read_bytes() for p in elsewhere.iterdir()} == before
    assert not [p for p in (tmp_path / "team").iterdir() if p.name.startswith(".")]

    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    for mount in (False, True):  # a folder renamed whole, or a mount point whose files are renamed into it
        out = export_clip(run_3t, tmp_path / f"out{int(mount)}")
        (out / "open_clip_model.safetensors").unlink()
        (out / "open_clip_model.safetensors").symlink_to(precious)
        with monkeypatch.context() as m:
            m.setattr(os.path, "ismount", lambda path, out=out: mount and str(path) == str(out))
            export_clip(run_3t, out, overwrite=True)
        assert precious.read_text() == "mine" and not (out / "open_clip_model.safetensors").is_symlink()
        assert (out / "open_clip_model.safetensors").read_bytes() == before["open_clip_model.safetensors"]
