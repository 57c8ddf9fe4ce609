"""Reading pretrained weights and checkpoints without surprises: timm towers loaded strictly (every weight from the
file, or a one-line WeightsError), checkpoint files described without reading their tensors."""
import contextlib
import logging
import os
import re
import warnings

import timm
import timm.models._builder as timm_builder
import torch

from ._openclip import model_weights_file


class WeightsError(ValueError):
    """Pretrained weights that cannot be read or do not fill the model: the message is one line naming the fix."""


def error_line(error):
    """'Type: first sentence' of an exception raised while reading a weights or checkpoint file."""
    text = (str(error).strip().splitlines() or [""])[0].split(". ")[0]
    unsafe = re.search(r"unsupported (?:globals?: )?(?:GLOBAL )?([\w.]*\w)", str(error), re.I)  # torch's, timm's
    if unsafe:  # a pickle that would build other objects than tensors, e.g. call builtins.exec: never unpickled
        text = f"it pickles {unsafe.group(1)}, which is never unpickled (only tensors are)"
    elif "weights_only" in text or "Weights only load failed" in text:  # torch's advice to unpickle unsafely is never
        text = "not a file that torch.load or safetensors can read"      # the fix for a bad weights file
    return f"{type(error).__name__}: {text[:200]}"


@contextlib.contextmanager
def _recording_timm_loads(records, what, source, name):
    """Within the block, timm's pretrained-weights load (timm 1.0: `timm.models._builder.load_pretrained`, which
    loads with strict=False once the classifier is dropped) appends the keys it could not match to `records`;
    a file it cannot read or load becomes a one-line WeightsError."""
    original = getattr(timm_builder, "load_pretrained", None)
    if original is None:
        raise ImportError(f"timm {timm.__version__} has no timm.models._builder.load_pretrained: open_clip_3t's strict "
                          f"weight check was written for timm 1.0")

    def load_pretrained(model, *args, **kwargs):
        hook = model.register_load_state_dict_post_hook(lambda module, keys: records.append(keys))
        try:
            return original(model, *args, **kwargs)
        except Exception as e:
            lines = str(e).strip().splitlines()
            if lines and lines[0].startswith("Error(s) in loading state_dict"):  # a shape that does not fit
                raise WeightsError(f"{what} {source} do not fit timm's {name} ({lines[1].strip()[:300]}): pass "
                                   f"weights of that model, saved from timm.create_model('{name}', ...)") from None
            raise WeightsError(f"{what} {source} cannot be read ({error_line(e)}): pass a state dict saved with "
                               f"torch.save(model.state_dict(), FILE) or a .safetensors file") from None
        finally:
            hook.remove()

    timm_builder.load_pretrained = load_pretrained
    quiet = logging.getLogger(timm_builder.__name__)  # its "Missing/Unexpected keys" lines: we report them ourselves
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        yield
    finally:
        timm_builder.load_pretrained = original
        quiet.setLevel(level)


def create_timm_model(name, weights=None, pretrained=True, what="weights", **kwargs):
    """`timm.create_model(name, num_classes=0, **kwargs)` with pretrained weights (the local file `weights` through
    timm's `pretrained_cfg_overlay` door, else timm's hub), loaded strictly: every parameter and buffer of the model
    comes from the weights, or WeightsError (one line). timm itself would keep random weights with a log line."""
    source = weights if weights else f"(timm's hub weights of {name})"
    unreadable = checkpoint_unreadable(weights) if pretrained and weights and os.path.isfile(weights) else None
    if unreadable:
        raise WeightsError(f"{what} {source} cannot be read ({unreadable}): pass a state dict saved with "
                           f"torch.save(model.state_dict(), FILE) or a .safetensors file")
    records = []
    # custom_load: the hub config's weights format (e.g. augreg's JAX .npz); a local file is in its own format. timm
    # >= 1.0.31 resets it for a given file, earlier 1.0 releases keep it and read a .pth as .npz.
    overlay = dict(file=weights, custom_load=str(weights).endswith(".npz")) if weights else None
    with _recording_timm_loads(records, what, source, name):
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, pretrained_cfg_overlay=overlay, **kwargs)
    if pretrained and records:  # no record: a custom loader (e.g. .npz) that loads every weight or raises
        missing, unexpected = list(records[-1].missing_keys), list(records[-1].unexpected_keys)
        if missing or unexpected:
            total = len(model.state_dict())
            extra = f"; {len(unexpected)} tensors of the file are not in the model (e.g. {unexpected[:3]})" \
                if unexpected else ""
            raise WeightsError(f"{what} {source} do not fit timm's {name}: {len(missing)} of its {total} weights are "
                               f"not in the file (e.g. {missing[:3]}){extra}; pass weights of that model, saved from "
                               f"timm.create_model('{name}', ...)")
    return model


def misfit_line(missing, unexpected, shapes=(), total=None):
    """'N of the model's weights are not in the file (e.g. [...]); ...' for the keys and shapes that do not fit."""
    parts = []
    if missing:
        whose = f"of the model's {total} weights" if total else "weights of the model"
        parts.append(f"{len(missing)} {whose} are not in the file (e.g. {list(missing)[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} tensors of the file are not in the model (e.g. {list(unexpected)[:3]})")
    if shapes:
        examples = "; ".join(f"{k}: file {a}, model {b}" for k, a, b in shapes[:2])
        parts.append(f"{len(shapes)} differ in shape (e.g. {examples})")
    return "; ".join(parts)


def load_error_line(error):
    """One line from an exception of OpenCLIP's or torch's checkpoint loading (load_state_dict's lists of keys and
    shapes are summarised)."""
    if isinstance(error, WeightsError) and " does not fit " in str(error):
        return str(error).split(" (", 1)[1].rsplit("): ", 1)[0]
    text = str(error)
    if text.startswith("Error(s) in loading state_dict"):
        def keys(kind):
            found = re.search(rf"{kind} key\(s\) in state_dict: (.*?)\.\s*$", text, flags=re.M)
            return re.findall(r'"([^"]+)"', found.group(1)) if found else []
        shapes = [(k, list(map(int, re.findall(r"\d+", a))), list(map(int, re.findall(r"\d+", b)))) for k, a, b in
                  re.findall(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
                             r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)", text)]
        return misfit_line(keys("Missing"), keys("Unexpected"), shapes)
    return f"{type(error).__name__}: {(text.strip().splitlines() or [''])[0][:200]}"


def on_meta_device(build):
    """Run `build()` (which reads weights files) with the model on the meta device: the checks of a strict load,
    without memory or compute for the model. A failure there is confirmed on the CPU, since a timm checkpoint
    filter may create tensors that cannot be mixed with meta ones."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying ... to a meta parameter is a no-op"
            build()
    except WeightsError:
        build()


def _zipped(path):
    """Whether `path` is in torch.save's zip format (which torch can memory-map), not its legacy one."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


TORCH_LEGACY_START = b"\x80\x02\x8a\x0a"  # torch.save's legacy format: a protocol-2 pickle of its magic number


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def meta_state_dict(path):
    """The state dict of a checkpoint or weights file as meta tensors (names, shapes, dtypes; no tensor data read:
    a safetensors header, or a torch checkpoint memory-mapped), unwrapped from {'state_dict': ...} and without
    DDP's 'module.' prefix, as OpenCLIP's reader unwraps it."""
    if str(path).endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}
            sd = {k: torch.empty(s.get_shape(), dtype=SAFETENSORS_DTYPES.get(s.get_dtype(), torch.float32),
                                 device="meta") for k, s in slices.items()}
    else:
        ckpt = torch.load(path, map_location="cpu", mmap=_zipped(path), weights_only=True)
        sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else {}
        sd = {k: torch.empty_like(v, device="meta") for k, v in sd.items() if isinstance(v, torch.Tensor)}
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def checkpoint_keys(path):
    """Parameter names in a checkpoint file without reading their tensors (safetensors header / torch mmap)."""
    return list(meta_state_dict(path))


def checkpoint_unreadable(path):
    """Why torch cannot read the checkpoint file `path` (e.g. truncated by a job that died while writing it, or
    not a checkpoint at all), as one short line; None if it reads. Cheap: a zip checkpoint (torch.save's format) is
    memory-mapped, so its directory and pickle are read, not its tensors; a .safetensors file's header is read."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        if str(path).endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(str(path), framework="pt"):
                pass
        else:
            with open(path, "rb") as f:
                start = f.read(4)
            if start != b"PK\x03\x04" and start != TORCH_LEGACY_START:
                return "not a file torch.save wrote (neither its zip nor its legacy format), nor a .safetensors file"
            torch.load(path, map_location="cpu", mmap=start == b"PK\x03\x04", weights_only=True)
    except Exception as e:
        return error_line(e)
    return None


def first_nonfinite(state_dict):
    """The name of the first floating-point tensor of a state dict that holds a NaN or an infinity, else None."""
    for name, t in state_dict.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def check_model_weights(model_name, what="--model"):
    """The weights file OpenCLIP loads for a local-dir: or hf-hub: model must read as tensors (no pickled code, a
    safetensors header that tells the truth): WeightsError (one line) if not, before any model is built."""
    path = model_weights_file(model_name)
    reason = checkpoint_unreadable(path) if path else None
    if reason:
        raise WeightsError(f"{what} {model_name}: weights file {path} does not load ({reason}): it is cut short, "
                           f"damaged or not what an export writes; export the checkpoint again (`python -m "
                           f"open_clip_3t.export` writes open_clip_model.safetensors)")
