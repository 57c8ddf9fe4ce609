"""The `three_towers` section of a model config: its schema (each frozen tower h; the heads and loss they share) and
its parsing, with one-line errors that name the key to fix."""
import dataclasses
import re
from dataclasses import dataclass, field, fields
from typing import Optional, Tuple

from .loss import loss_terms

DEFAULT_TOWER = "third"  # the name of the tower of a single-tower section: 3T's names as they always were
TOWER_NAME = re.compile(r"[a-z][a-z0-9]{0,15}")


@dataclass(frozen=True)
class ThirdTowerCfg:
    """One frozen tower h: its timm model, weights and preprocessing, and its name."""
    timm_model_name: str                     # e.g. "vit_base_patch16_224.augreg_in21k"
    embed_dim: int                           # width of h's pre-logits embedding (the input of heads h_f, h_g)
    name: str = DEFAULT_TOWER                # keys its heads, temperatures, loss terms, log lines and cache
    timm_model_pretrained: bool = True       # load h's weights from timm's hub (ignored when `weights` is set)
    weights: Optional[str] = None            # local weights file for h (timm's pretrained_cfg_overlay file door)
    image_size: Optional[int] = None         # h's input size; default: timm's pretrained_cfg
    mean: Optional[Tuple[float, ...]] = None  # h's normalisation; default: timm's pretrained_cfg
    std: Optional[Tuple[float, ...]] = None
    interpolation: Optional[str] = None      # "bicubic" / "bilinear"; default: timm's pretrained_cfg
    crop_pct: Optional[float] = None         # h's eval center crop (used by the cache); default: timm's
    timm_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs, e.g. {"img_size": 32}


@dataclass(frozen=True)
class ThreeTowersSection:
    """The parsed `three_towers` section: K frozen towers, either listed (`"towers": [{"name": ..., <ThirdTowerCfg
    fields>}, ...]`) or, for K = 1, given by the ThirdTowerCfg fields in the section itself (then named "third");
    plus what every tower shares: the heads and the loss."""
    towers: Tuple[ThirdTowerCfg, ...]
    head_type: str = "linear"                # "linear" or "mlp" for every tower's heads f_h, g_h, h_f, h_g
    head_dim: Optional[int] = None           # width of each tower's two shared spaces; default: the CLIP embed_dim
    loss_weights: Tuple[float, ...] = ()     # one per term, L(f,g) then L(f_h,h_f), L(g_h,h_g) of each tower
    transfer: str = "contrastive"            # "contrastive" or "l2" for the transfer terms

    @property
    def names(self):
        return [tower.name for tower in self.towers]

    def tower(self, name=None):
        """The tower called `name`; without a name, the only one."""
        if name is None and len(self.towers) == 1:
            return self.towers[0]
        found = [t for t in self.towers if t.name == name]
        if not found:
            which = "name one" if name is None else f"there is no tower {name!r}"
            raise ValueError(f"this 3T model has the third towers {self.names}: {which} of them")
        return found[0]

    def replace(self, weights=None, **shared):
        """A copy with shared fields replaced (None leaves a field as it is) and towers' weights files set from
        `weights` ({tower name: file})."""
        towers = tuple(dataclasses.replace(t, weights=weights[t.name]) if (weights or {}).get(t.name) else t
                       for t in self.towers)
        return _checked(dataclasses.replace(self, towers=towers,
                                            **{k: v for k, v in shared.items() if v is not None}))

    def to_dict(self):
        """The section as a config would hold it (towers listed)."""
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "towers"},
                "towers": [dataclasses.asdict(t) for t in self.towers]}

    @classmethod
    def from_dict(cls, d):
        if isinstance(d, cls):
            return d
        d = dict(d)
        shared = {f.name for f in fields(cls)} - {"towers"}
        per_tower = {f.name for f in fields(ThirdTowerCfg)}
        if "towers" in d:
            inline = sorted(set(d) & per_tower)
            if inline:
                raise ValueError(f"three_towers section lists its towers and also has the tower key(s) {inline}: "
                                 f"move them into each entry of three_towers.towers")
            towers = d.pop("towers")
            if not isinstance(towers, (list, tuple)) or not towers:
                raise ValueError("three_towers.towers must be a non-empty list of towers, each with a name")
        else:
            towers = [{k: d.pop(k) for k in list(d) if k in per_tower}]
        unknown = sorted(set(d) - shared) + sorted({k for t in towers for k in t} - per_tower)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in the three_towers config section: valid keys are "
                             f"{sorted(shared)} and, per tower, {sorted(per_tower)}")
        if len(towers) > 1 and any("name" not in t for t in towers):
            raise ValueError("three_towers.towers: give every tower a short name (e.g. \"name\": \"in21k\"); it keys "
                             "the tower's heads, temperatures, loss terms, log lines and cache")
        lacking = [t.get("name", DEFAULT_TOWER) for t in towers if not {"timm_model_name", "embed_dim"} <= set(t)]
        if lacking:
            raise ValueError(f"three_towers: tower {lacking[0]!r} needs timm_model_name and embed_dim")
        tuples = ("mean", "std")
        towers = tuple(ThirdTowerCfg(**{k: tuple(v) if k in tuples and v is not None else v for k, v in t.items()})
                       for t in towers)
        if d.get("loss_weights") is not None:
            d["loss_weights"] = tuple(float(w) for w in d["loss_weights"])
        else:
            d.pop("loss_weights", None)
        return _checked(cls(towers=towers, **d))


def _checked(cfg):
    """`cfg` with its loss weights filled in (1 per term), after checking names, head type, transfer and weights."""
    names = cfg.names
    bad = [n for n in names if not isinstance(n, str) or not TOWER_NAME.fullmatch(n)]
    if bad:
        raise ValueError(f"three_towers: tower name {bad[0]!r} is not a short name: use 1-16 lower-case letters "
                         f"and digits, starting with a letter (e.g. in21k)")
    if set(names) & {"f", "g", "h"}:  # a tower h called f, g or h would share its heads' names with another's
        raise ValueError(f"three_towers: a tower may not be called {sorted(set(names) & {'f', 'g', 'h'})[0]!r} (the "
                         f"heads of a tower N are f_N, N_f, g_N, N_g): give it another name")
    if len(set(names)) != len(names):
        raise ValueError(f"three_towers: the tower names {names} repeat: give each tower its own name")
    if cfg.head_type not in ("linear", "mlp"):
        raise ValueError(f"three_towers.head_type={cfg.head_type!r}: use 'linear' or 'mlp'")
    if cfg.transfer not in ("contrastive", "l2"):
        raise ValueError(f"three_towers.transfer={cfg.transfer!r}: use 'contrastive' or 'l2'")
    n_terms = 1 + 2 * len(names)
    if not cfg.loss_weights:
        return dataclasses.replace(cfg, loss_weights=(1.0,) * n_terms)
    if len(cfg.loss_weights) != n_terms:
        raise ValueError(f"three_towers.loss_weights has {len(cfg.loss_weights)} values: give {n_terms}, one "
                         f"per term: {', '.join(term.name for term in loss_terms(names))}")
    return dataclasses.replace(cfg, loss_weights=tuple(float(w) for w in cfg.loss_weights))


def parse_named(words, names, flag):
    """{tower name: value} from command-line words NAME=VALUE (a single bare VALUE names the only tower); a dict
    passes through. Raises ValueError (one line) on a name that is not a tower or a tower named twice."""
    if isinstance(words, dict):
        return {name: value for name, value in by_tower(words, names, flag).items() if value is not None}
    words = [words] if isinstance(words, str) else list(words)
    found = {}
    for word in words:
        name, sep, value = word.partition("=")
        if not (sep and TOWER_NAME.fullmatch(name)):
            if len(words) > 1 or len(names) > 1:
                raise ValueError(f"{flag} {word}: this model has the third towers {names}: write NAME=VALUE for each")
            name, value = names[0], word
        if name not in names:
            raise ValueError(f"{flag} {word}: {name!r} is not a third tower of this model, which has {names}")
        if name in found:
            raise ValueError(f"{flag}: tower {name} is given twice; give each tower once")
        found[name] = value
    return found


def by_tower(value, names, what):
    """`value` for each tower: a {name: value} dict (towers it leaves out get None), or one value that applies to
    the only tower (or, for True/False/"random", to every tower)."""
    if isinstance(value, dict):
        unknown = sorted(set(value) - set(names))
        if unknown:
            raise ValueError(f"{what}: {unknown} are not third towers of this model, which has {names}")
        return {n: value.get(n) for n in names}
    if value is None or isinstance(value, bool) or value == "random" or len(names) == 1:
        return {n: value for n in names}
    raise ValueError(f"{what}={value!r}: this model has the third towers {names}: give {{name: value}} for them")
