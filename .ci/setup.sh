#!/usr/bin/env bash
# Set up palflow: a virtual environment in .venv with the package, its test tools,
# and the CPU build of torch pinned in constraints.txt. Safe to run again.
#
#   bash .ci/setup.sh            Python packages only
#   bash .ci/setup.sh --system   also Debian's Open MPI, NWChem, Slurm and munge (root or
#                                sudo), mpi4py, and a running single-node Slurm cluster,
#                                so that the MPI, DFT and Slurm tests run too; Chromium
#                                (the report in a browser) and tmux (the live view)
set -euo pipefail
cd "$(dirname "$0")/.."

system=0
[ "${1:-}" = "--system" ] && system=1

if [ "$system" = 1 ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq openmpi-bin libopenmpi-dev nwchem cp2k slurm-wlm munge \
        chromium tmux >/dev/null
fi

PYTHON=${PYTHON:-python3}
# xtb-python ships wheels for CPython 3.11 only.
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    echo "palflow needs Python 3.11 (xtb-python's wheels); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
# The constraints file pins torch to its CPU build; the package itself asks for a range.
extras="test"
command -v mpicc >/dev/null && extras="test,mpi"   # mpi4py compiles against the MPI found
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[$extras]"
.venv/bin/python -W ignore -c "import mace, torch, parsl, xtb, tblite, ase, vesin; print('palflow set up: torch', torch.__version__, '| parsl', parsl.__version__, '| mace-torch', mace.__version__)"

if [ "$system" = 1 ]; then
    $sudo bash .ci/slurm/start.sh
fi
