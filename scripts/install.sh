#!/usr/bin/env bash
# Create a virtual environment (default ./.venv) and install opd_verl into it.
#   bash scripts/install.sh          runtime only
#   bash scripts/install.sh --test   plus the test tools (pytest, hypothesis, TRL as a test oracle, ruff)
# torch is installed first with an exact pin: a looser spec resolves to a multi-GB CUDA build on CPU machines.
# Environment: VENV (venv directory, default .venv), PYTHON (interpreter for the venv, default python3),
# TORCH_SPEC (default torch==2.13.0; GPU machines use the `gpu` extra instead: pip install '.[gpu]').
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${VENV:-.venv}"
extra=""
if [[ "${1:-}" == "--test" ]]; then
  extra="[test]"
elif [[ -n "${1:-}" ]]; then
  echo "usage: bash scripts/install.sh [--test]" >&2
  exit 2
fi
if [[ ! -x "$venv/bin/python" ]]; then
  "${PYTHON:-python3}" -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --upgrade pip
"$venv/bin/python" -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
"$venv/bin/python" -m pip install --quiet -e ".${extra}"
"$venv/bin/python" -c "import opd_verl, verl, torch; print('opd_verl', opd_verl.__version__, '| verl', verl.__version__, '| torch', torch.__version__)"
