"""The OPSD privileged-teacher benchmark at its CI size: the before and after paths give the same loss."""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("verl")

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_opsd_teacher.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_opsd_teacher", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_before_and_after_give_equal_losses(beta):
    bench = _bench()
    args = bench.parse_args(["--quick", "--beta", str(beta), "--threads", "1"])
    before, t_before = bench.run_variant(args, "before", reset_peak=False)
    # one teacher forward per sample before (the 32-position chunk size doubled as the teacher batch size)
    assert before["teacher_forwards"] == args.samples
    assert 0.0 < before["clip_rate"] < 1.0  # the flags are exercised
    for budget, forwards in ((256, None), (1024, 1)):
        after, t_after = bench.run_variant(args, f"after@{budget}", reset_peak=False)
        if forwards is not None:
            assert after["teacher_forwards"] == forwards
        assert after["teacher_forwards"] < before["teacher_forwards"]
        assert after["loss"] == pytest.approx(before["loss"], rel=1e-6)
        torch.testing.assert_close(t_after["opsd_divergence"], t_before["opsd_divergence"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            t_after["opsd_teacher_log_probs"], t_before["opsd_teacher_log_probs"], rtol=1e-5, atol=1e-5
        )
        torch.testing.assert_close(t_after["grad"], t_before["grad"], rtol=1e-5, atol=1e-7)
        assert torch.equal(t_after["opsd_clipped"], t_before["opsd_clipped"])
