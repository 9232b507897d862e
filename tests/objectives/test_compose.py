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
    signal=st.sampled_from(["opd", "gopd"]),
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
    assert metrics["opd/release/point_token"] == 4.0  # row 0 released from its 5th token on; row 1 not released
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


def _ragged_batch(seed, b=6, t=150):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(b, t, generator=g) * 4
    te = -torch.rand(b, t, generator=g) * 4
    r = -torch.rand(b, t, generator=g) * 4
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    m = (torch.arange(t)[None, :] < lengths[:, None]) & (torch.rand(b, t, generator=g) > 0.15)
    m[0] = False  # an all-masked row
    s = s.masked_fill(~m, -math.inf)
    sids = (torch.arange(t)[None, :] * 9 // lengths[:, None].clamp_min(1)).clamp_max(8)
    margins = torch.rand(b, t, generator=g)
    margins = torch.where(torch.arange(t)[None, :] > lengths[:, None] // 2, margins * 0.2, margins)
    return s, te, r, m.long(), sids, margins


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), weighting=st.sampled_from(["none", "iw", "prefix_mask", "suffix_mask"]))
def test_compose_metrics_equal_direct_computation(seed, weighting):
    s, te, r, m, sids, margins = _ragged_batch(seed)
    params = StageParams(
        signal={"name": "gopd", "lam": 1.5}, weighting={"name": weighting, "w_max": 1.6, "fraction": 0.4}
    )
    out, metrics = compose_advantages(s, te, m, params=params, ref_logprobs=r)
    valid = m.bool()
    disc = gopd_advantages(s, te, m)
    signal = gopd_advantages(s, te, m, 1.5, r)
    if weighting == "iw":
        weights = iw_opd_weights(disc, m, 1.6)
    elif weighting == "none":
        weights = valid.float()
    else:
        weights = position_mask_weights(m, weighting, 0.4)
    approx = dict(rel=1e-5, abs=1e-5)
    assert metrics["opd/discrepancy"] == pytest.approx(float(disc[valid].mean()), **approx)
    assert metrics["opd/abs_discrepancy"] == pytest.approx(float(disc[valid].abs().mean()), **approx)
    assert metrics["opd/signal"] == pytest.approx(float(signal[valid].mean()), **approx)
    assert metrics["opd/advantage"] == pytest.approx(float(out[valid].mean()), **approx)
    assert metrics["opd/weight_mean"] == pytest.approx(float(weights[valid].mean()), **approx)
    assert metrics["opd/weight_min"] == pytest.approx(float(weights[valid].min()), **approx)
    assert metrics["opd/weight_max"] == pytest.approx(float(weights[valid].max()), **approx)
    # deciles by a loop over rows: rank r of n valid tokens falls in decile floor(10 r / n)
    sums, counts = [0.0] * 10, [0] * 10
    for row in range(m.shape[0]):
        values = disc[row][valid[row]].tolist()
        for rank, value in enumerate(values):
            sums[10 * rank // len(values)] += value
            counts[10 * rank // len(values)] += 1
    for k in range(10):
        expected = sums[k] / counts[k] if counts[k] else 0.0
        assert metrics[f"opd/discrepancy_decile/{k}"] == pytest.approx(expected, **approx)


def test_error_names_input_and_batch_row():
    s, te, r, m, *_ = _ragged_batch(3)
    m = torch.ones_like(m)
    te[4, 7] = math.nan
    with pytest.raises(ValueError, match=r"teacher_logprobs has NaN/inf at 1 valid response tokens \(rows \[4\]\)"):
        compose_advantages(s.clamp_min(-10), te, m, params=StageParams())


def test_nan_margin_names_its_batch_row():
    s, te, r, m, sids, margins = _ragged_batch(4)
    m = torch.ones_like(m)
    margins[3, 5] = math.nan
    params = StageParams(release={"enabled": True})
    with pytest.raises(ValueError, match=r"margins has NaN/inf .*rows \[3\]"):
        compose_advantages(s.clamp_min(-10), te, m, params=params, sentence_ids=sids, margins=margins)


@pytest.mark.parametrize("padding", [0.3, -math.inf, math.inf, math.nan])
@pytest.mark.parametrize("mask_dtype", [torch.long, torch.float32, torch.bool])
def test_padding_values_never_matter_and_nonzero_mask_is_valid(padding, mask_dtype):
    s, te, r, m, sids, margins = _ragged_batch(6, b=4, t=40)
    s = s.clamp_min(-10)
    params = StageParams(
        signal={"name": "gopd", "lam": 1.25}, weighting={"name": "iw"}, release={"enabled": True}, task_coef=0.5
    )
    task = torch.randn(s.shape)
    clean, clean_metrics = compose_advantages(
        s, te, m, params=params, ref_logprobs=r, sentence_ids=sids, margins=margins, task_advantages=task
    )
    pad = ~m.bool()
    dirty = [x.masked_fill(pad, padding) for x in (s, te, r, margins, task)]
    # nonzero mask values count as valid, as response_mask.bool() does
    scaled = (m * torch.where(torch.arange(40) % 2 == 0, 2, -1)).to(mask_dtype)
    out, metrics = compose_advantages(
        dirty[0],
        dirty[1],
        scaled,
        params=params,
        ref_logprobs=dirty[2],
        sentence_ids=sids,
        margins=dirty[3],
        task_advantages=dirty[4],
    )
    assert torch.equal(out, clean) and metrics == clean_metrics


def test_huge_finite_values_are_kept():
    s = torch.tensor([[1e25, -3e30, -math.inf]])
    m = torch.tensor([[1, 1, 0]])
    out, _ = compose_advantages(s, torch.zeros(1, 3), m, params=StageParams())
    assert out.tolist() == torch.tensor([[-1e25, 3e30, 0.0]]).tolist()


def test_stage_metrics_are_each_stage_mean_and_std():
    s, te, r, m, sids, margins = _ragged_batch(8)
    task = torch.randn(s.shape)
    params = StageParams(
        signal={"name": "gopd", "lam": 1.5}, weighting={"name": "iw"}, release={"enabled": True}, task_coef=0.5
    )
    out, metrics = compose_advantages(
        s, te, m, params=params, ref_logprobs=r, sentence_ids=sids, margins=margins, task_advantages=task
    )
    valid = m.bool()
    signal = gopd_advantages(s, te, m, 1.5, r)
    weighted = signal * iw_opd_weights(gopd_advantages(s, te, m), m)
    for name, values in (("signal", signal), ("weighting", weighted), ("final", out)):
        v = values[valid].double()
        assert metrics[f"opd/stage/{name}/adv_mean"] == pytest.approx(float(v.mean()), rel=1e-5, abs=1e-6)
        assert metrics[f"opd/stage/{name}/adv_std"] == pytest.approx(float(v.std(unbiased=False)), rel=1e-4)
