"""Shared by the end-to-end tests: runs of `python -m opd_verl.main` on the CPU demo, one heavy job at a time."""

import json
import os
import subprocess
import sys

import pytest

HEAVY_LOCK = "/tmp/opd_heavy.lock"


class DemoRun:
    """Runs of ``python -m opd_verl.main +recipe=RECIPE opd.cpu_demo=true`` under one ``tmp_path``.

    Checkpoints and ``metrics.jsonl`` go to ``tmp_path/run``; run NAME logs to ``tmp_path/NAME.log`` and keeps its
    Hydra files in ``tmp_path/hydra_NAME``. The demo's held-out evaluation (veRL's validation before training and
    every ``trainer.test_freq`` steps) is off unless ``validate=True``: it logs a step-0 entry and costs time.
    """

    lock = HEAVY_LOCK

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.run_dir = tmp_path / "run"

    def command(self, recipe: str, name: str, *overrides: str, validate: bool = False) -> list[str]:
        no_validation = () if validate else ("trainer.val_before_train=false", "trainer.test_freq=-1")
        return [
            sys.executable,
            "-m",
            "opd_verl.main",
            f"+recipe={recipe}",
            "opd.cpu_demo=true",
            f"trainer.default_local_dir={self.run_dir}",
            f"hydra.run.dir={self.tmp_path / ('hydra_' + name)}",
            *no_validation,
            *overrides,
        ]

    def run(
        self, recipe: str, name: str, *overrides: str, run_timeout_s: int, lock_wait_s: int, validate: bool = False
    ) -> subprocess.CompletedProcess:
        """One run holding the heavy-job lock (waiting at most ``lock_wait_s``) under a hard timeout, so a run that
        would wait for Ray resources fails instead of hanging; asserts that it exits 0."""
        lock = ["flock", "-w", str(lock_wait_s), self.lock, "timeout", str(run_timeout_s)]
        out = subprocess.run(
            [*lock, *self.command(recipe, name, *overrides, validate=validate)],
            capture_output=True,
            text=True,
            cwd=str(self.tmp_path),
            env=dict(os.environ),
        )
        text = out.stdout + out.stderr
        (self.tmp_path / f"{name}.log").write_text(text)
        assert out.returncode == 0, f"{recipe} run {name} failed (rc {out.returncode}); log tail:\n{text[-5000:]}"
        return out

    def metrics(self, run_dir=None) -> dict[int, dict]:
        """The logged metrics by step (a resumed run keeps the rows up to its checkpoint); empty before any step.
        ``run_dir``: a run given its own ``trainer.default_local_dir`` (default: ``tmp_path/run``)."""
        path = (run_dir or self.run_dir) / "metrics.jsonl"
        by_step: dict[int, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    by_step.setdefault(row["step"], {}).update(row["data"])
        return by_step


@pytest.fixture
def demo_run(tmp_path) -> DemoRun:
    return DemoRun(tmp_path)
