"""Each distillation recipe trains 2 steps through veRL 0.9.1's real v1 loop on CPU with the plugin trainer.

`python -m opd_verl.main +recipe=NAME opd.cpu_demo=true`: tiny demo student and SFT teacher, the plugin's
forward-only teacher (and, for ``gopd_rc``, reference) worker group, HF rollout. The assertions are on metrics
only the plugin logs, so they fail if the plugin trainer, its workers or the hand-over did not run. Slow: Ray
start-up per run; runs hold /tmp/opd_heavy.lock.
"""

import json
import math

import pytest

RUN_TIMEOUT_S = 900
LOCK_WAIT_S = 2400

pytestmark = [pytest.mark.slow, pytest.mark.timeout(LOCK_WAIT_S + RUN_TIMEOUT_S + 300)]

# the teacher's mass on the student's top-K ids: the ids reached the teacher worker, its output the health step
TOPK_MASS = "opd/health/topk_overlap_mass"
COMMON = ("opd/teacher_time_s", "opd/discrepancy", "opd/discrepancy_decile/0", "opd/stage/final/adv_mean")
EXPECTED = {
    "exopd": COMMON + ("opd/stage/signal/adv_std", "actor/kl_loss"),
    "gopd_rc": COMMON + ("opd/stage/signal/adv_mean",),
    "iw_opd": COMMON + ("opd/weight_mean", "opd/weight_min", "opd/stage/weighting/adv_mean"),
    "prefix_release": COMMON + ("opd/release/accept_rate", "opd/release/kept_fraction", TOPK_MASS),
    "exopd_iw_release": COMMON + ("opd/weight_min", "opd/release/accept_rate", "opd/release/kept_fraction", TOPK_MASS),
}


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    """A randomly initialised model of the demo teacher's shape: the reward-correction base model of ``gopd_rc``."""
    from opd_verl.demo.assets import TEACHER_INIT_SEED, VARIANT_SPECS
    from opd_verl.demo.tiny import build_tiny_qwen2

    spec = VARIANT_SPECS["sums"]
    path = tmp_path_factory.mktemp("base") / "teacher_base"
    return build_tiny_qwen2(str(path), spec.teacher_hidden, spec.teacher_layers, seed=TEACHER_INIT_SEED)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_trains_two_steps(demo_run, tmp_path, recipe, request):
    overrides = []
    if recipe == "gopd_rc":
        overrides.append(f"opd.reference.path={request.getfixturevalue('base_model_dir')}")
    steps = ("trainer.total_training_steps=2", "trainer.save_freq=2")
    # one recipe also runs the demo's held-out evaluation (veRL's validation before training and at the last step)
    validate = recipe == "exopd"
    demo_run.run(
        recipe, "run", *steps, *overrides, run_timeout_s=RUN_TIMEOUT_S, lock_wait_s=LOCK_WAIT_S, validate=validate
    )
    metrics = demo_run.metrics()
    if validate:
        held_out = "val-core/opd_demo/addition/acc/mean@1"
        assert held_out in metrics.pop(0) and held_out in metrics[2]
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())["held_out_accuracy"]
        assert 0.0 <= summary["before"] <= 1.0 and 0.0 < summary["teacher"] <= 1.0 and summary["after_step"] == 2
    assert sorted(metrics) == [1, 2]
    for step, data in metrics.items():
        for key in EXPECTED[recipe]:
            assert key in data, f"{recipe} step {step}: plugin metric {key} missing"
            assert math.isfinite(float(data[key])), f"{recipe} step {step}: {key}={data[key]}"
        assert data["opd/teacher_time_s"] > 0
        if "opd/weight_min" in EXPECTED[recipe]:
            assert 1.0 <= data["opd/weight_min"] <= data["opd/weight_mean"] <= 1.5 + 1e-6
        if "opd/release/kept_fraction" in EXPECTED[recipe]:
            assert 0.0 < data["opd/release/kept_fraction"] <= 1.0
        if TOPK_MASS in EXPECTED[recipe]:
            assert 0.0 < data[TOPK_MASS] <= 1.0
    state = json.loads((tmp_path / "run" / "global_step_2" / "opd_state.json").read_text())
    assert state["global_step"] == 2 and state["advantage_step"] == 2 and state["teacher_calls"] == 2
