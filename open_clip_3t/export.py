"""Export a 3T checkpoint as a plain OpenCLIP model folder (f, g, `logit_scale` and, for SigLIP, `logit_bias`; every
third tower h, its heads and its transfer terms' temperatures and biases dropped).

    python -m open_clip_3t.export logs/RUN/checkpoints/epoch_10.pt --out released/ [--model 3T-ViT-B-16]

The folder holds `open_clip_config.json` + `open_clip_model.safetensors` (+ the tokenizer's files when the text
tower uses a Hugging Face tokenizer, `text_cfg.hf_tokenizer_name`), which vanilla OpenCLIP (and CLIP_benchmark) load
with `create_model_and_transforms('local-dir:FOLDER')`, no plugin installed, as the class the 3T model was built on
(`CLIP`, or `CustomTextCLIP` for custom and Hugging Face text towers and SigLIP); and a model card (README.md, the
hub's format) with its machine-readable provenance record (open_clip_3t/release.py). `--push-to-hub ORG/NAME` then
uploads it (open_clip_3t/publish.py). docs/release.md.
"""
import argparse
import ast
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import open_clip
from open_clip.transform import PreprocessCfg
from safetensors.torch import save as save_safetensors

from ._openclip import (RemoteCodeError, check_remote_code, hf_text_tower_trust, load_state_dict, model_exists,
                        openclip_model_class, remote_code_trusted, trusting_remote_code)
from .files import unwritable, write_atomic
from .flags import HelpFormatter
from .model import clip_state_dict, towers_in
from .plan import resolve_plan
from .release import CARD_FILE, PROVENANCE_FILE, release_files
from .weights import checkpoint_keys, checkpoint_unreadable, first_nonfinite, load_error_line


def _run_params(checkpoint):
    """OpenCLIP writes logs/RUN/params.txt beside logs/RUN/checkpoints/ (`name: value` lines); '' if absent."""
    params = Path(checkpoint).resolve().parent.parent / "params.txt"
    return params.read_text(errors="replace") if params.is_file() else ""


def _model_name_from_run(checkpoint):
    """`model: NAME` from the run's params.txt."""
    match = re.search(r"^model: (\S+)$", _run_params(checkpoint), flags=re.M)
    return match.group(1) if match else None


def no_model_name(checkpoint):
    """Why the run's params.txt names no model (for an error line)."""
    params = Path(checkpoint).resolve().parent.parent / "params.txt"
    return f"{params} has no 'model: NAME' line" if params.is_file() else f"no params.txt beside its run ({params})"


def image_normalisation_of_run(checkpoint):
    """{'image_mean': ..., 'image_std': ...} the run was trained with, from its params.txt: set when the image tower
    started from pretrained timm weights (LiT, 3T finetuning), which expect their own normalisation; {} otherwise."""
    found = {}
    for key in ("image_mean", "image_std"):
        match = re.search(rf"^{key}: ([\[(].*[\])])$", _run_params(checkpoint), flags=re.M)
        if match:
            found[key] = [float(v) for v in ast.literal_eval(match.group(1))]
    return found


CONFIG_FILE, WEIGHTS_FILE = "open_clip_config.json", "open_clip_model.safetensors"
# What a Hugging Face tokenizer's save_pretrained writes (an export ships it when the config names one).
TOKENIZER_FILE = re.compile(r"(tokenizer.*|special_tokens_map|added_tokens|vocab|merges|spiece|sentencepiece.*|"
                            r"chat_template)\.(json|txt|model|jinja)")


def _not_exported(out_dir, names):
    """The names an export would not have written: anything but the config, the weights, and the tokenizer's files
    if the folder's config names a Hugging Face tokenizer."""
    try:
        text_cfg = json.loads((out_dir / CONFIG_FILE).read_text())["model_cfg"]["text_cfg"]
    except (OSError, ValueError, KeyError, TypeError):
        text_cfg = {}
    return [name for name in names if name not in (CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, PROVENANCE_FILE)
            and not (text_cfg.get("hf_tokenizer_name") and TOKENIZER_FILE.fullmatch(name))]


def _check_out(out_dir, overwrite):
    """--out may be new, empty, or (with --overwrite) an earlier export: never anything else, nor a link to one."""
    if out_dir.is_symlink():  # the export would replace the link, or (--overwrite) the folder it points to
        raise FileExistsError(f"--out {out_dir} is a symbolic link (to {os.readlink(out_dir)}): pass the folder "
                              f"itself, or a new path")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"--out {out_dir} is a file: choose a folder")
    held = sorted(p.name for p in out_dir.iterdir() if not re.fullmatch(r"\..*\.tmp-\d+|.*\.tmp\..*\.\d+", p.name))
    if not held:
        return
    others = _not_exported(out_dir, held)
    if others or CONFIG_FILE not in held:
        listed = ", ".join((others or held)[:3]) + (", ..." if len(others or held) > 3 else "")
        raise FileExistsError(f"export folder {out_dir} holds {listed}, which is not an earlier export: choose "
                              f"another --out (--overwrite replaces only a folder written by export)")
    if not overwrite:
        raise FileExistsError(f"export folder {out_dir} holds an earlier export: pass --overwrite to replace it, or "
                              f"choose another --out")


def _write_export(out_dir, files):
    """Write {name: bytes} as the folder `out_dir`: built under a temporary name beside it and renamed, so the
    folder appears complete or not at all (an earlier export is renamed aside first, removed last). A mount point
    cannot be renamed: there each file is written to a temporary name inside it and renamed, weights first."""
    pid = os.getpid()
    if out_dir.is_dir() and os.path.ismount(out_dir):
        for name, data in files.items():
            write_atomic(out_dir / name, data)
        return
    tmp, old = out_dir.with_name(f".{out_dir.name}.tmp-{pid}"), out_dir.with_name(f".{out_dir.name}.old-{pid}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for name, data in files.items():
            write_atomic(tmp / name, data)
        if out_dir.exists():
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out_dir.exists():
            os.replace(old, out_dir)  # the earlier export stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def _tokenizer_files(model_name, tokenizer_name):
    """{name: bytes} of the model's Hugging Face tokenizer: OpenCLIP's get_tokenizer('local-dir:FOLDER') reads such
    a tokenizer from FOLDER itself, so the export ships it."""
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except RemoteCodeError:
        raise
    except Exception as e:  # hub unreachable and not cached, missing files, ...
        raise ValueError(f"cannot load {model_name}'s tokenizer {tokenizer_name!r} to ship it with the export "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}): export where the "
                         f"training run could load it (its Hugging Face cache or local folder)") from None
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def export_clip(checkpoint, out_dir, model_name=None, overwrite=False, trust_remote_code=None, hub_id=None):
    """Write the plain-OpenCLIP part of a 3T checkpoint to `out_dir`, with its model card and provenance record;
    returns the folder's path. `overwrite` replaces an earlier export, never a folder that holds anything else. Code
    that comes with the model's tokenizer or Hugging Face text tower runs only with trust_remote_code=True
    (docs/untrusted_models.md). hub_id: the ORG/NAME the card says to load (default: a placeholder, which
    `publish` replaces)."""
    trusted = remote_code_trusted(trust_remote_code)
    with trusting_remote_code(trusted):
        return _export(checkpoint, Path(out_dir), model_name, overwrite, trusted, hub_id)


def _export(checkpoint, out_dir, model_name, overwrite, trusted, hub_id=None):
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist: pass a training checkpoint "
                                f"(epoch_N.pt) or a saved state dict")
    reason = checkpoint_unreadable(checkpoint)
    if reason:
        raise ValueError(f"checkpoint {checkpoint} does not load ({reason}): pass a training checkpoint (epoch_N.pt) "
                         f"or a saved state dict")
    _check_out(out_dir, overwrite)
    reason = unwritable(out_dir)
    if reason:
        raise ValueError(f"cannot write --out {out_dir} ({reason}): choose a folder on a writable file system with "
                         f"free space")
    given = model_name is not None
    model_name = model_name or _model_name_from_run(checkpoint)
    if model_name is None:
        raise ValueError(f"cannot tell which model {checkpoint} holds ({no_model_name(checkpoint)}): "
                         f"pass --model 3T-NAME (model_name=...)")
    source = "--model" if given else "its run's params.txt"
    if not model_exists(model_name):
        raise ValueError(f"model {model_name} (from {source}) does not exist: pass the 3T --model the checkpoint was "
                         f"trained with")
    keys = checkpoint_keys(checkpoint)
    if not towers_in(keys) and "logit_scale" not in keys:
        raise ValueError(f"{checkpoint} holds no 3T heads and is no CLIP checkpoint either ({len(keys)} tensors, e.g. "
                         f"{keys[:3]}): pass a 3T training checkpoint (epoch_N.pt)")
    if not towers_in(keys):
        raise ValueError(f"{checkpoint} holds no 3T heads: it is not a 3T checkpoint, and a plain CLIP checkpoint "
                         f"needs no export (load it with open_clip.create_model_and_transforms('{model_name}', "
                         f"pretrained='{checkpoint}'))")
    plan = resolve_plan(model_name, build_by_default=False)
    if plan.family != "3t":
        raise ValueError(f"{checkpoint} holds 3T heads, but {model_name} (from {source}) is a plain OpenCLIP model: "
                         f"pass the 3T --model the checkpoint was trained with")
    check_remote_code(model_name, trusted)

    state_dict = load_state_dict(checkpoint)
    bad = first_nonfinite(state_dict)
    if bad is not None:
        raise ValueError(f"checkpoint {checkpoint} holds non-finite weights (first: {bad}): the run diverged; export "
                         f"a checkpoint from before that")
    clip_cfg = plan.model_cfg
    clip_weights = {k: v.detach().contiguous() for k, v in clip_state_dict(state_dict).items()}
    # Prove that vanilla OpenCLIP will load it: build the class its factory picks for this config, strictly (a
    # Hugging Face text tower from its config alone, as OpenCLIP does when a checkpoint follows).
    build_cfg = {k: v for k, v in clip_cfg.items() if k != "custom_text"}
    if "hf_model_name" in build_cfg["text_cfg"]:
        build_cfg["text_cfg"] = {**build_cfg["text_cfg"], "hf_model_pretrained": False}
    try:
        with hf_text_tower_trust(trusted):
            exported_class = openclip_model_class(clip_cfg)
            exported_class(**build_cfg).load_state_dict(clip_weights, strict=True)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {checkpoint} does not fit {model_name} (from {source}): {load_error_line(e)}; "
                         f"pass the 3T --model it was trained with") from None

    preprocess_cfg = asdict(PreprocessCfg())
    preprocess_cfg["size"] = clip_cfg["vision_cfg"].get("image_size", preprocess_cfg["size"])
    normalisation = image_normalisation_of_run(checkpoint)  # f started from h (3T finetuning): h's mean and std
    preprocess_cfg.update({k[len("image_"):]: v for k, v in normalisation.items()})
    config = {"model_cfg": clip_cfg, "preprocess_cfg": preprocess_cfg}
    files = {WEIGHTS_FILE: save_safetensors(clip_weights), CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode()}
    if clip_cfg["text_cfg"].get("hf_tokenizer_name"):
        files.update(_tokenizer_files(model_name, clip_cfg["text_cfg"]["hf_tokenizer_name"]))
    files.update(release_files(checkpoint, model_name, plan, exported_class.__name__, hub_id))
    try:
        _write_export(out_dir, files)
    except OSError as e:
        raise ValueError(f"cannot write --out {out_dir} ({e.strerror or e}): choose a folder on a writable file "
                         f"system with free space (an earlier export there is kept)") from None
    return out_dir


def make_parser():
    """The command line of `python -m open_clip_3t.export`."""
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.export", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="training checkpoint (epoch_N.pt) or a bare 3T state dict")
    parser.add_argument("--out", required=True, help="folder to write (loadable as local-dir:FOLDER)")
    parser.add_argument("--model", default=None, help="3T model name; default: read from the run's params.txt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in --out (a folder holding anything else is never replaced)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run code that comes with the model's tokenizer or Hugging Face text tower (an auto_map, "
                             "a config's trust_remote_code), refused by default: only for models you trust")
    parser.add_argument("--push-to-hub", default=None, metavar="ORG/NAME",
                        help="then upload the folder to this Hugging Face hub model repository (created if needed; "
                             "log in first: hf auth login), as `python -m open_clip_3t.publish FOLDER ORG/NAME` does")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    parser.add_argument("--debug", action="store_true", help="on an error, print its traceback too")
    return parser


def main(argv=None):
    from .publish import check_repo_id, publish

    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.push_to_hub is not None:
            check_repo_id(args.push_to_hub)  # before any work
        out = export_clip(args.checkpoint, args.out, model_name=args.model, overwrite=args.overwrite,
                          trust_remote_code=args.trust_remote_code, hub_id=args.push_to_hub)
        print(f"exported plain OpenCLIP model to {out} (load with create_model_and_transforms('local-dir:{out}'))")
        if args.push_to_hub is not None:
            info = publish(out, args.push_to_hub, private=args.private)
            print(f"published {out} as {getattr(info, 'commit_url', None) or args.push_to_hub} (load with "
                  f"create_model_and_transforms('hf-hub:{args.push_to_hub}'))")
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        if args.debug:
            raise
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
