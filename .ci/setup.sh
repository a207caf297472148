#!/usr/bin/env bash
# Set up palflow on a fresh machine: a virtual environment in .venv with the
# package, its test tools, and the CPU build of torch pinned in constraints.txt.
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
# xtb-python ships wheels for CPython 3.11 only.
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "palflow needs Python 3.11 (xtb-python's wheels); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The constraints file pins torch to its CPU build; the package itself asks for a range.
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[test]"
.venv/bin/python -c "import torch, parsl, xtb, ase, vesin; print('palflow set up: torch', torch.__version__, '| parsl', parsl.__version__)"
