"""Export a 3T checkpoint as a plain OpenCLIP model folder (f, g and `logit_scale`; h and the heads dropped).

    python -m open_clip_3t.export logs/RUN/checkpoints/epoch_10.pt --out released/ [--model 3T-ViT-B-16]

The folder holds `open_clip_config.json` + `open_clip_model.safetensors`, which vanilla OpenCLIP (and
CLIP_benchmark) load with `create_model_and_transforms('local-dir:FOLDER')`, no plugin installed.
"""
import argparse
import json
import os
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from open_clip.model import CLIP
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file

from ._openclip import SECTION, load_state_dict, model_config
from .model import clip_state_dict, is_three_towers_key


def _model_name_from_run(checkpoint):
    """OpenCLIP writes logs/RUN/params.txt beside logs/RUN/checkpoints/: read `model: NAME` from it."""
    params = Path(checkpoint).resolve().parent.parent / "params.txt"
    if params.is_file():
        match = re.search(r"^model: (\S+)$", params.read_text(), flags=re.M)
        if match:
            return match.group(1)
    return None


def export_clip(checkpoint, out_dir, model_name=None, overwrite=False):
    """Write the plain-CLIP part of a 3T checkpoint to `out_dir`; returns the folder's path."""
    out_dir = Path(out_dir)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {checkpoint} does not exist: pass a training checkpoint "
                                f"(epoch_N.pt) or a saved state dict")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"export folder {out_dir} is not empty: choose another --out or pass --overwrite")
    model_name = model_name or _model_name_from_run(checkpoint)
    if model_name is None:
        raise ValueError(f"cannot tell which model {checkpoint} holds (no params.txt beside its run): "
                         f"pass --model 3T-NAME (model_name=...)")
    cfg = model_config(model_name)
    if cfg is None or SECTION not in cfg:
        raise ValueError(f"{model_name} is not a 3T model config: pass the --model the checkpoint was trained with")

    state_dict = load_state_dict(checkpoint)
    if not any(is_three_towers_key(k) for k in state_dict):
        raise ValueError(f"{checkpoint} holds no 3T heads: it is not a 3T checkpoint (a plain CLIP needs no export)")
    clip_cfg = {k: v for k, v in cfg.items() if k != SECTION}
    clip_weights = {k: v.detach().contiguous() for k, v in clip_state_dict(state_dict).items()}
    CLIP(**clip_cfg).load_state_dict(clip_weights, strict=True)  # proves vanilla OpenCLIP will load it

    preprocess_cfg = asdict(PreprocessCfg())
    preprocess_cfg["size"] = clip_cfg["vision_cfg"].get("image_size", preprocess_cfg["size"])
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(clip_weights, str(tmp / "open_clip_model.safetensors"))
    config = {"model_cfg": clip_cfg, "preprocess_cfg": preprocess_cfg}
    (tmp / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)  # the folder appears complete or not at all
    return out_dir


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m open_clip_3t.export", description=__doc__.split("\n")[0])
    parser.add_argument("checkpoint", help="training checkpoint (epoch_N.pt) or a bare 3T state dict")
    parser.add_argument("--out", required=True, help="folder to write (loadable as local-dir:FOLDER)")
    parser.add_argument("--model", default=None, help="3T model name; default: read from the run's params.txt")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    try:
        out = export_clip(args.checkpoint, args.out, model_name=args.model, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        sys.exit(f"error: {e}")
    print(f"exported plain OpenCLIP model to {out} (load with create_model_and_transforms('local-dir:{out}'))")


if __name__ == "__main__":
    main()
