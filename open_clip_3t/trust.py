"""The rule of docs/untrusted_models.md: code that comes with a model never runs unless the caller trusts it.

This module holds the rule (the run's trust, the one-line refusal); open_clip_3t/_openclip.py applies it at
OpenCLIP's doors (its tokenizer and Hugging Face text tower loads).
"""
import contextlib
import contextvars
import os


class RemoteCodeError(ValueError):
    """Code that comes with a model, refused: one line naming the file, the key and the fix."""


TRUST_FIX = "pass --trust-remote-code (in Python: trust_remote_code=True) only if you trust its authors"
_TRUSTED = contextvars.ContextVar("open_clip_3t_trust_remote_code", default=False)


@contextlib.contextmanager
def trusting_remote_code(trusted=True):
    """Within the block, OpenCLIP's doors trust code that comes with a model as if each call passed
    trust_remote_code=`trusted` (what our commands' --trust-remote-code means for the run)."""
    token = _TRUSTED.set(bool(trusted))
    try:
        yield
    finally:
        _TRUSTED.reset(token)


def remote_code_trusted(explicit=None):
    """A caller's trust_remote_code=..., else the run's (`trusting_remote_code`; default False)."""
    return bool(explicit) if explicit is not None else _TRUSTED.get()


def refused(error, what, name, filename):
    """transformers' refusal of remote code (asked with trust_remote_code=False) as our one line; None for others."""
    if "trust_remote_code" not in str(error):
        return None
    name = str(name)
    where = os.path.join(name, filename) if os.path.isdir(name) else f"{filename} of the Hugging Face repo {name}"
    return RemoteCodeError(f"{where}: its auto_map names code that comes with {what} {name}: refused; {TRUST_FIX}")
