#!/usr/bin/env bash
# The GPU check of issue 13, one command: scripts/gpu_check.sh OUT_DIR [--workdir DIR]
# Writes OUT_DIR/report.md + report.json (or FAILED.md + FAILED.json and exit 1); see scripts/gpu_check.py.
# Runs this checkout (PYTHONPATH) with the repository's .venv when there is one (else $PYTHON, else python3), and
# offline: nothing may be downloaded, so any attempt fails at once instead of waiting on a network.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [[ -z "$python" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then python="$repo/.venv/bin/python"; else python="$(command -v python3)"; fi
fi
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
exec "$python" "$repo/scripts/gpu_check.py" "$@"
