"""Shared fixtures: a tiny 3T model and a locally saved "pretrained" third tower (no downloads)."""
import os
import subprocess
import sys

import pytest
import timm
import torch

import open_clip_3t  # noqa: F401  (registers the 3T configs)

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def h_weights(tmp_path_factory):
    """A test_vit classifier saved to a file, loaded as h through timm's local-file door."""
    torch.manual_seed(123)
    h = timm.create_model("test_vit", num_classes=7, img_size=32)
    path = tmp_path_factory.mktemp("third_tower") / "test_vit_32.pth"
    torch.save(h.state_dict(), path)
    return str(path)


def run_python(code, env=None, timeout=300):
    """Run `code` in a fresh interpreter (one that never imported open_clip_3t); returns stdout."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# Session-wide local SLURM cluster (scripts/slurm/local_cluster.sh); see tests/slurm_cluster.py.
from tests.slurm_cluster import slurm_cluster  # noqa: E402,F401
