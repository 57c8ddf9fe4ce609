"""open_clip_3t: Three Towers (3T, arXiv 2305.16999) for OpenCLIP.

Importing this package registers the 3T model family in OpenCLIP's factory (once, idempotently):
`open_clip.create_model('3T-ViT-B-16')` then returns a `ThreeTowersCLIP`, and a 3T config of OpenCLIP's
`CustomTextCLIP` class (custom or Hugging Face text tower, e.g. `3T-ViT-B-16-SigLIP`) a `ThreeTowersCustomTextCLIP`.
"""
from ._openclip import register as _register
from .loss import ThreeTowersLoss, ThreeTowersSigLipLoss
from .model import ThreeTowers, ThreeTowersCLIP, ThreeTowersCustomTextCLIP, clip_state_dict
from .third_tower import ThirdTower, ThreeTowersCfg

_register()

__all__ = ["ThreeTowers", "ThreeTowersCLIP", "ThreeTowersCustomTextCLIP", "ThreeTowersLoss", "ThreeTowersSigLipLoss",
           "ThirdTower", "ThreeTowersCfg", "export_clip", "clip_state_dict"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported lazily so that `python -m open_clip_3t.export` runs without runpy's double-import warning.
    if name == "export_clip":
        from .export import export_clip
        return export_clip
    raise AttributeError(f"module 'open_clip_3t' has no attribute {name!r}")
