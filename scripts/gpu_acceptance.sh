#!/usr/bin/env bash
# GPU acceptance run of opd_verl: one offline command on a GPU machine with the `gpu` extra already installed
# (nothing is installed or downloaded). It builds tiny Qwen3 models locally, checks the teacher log-probs, their
# memory, the student top-K hook and an OPSD LoRA step against independent computations, trains exopd_iw_release
# and opsd for 2 steps each through veRL's loop (vLLM, FSDP2, bf16, flash-attention, remove-padding, dynamic batch
# sizes) and resumes opsd for a third step; with 2+ GPUs also sequence parallelism, sharding and teacher servers.
# Ends with a table (check, result, figure, time); exits non-zero naming the failed checks. See docs/cluster.md.
#
# Usage (from anywhere; arguments go to `python -m opd_verl.acceptance`):
#   scripts/gpu_acceptance.sh                     # the GPU run (~10 min on one H100/H200)
#   scripts/gpu_acceptance.sh --dry-run           # on CPU: models, every run's config validated, the table
#   scripts/gpu_acceptance.sh --dry-run --cpu-components   # plus the component checks on CPU
#   scripts/gpu_acceptance.sh --help
#
# Environment: OPD_PYTHON  the python whose environment has opd_verl and the gpu extra [python]
set -euo pipefail

PY=${OPD_PYTHON:-python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" -m opd_verl.acceptance "$@"
