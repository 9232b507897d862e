"""Preemption and resume through veRL's real trainer on CPU, one run and one relaunch sharing a run dir.

TERM to a running `python -m opd_verl.main` (what Slurm sends at the time limit and on `scancel`; Ray's own handler
must not take it) leaves a checkpoint at the next step boundary and exit 0. The newest step's files are then cut
short (a job killed while saving); the relaunch of the same command skips that step with a warning naming it,
resumes from the previous complete one, says which checkpoint and plugin state it restored, and the metrics file,
summary and plot cover every step of both runs. USR1 takes the same path (tests/scripts/test_preemption.py).
"""

import fcntl
import json
import os
import signal
import subprocess
import time

import pytest

LOCK_WAIT_S = 1500
RUN_TIMEOUT_S = 900

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + 2 * RUN_TIMEOUT_S + 300)]


def _command(demo_run, name, *overrides):
    return demo_run.command("exopd", name, "trainer.save_freq=1", *overrides)


def _lock(path):
    """The heavy-job lock, waiting in line like `flock` (the module's timeout bounds the wait)."""
    lock = open(path, "a")
    fcntl.flock(lock, fcntl.LOCK_EX)
    return lock


def test_term_checkpoints_then_resume_falls_back_and_keeps_history(demo_run, tmp_path):
    run_dir = demo_run.run_dir
    flag = tmp_path / "PREEMPT_REQUESTED"
    env = {**os.environ, "OPD_PREEMPT_FLAG_FILE": str(flag)}
    with _lock(demo_run.lock):
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
            while max(demo_run.metrics(), default=0) < 2:
                assert proc.poll() is None, (tmp_path / "first.log").read_text()[-4000:]
                assert time.monotonic() < deadline, "no second training step within the time limit"
                time.sleep(1)
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        text = (tmp_path / "first.log").read_text()
        assert rc == 0, text[-4000:]
        last = max(demo_run.metrics())
        assert 2 <= last < 60, "the run trained to the end: the signal did not stop it"
        assert (run_dir / "latest_checkpointed_iteration.txt").read_text() == str(last)
        assert (run_dir / f"global_step_{last}" / "opd_complete.json").exists(), text[-3000:]

        # a job killed while saving: the newest step's largest file cut short, the pointer already moved
        newest = run_dir / f"global_step_{last}"
        victim = max((p for p in newest.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])

        flag.unlink()  # the launcher clears a handled request before the requeued job starts
        resumed = subprocess.run(
            _command(demo_run, "resume", f"trainer.total_training_steps={last + 1}", "trainer.resume_mode=auto"),
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_S,
        )
    out = resumed.stdout + resumed.stderr
    (tmp_path / "resume.log").write_text(out)
    assert resumed.returncode == 0, out[-4000:]
    assert f"skipping the incomplete checkpoint {newest} ({victim.relative_to(newest)} has" in out, out[-4000:]
    assert f"resuming at step {last - 1} from {run_dir / f'global_step_{last - 1}'}; plugin state" in out
    assert str(run_dir / f"global_step_{last - 1}" / "opd_state.json") in out
    steps = sorted(s for s in demo_run.metrics() if s > 0)  # step 0: validation before training, when on
    assert steps == list(range(1, last + 2)), f"history lost on resume: {steps}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == last + 1 and summary["reverse_kl"]["first_steps"][0] == 1
    assert (run_dir / "curves.png").exists()
