"""A run, resolved once: what it trains (CLIP, LiT or 3T, with the softmax or the sigmoid loss), where each frozen tower
h comes from and how that is checked, the heads and the loss terms.

`resolve_plan` is the one place that reads a model's `three_towers` section and decides, for each tower, whether it
is built, loaded from a file or timm's hub, taken from a full 3T checkpoint, read from a cache, or left random. It
runs before any model, process group or data loader exists: training/params.py builds the plan from the command
line, `python -m open_clip_3t.cache` from its own flags, evaluation and export from a model name and checkpoint, and
the factory hook from `create_model`'s keywords. Every later stage reads the plan; a stage that needs a new fact adds
a field here instead of looking at the config again.
"""
import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from ._openclip import read_model_config, read_three_towers_section
from .config import ThirdTowerCfg, ThreeTowersSection, by_tower, parse_named
from .loss import loss_terms

# Where a frozen tower comes from in a run, and how that is checked.
SOURCES = {
    "file": "a local weights file, loaded strictly (global rank 0 first checks it on the meta device)",
    "hub": "timm's hub weights, loaded strictly",
    "cache": "precomputed embeddings; the cache's fingerprint and sidecars are checked against the tower and shards",
    "checkpoint": "a full 3T checkpoint that holds the tower, loaded strictly",
    "random": "random weights, asked for by name",
    "none": "not built (evaluation, export, a checkpoint trained from a cache)",
}
FAMILIES = ("clip", "lit", "3t")


@dataclass(frozen=True)
class TowerPlan:
    """One frozen tower h of a run."""
    cfg: ThirdTowerCfg                  # its config; `weights` is the file the run loads (a flag wins over the config)
    source: str                         # a key of SOURCES
    build: Union[bool, str] = True      # what the model builds: True (reading weights), "random" (weights come from a
    #                                     checkpoint, or none), False (no module)
    cache: Optional[str] = None         # the cache folder, for source "cache"
    cache_facts: Optional[dict] = field(default=None, compare=False)  # the cache's totals, once it was validated

    @property
    def name(self):
        return self.cfg.name

    @property
    def check(self):
        return SOURCES[self.source]

    def __str__(self):
        where = {"file": self.cfg.weights, "hub": self.cfg.timm_model_name, "cache": self.cache}.get(self.source)
        built = {True: "built", "random": "built without weights", False: "not built"}[self.build]
        return f"{self.name}: {self.cfg.timm_model_name} from {self.source}{f' {where}' if where else ''} ({built})"


@dataclass(frozen=True)
class RunPlan:
    """Everything later stages ask about a run. Immutable: `dataclasses.replace` makes an amended copy."""
    model: str                                   # --model: a config name or local-dir:
    family: str                                  # "clip", "lit" (a locked pretrained image tower) or "3t"
    loss: str = "softmax"                        # "softmax" (CLIP) or "sigmoid" (SigLIP: --siglip)
    section: Optional[ThreeTowersSection] = None  # 3T: the config's section with the run's overrides
    towers: Tuple[TowerPlan, ...] = ()           # 3T: one per frozen tower, in the config's order
    cache_missing: str = "error"                 # a sample missing from a cache: error, skip, or online
    init_image_from: Optional[str] = None        # 3T finetuning: f starts from this tower's weights
    image_tower_weights: Optional[str] = None    # LiT: a local timm weights file for the image tower
    precision: str = "fp32"
    model_cfg: dict = field(default_factory=dict, repr=False, compare=False)  # OpenCLIP's part of the config

    @property
    def tower_names(self):
        return tuple(t.name for t in self.towers)

    def tower(self, name=None):
        """The tower called `name`; without a name, the only one."""
        return self.towers[self.tower_names.index(self.section.tower(name).name)]

    @property
    def cached(self):
        """The towers whose embeddings come from a cache, in the config's order."""
        return tuple(t.name for t in self.towers if t.source == "cache")

    @property
    def built(self):
        """The towers the model builds (and whose weights it reads, unless they come from a checkpoint)."""
        return tuple(t.name for t in self.towers if t.build)

    @property
    def loss_weights(self):
        return self.section.loss_weights if self.section else (1.0,)

    @property
    def transfer(self):
        return self.section.transfer if self.section else None

    def model_kwargs(self):
        """`open_clip.create_model` keywords that build this run's model (none for a plain OpenCLIP model)."""
        if self.family != "3t":
            return {}
        return {"three_towers": self.section, "third_tower": {t.name: t.build for t in self.towers}}

    def with_cache_facts(self, facts):
        """A copy whose cached towers carry their validated cache's totals ({tower name: dict})."""
        towers = tuple(dataclasses.replace(t, cache_facts=facts[t.name]) if t.name in facts else t
                       for t in self.towers)
        return dataclasses.replace(self, towers=towers)

    def __str__(self):
        """One line (params.txt shows it)."""
        text = f"{self.family} {self.loss} {self.model}"
        if self.family == "3t":
            text += (f"; towers: {'; '.join(map(str, self.towers))}; loss weights {list(self.loss_weights)}, "
                     f"transfer {self.transfer}, heads {self.section.head_type}")
            if self.cached:
                text += f", --third-tower-cache-missing {self.cache_missing}"
            if self.init_image_from:
                text += f"; f starts from {self.init_image_from}"
        if self.image_tower_weights:
            text += f"; image tower from {self.image_tower_weights}"
        return text + f"; precision {self.precision}"


def _kwarg_names(cli):
    """How errors name each choice: create_model's keywords, or the command line's flags."""
    names = {"third_tower": "third-tower", "third_tower_weights": "third-tower-weights",
             "third_tower_cache": "third-tower-cache", "init_image_from_third_tower": "third-tower-init-image",
             "loss_weights": "third-tower-loss-weights"}
    return {k: "--" + v if cli else k for k, v in names.items()}


def _decide(cfg, asked, cache, weights_given, held, build_by_default, cache_missing, init_from):
    """(source, build) of one tower: the one place that decides where a frozen tower comes from.
    asked: what a create_model caller asked for it (True, False, "random" or None); cache: its cache folder;
    weights_given: its weights file was passed (not only named by the config); held: a full 3T checkpoint about to
    be loaded holds its weights; build_by_default: what to do when nothing else decides."""
    own = "file" if cfg.weights else "hub" if cfg.timm_model_pretrained else "random"
    if asked is False:
        return "none", False
    if asked == "random":
        return ("checkpoint" if held else "random"), "random"
    if asked is True:
        return own, True
    if cache is not None:
        return "cache", cache_missing == "online" or init_from == cfg.name  # built only to fill in, or to copy into f
    if weights_given:
        return own, True
    if held:
        return "checkpoint", "random"
    return (own, True) if build_by_default else ("none", False)


def resolve_plan(model, *, section=None, third_tower=None, third_tower_weights=None, third_tower_cache=None,
                 cache_missing="error", loss_weights=None, transfer=None, head_type=None, init_image_from=None,
                 siglip=False, lock_image=False, image_tower_weights=None, precision="fp32", checkpoint_towers=None,
                 checkpoint_head_type=None, build_by_default=True, cli=False):
    """The RunPlan of training, evaluating or exporting `model` with these choices. Raises ValueError (one line) on a
    choice that does not fit the model.

    section: a `three_towers` section replacing the config's. third_tower / third_tower_weights / third_tower_cache:
    per tower, as create_model's keywords or command-line words (NAME=VALUE, or VALUE for the only tower).
    checkpoint_towers: the towers whose weights a full 3T checkpoint about to be loaded holds; checkpoint_head_type:
    the head type its keys show. build_by_default: whether a tower nothing else decides is built (training,
    create_model without a 3T checkpoint) or not (evaluation, export). cli: name flags, not keywords, in errors.
    """
    flags = _kwarg_names(cli)
    model_cfg = read_model_config(model) or {}
    raw = section if section is not None else read_three_towers_section(model)
    loss = "sigmoid" if siglip else "softmax"
    common = {"model": model, "loss": loss, "precision": precision, "image_tower_weights": image_tower_weights,
              "model_cfg": {k: v for k, v in model_cfg.items() if k != "three_towers"}}
    if raw is None:
        return RunPlan(family="lit" if lock_image else "clip", **common)

    parsed = ThreeTowersSection.from_dict(raw)
    names = parsed.names
    weights = parse_named(third_tower_weights or {}, names, flags["third_tower_weights"])
    caches = parse_named(third_tower_cache or {}, names, flags["third_tower_cache"])
    asked = by_tower(third_tower, names, flags["third_tower"])
    if init_image_from:
        try:
            init_image_from = parsed.tower(None if init_image_from is True else init_image_from).name
        except ValueError as e:
            raise ValueError(f"{flags['init_image_from_third_tower']}: {e}") from None
    terms = loss_terms(names)
    if loss_weights is not None and len(loss_weights) != len(terms):
        raise ValueError(f"{flags['loss_weights']}: {len(loss_weights)} values for {len(terms)} loss terms; give one "
                         f"per term, in this order: {', '.join(term.name for term in terms)}")
    parsed = parsed.replace(weights=weights, loss_weights=None if loss_weights is None else tuple(loss_weights),
                            transfer=transfer, head_type=head_type or checkpoint_head_type)
    held = set(checkpoint_towers or ())
    towers = []
    for cfg in parsed.towers:
        source, build = _decide(cfg, asked[cfg.name], caches.get(cfg.name), cfg.name in weights, cfg.name in held,
                                build_by_default, cache_missing, init_image_from)
        towers.append(TowerPlan(cfg, source, build, caches.get(cfg.name)))
    return RunPlan(family="3t", section=parsed, towers=tuple(towers), cache_missing=cache_missing,
                   init_image_from=init_image_from or None, **common)

