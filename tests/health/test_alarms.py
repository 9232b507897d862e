"""Teacher-health alarms (`opd_verl.health`) on hand-made tensors: each threshold, the NaN-row policy, the config."""

import math
import re

import pytest
import torch

from opd_verl.health import (
    HealthConfig,
    advantage_jump,
    collapse_counts,
    nonfinite_rows,
    parse_health,
    release_points,
    step_health,
    temperature_mismatch,
    topk_overlap_mass,
    zero_rows,
)
from opd_verl.objectives import StageParams, compose_advantages

V = 1000
LNV = math.log(V)


def _run(config=None, *, teacher, student=None, mask=None, advantages=None, owners=None, names=("t0",), **kw):
    mask = torch.ones_like(teacher) if mask is None else mask
    student = torch.full_like(teacher, -1.0) if student is None else student
    advantages = (teacher - student) * mask if advantages is None else advantages
    owners = [0] * teacher.shape[0] if owners is None else owners
    args = {
        "scored_temperatures": {},
        "expected_temperature": 1.0,
        "stage_metrics": {},
        "nonfinite": nonfinite_rows(mask, teacher=teacher),
    }
    args.update(kw)
    return step_health(
        config or HealthConfig(),
        student=student,
        teacher=teacher,
        response_mask=mask,
        advantages=advantages,
        owners=owners,
        teacher_names=list(names),
        vocab_sizes=[V] * len(names),
        **args,
    )


def _fired(report, name):
    return [a for a in report.alarms if a.name == name]


# ------------------------------------------------------------------ collapse


def test_collapse_fraction_matches_a_naive_count_and_fires_at_the_threshold():
    torch.manual_seed(0)
    teacher = -torch.rand(2, 10) * 2  # healthy: far above -ln V
    mask = torch.ones(2, 10)
    mask[1, 8:] = 0
    teacher[0, :6] = -LNV  # uniform scores on 6 of 10 tokens
    teacher[1, :3] = -LNV * 1.04  # inside the 5% band
    teacher[1, 3] = -LNV * 1.2  # confidently disagrees: outside the band
    teacher[1, 9] = -LNV  # padding: not counted
    counts, _ = collapse_counts(teacher, mask, torch.full((2,), LNV), 0.05)
    naive = [sum(1 for t in range(10) if mask[b, t] and abs(teacher[b, t] + LNV) <= 0.05 * LNV) for b in range(2)]
    assert counts.tolist() == naive == [6, 3]
    # teacher 0 owns row 0 (6/10), teacher 1 owns row 1 (3/8)
    report = _run(teacher=teacher, mask=mask, owners=[0, 1], names=("a", "b"))
    fired = _fired(report, "collapse")
    assert [a.teacher for a in fired] == ["a"]
    assert fired[0].figure == pytest.approx(0.6)
    assert report.metrics["opd/teacher/b/collapse_fraction"] == pytest.approx(3 / 8)
    assert report.metrics["opd/health/alarm/collapse"] == 1.0


def test_collapse_does_not_fire_below_the_fraction():
    teacher = -torch.rand(1, 10)
    teacher[0, :4] = -LNV
    assert not _fired(_run(teacher=teacher), "collapse")


def test_a_zeroed_output_layer_gives_minus_ln_v_on_every_token():
    """What the end-to-end fault injection does: zero logits are a uniform distribution."""
    logits = torch.zeros(3, 7, V)
    lp = torch.log_softmax(logits, dim=-1)[..., 0]
    report = _run(teacher=lp)
    assert _fired(report, "collapse")[0].figure == 1.0
    assert report.metrics["opd/teacher/t0/nll_over_lnv"] == pytest.approx(1.0)


# ------------------------------------------------------------------ non-finite rows


def _stage_inputs():
    torch.manual_seed(1)
    student = -torch.rand(4, 6) * 3
    teacher = -torch.rand(4, 6) * 3
    mask = torch.ones(4, 6)
    mask[2, 4:] = 0
    return student, teacher, mask


def test_nan_teacher_row_is_counted_zeroed_and_the_other_rows_unchanged():
    student, teacher, mask = _stage_inputs()
    teacher[1, 2] = float("nan")
    teacher[2, 5] = float("nan")  # padding: ignored
    params = StageParams(signal={"name": "opd"}, weighting={"name": "iw"})
    with pytest.raises(ValueError, match="NaN/inf"):  # the objectives themselves refuse it
        compose_advantages(student, teacher, mask, params=params)

    bad, counts = nonfinite_rows(mask, teacher=teacher, student=student, ref=None)
    assert bad.tolist() == [False, True, False, False]
    assert counts == {"teacher": 1, "student": 0}
    mask2, clean = zero_rows(bad, mask, teacher=teacher, student=student, ref=None)
    assert clean["ref"] is None and clean["teacher"][1].abs().sum() == 0 and mask2[1].sum() == 0
    adv, _ = compose_advantages(clean["student"], clean["teacher"], mask2, params=params)
    assert torch.isfinite(adv).all()
    assert adv[1].abs().sum() == 0
    keep = [0, 2, 3]
    expected, _ = compose_advantages(student[keep], teacher[keep], mask[keep], params=params)
    torch.testing.assert_close(adv[keep], expected)
    assert torch.isnan(teacher[1, 2])  # inputs untouched

    report = _run(teacher=clean["teacher"], mask=mask2, advantages=adv, nonfinite=(bad, counts))
    fired = _fired(report, "nonfinite")
    assert len(fired) == 1 and fired[0].figure == 1.0 and fired[0].teacher == "t0" and fired[0].action == "warn"
    assert report.metrics["opd/health/nonfinite_rows"] == 1.0
    assert report.metrics["opd/health/nonfinite_tokens/teacher"] == 1.0
    assert report.metrics["opd/teacher/t0/nonfinite_rows"] == 1.0


def test_nonfinite_max_rows_threshold():
    _, teacher, mask = _stage_inputs()
    teacher[0, 0] = float("inf")
    teacher[3, 1] = float("-inf")
    nf = nonfinite_rows(mask, teacher=teacher)
    clean = torch.nan_to_num(teacher, posinf=0.0, neginf=0.0)
    cfg = parse_health({"nonfinite": {"max_rows": 2}})
    assert not _fired(_run(cfg, teacher=clean, mask=mask, nonfinite=nf), "nonfinite")
    cfg = parse_health({"nonfinite": {"max_rows": 1, "action": "stop"}})
    fired = _fired(_run(cfg, teacher=clean, mask=mask, nonfinite=nf), "nonfinite")
    assert fired[0].figure == 2.0 and fired[0].action == "stop"


# ------------------------------------------------------------------ temperature, release, IW, advantage jump


def test_temperature_mismatch_threshold():
    assert temperature_mismatch(1.0, 1.1, 1e-3) == pytest.approx(0.1)
    assert temperature_mismatch(1.0, 1.0005, 1e-3) is None
    teacher = -torch.rand(2, 3)
    report = _run(teacher=teacher, scored_temperatures={"t0": 1.0}, expected_temperature=0.7)
    fired = _fired(report, "temperature")
    assert fired[0].figure == 1.0 and "0.7" in fired[0].threshold
    assert not _fired(_run(teacher=teacher, scored_temperatures={"t0": 0.7}, expected_temperature=0.7), "temperature")


@pytest.mark.parametrize(
    ("accept", "kept", "fires"), [(1.0, 0.02, True), (0.995, 0.05, True), (1.0, 0.5, False), (0.5, 0.02, False)]
)
def test_release_alarm_needs_high_acceptance_and_tiny_kept_fraction(accept, kept, fires):
    stage = {"opd/release/accept_rate": accept, "opd/release/kept_fraction": kept}
    report = _run(teacher=-torch.rand(2, 3), stage_metrics=stage, release_enabled=True)
    assert bool(_fired(report, "release")) == fires


def test_iw_saturation_fires_when_discrepancy_is_zero_and_not_on_a_random_batch():
    student, teacher, mask = _stage_inputs()
    params = StageParams(signal={"name": "opd"}, weighting={"name": "iw", "w_max": 1.5})
    _, same = compose_advantages(student, student.clone(), mask, params=params)  # no discrepancy: all at w_max
    r = _run(teacher=student.clone(), student=student, mask=mask, stage_metrics=same, weighting="iw", w_max=1.5)
    assert _fired(r, "iw")[0].figure == pytest.approx(1.0)
    _, rand = compose_advantages(student, teacher, mask, params=params)
    r = _run(teacher=teacher, student=student, mask=mask, stage_metrics=rand, weighting="iw", w_max=1.5)
    assert not _fired(r, "iw") and 0.3 < r.metrics["opd/health/iw_saturation"] < 0.9


def test_advantage_jump_both_directions():
    assert advantage_jump(None, 5.0, 100.0) is None
    assert advantage_jump(1.0, 150.0, 100.0) == pytest.approx(150.0)
    assert advantage_jump(1.0, 0.005, 100.0) == pytest.approx(200.0)
    assert advantage_jump(1.0, 50.0, 100.0) is None
    assert advantage_jump(1.0, 0.0, 100.0) == math.inf
    teacher = -torch.rand(2, 4)
    adv = torch.randn(2, 4)
    scale = float(adv.std(unbiased=False))
    r = _run(teacher=teacher, advantages=adv, previous_adv_scale=scale / 1000)
    assert _fired(r, "advantage_jump")[0].figure == pytest.approx(1000.0, rel=1e-4)
    assert r.adv_scale == pytest.approx(scale)


def test_release_points_match_a_naive_loop():
    adv = torch.tensor([[1.0, -2.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.3, 0.1, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]).float()
    got = release_points(adv, mask).tolist()
    naive = []
    for b in range(3):
        valid = [t for t in range(5) if mask[b, t]]
        last = max((i + 1 for i, t in enumerate(valid) if adv[b, t] != 0), default=0)
        naive.append(last / len(valid))
    assert got == pytest.approx(naive) and got == pytest.approx([0.5, 0.8, 0.0])


def test_topk_overlap_mass_matches_a_naive_loop_and_its_step_figures():
    torch.manual_seed(8)
    b, t, k, v = 5, 23, 4, 50
    logits = torch.randn(b, t, v) * 3
    logp = logits.log_softmax(-1)
    cand = torch.stack([torch.randperm(v)[:k] for _ in range(b * t)]).view(b, t, k)
    got = topk_overlap_mass(logp.gather(-1, cand))
    naive = torch.zeros(b, t)
    for i in range(b):
        for j in range(t):
            naive[i, j] = sum(math.exp(logp[i, j, c].item()) for c in cand[i, j].tolist())
    torch.testing.assert_close(got, naive, atol=1e-6, rtol=0)
    # a uniform teacher puts K / V on any K ids; all ids hold the whole mass
    assert topk_overlap_mass(torch.full((3, k), -math.log(v))).tolist() == pytest.approx([k / v] * 3)
    assert topk_overlap_mass(logp[0, :2]).tolist() == pytest.approx([1.0, 1.0])

    # through the step: mean over valid tokens and by position decile of each row's valid tokens
    mask = (torch.rand(b, t) > 0.25).float()
    mask[2] = 0
    teacher = -torch.rand(b, t)
    r = _run(teacher=teacher, mask=mask, topk_mass=got)
    valid = [(i, j) for i in range(b) for j in range(t) if mask[i, j]]
    assert r.metrics["opd/health/topk_overlap_mass"] == pytest.approx(
        sum(naive[i, j].item() for i, j in valid) / len(valid), abs=1e-6
    )
    by_decile = [[] for _ in range(10)]
    for i in range(b):
        cols = [j for j in range(t) if mask[i, j]]
        for rank, j in enumerate(cols):
            by_decile[rank * 10 // len(cols)].append(naive[i, j].item())
    expected = [sum(x) / len(x) if x else 0.0 for x in by_decile]
    got_deciles = [r.metrics[f"opd/health/topk_overlap_mass_decile/{d}"] for d in range(10)]
    assert got_deciles == pytest.approx(expected, abs=1e-6)
    assert "opd/health/topk_overlap_mass" not in _run(teacher=teacher, mask=mask).metrics


def test_decile_means_equal_position_decile_means():
    from opd_verl.health import decile_bins, decile_means
    from opd_verl.objectives import position_decile_means

    torch.manual_seed(6)
    values = torch.randn(7, 33)
    mask = (torch.rand(7, 33) > 0.3).float()
    mask[3] = 0
    expected, _ = position_decile_means(values, mask)
    assert decile_means(decile_bins(mask), values) == pytest.approx(expected.tolist(), abs=1e-6)


def test_sample_grid_keeps_rows_and_bounds_the_tokens():
    from opd_verl.health import sample_grid

    assert sample_grid((4, 100), 65536) == (1, 1)
    rs, cs = sample_grid((256, 16384), 65536)
    assert rs == 1 and cs == 64 and 256 * math.ceil(16384 / cs) <= 65536
    rs, cs = sample_grid((100_000, 8), 1000)
    assert math.ceil(100_000 / rs) * math.ceil(8 / cs) <= 1000


def test_sampled_figures_estimate_the_exact_ones_on_a_large_batch():
    torch.manual_seed(5)
    b, t = 64, 4096
    student = -torch.rand(b, t) * 2
    teacher = student + 0.2 * torch.randn(b, t) - 0.1
    teacher[: b // 2] = -LNV  # teacher "a" (rows 0..31) collapsed
    owners = [0] * (b // 2) + [1] * (b // 2)
    lengths = torch.randint(t // 2, t + 1, (b,))
    mask = (torch.arange(t)[None] < lengths[:, None]).float()
    adv = (teacher - student) * mask
    cfg = parse_health({"sample_tokens": 4096})
    r = _run(cfg, teacher=teacher, student=student, mask=mask, advantages=adv, owners=owners, names=("a", "b"))
    assert [a.teacher for a in _fired(r, "collapse")] == ["a"]
    assert r.metrics["opd/teacher/a/collapse_fraction"] == 1.0 and r.metrics["opd/teacher/b/collapse_fraction"] == 0
    exact = float(((teacher - student) * mask)[b // 2 :].sum() / mask[b // 2 :].sum())
    assert r.metrics["opd/teacher/b/discrepancy"] == pytest.approx(exact, abs=0.02)
    full = float(adv[mask.bool()].std(unbiased=False))
    assert r.adv_scale == pytest.approx(full)  # the scale reads every token


def test_healthy_batch_fires_nothing_and_reports_per_teacher_figures():
    torch.manual_seed(3)
    student = -torch.rand(6, 8) * 2
    teacher = student + 0.1 * torch.randn(6, 8)
    owners = [0, 1, 0, 1, 1, 0]
    r = _run(teacher=teacher, student=student, owners=owners, names=("a", "b"), previous_adv_scale=0.1)
    assert r.alarms == []
    for name, rows in (("a", [0, 2, 5]), ("b", [1, 3, 4])):
        assert r.metrics[f"opd/teacher/{name}/samples"] == 3
        expected = float((teacher[rows] - student[rows]).mean())
        assert r.metrics[f"opd/teacher/{name}/discrepancy"] == pytest.approx(expected, abs=1e-6)
    assert len(r.positions["advantage"]) == 10


# ------------------------------------------------------------------ config


def test_parse_health_defaults_and_errors_name_the_field():
    cfg = parse_health(None)
    assert cfg.enabled and cfg.plot_every == 10 and cfg.sample_tokens == 16384 and cfg["collapse"]["fraction"] == 0.5
    assert all(a.action == "warn" for a in cfg.alarms.values())
    bad = [
        ({"collapse": {"action": "halt"}}, "opd.health.collapse.action='halt'", "warn, stop"),
        ({"collapse": {"margin": 0}}, "opd.health.collapse.margin=0", "(0, 1]"),
        ({"nonfinite": {"max_rows": 1.5}}, "opd.health.nonfinite.max_rows=1.5", "integer"),
        ({"advantage_jump": {"factor": 1}}, "opd.health.advantage_jump.factor=1", "> 1"),
        ({"plot_every": -1}, "opd.health.plot_every=-1", ">= 0"),
        ({"sample_tokens": 0}, "opd.health.sample_tokens=0", ">= 1"),
        ({"iw": {"treshold": 1}}, "opd.health.iw.treshold=1", "saturation"),
        ({"collaps": {}}, "opd.health.collaps={}", "collapse"),
        ({"enabled": "yes"}, "opd.health.enabled='yes'", "true or false"),
    ]
    for raw, field, allowed in bad:
        with pytest.raises(ValueError, match=re.escape(field)) as err:
            parse_health(raw)
        assert allowed in str(err.value)
