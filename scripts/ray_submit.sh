#!/usr/bin/env bash
# Submit a recipe to an existing Ray cluster with `ray job submit`.
#
# Usage:
#   RAY_ADDRESS=http://HEAD:8265 scripts/ray_submit.sh RECIPE [hydra overrides...]
#   e.g.  RAY_ADDRESS=http://10.0.0.1:8265 scripts/ray_submit.sh exopd trainer.nnodes=2 trainer.n_gpus_per_node=8 \
#           data.train_files=/shared/data/deepmath/train.parquet actor_rollout_ref.model.path=/shared/models/student
#
# The job's runtime_env brings this package to every node of the cluster; the cluster's Python must already have
# veRL's GPU stack (e.g. the image of docker/Dockerfile), or list it in OPD_SUBMIT_PIP.
#
# Environment variables (defaults in brackets):
#   RAY_ADDRESS          the cluster's dashboard/job address (required)
#   OPD_SUBMIT_INSTALL   how the package reaches the nodes [source]:
#                          source: upload this checkout's opd_verl/ (runtime_env py_modules) and load the plugin
#                                  in every worker with VERL_USE_EXTERNAL_MODULES;
#                          pip:    pip-install OPD_PACKAGE_SPEC in the job's runtime_env
#   OPD_PACKAGE_SPEC     pip requirement for OPD_SUBMIT_INSTALL=pip, e.g. a wheel on a shared filesystem or
#                        "opd-verl[gpu] @ git+https://HOST/ORG/opd_verl@COMMIT" []
#   OPD_SUBMIT_PIP       extra pip requirements for the runtime_env, space-separated []
#   OPD_SUBMIT_ID        submission id (default: Ray picks one) []
#   OPD_SUBMIT_NO_WAIT   1: return after submitting instead of following the logs [0]
#   OPD_REMOTE_PYTHON    python executable on the cluster [python]
#   OPD_PYTHON           local python used to write the runtime_env JSON [python3]
#   OPD_RAY              local ray executable [ray]

set -euo pipefail

die() {
  echo "ray_submit.sh: error: $*" >&2
  exit 2
}

[[ $# -ge 1 ]] || die "usage: RAY_ADDRESS=http://HEAD:8265 scripts/ray_submit.sh RECIPE [hydra overrides...]"
RECIPE=$1
shift
[[ -n ${RAY_ADDRESS:-} ]] || die "RAY_ADDRESS is not set (the cluster's job address, e.g. http://HEAD:8265)"

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OPD_SUBMIT_INSTALL=${OPD_SUBMIT_INSTALL:-source}
OPD_REMOTE_PYTHON=${OPD_REMOTE_PYTHON:-python}
OPD_PYTHON=${OPD_PYTHON:-python3}
OPD_RAY=${OPD_RAY:-ray}

case $OPD_SUBMIT_INSTALL in
  source) [[ -f $REPO/opd_verl/__init__.py ]] || die "no opd_verl package under $REPO" ;;
  pip) [[ -n ${OPD_PACKAGE_SPEC:-} ]] || die "OPD_SUBMIT_INSTALL=pip needs OPD_PACKAGE_SPEC (a pip requirement)" ;;
  *) die "OPD_SUBMIT_INSTALL must be 'source' or 'pip' (got '$OPD_SUBMIT_INSTALL')" ;;
esac

RUNTIME_ENV=$(
  OPD_REPO=$REPO "$OPD_PYTHON" - <<'PY'
import json, os

install = os.environ.get("OPD_SUBMIT_INSTALL", "source")
pip = []
env = {}
runtime_env = {}
if install == "source":
    runtime_env["py_modules"] = [os.path.join(os.environ["OPD_REPO"], "opd_verl")]
    env["VERL_USE_EXTERNAL_MODULES"] = "opd_verl.integration.plugin"
else:
    pip.append(os.environ["OPD_PACKAGE_SPEC"])
pip += os.environ.get("OPD_SUBMIT_PIP", "").split()
if pip:
    runtime_env["pip"] = {"packages": pip, "pip_check": False}
runtime_env["env_vars"] = env
print(json.dumps(runtime_env))
PY
)

SUBMIT=("$OPD_RAY" job submit "--address=$RAY_ADDRESS" "--runtime-env-json=$RUNTIME_ENV")
[[ -z ${OPD_SUBMIT_ID:-} ]] || SUBMIT+=("--submission-id=$OPD_SUBMIT_ID")
[[ ${OPD_SUBMIT_NO_WAIT:-0} != 1 ]] || SUBMIT+=(--no-wait)

echo "ray_submit.sh: runtime_env $RUNTIME_ENV"
# opd.cpu_demo=false: the job's driver may run on a CPU-only head node; the CPU demo must never replace the run.
exec "${SUBMIT[@]}" -- "$OPD_REMOTE_PYTHON" -m opd_verl.main "+recipe=$RECIPE" opd.cpu_demo=false "$@"
