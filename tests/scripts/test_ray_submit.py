"""scripts/ray_submit.sh with a stub `ray` that records its arguments."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "ray_submit.sh"


@pytest.fixture
def submit(tmp_path):
    record = tmp_path / "ray_args.json"
    stub = tmp_path / "ray"
    stub.write_text(f'#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, "w"))\n')
    stub.chmod(0o755)

    def run(*args, **env):
        full = {k: v for k, v in os.environ.items() if not k.startswith(("OPD_", "RAY_"))}
        full.update(OPD_RAY=str(stub), OPD_PYTHON=sys.executable, **env)
        proc = subprocess.run(["bash", str(SCRIPT), *args], env=full, capture_output=True, text=True, timeout=60)
        argv = json.loads(record.read_text()) if record.exists() else None
        return proc, argv

    return run


def runtime_env(argv):
    (opt,) = [a for a in argv if a.startswith("--runtime-env-json=")]
    return json.loads(opt.split("=", 1)[1])


def test_source_install(submit):
    proc, argv = submit("exopd", "trainer.nnodes=2", "data.train_files=/a b.parquet", RAY_ADDRESS="http://h:8265")
    assert proc.returncode == 0, proc.stderr
    assert argv[:3] == ["job", "submit", "--address=http://h:8265"]
    sep = argv.index("--")
    assert argv[sep + 1 :] == [
        "python", "-m", "opd_verl.main", "+recipe=exopd", "opd.cpu_demo=false", "trainer.nnodes=2",
        "data.train_files=/a b.parquet"
    ]  # fmt: skip
    env = runtime_env(argv)
    assert env["py_modules"] == [str(REPO / "opd_verl")]
    assert env["env_vars"] == {"VERL_USE_EXTERNAL_MODULES": "opd_verl.integration.plugin"}
    assert "pip" not in env
    assert "--no-wait" not in argv


def test_pip_install_with_extras_id_and_no_wait(submit):
    proc, argv = submit(
        "opsd",
        RAY_ADDRESS="http://h:8265",
        OPD_SUBMIT_INSTALL="pip",
        OPD_PACKAGE_SPEC="/shared/wheels/opd_verl-0.1.0-py3-none-any.whl[gpu]",
        OPD_SUBMIT_PIP="math-verify==0.8.0 nltk",
        OPD_SUBMIT_ID="opsd-1",
        OPD_SUBMIT_NO_WAIT="1",
        OPD_REMOTE_PYTHON="python3",
    )
    assert proc.returncode == 0, proc.stderr
    env = runtime_env(argv)
    assert env["pip"] == {
        "packages": ["/shared/wheels/opd_verl-0.1.0-py3-none-any.whl[gpu]", "math-verify==0.8.0", "nltk"],
        "pip_check": False,
    }
    assert "py_modules" not in env
    assert "--submission-id=opsd-1" in argv and "--no-wait" in argv
    assert argv[argv.index("--") + 1 :] == ["python3", "-m", "opd_verl.main", "+recipe=opsd", "opd.cpu_demo=false"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ((), {"RAY_ADDRESS": "http://h:8265"}, "usage:"),
        (("opd",), {}, "RAY_ADDRESS is not set"),
        (("opd",), {"RAY_ADDRESS": "x", "OPD_SUBMIT_INSTALL": "conda"}, "must be 'source' or 'pip'"),
        (("opd",), {"RAY_ADDRESS": "x", "OPD_SUBMIT_INSTALL": "pip"}, "needs OPD_PACKAGE_SPEC"),
    ],
)
def test_errors(submit, args, env, message):
    proc, argv = submit(*args, **env)
    assert proc.returncode == 2 and message in proc.stderr
    assert argv is None
