"""veRL 0.9.1's real trainer on CPU through `python -m opd_verl.main`: 2 steps with the teacher in its own pool,
then a resume from the checkpoint, then one step with the teacher colocated on the trainer's 2 logical GPUs.

Slow (Ray start-up ~1.5 min per run; the first run on a fresh machine also trains the demo teacher, ~2 min). Runs
hold /tmp/opd_heavy.lock so only one Ray job runs on the machine at a time, and every run has a hard timeout: a
run that would wait for Ray resources fails instead of hanging.
"""

import math
import re

import pytest

RUN_TIMEOUT_S = 900
LOCK_WAIT_S = 1500

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + 3 * RUN_TIMEOUT_S + 300)]

# top_k=1 makes the rollout's sampling deterministic (the log-probs stay those of temperature 1), so runs with
# different placements score the same responses at step 1.
SAME_ROLLOUTS = ("actor_rollout_ref.rollout.top_k=1",)


REQUIRED = (
    "opd/discrepancy",  # only the plugin's estimator logs it: teacher log-probs reached the advantage
    "opd/signal",
    "opd/teacher_time_s",
    "opd/teacher_log_prob",  # mean teacher log-prob over response tokens
    "actor/kl_loss",  # reference log-probs computed (exopd turns on the ref policy)
    "actor/grad_norm",
    "actor/loss",
    "critic/score/mean",  # task reward of the rollouts
    "response_length/mean",
)


def _run(demo_run, name, *overrides):
    return demo_run.run("exopd", name, *overrides, run_timeout_s=RUN_TIMEOUT_S, lock_wait_s=LOCK_WAIT_S)


def test_two_steps_then_resume_then_colocated_teachers(demo_run, tmp_path):
    separate = ("opd.teachers.placement=separate", *SAME_ROLLOUTS)  # 1 trainer GPU + the teacher's own 1-GPU pool
    first = _run(demo_run, "first", "trainer.total_training_steps=2", "trainer.save_freq=2", *separate)
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

    _run(
        demo_run,
        "resume",
        "trainer.total_training_steps=3",
        "trainer.save_freq=-1",
        "trainer.resume_mode=auto",
        *separate,
    )
    resumed = demo_run.metrics()  # the resumed run appends to the history of the first
    assert sorted(resumed) == [1, 2, 3], f"resume did not continue after the step-2 checkpoint: {sorted(resumed)}"
    assert resumed[1] == metrics[1] and resumed[2] == metrics[2], "the resume rewrote the history of steps 1-2"
    for key in REQUIRED:
        assert math.isfinite(float(resumed[3][key]))
    # A fresh start has actor == reference at its first update (kl_loss 0, as at step 1 above); after loading the
    # step-2 checkpoint the actor has moved away from the reference.
    assert metrics[1]["actor/kl_loss"] == 0.0 and resumed[3]["actor/kl_loss"] > 0.0

    # The default placement: the teacher in veRL's global pool with actor/rollout/ref, sharded with FSDP2 over the
    # trainer's 2 logical GPUs (2 gloo ranks), parameters offloaded between phases (the recipe's setting). Same
    # student, data order and deterministic sampling: the first step's teacher log-probs equal the separate run's.
    colocated_dir = tmp_path / "colocated"
    out = _run(
        demo_run,
        "colocated",
        "trainer.total_training_steps=1",
        "trainer.save_freq=-1",
        "trainer.n_gpus_per_node=2",
        "opd.teachers.placement=colocated",
        f"trainer.default_local_dir={colocated_dir}",
        "+ray_kwargs.ray_init.log_to_driver=true",  # the trainer's start-up line says where the teacher landed
        *SAME_ROLLOUTS,
    )
    text = out.stdout + out.stderr
    assert "'num_gpus': 2" in text  # Ray was started with the trainer's 2 logical GPUs, none for a teacher pool
    landed = re.search(r"opd_verl: forward workers teacher0: (.*)", text)
    assert landed, "the trainer did not say where the teacher workers landed"
    assert re.fullmatch(
        r"2 rank\(s\) in global_pool \(colocated\), FSDP2-sharded over (cpu:)?gloo, offload on", landed.group(1).strip()
    ), landed.group(1)
    colocated = demo_run.metrics(colocated_dir)
    assert sorted(colocated) == [1]
    for key in REQUIRED:
        assert math.isfinite(float(colocated[1][key])), key
    # same rollouts (deterministic sampling; the 2 ranks each generate half of them) ...
    for key in ("response_length/mean", "critic/score/mean"):
        assert colocated[1][key] == metrics[1][key], key
    # ... scored by the sharded, offloaded teacher as by the unsharded one in its own pool (measured: 6e-8 apart, the
    # packed forwards of the 2 ranks differ). A teacher scoring with the student's weights would give discrepancy 0.
    assert math.isclose(
        colocated[1]["opd/teacher_log_prob"], metrics[1]["opd/teacher_log_prob"], rel_tol=1e-4, abs_tol=1e-5
    )
    assert abs(colocated[1]["opd/discrepancy"]) > 1e-3
