#!/usr/bin/env bash
# First thing to run on a new GPU machine: install the `gpu` extra (veRL's tested GPU stack: torch 2.11,
# vLLM 0.24), check the stack, and train 2 steps of the `exopd` recipe on one GPU with vLLM rollout and teacher.
# Prints PASS/FAIL per stage and stops at the first failure.
#
# STATUS: not yet run on a GPU. It was written and checked (shellcheck) on CPU-only machines; expect to adjust
# overrides on its first real run and report what changed.
#
# Usage (from the repository root):
#   OPD_SMOKE_STUDENT=/models/Qwen3-0.6B OPD_SMOKE_TEACHER=/models/Qwen3-1.7B scripts/gpu_smoke.sh [hydra overrides]
#
# Environment variables (defaults in brackets):
#   OPD_SMOKE_STUDENT       local path of a small student model (required)
#   OPD_SMOKE_TEACHER       local path of a teacher with the student's tokenizer [the student]
#   OPD_SMOKE_TEACHER_KIND  opd.teachers.kind: server (veRL's vLLM teacher) | local [server]
#   OPD_SMOKE_INSTALL       1: pip install -e ".[gpu]" first; 0: use the current environment [1]
#   OPD_SMOKE_DIR           scratch dir for data, logs and checkpoints [/tmp/opd_smoke_$USER]
#   OPD_PYTHON              python [python]

set -uo pipefail

STUDENT=${OPD_SMOKE_STUDENT:?set OPD_SMOKE_STUDENT to a local model directory}
TEACHER=${OPD_SMOKE_TEACHER:-$STUDENT}
KIND=${OPD_SMOKE_TEACHER_KIND:-server}
DIR=${OPD_SMOKE_DIR:-/tmp/opd_smoke_${USER:-user}}
PY=${OPD_PYTHON:-python}
mkdir -p "$DIR"

stage() {
  local name=$1
  shift
  echo "=== $name: $*"
  if "$@" >"$DIR/$name.log" 2>&1; then
    echo "PASS $name"
  else
    echo "FAIL $name (log: $DIR/$name.log)"
    tail -n 30 "$DIR/$name.log"
    exit 1
  fi
}

write_data() {
  local i
  for i in 1 2 3 4 5 6 7 8; do
    printf '{"question": "What is %d + %d?", "final_answer": "%d", "difficulty": 1.0, "topic": "Arithmetic"}\n' \
      "$i" "$((i * 3))" "$((i * 4))"
  done >"$DIR/toy.jsonl"
  "$PY" scripts/data/prepare_deepmath.py --input "$DIR/toy.jsonl" --output "$DIR/train.parquet" &&
    "$PY" scripts/data/prepare_deepmath.py --input "$DIR/toy.jsonl" --output "$DIR/val.parquet" --split test --limit 4
}

train() {
  "$PY" -m opd_verl.main +recipe=exopd opd.cpu_demo=false \
    "actor_rollout_ref.model.path=$STUDENT" "opd.teachers.models.default.path=$TEACHER" "opd.teachers.kind=$KIND" \
    "data.train_files=$DIR/train.parquet" "data.val_files=$DIR/val.parquet" \
    data.train_batch_size=4 data.max_prompt_length=256 data.max_response_length=256 \
    actor_rollout_ref.actor.ppo_mini_batch_size=4 actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.rollout.name=vllm actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=1 \
    trainer.nnodes=1 trainer.n_gpus_per_node=1 trainer.total_training_steps=2 \
    trainer.val_before_train=false trainer.test_freq=-1 trainer.save_freq=-1 "trainer.logger=[console]" \
    "trainer.default_local_dir=$DIR/ckpt" "$@" &&
    grep -q "step:2" "$DIR/train.log"
}

stage gpu nvidia-smi -L
if [[ ${OPD_SMOKE_INSTALL:-1} == 1 ]]; then
  stage install "$PY" -m pip install -e ".[gpu]"
fi
stage imports "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA'; import flash_attn, vllm, verl, opd_verl
print('torch', torch.__version__, 'vllm', vllm.__version__, 'verl', verl.__version__, 'flash_attn', flash_attn.__version__)"
stage data write_data
stage train train "$@"
echo "gpu_smoke: all stages passed (logs in $DIR)"
