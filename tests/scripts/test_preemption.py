"""Signal handling of `opd_verl.trainer.preemption`: flag, flag file, step-boundary decision, real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from opd_verl.trainer import preemption

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _restore(monkeypatch):
    monkeypatch.delenv(preemption.FLAG_FILE_ENV, raising=False)
    old = {sig: signal.getsignal(sig) for sig in preemption.DEFAULT_SIGNALS}
    preemption.clear_preemption()
    yield
    preemption.clear_preemption()
    for sig, handler in old.items():
        signal.signal(sig, handler)


def test_nothing_requested_by_default():
    assert not preemption.preemption_requested()
    assert not preemption.should_save_and_exit()
    assert preemption.preemption_reason() is None


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_handler_sets_flag(sig):
    preemption.install_signal_handlers()
    assert not preemption.should_save_and_exit()
    os.kill(os.getpid(), sig)
    # Python runs the handler in the main thread at the next bytecode boundary.
    for _ in range(100):
        if preemption.preemption_requested():
            break
        time.sleep(0.01)
    assert preemption.should_save_and_exit()
    assert preemption.preemption_reason() == sig.name


def test_step_boundary_decision_over_steps():
    """A loop that checks at each step boundary stops right after the step during which the request came."""
    preemption.install_signal_handlers()
    finished = []
    for step in range(1, 11):
        finished.append(step)
        if step == 4:
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
        if preemption.should_save_and_exit():
            break
    assert finished == [1, 2, 3, 4]


def test_flag_file_written_and_seen_by_another_reader(tmp_path, monkeypatch):
    flag = tmp_path / "sub" / "PREEMPT"
    preemption.request_preemption("SIGUSR1", flag_file=flag)
    assert flag.exists()
    assert flag.read_text().split()[0] == "SIGUSR1"
    # A fresh reader (as the trainer actor would be) knows only the file.
    preemption._requested.clear()
    preemption._reason = None
    assert preemption.should_save_and_exit(flag_file=flag)
    assert preemption.preemption_reason(flag_file=flag) == "SIGUSR1"
    monkeypatch.setenv(preemption.FLAG_FILE_ENV, str(flag))
    assert preemption.should_save_and_exit()
    preemption.clear_preemption()
    assert not flag.exists()
    assert not preemption.should_save_and_exit()


def test_first_reason_kept(tmp_path):
    preemption.request_preemption("SIGUSR1")
    preemption.request_preemption("SIGTERM")
    assert preemption.preemption_reason() == "SIGUSR1"


def test_unwritable_flag_file_keeps_in_process_flag(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    preemption.request_preemption("SIGTERM", flag_file=blocker / "PREEMPT")  # parent is a file: cannot create
    assert preemption.should_save_and_exit()


def test_install_exports_flag_file(tmp_path):
    flag = tmp_path / "PREEMPT"
    preemption.install_signal_handlers(flag_file=flag)
    assert os.environ[preemption.FLAG_FILE_ENV] == str(flag)
    assert preemption.flag_file_path() == flag


def test_install_outside_main_thread_is_refused():
    import threading

    errors = []

    def target():
        try:
            preemption.install_signal_handlers()
        except RuntimeError as err:
            errors.append(str(err))

    t = threading.Thread(target=target)
    t.start()
    t.join()
    assert errors and "main thread" in errors[0]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_real_subprocess_signal_saves_and_exits_cleanly(tmp_path, sig):
    """A child process running a step loop gets a real signal, checkpoints at the boundary and exits with 0."""
    flag = tmp_path / "PREEMPT"
    ready = tmp_path / "ready"
    ckpt = tmp_path / "ckpt.txt"
    code = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from opd_verl.trainer import preemption

        preemption.install_signal_handlers(flag_file={str(flag)!r})
        Path({str(ready)!r}).write_text("ready")
        for step in range(1, 100000):
            time.sleep(0.02)  # one training step
            if preemption.should_save_and_exit():
                Path({str(ckpt)!r}).write_text(f"{{step}} {{preemption.preemption_reason()}}")
                break
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 30
        while not ready.exists():
            assert time.monotonic() < deadline, "child did not start"
            assert proc.poll() is None, "child died before the signal"
            time.sleep(0.05)
        time.sleep(0.1)
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    step, reason = ckpt.read_text().split()
    assert int(step) >= 1
    assert reason == sig.name
    assert flag.exists() and flag.read_text().startswith(sig.name)


def test_term_survives_ray_init_in_the_driver(monkeypatch, tmp_path):
    """`opd_verl.main.launch`: Ray's own SIGTERM handler (installed by `ray.init` inside veRL's `run_ppo`) does not
    take TERM from the plugin; TERM after start-up is a preemption request and the driver lives on."""
    import ray
    import verl.trainer.main_ppo as main_ppo
    from omegaconf import OmegaConf

    import opd_verl.cpu_port.activate as cpu_activate
    import opd_verl.main as main

    def ray_like_init(*args, **kwargs):  # what ray/_private/worker.py does in ray.init
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    seen = []

    def fake_run_ppo(cfg, task_runner_class):
        ray.init()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        seen.append(preemption.preemption_reason())

    monkeypatch.setenv(preemption.FLAG_FILE_ENV, str(tmp_path / "flag"))
    monkeypatch.setattr(ray, "init", ray_like_init)
    monkeypatch.setattr(main_ppo, "run_ppo", fake_run_ppo)
    monkeypatch.setattr(main, "validate_verl", lambda cfg: None)
    monkeypatch.setattr(main, "_task_runner", lambda opd: None)
    monkeypatch.setattr(cpu_activate, "is_active", lambda: False)  # a driver without the CPU shims
    main.launch(OmegaConf.create({"opd": {"cpu_demo": "false"}}), None)
    assert seen == ["SIGTERM"] and (tmp_path / "flag").exists()
    assert ray.init is ray_like_init  # restored after the run


def test_driver_announces_the_resume_and_skips_an_incomplete_step(tmp_path, capsys):
    """`opd_verl.main.announce_resume`: before Ray starts, the driver names the skipped incomplete step, the step it
    resumes from and the plugin state; a corrupt state file stops the run naming the file."""
    import json

    from omegaconf import OmegaConf

    import opd_verl.main as main
    from opd_verl.trainer.checkpoints import write_manifest, write_pointer

    for step in (1, 2):
        folder = tmp_path / f"global_step_{step}"
        (folder / "actor").mkdir(parents=True)
        (folder / "actor" / "model.pt").write_bytes(b"x" * 64)
        (folder / "opd_state.json").write_text(json.dumps({"advantage_step": step}))
        write_manifest(str(folder))
    write_pointer(str(tmp_path), 2)
    (tmp_path / "global_step_2" / "actor" / "model.pt").write_bytes(b"x" * 7)  # killed while saving
    cfg = OmegaConf.create({"trainer": {"resume_mode": "auto", "default_local_dir": str(tmp_path)}})
    main.announce_resume(cfg)
    out = capsys.readouterr().out
    assert f"skipping the incomplete checkpoint {tmp_path / 'global_step_2'}" in out
    assert f"resuming at step 1 from {tmp_path / 'global_step_1'}; plugin state {{'advantage_step': 1}}" in out
    (tmp_path / "global_step_1" / "opd_state.json").write_text("{not json")
    with pytest.raises(SystemExit, match="opd_state.json"):
        main.announce_resume(cfg)
