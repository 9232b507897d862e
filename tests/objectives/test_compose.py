"""Stage composition (docs/objectives.md section 6): stage-by-stage reference, params validation, metrics."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_verl.objectives import (
    StageParams,
    apply_release,
    compose_advantages,
    cosine_fraction,
    gopd_advantages,
    iw_opd_weights,
    position_mask_weights,
)


def _batch(seed, b=3, t=12):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(b, t, generator=g) * 4
    te = -torch.rand(b, t, generator=g) * 4
    r = -torch.rand(b, t, generator=g) * 4
    m = (torch.rand(b, t, generator=g) > 0.2).long()
    m[:, 0] = 1
    sids = torch.div(torch.arange(t), 2, rounding_mode="floor").repeat(b, 1)
    margins = torch.rand(b, t, generator=g)
    margins[:, t // 2 :] *= 0.1
    task = torch.randn(b, t, generator=g)
    pad = ~m.bool()
    return s.masked_fill(pad, -math.inf), te.masked_fill(pad, -math.inf), r, m, sids, margins, task


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 1000),
    signal=st.sampled_from(["opd", "gopd", "opsd_sampled"]),
    lam=st.sampled_from([0.5, 1.0, 1.25]),
    weighting=st.sampled_from(["none", "iw", "prefix_mask", "suffix_mask", "prefix_weight"]),
    release_on=st.booleans(),
    task_coef=st.sampled_from([0.0, 0.5]),
)
def test_compose_equals_stagewise(seed, signal, lam, weighting, release_on, task_coef):
    s, te, r, m, sids, margins, task = _batch(seed)
    lam = lam if signal == "gopd" else 1.0
    params = StageParams(
        signal={"name": signal, "lam": lam},
        weighting={"name": weighting, "w_max": 1.7, "fraction": 0.4, "weight": 2.0},
        release={"enabled": release_on, "min_segment": 2, "penalty": 1.0},
        task_coef=task_coef,
    )
    out, metrics = compose_advantages(
        s, te, m, params=params, ref_logprobs=r, sentence_ids=sids, margins=margins, task_advantages=task
    )
    # independent stage-by-stage composition from the public functions
    adv = gopd_advantages(s, te, m, lam, r)
    disc = gopd_advantages(s, te, m)
    if weighting == "iw":
        adv = adv * iw_opd_weights(disc, m, 1.7)
    elif weighting != "none":
        adv = adv * position_mask_weights(m, weighting, 0.4, 2.0)
    if release_on:
        adv, _ = apply_release(adv, m, sids, margins, min_segment=2, penalty=1.0)
    expected = adv + task_coef * torch.where(m.bool(), task, torch.zeros(()))
    torch.testing.assert_close(out, expected)
    assert torch.isfinite(out).all() and (out[~m.bool()] == 0).all()
    assert all(math.isfinite(v) for v in metrics.values())
    assert metrics["opd/discrepancy"] == pytest.approx(float(disc[m.bool()].mean()), rel=1e-5, abs=1e-6)
    assert ("opd/release/accept_rate" in metrics) == release_on
    assert all(f"opd/discrepancy_decile/{k}" in metrics for k in range(10))


def test_release_metrics_hand_worked():
    s = torch.zeros(2, 8)
    te = torch.full((2, 8), -1.0)
    m = torch.ones(2, 8, dtype=torch.long)
    m[1, 3:] = 0  # row 1: 3 tokens, 3 sentences -> no split allowed (gain undefined)
    sids = torch.arange(8).repeat(2, 1)
    margins = torch.tensor([[0.9, 0.8, 0.9, 0.8, 0.1, 0.2, 0.1, 0.2]] * 2)
    params = StageParams(release={"enabled": True})
    out, metrics = compose_advantages(s, te, m, params=params, sentence_ids=sids, margins=margins)
    assert metrics["opd/release/accept_rate"] == pytest.approx(0.5)
    assert metrics["opd/release/kept_fraction"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["opd/release/gain"] == pytest.approx(8 * math.log(50) - 2 * math.log(8), rel=1e-5)
    assert metrics["opd/release/gain_defined_rate"] == pytest.approx(0.5)
    torch.testing.assert_close(out[0], torch.tensor([-2.0] * 4 + [0.0] * 4))


def test_anneal_uses_cosine_fraction():
    s, te, r, m, *_ = _batch(3, b=2, t=20)
    params = StageParams(weighting={"name": "prefix_mask", "anneal": True, "fraction": 0.3, "fraction_end": 1.0})
    out, metrics = compose_advantages(s, te, m, params=params, step=4, total_steps=10)
    frac = cosine_fraction(4, 10, 0.3, 1.0)
    assert metrics["opd/weighting/fraction"] == pytest.approx(frac)
    expected = gopd_advantages(s, te, m) * position_mask_weights(m, "prefix_mask", frac)
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="step and total_steps"):
        compose_advantages(s, te, m, params=params)


def test_per_row_lam_override():
    s, te, r, m, *_ = _batch(4)
    params = StageParams(signal={"name": "gopd", "lam": 1.25})
    lam = torch.tensor([1.0, 1.5, 0.5])
    out, _ = compose_advantages(s, te, m, params=params, ref_logprobs=r, lam=lam)
    torch.testing.assert_close(out, gopd_advantages(s, te, m, lam, r))


def test_from_config_mapping():
    section = {
        "cpu_demo": "auto",
        "signal": {"name": "gopd", "lam": 1.25},
        "weighting": {"name": "iw", "w_max": 1.5, "fraction": 0.3, "weight": 1.5, "anneal": False, "fraction_end": 1.0},
        "release": {
            "enabled": True,
            "top_k": 8,
            "margin": "prob",
            "split_newlines": True,
            "min_segment": 2,
            "penalty": 2.0,
            "min_gain": 0.0,
        },
        "task_coef": 0.0,
        "teachers": {},
    }
    p = StageParams.from_config(section)
    assert p.signal.lam == 1.25 and p.weighting.name == "iw" and p.release.enabled and p.release.top_k == 8


def test_from_config_reads_the_shipped_yaml():
    omegaconf = pytest.importorskip("omegaconf")
    from importlib import resources

    path = resources.files("opd_verl") / "hydra_configs" / "opd_trainer.yaml"
    if not path.is_file():
        pytest.skip("base config not present")
    cfg = omegaconf.OmegaConf.load(str(path))
    p = StageParams.from_config(cfg.opd)
    assert p.signal.name == "opd" and p.weighting.name == "none" and p.release.enabled is False


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"signal": {"name": "opsd"}}, "opd.signal.name"),
        ({"signal": {"name": "opd", "lam": 1.25}}, "opd.signal.lam"),
        ({"signal": {"name": "gopd", "lam": 0.0}}, "opd.signal.lam"),
        ({"weighting": {"name": "cosine"}}, "opd.weighting.name"),
        ({"weighting": {"w_max": 0.5}}, "opd.weighting.w_max"),
        ({"weighting": {"fraction": 0.0}}, "opd.weighting.fraction"),
        ({"weighting": {"name": "suffix_mask", "anneal": True}}, "opd.weighting.anneal"),
        ({"weighting": {"typo": 1}}, "opd.weighting has unknown keys"),
        ({"release": {"min_segment": 0}}, "opd.release.min_segment"),
        ({"release": {"margin": "gap"}}, "opd.release.margin"),
        ({"release": {"penalty": -1.0}}, "opd.release.penalty"),
        ({"task_coef": math.nan}, "opd.task_coef"),
    ],
)
def test_params_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StageParams(**kwargs)


def test_missing_inputs_raise():
    s, te, r, m, sids, margins, task = _batch(5)
    with pytest.raises(ValueError, match="sentence_ids and margins"):
        compose_advantages(s, te, m, params=StageParams(release={"enabled": True}))
    with pytest.raises(ValueError, match="task_advantages"):
        compose_advantages(s, te, m, params=StageParams(task_coef=1.0))
    with pytest.raises(ValueError, match="ref_logprobs"):
        compose_advantages(s, te, m, params=StageParams(signal={"name": "gopd", "lam": 2.0}))
    with pytest.raises(ValueError, match="params"):
        compose_advantages(s, te, m, params={"signal": "opd"})


def test_all_masked_batch_is_finite():
    s = torch.full((2, 4), -math.inf)
    m = torch.zeros(2, 4)
    params = StageParams(weighting={"name": "iw"}, release={"enabled": True})
    out, metrics = compose_advantages(
        s, s, m, params=params, sentence_ids=torch.zeros(2, 4, dtype=torch.long), margins=s
    )
    assert (out == 0).all() and all(math.isfinite(v) for v in metrics.values())
