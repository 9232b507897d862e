"""`opd.teachers.kind=server` through veRL 0.9.1's real trainer on CPU: veRL's own teacher loop (its HF teacher
replica here, vLLM/SGLang on GPU) scores the sampled tokens, and the plugin's `opd_pipeline` distillation loss
optimises ExOPD with IW weights, with the recipe's token-level rollout importance sampling on. 2 steps.

Slow (Ray start-up ~1.5 min); holds /tmp/opd_heavy.lock with a hard timeout like the other end-to-end runs.
"""

import math

import pytest

RUN_TIMEOUT_S = 900
LOCK_WAIT_S = 1500

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + RUN_TIMEOUT_S + 120)]


def test_exopd_with_iw_on_veRL_teacher_servers(demo_run):
    demo_run.run(
        "exopd",
        "server",
        "opd.teachers.kind=server",
        "opd.weighting.name=iw",
        "trainer.total_training_steps=2",
        run_timeout_s=RUN_TIMEOUT_S,
        lock_wait_s=LOCK_WAIT_S,
    )
    metrics = demo_run.metrics()
    assert sorted(metrics) == [1, 2]
    for step, data in metrics.items():
        for key in (
            "actor/distillation/loss",  # veRL's distillation loss ran with the plugin's opd_pipeline
            "actor/opd/discrepancy",
            "actor/opd/signal",
            "actor/opd/weight_max",
            "actor/opd/rollout_is_weight_mean",  # the recipe's rollout IS weights reached the advantages
            "rollout_corr/rollout_is_mean",
            "actor/grad_norm",
        ):
            assert key in data, f"step {step}: metric {key} missing"
            assert math.isfinite(float(data[key])), f"step {step}: {key}={data[key]} is not finite"
        assert "opd/teacher_time_s" not in data  # no plugin teacher worker: veRL's servers scored the tokens
        assert 1.0 <= data["actor/opd/weight_min"] <= data["actor/opd/weight_max"] <= 1.5  # IW weights, w_max 1.5
        assert data["actor/opd/rollout_is_weight_mean"] > 0.0
    # Step 1: the reference is the student's initial checkpoint, so ExOPD's signal lam*(t - r) - (s - r) equals
    # 1.25 * (t - s) = 1.25 * discrepancy: teacher log-probs from the servers and veRL's ref log-probs both arrived.
    first = metrics[1]
    assert math.isclose(first["actor/opd/signal"], 1.25 * first["actor/opd/discrepancy"], rel_tol=1e-3, abs_tol=1e-3)
