"""The models the standalone evaluator (training/eval.py) scores: a training checkpoint (with its model name, from
the run's params.txt) or an exported folder, each checked before it is built, and loaded as its plan says (f and g
only, or with one frozen tower for the model's own third-tower pair)."""
import os
from dataclasses import dataclass
from typing import Optional

import open_clip

import open_clip_3t  # noqa: F401  (registers the 3T configs before any model name is resolved)
from open_clip_3t._openclip import check_remote_code, checkpoint_path_for, load_state_dict
# params.txt beside the run's checkpoints/ names the model and, for pretrained image towers, their normalisation
from open_clip_3t.export import _model_name_from_run, image_normalisation_of_run, no_model_name
from open_clip_3t.factory import checkpoint_misfit
from open_clip_3t.model import checkpoint_layout, tower_keys
from open_clip_3t.plan import resolve_plan
from open_clip_3t.weights import check_model_weights, checkpoint_keys, checkpoint_unreadable, first_nonfinite

@dataclass
class ModelSpec:
    label: str                 # how the model is named in the table
    name: str                  # OpenCLIP model name, or local-dir:DIR
    checkpoint: Optional[str]  # training checkpoint (None for local-dir: and hf-hub:)


def model_folder(name, flag):
    """A local-dir: or hf-hub: model, checked before any model is built (docs/untrusted_models.md): its weights read
    as tensors, its tokenizer and text tower need no code of their own (unless trusted)."""
    check_model_weights(name, flag)
    check_remote_code(name)
    return ModelSpec(name, name, None)


def resolve_spec(spec, model_name, flag, model_flag):
    """A model given as local-dir:DIR, an exported folder, an hf-hub: id, or a checkpoint file (+ its model name)."""
    if spec.startswith("hf-hub:"):
        return model_folder(spec, flag)
    if spec.startswith("local-dir:") or os.path.isdir(spec):
        folder = spec[len("local-dir:"):] if spec.startswith("local-dir:") else spec
        if not os.path.isfile(os.path.join(folder, "open_clip_config.json")):
            raise FileNotFoundError(f"{flag} {spec}: {folder} holds no open_clip_config.json; pass a folder written "
                                    f"by `python -m open_clip_3t.export` (or any OpenCLIP local-dir folder)")
        return model_folder(f"local-dir:{folder}", flag)
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"{flag} {spec}: no such checkpoint file or folder; pass epoch_N.pt, an exported "
                                f"folder or local-dir:DIR")
    reason = checkpoint_unreadable(spec)
    if reason:
        raise ValueError(f"{flag} {spec} does not load ({reason}): it is truncated or not a checkpoint; pass an intact "
                         f"epoch_N.pt, an exported folder or local-dir:DIR")
    model_name = model_name or _model_name_from_run(spec)
    if model_name is None:
        raise ValueError(f"cannot tell which model {spec} holds ({no_model_name(spec)}): pass {model_flag} NAME")
    check_remote_code(model_name)
    return ModelSpec(f"{model_name} {spec}", model_name, spec)


def eval_plan(spec: ModelSpec, third_tower_weights=None, pair=None):
    """The plan of evaluating `spec`: f and g only (no tower h is built); with `pair` (True: the only tower, or a
    tower's name), also that tower, for the model's own third-tower pair: from --third-tower-weights, else from the
    checkpoint when it holds it, else from the config's weights. Checked before any model is built."""
    if spec.checkpoint is None:
        if pair:
            raise ValueError(f"--third-tower-pair needs a 3T training checkpoint (with its heads), not {spec.label}: "
                             f"pass --pretrained logs/RUN/checkpoints/epoch_N.pt of a 3T run")
        return resolve_plan(spec.name, build_by_default=False)
    held, head_type = checkpoint_layout(checkpoint_keys(spec.checkpoint))
    plan = resolve_plan(spec.name, third_tower=False, checkpoint_head_type=head_type, build_by_default=False)
    if not pair:
        return plan
    if plan.family != "3t":
        raise ValueError(f"--third-tower-pair needs a 3T training checkpoint (with its heads), not {spec.label}: "
                         f"pass --pretrained logs/RUN/checkpoints/epoch_N.pt of a 3T run")
    try:
        name = plan.section.tower(None if pair is True else pair).name
    except ValueError as e:
        raise ValueError(f"--third-tower-pair: {e}") from None
    if third_tower_weights is not None and not os.path.isfile(third_tower_weights):
        raise FileNotFoundError(f"--third-tower-weights {third_tower_weights}: no such file; pass h's timm weights "
                                f"file")
    plan = resolve_plan(spec.name, section=plan.section, checkpoint_towers=held or (),
                        third_tower={n: None if n == name else False for n in plan.tower_names},
                        third_tower_weights=None if third_tower_weights is None else {name: third_tower_weights})
    if plan.tower(name).source == "random":
        raise ValueError(f"--third-tower-pair: {spec.checkpoint} was trained from a cache and holds no weights of "
                         f"{'h' if len(plan.towers) == 1 else 'the tower ' + name}, and {spec.name} names none: pass "
                         f"--third-tower-weights FILE (the file the cache was built from)")
    return plan


def check_fits(spec: ModelSpec, plan, flag):
    """The weights of `spec` load into its model as `load_model` loads them (checked on the meta device, no tensor
    read): a checkpoint of another model, or an exported folder whose config no longer matches its weights (e.g. a
    hand-edited context_length, which OpenCLIP would silently resize to), stops here, before any model is built."""
    if spec.checkpoint is None:
        weights = checkpoint_path_for(spec.name, None)
        if weights is None:
            raise ValueError(f"{flag} {spec.name}: the folder holds no weights file (open_clip_model.safetensors), so "
                             f"OpenCLIP would evaluate random weights: pass a folder written by `python -m "
                             f"open_clip_3t.export`")
        misfit = checkpoint_misfit(spec.name, weights, strict=True)
        fix = ("the folder's open_clip_config.json does not describe its weights (edited by hand?): restore it, or "
               "export the checkpoint again")
    else:
        weights, kwargs = spec.checkpoint, plan.model_kwargs()
        fix = "pass the --model it was trained with (its run's params.txt names it)"
        if plan.built or plan.family != "3t":  # loaded by create_model(pretrained=...): h's weights are not read here
            if "third_tower" in kwargs:
                kwargs["third_tower"] = {name: build and "random" for name, build in kwargs["third_tower"].items()}
            misfit = checkpoint_misfit(spec.name, weights, **kwargs)
        else:  # f and g, strictly (see load_model)
            towers = {tower_keys(name).tower for name in plan.tower_names}
            misfit = checkpoint_misfit(spec.name, weights, strict=True, ignore=towers, **kwargs)
    if misfit:
        raise ValueError(f"{flag}: {weights} does not fit {spec.name} ({misfit}): {fix}")


def load_model(spec: ModelSpec, device, precision, plan=None):
    """(model in eval mode, its eval preprocessing, its tokenizer), as `plan` (default: `eval_plan(spec)`) says.
    A checkpoint is evaluated with the image normalisation its run trained with (its params.txt)."""
    plan = plan or eval_plan(spec)
    normalisation = image_normalisation_of_run(spec.checkpoint) if spec.checkpoint else {}
    if spec.checkpoint is None:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.name, device=device, precision=precision)
    elif plan.built:  # a tower h too, for its third-tower pair
        model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=spec.checkpoint,
                                                                     device=device, precision=precision,
                                                                     **normalisation, **plan.model_kwargs())
    elif plan.family == "3t":
        # Evaluation needs f and g only: build without any third tower and load the checkpoint minus the towers'
        # weights (a checkpoint trained with a tower online holds them; create_model(pretrained=...) would load them
        # strictly).
        towers = {tower_keys(name).tower for name in plan.tower_names}
        state_dict = {k: v for k, v in load_state_dict(spec.checkpoint).items() if k.split(".")[0] not in towers}
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.name, device=device, precision=precision, **plan.model_kwargs(), **normalisation)
        try:
            model.load_state_dict(state_dict, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise ValueError(f"checkpoint {spec.checkpoint} does not fit {spec.name} "
                             f"({first[1].strip() if len(first) > 1 else first[0]}): pass the --model it was trained "
                             f"with") from None
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(spec.name, pretrained=spec.checkpoint,
                                                                     device=device, precision=precision,
                                                                     **normalisation)
    bad = first_nonfinite(model.state_dict())
    if bad is not None:
        raise ValueError(f"{spec.checkpoint or spec.name} holds non-finite weights (first: {bad}): the run diverged; "
                         f"evaluate a checkpoint from before that")
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(spec.name)
