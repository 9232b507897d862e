"""scripts/gpu_smoke.sh cannot run without a GPU; check what it promises and that it refuses to run unconfigured."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_smoke.sh"


def test_documented_status_and_stages():
    text = SCRIPT.read_text()
    assert "not yet run on a GPU" in text
    assert "+recipe=exopd" in text and "trainer.total_training_steps=2" in text
    assert "trainer.n_gpus_per_node=1" in text and "actor_rollout_ref.rollout.name=vllm" in text
    assert 'pip install -e ".[gpu]"' in text
    assert [line.split()[1] for line in text.splitlines() if line.startswith("stage ")] == [
        "gpu",
        "imports",
        "data",
        "train",
    ]


def test_requires_student_path(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPD_")}
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert proc.returncode != 0
    assert "OPD_SMOKE_STUDENT" in proc.stderr
