"""Fake Slurm for the launch-script tests: stub executables that record their arguments.

Stubs: `srun`, `scontrol`, `ray`, `python`, `hostname` and `apptainer`.

`srun` runs its command locally (so every "node" is this machine) with SLURMD_NODENAME set to the --nodelist
node and its output sent to --output; `ray start` marks the node as joined (unless listed in FAKE_NEVER_JOIN) and
blocks until TERM; `python -c` answers the cluster-size probe from the joined marks; `python -m opd_verl.main`
is a training driver that runs FAKE_TRAIN_SECONDS and logs the signals it gets. Every call appends one line to
$FAKE_DIR/calls.log.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from types import SimpleNamespace

import pytest

STUBS = {
    "srun": r"""#!/usr/bin/env bash
node="" out=""
all=("$@")
while [[ $# -gt 0 && $1 == --* ]]; do
  case $1 in
    --nodelist=*) node=${1#--nodelist=} ;;
    --output=*) out=${1#--output=} ;;
  esac
  shift
done
printf 'srun node=%s ARGS %s\n' "$node" "$(printf '%q ' "${all[@]}")" >>"$FAKE_DIR/calls.log"
export SLURMD_NODENAME=$node
if [[ -n $out ]]; then exec "$@" >>"$out" 2>&1; else exec "$@"; fi
""",
    "scontrol": r"""#!/usr/bin/env bash
if [[ $1 == show && $2 == hostnames ]]; then
  for n in $FAKE_NODES; do echo "$n"; done
  exit 0
fi
printf 'scontrol ARGS %s\n' "$(printf '%q ' "$@")" >>"$FAKE_DIR/calls.log"
""",
    "hostname": r"""#!/usr/bin/env bash
if [[ ${1:-} == --ip-address ]]; then echo "fe80::1 10.1.2.3 10.9.9.9"; else echo fakehost; fi
""",
    "apptainer": r"""#!/usr/bin/env bash
printf 'apptainer ARGS %s\n' "$(printf '%q ' "$@")" >>"$FAKE_DIR/calls.log"
[[ $1 == exec ]] || exit 64
shift
while [[ $1 == -* ]]; do shift; done
shift  # the image
exec "$@"
""",
    "ray": r"""#!/usr/bin/env bash
node=${SLURMD_NODENAME:-none}
printf 'ray node=%s FLAG=%s ARGS %s\n' "$node" "${OPD_PREEMPT_FLAG_FILE:-}" "$(printf '%q ' "$@")" \
  >>"$FAKE_DIR/calls.log"
if [[ $1 == start ]]; then
  echo "ray started on $node"
  case " ${FAKE_NEVER_JOIN:-} " in *" $node "*) ;; *) touch "$FAKE_DIR/joined/$node" ;; esac
  trap 'echo "ray-stopped node=$node" >>"$FAKE_DIR/calls.log"; rm -f "$FAKE_DIR/joined/$node"; exit 0' TERM
  end=$((SECONDS + ${FAKE_RAY_MAX_SECONDS:-120}))  # never outlive a broken test
  while [[ $SECONDS -lt $end ]]; do sleep 0.1; done
fi
""",
    "python": r"""#!/usr/bin/env bash
if [[ $1 == -c ]]; then
  n=$(find "$FAKE_DIR/joined" -type f | wc -l)
  echo "probe addr=$3" >>"$FAKE_DIR/calls.log"
  echo "$n $((n * FAKE_GPUS))"
  exit 0
fi
printf 'python RAY_ADDRESS=%s FLAG=%s PWD=%s ARGS %s\n' "${RAY_ADDRESS:-}" "${OPD_PREEMPT_FLAG_FILE:-}" "$PWD" \
  "$(printf '%q ' "$@")" >>"$FAKE_DIR/calls.log"
echo "training driver output"
stop=0
on_sig() {
  local flag=no
  [[ -e ${OPD_PREEMPT_FLAG_FILE:-/nonexistent} ]] && flag=yes
  echo "train-signal $1 flagfile=$flag" >>"$FAKE_DIR/calls.log"
  stop=1
}
trap 'on_sig USR1' USR1
trap 'on_sig TERM' TERM
end=$((SECONDS + ${FAKE_TRAIN_SECONDS:-1}))
while [[ $stop == 0 && $SECONDS -lt $end ]]; do sleep 0.1; done
[[ $stop == 1 ]] && echo "train-saved-checkpoint" >>"$FAKE_DIR/calls.log"
echo "train-exit" >>"$FAKE_DIR/calls.log"
exit "${FAKE_TRAIN_RC:-0}"
""",
}


def install_stubs(root: Path) -> Path:
    """Write the stubs to root/bin and return that directory."""
    bindir = root / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    (root / "joined").mkdir(exist_ok=True)
    for name, text in STUBS.items():
        path = bindir / name
        path.write_text(text)
        path.chmod(0o755)
    return bindir


def slurm_env(root: Path, nodes: list[str], gpus: int = 4, **extra: str) -> dict[str, str]:
    """Environment of a batch job on `nodes` with the stubs first on PATH."""
    bindir = install_stubs(root)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OPD_", "RAY_"))}
    env.update(
        PATH=f"{bindir}:/usr/local/bin:/usr/bin:/bin",
        FAKE_DIR=str(root),
        FAKE_NODES=" ".join(nodes),
        FAKE_GPUS=str(gpus),
        SLURM_JOB_ID="42",
        SLURM_JOB_NODELIST=f"n[1-{len(nodes)}]",
        SLURM_NNODES=str(len(nodes)),
        SLURM_GPUS_ON_NODE=str(gpus),
        SLURM_CPUS_ON_NODE="16",
        SLURM_SUBMIT_DIR=str(root / "submit"),
        OPD_JOIN_POLL="0",
        OPD_STOP_TIMEOUT="10",
    )
    (root / "submit").mkdir(exist_ok=True)
    env.update(extra)
    return env


def calls(root: Path, tool: str | None = None) -> list[str]:
    """Recorded lines (optionally only those of one tool)."""
    path = root / "calls.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if tool is None or line.startswith(tool + " ")]


def argv_of(line: str) -> list[str]:
    """The recorded argument vector of one call line."""
    return shlex.split(line.split(" ARGS ", 1)[1])


@pytest.fixture
def fake_slurm(tmp_path):
    """Namespace(root, env(nodes, gpus=4, **extra), calls(tool=None), argv_of(line)) for one fake job in tmp_path."""
    root = tmp_path / "fake"
    root.mkdir()
    return SimpleNamespace(
        root=root,
        env=lambda nodes, gpus=4, **extra: slurm_env(root, nodes, gpus, **extra),
        calls=lambda tool=None: calls(root, tool),
        argv_of=argv_of,
    )
