"""veRL 0.9.1's real trainer on CPU through `python -m opd_verl.main`: 2 steps, then a resume from the checkpoint.

Slow (Ray start-up ~1.5 min per run; the first run on a fresh machine also trains the demo teacher, ~2 min). Runs
hold /tmp/opd_heavy.lock so only one Ray job runs on the machine at a time, and every run has a hard timeout: a
run that would wait for Ray resources fails instead of hanging.
"""

import math

import pytest

RUN_TIMEOUT_S = 900
LOCK_WAIT_S = 1500

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + 2 * RUN_TIMEOUT_S + 300)]


REQUIRED = (
    "opd/discrepancy",  # only the plugin's estimator logs it: teacher log-probs reached the advantage
    "opd/signal",
    "opd/teacher_time_s",
    "actor/kl_loss",  # reference log-probs computed (exopd turns on the ref policy)
    "actor/grad_norm",
    "actor/loss",
    "critic/score/mean",  # task reward of the rollouts
    "response_length/mean",
)


def _run(demo_run, name, *overrides):
    return demo_run.run("exopd", name, *overrides, run_timeout_s=RUN_TIMEOUT_S, lock_wait_s=LOCK_WAIT_S)


def test_two_steps_then_resume(demo_run, tmp_path):
    first = _run(demo_run, "first", "trainer.total_training_steps=2", "trainer.save_freq=2")
    metrics = demo_run.metrics()
    assert sorted(metrics) == [1, 2]
    for step, data in metrics.items():
        for key in REQUIRED:
            assert key in data, f"step {step}: metric {key} missing"
            assert math.isfinite(float(data[key])), f"step {step}: {key}={data[key]} is not finite"
    # Step 1: the reference is the student's initial checkpoint, so ExOPD's signal lam*(t - r) - (s - r) equals
    # lam * (t - s) = 1.25 * discrepancy; this holds only if teacher and reference log-probs both reached it.
    assert math.isclose(metrics[1]["opd/signal"], 1.25 * metrics[1]["opd/discrepancy"], rel_tol=1e-3, abs_tol=1e-3)
    assert (tmp_path / "run" / "global_step_2").is_dir()
    assert "teacher-student reverse KL" in first.stdout
    assert (tmp_path / "run" / "curves.png").exists() and (tmp_path / "run" / "summary.json").exists()

    _run(demo_run, "resume", "trainer.total_training_steps=3", "trainer.save_freq=-1", "trainer.resume_mode=auto")
    resumed = demo_run.metrics()  # the resumed run appends to the history of the first
    assert sorted(resumed) == [1, 2, 3], f"resume did not continue after the step-2 checkpoint: {sorted(resumed)}"
    assert resumed[1] == metrics[1] and resumed[2] == metrics[2], "the resume rewrote the history of steps 1-2"
    for key in REQUIRED:
        assert math.isfinite(float(resumed[3][key]))
    # A fresh start has actor == reference at its first update (kl_loss 0, as at step 1 above); after loading the
    # step-2 checkpoint the actor has moved away from the reference.
    assert metrics[1]["actor/kl_loss"] == 0.0 and resumed[3]["actor/kl_loss"] > 0.0
