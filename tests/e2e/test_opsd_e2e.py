"""The ``opsd`` recipe trains 2 steps through veRL 0.9.1's real v1 loop on CPU, with LoRA and the frozen teacher.

`python -m opd_verl.main +recipe=opsd opd.cpu_demo=true`: the demo's addition rows carry ``extra_info.problem`` and
``extra_info.solution``; the recipe's LoRA runs on CPU with a demo-sized rank (8, adapters merged for the HF
rollout replica), so the teacher is the recipe's own ``frozen`` one: the base model with the adapter disabled,
inside the actor. The assertions are on metrics only the OPSD actor loss logs (veRL prefixes them ``actor/``), so
they fail unless the OPSD worker ran its privileged teacher forward between the student's forward and backward
under veRL's FSDP2 engine, with the dataset fields reaching the actor's micro-batches. Slow (Ray start-up); the run
holds /tmp/opd_heavy.lock and has a hard timeout.
"""

import math

import pytest

RUN_TIMEOUT_S = 600
LOCK_WAIT_S = 2400

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + RUN_TIMEOUT_S + 120)]

OPSD_METRICS = (
    "actor/opsd/loss",
    "actor/opsd/divergence_mean",
    "actor/opsd/sampled_gap_mean",
    "actor/opsd/clip_rate",
    "actor/opsd/context_fraction",
    "actor/opsd/teacher_adapter_off",
)


def _run(demo_run, *overrides):
    steps = ("trainer.total_training_steps=2", "trainer.save_freq=2")
    demo_run.run("opsd", "run", *steps, *overrides, run_timeout_s=RUN_TIMEOUT_S, lock_wait_s=LOCK_WAIT_S)
    return demo_run.metrics()


def test_opsd_recipe_trains_two_steps_with_lora_frozen_teacher(demo_run, tmp_path):
    metrics = _run(demo_run)
    assert sorted(metrics) == [1, 2]
    for step, data in metrics.items():
        for key in (*OPSD_METRICS, "actor/grad_norm", "actor/loss"):
            assert key in data, f"step {step}: metric {key} missing"
            assert math.isfinite(float(data[key])), f"step {step}: {key}={data[key]} is not finite"
        assert data["actor/opsd/context_fraction"] == 1.0  # every demo row has a reference solution
        assert data["actor/opsd/teacher_adapter_off"] == 1.0  # frozen teacher = LoRA adapter disabled
        assert 0.0 <= data["actor/opsd/clip_rate"] <= 1.0
        assert data["actor/grad_norm"] > 0.0
        # the trainer's advantages are zero: the full-vocabulary loss is computed inside the actor
        assert data["critic/advantages/mean"] == 0.0
    actor_ckpt = tmp_path / "run" / "global_step_2" / "actor"
    assert (actor_ckpt / "lora_train_meta.json").exists(), "LoRA was not active in the actor"
    assert not list(actor_ckpt.glob("opsd_teacher_rank*.pt")), "a frozen LoRA teacher keeps no weight copy"


def test_opsd_sampled_variant_with_ema_teacher(demo_run, tmp_path):
    """``opd.opsd.loss=sampled`` through the same actor path, EMA teacher (adapter EMA) saved with the checkpoint."""
    import torch

    metrics = _run(demo_run, "opd.opsd.loss=sampled", "opd.opsd.teacher=ema", "opd.opsd.ema_decay=0.9")
    assert sorted(metrics) == [1, 2]
    for step, data in metrics.items():
        for key in ("actor/opsd/loss", "actor/opsd/sampled_gap_mean", "actor/opsd/context_fraction", "actor/pg_loss"):
            assert key in data and math.isfinite(float(data[key])), f"step {step}: {key} missing or not finite"
        assert "actor/opsd/divergence_mean" not in data  # no full-vocabulary divergence in the sampled variant
        assert data["actor/opsd/teacher_adapter_off"] == 0.0
    # Step 1 is on-policy (ratio 1, no clipping), so the PG loss is minus the token-mean advantage teacher - student.
    gap, pg = metrics[1]["actor/opsd/sampled_gap_mean"], metrics[1]["actor/pg_loss"]
    assert abs(pg + gap) <= 0.15 * abs(gap) + 1e-3, f"pg_loss {pg} vs sampled gap {gap}"
    state = torch.load(tmp_path / "run" / "global_step_2" / "actor" / "opsd_teacher_rank0.pt", weights_only=True)
    assert state["mode"] == "ema" and state["decay"] == 0.9
    assert state["num_updates"] == 2  # one optimizer step per training step (one mini-batch per step in the demo)
    assert state["shadow"] and all("lora_" in name for name in state["shadow"])  # the adapter only
