"""`python -m opd_verl.main +recipe=opsd` checks the problem/solution columns of the training files in the driver:
a row without a reference solution stops the run with the file, the row and the column, before Ray starts."""

import os
import subprocess
import sys

import pandas as pd


def _write(path, solutions):
    rows = [
        {
            "data_source": "t",
            "prompt": [{"role": "user", "content": f"{i}+1="}],
            "reward_model": {"style": "rule", "ground_truth": str(i + 1)},
            "extra_info": {"problem": f"{i}+1=", "solution": s},
        }
        for i, s in enumerate(solutions)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def _main(tmp_path, *overrides):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "opd_verl.main", "+recipe=opsd", "opd.cpu_demo=false", *overrides]
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)


def test_missing_solution_names_file_row_and_column_before_ray(tmp_path):
    good = _write(tmp_path / "good.parquet", ["1", "2"])
    bad = _write(tmp_path / "bad.parquet", ["1", "2", "  ", "4"])
    out = _main(tmp_path, f"data.train_files=[{good},{bad}]", "actor_rollout_ref.model.path=/nonexistent/model")
    assert out.returncode != 0
    assert (
        f"opd_verl: invalid data: {bad}: row 2 has no reference solution in column 'extra_info.solution'" in out.stderr
    ), out.stderr[-2000:]
    assert "ray init" not in out.stdout.lower()


def test_missing_problem_column_is_named(tmp_path):
    bad = _write(tmp_path / "bad.parquet", ["1"])
    out = _main(tmp_path, f"data.train_files={bad}", "opd.opsd.problem_key=extra_info.question")
    assert out.returncode != 0
    assert f"{bad}: row 0 has no problem text in column 'extra_info.question'" in out.stderr, out.stderr[-2000:]


def test_weighting_with_opsd_is_refused_in_the_driver(tmp_path):
    good = _write(tmp_path / "good.parquet", ["1"])
    out = _main(tmp_path, f"data.train_files={good}", "opd.opsd.loss=sampled", "opd.weighting.name=iw")
    assert out.returncode != 0
    assert "opd_verl: invalid config: opd.weighting.name='iw' is not available with opd.signal.name=opsd" in out.stderr
    assert "ray init" not in out.stdout.lower()
