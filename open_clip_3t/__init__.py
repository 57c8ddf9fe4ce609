"""open_clip_3t: Three Towers (3T, arXiv 2305.16999) for OpenCLIP.

Importing this package registers the 3T model family in OpenCLIP's factory (once, idempotently):
`open_clip.create_model('3T-ViT-B-16')` then returns a `ThreeTowersCLIP`, and a 3T config of OpenCLIP's
`CustomTextCLIP` class (custom or Hugging Face text tower, e.g. `3T-ViT-B-16-SigLIP`) a `ThreeTowersCustomTextCLIP`.
"""
import warnings

from . import factory as _factory
from ._openclip import RemoteCodeError
from ._openclip import register as _register
from .config import ThirdTowerCfg, ThreeTowersSection
from .loss import ThreeTowersLoss, ThreeTowersSigLipLoss
from .model import ThreeTowers, ThreeTowersCLIP, ThreeTowersCustomTextCLIP, clip_state_dict
from .plan import RunPlan, TowerPlan, resolve_plan
from .third_tower import ThirdTower

_register(_factory.create_model, _factory.create_loss)

__all__ = ["ThreeTowers", "ThreeTowersCLIP", "ThreeTowersCustomTextCLIP", "ThreeTowersLoss", "ThreeTowersSigLipLoss",
           "ThirdTower", "ThirdTowerCfg", "ThreeTowersSection", "RunPlan", "TowerPlan", "resolve_plan",
           "export_clip", "clip_state_dict", "RemoteCodeError"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that `python -m open_clip_3t.export` runs without runpy's double-import warning.
    if name == "export_clip":
        from .export import export_clip
        return export_clip
    if name == "ThreeTowersCfg":  # the name of ThreeTowersSection in 0.1.0
        warnings.warn("open_clip_3t.ThreeTowersCfg is now open_clip_3t.ThreeTowersSection", DeprecationWarning,
                      stacklevel=2)
        return ThreeTowersSection
    raise AttributeError(f"module 'open_clip_3t' has no attribute {name!r}")
