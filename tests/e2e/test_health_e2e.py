"""Teacher-health alarms through veRL's real trainer on CPU (`python -m opd_verl.main`), with a fault injected.

The teacher worker zeroes its output-embedding weights from step 2 (the test-only hook
``OPD_VERL_TEST_ZERO_TEACHER_FROM_STEP``), as a teacher that lost its weights after an offload would score. With
``opd.health.collapse.action=stop`` the collapse alarm ends the run at the end of step 2 with a checkpoint and an
error naming the alarm, the teacher and the figure; a resume with the alarm set to ``warn`` trains on.
"""

import os
import subprocess

import pytest

from opd_verl.workers.forward_worker import ZERO_TEACHER_FROM_STEP_ENV

RUN_TIMEOUT_S = 900
LOCK_WAIT_S = 1500

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + 2 * RUN_TIMEOUT_S + 300)]


def _run(demo_run, name, *overrides):
    env = {**os.environ, ZERO_TEACHER_FROM_STEP_ENV: "2"}
    cmd = demo_run.command("exopd", name, "trainer.save_freq=-1", "opd.health.plot_every=0", *overrides)
    lock = ["flock", "-w", str(LOCK_WAIT_S), demo_run.lock, "timeout", str(RUN_TIMEOUT_S)]
    out = subprocess.run([*lock, *cmd], capture_output=True, text=True, cwd=str(demo_run.tmp_path), env=env)
    text = out.stdout + out.stderr
    (demo_run.tmp_path / f"{name}.log").write_text(text)
    return out.returncode, text


def test_collapse_alarm_stops_with_checkpoint_then_resume_with_warn_goes_on(demo_run):
    run_dir = demo_run.run_dir
    rc, text = _run(demo_run, "stop", "trainer.total_training_steps=4", "opd.health.collapse.action=stop")
    assert text.strip(), f"no output (rc {rc}): waited more than {LOCK_WAIT_S} s for the heavy-job lock?"
    assert rc not in (0, 124), f"the run did not stop with an error (rc {rc}):\n{text[-4000:]}"
    assert "HealthAlarmError" in text, text[-4000:]
    assert "health alarm 'collapse' (stop) for teacher 'default': figure 1" in text, text[-4000:]
    metrics = {k: v for k, v in demo_run.metrics().items() if k >= 1}  # step 0: validation before training
    assert sorted(metrics) == [1, 2], f"the run did not stop at the step-2 boundary: steps {sorted(metrics)}"
    assert metrics[1]["opd/health/alarm/collapse"] == 0.0
    assert metrics[1]["opd/teacher/default/collapse_fraction"] < 0.05
    assert metrics[2]["opd/health/alarm/collapse"] == 1.0
    assert metrics[2]["opd/teacher/default/collapse_fraction"] == 1.0
    assert sum(v for k, v in metrics[1].items() if k.startswith("opd/health/alarm/")) == 0.0
    assert (run_dir / "global_step_2").is_dir(), "no checkpoint at the step boundary of the alarm"
    assert not (run_dir / "global_step_3").exists()
    assert (run_dir / "diagnostics.png").stat().st_size > 10_000

    rc, text = _run(
        demo_run,
        "resume",
        "trainer.total_training_steps=3",
        "trainer.resume_mode=auto",
        "opd.health.collapse.action=warn",
    )
    assert rc == 0, text[-4000:]
    resumed = demo_run.metrics()
    assert max(resumed) == 3, f"resume did not continue after the step-2 checkpoint: steps {sorted(resumed)}"
    assert resumed[3]["opd/health/alarm/collapse"] == 1.0  # still fired, only warned
    # the warning itself is in the trainer's Ray log (quiet console); the step line names the alarm
    assert "step 3/3" in text and "HEALTH ALARM collapse" in text.split("step 3/3", 1)[1], text[-4000:]
