"""A bad `opd` value stops `python -m opd_verl.main` with the field's message before anything is built or started
(no CPU demo assets, no Ray)."""

import os
import subprocess
import sys


def test_invalid_value_fails_before_demo_assets_and_ray(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "XDG_CACHE_HOME": str(cache), "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": ""}
    out = subprocess.run(
        [sys.executable, "-m", "opd_verl.main", "+recipe=exopd", "opd.cpu_demo=true", "opd.weighting.w_max=0.5"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode != 0
    assert "opd_verl: invalid config: opd.weighting.w_max=0.5 is not allowed: it must be >= 1.0." in out.stderr
    assert not cache.exists() or not any(cache.rglob("*")), "demo assets were built before validation"
    assert "ray init" not in out.stdout
