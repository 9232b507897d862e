"""Preemption through veRL's real trainer on CPU: USR1 to a running `python -m opd_verl.main` leaves a checkpoint at
the next step boundary and a clean exit; a second run resumes from that checkpoint (what the Slurm script does
on `--signal=B:USR1@300` and requeue)."""

import fcntl
import os
import signal
import subprocess
import time

import pytest

LOCK_WAIT_S = 1500
RUN_TIMEOUT_S = 900

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + 2 * RUN_TIMEOUT_S + 300)]


def _command(demo_run, name, *overrides):
    return demo_run.command("exopd", name, "trainer.save_freq=-1", *overrides)


def test_usr1_checkpoints_at_step_boundary_then_resume(demo_run, tmp_path):
    run_dir = demo_run.run_dir
    flag = tmp_path / "PREEMPT_REQUESTED"
    env = {**os.environ, "OPD_PREEMPT_FLAG_FILE": str(flag)}
    with open(demo_run.lock, "a") as lock:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "waited too long for the heavy-job lock"
                time.sleep(2)

        log = open(tmp_path / "first.log", "w")
        proc = subprocess.Popen(
            _command(demo_run, "first", "trainer.total_training_steps=60"),
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not sorted(demo_run.metrics()):
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "no training step within the time limit"
                time.sleep(1)
            proc.send_signal(signal.SIGUSR1)
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = (tmp_path / "first.log").read_text()
        assert rc == 0, text[-4000:]
        done = sorted(demo_run.metrics())
        last = done[-1]
        assert last < 60, "the run trained to the end: the signal did not stop it"
        assert (run_dir / f"global_step_{last}").is_dir(), f"no checkpoint at the step boundary {last}: {text[-3000:]}"
        assert flag.exists()

        flag.unlink()  # the launcher clears a handled request before the requeued job starts
        resumed = subprocess.run(
            _command(demo_run, "resume", f"trainer.total_training_steps={last + 1}", "trainer.resume_mode=auto"),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
        assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-4000:]
        assert sorted(demo_run.metrics()) == [last + 1], f"resume did not continue after step {last}"
