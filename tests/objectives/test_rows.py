"""Row-block helpers (opd_verl/objectives/rows.py) against direct computations, and row-block independence of
every objective: results with one row per block equal those with the whole batch in one block."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_verl.objectives import (
    StageParams,
    apply_release,
    compose_advantages,
    discrepancy,
    gopd_advantages,
    iw_opd_advantages,
    iw_opd_weights,
    position_decile_means,
    release,
)
from opd_verl.objectives import rows as rows_module
from opd_verl.objectives.rows import BLOCK, BlockPrefix, RowBuffers, load_mask, load_masked

CPU = torch.device("cpu")


@settings(max_examples=30, deadline=None)
@given(length=st.integers(1, 3 * BLOCK + 5), seed=st.integers(0, 1000), f64=st.booleans())
def test_block_prefix_at_and_first_reaching_match_direct_sums(length, seed, f64):
    g = torch.Generator().manual_seed(seed)
    bufs = RowBuffers(3, length, CPU, ("values", "mask"), {"values": torch.float64} if f64 else None)
    values = torch.rand(3, length, generator=g, dtype=torch.float64)
    mask = (torch.rand(3, length, generator=g) > 0.4).float()
    bufs["values", 3].copy_(values)
    bufs["mask", 3].copy_(mask)
    positions = torch.randint(0, length + 1, (3, 7), generator=g)
    positions[:, 0], positions[:, 1] = 0, length
    got = BlockPrefix(bufs.full("values", 3), torch.float64).at(positions)
    stored = bufs["values", 3].double()  # the values as the buffer holds them
    for r in range(3):
        for q in range(7):
            expected = float(stored[r, : int(positions[r, q])].sum())
            assert float(got[r, q]) == pytest.approx(expected, rel=1e-6, abs=1e-9)

    counts = BlockPrefix(bufs.full("mask", 3))
    totals = mask.sum(dim=-1).long()
    targets = torch.stack([torch.arange(7) * (int(t) + 1) // 6 for t in totals])  # 0 .. total + 1
    reached = counts.first_reaching(targets)
    for r in range(3):
        for q in range(7):
            k = int(targets[r, q])
            if k == 0:
                assert reached[r, q] == 0
            elif k <= totals[r]:
                # smallest p with k valid tokens in [0, p)
                p = next(p for p in range(length + 1) if mask[r, :p].sum() >= k)
                assert reached[r, q] == p
            else:
                assert reached[r, q] > length


def test_row_buffers_keep_padding_zero():
    bufs = RowBuffers(2, 70, CPU, ("a", "b"), {"b": torch.float64})
    assert bufs.full("a", 2).shape == (2, 192) and bufs.full("b", 2).dtype == torch.float64
    bufs["a", 2].fill_(3.0)
    bufs["b", 2].fill_(2.0)
    assert (bufs.full("a", 2)[:, 70:] == 0).all() and (bufs.full("b", 2)[:, 70:] == 0).all()
    assert float(bufs.full("a", 2).sum()) == 3.0 * 140 and float(bufs.full("b", 2).sum()) == 2.0 * 140


@pytest.mark.parametrize(
    "mask, expected",
    [
        (torch.tensor([[1.0, 0.0, 1.0]]), [1.0, 0.0, 1.0]),
        (torch.tensor([[0.5, 0.0, 2.0]]), [1.0, 0.0, 1.0]),  # nonzero = valid, as response_mask.bool()
        (torch.tensor([[2, 0, 1]]), [1.0, 0.0, 1.0]),
        (torch.tensor([[True, False, True]]), [1.0, 0.0, 1.0]),
        (torch.tensor([[-1.0, 0.0, 1.0]]), [1.0, 0.0, 1.0]),
    ],
)
def test_load_mask_means_nonzero(mask, expected):
    bufs = RowBuffers(1, 3, CPU, ("mask",))
    load_mask(bufs["mask", 1], mask, bufs.full("mask", 1))
    assert bufs["mask", 1].tolist() == [expected]


@pytest.mark.parametrize("padding", [0.3, -math.inf, math.inf, math.nan])
def test_load_masked_equals_where_whatever_the_padding(padding):
    src = torch.tensor([[-1.5, 2.0, padding, padding], [padding, -0.25, 4.0, padding]])
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 0]])
    bufs = RowBuffers(2, 4, CPU, ("mask", "x"))
    load_mask(bufs["mask", 2], mask, bufs.full("mask", 2))
    total = load_masked(bufs["x", 2], src, bufs["mask", 2], mask, "x", 0, bufs.full("x", 2))
    expected = torch.where(mask.bool(), src, torch.zeros(()))
    assert torch.equal(bufs["x", 2], expected) and total == pytest.approx(float(expected.sum()))


def test_load_masked_keeps_huge_finite_values_exactly():
    src = torch.tensor([[1e25, -3e30, -math.inf]])
    mask = torch.tensor([[1, 1, 0]])
    bufs = RowBuffers(1, 3, CPU, ("mask", "x"))
    load_mask(bufs["mask", 1], mask, bufs.full("mask", 1))
    load_masked(bufs["x", 1], src, bufs["mask", 1], mask, "x", 0, bufs.full("x", 1))
    assert bufs["x", 1].tolist() == torch.tensor([[1e25, -3e30, 0.0]]).tolist()


@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_load_masked_names_input_and_absolute_row(bad):
    src = torch.zeros(2, 3)
    src[1, 2] = bad
    bufs = RowBuffers(2, 3, CPU, ("mask", "x"))
    mask = torch.ones(2, 3)
    load_mask(bufs["mask", 2], mask, bufs.full("mask", 2))
    with pytest.raises(ValueError, match=r"teacher_logprobs has NaN/inf at 1 valid response tokens \(rows \[8\]\)"):
        load_masked(bufs["x", 2], src, bufs["mask", 2], mask, "teacher_logprobs", 7, bufs.full("x", 2))


def _batch(seed, b=6, t=150):
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
    task = torch.randn(b, t, generator=g)
    return s, te, r, m.long(), sids, margins, task


def _one_row_blocks(monkeypatch):
    monkeypatch.setattr(rows_module, "_CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("weighting", ["none", "iw", "prefix_weight"])
@pytest.mark.parametrize("seed", [0, 1])
def test_one_row_per_block_equals_one_block(monkeypatch, weighting, seed):
    s, te, r, m, sids, margins, task = _batch(seed)
    params = StageParams(
        signal={"name": "gopd", "lam": 1.25},
        weighting={"name": weighting, "w_max": 1.7},
        release={"enabled": True, "min_segment": 2, "penalty": 1.0},
        task_coef=0.5,
    )
    kwargs = dict(params=params, ref_logprobs=r, sentence_ids=sids, margins=margins, task_advantages=task)

    def everything():
        adv = gopd_advantages(s, te, m, 1.25, r)
        out = [adv, discrepancy(s, te, m), iw_opd_weights(discrepancy(s, te, m), m, 1.7)]
        out.append(iw_opd_advantages(adv, m, 1.7, discrepancy(s, te, m)))
        out.extend(release(adv, m, sids, margins, 2, 1.0))
        return out, compose_advantages(s, te, m, **kwargs)

    whole, (composed, metrics) = everything()
    _one_row_blocks(monkeypatch)
    split, (composed_split, metrics_split) = everything()
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(composed, composed_split, rtol=1e-6, atol=1e-6)
    assert metrics.keys() == metrics_split.keys()
    for key, value in metrics.items():
        assert metrics_split[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key


def test_error_rows_are_batch_rows_in_any_block(monkeypatch):
    _one_row_blocks(monkeypatch)
    s, te, r, m, *_ = _batch(3)
    m = torch.ones_like(m)
    te[4, 7] = math.nan
    with pytest.raises(ValueError, match=r"teacher_logprobs .*rows \[4\]"):
        compose_advantages(s.clamp_min(-10), te, m, params=StageParams())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 1000), weighting=st.sampled_from(["none", "iw", "prefix_mask", "suffix_mask"]))
def test_compose_metrics_equal_direct_computation(seed, weighting):
    s, te, r, m, sids, margins, _ = _batch(seed)
    params = StageParams(
        signal={"name": "gopd", "lam": 1.5}, weighting={"name": weighting, "w_max": 1.6, "fraction": 0.4}
    )
    out, metrics = compose_advantages(s, te, m, params=params, ref_logprobs=r)
    valid = m.bool()
    disc = discrepancy(s, te, m)
    signal = gopd_advantages(s, te, m, 1.5, r)
    weights = torch.where(valid, out / torch.where(signal == 0, torch.ones(()), signal), torch.zeros(()))
    if weighting == "iw":
        weights = iw_opd_weights(disc, m, 1.6)
    elif weighting == "none":
        weights = valid.float()
    else:
        from opd_verl.objectives import position_mask_weights

        weights = position_mask_weights(m, weighting, 0.4)
    approx = dict(rel=1e-5, abs=1e-5)
    assert metrics["opd/discrepancy"] == pytest.approx(float(disc[valid].mean()), **approx)
    assert metrics["opd/abs_discrepancy"] == pytest.approx(float(disc[valid].abs().mean()), **approx)
    assert metrics["opd/signal"] == pytest.approx(float(signal[valid].mean()), **approx)
    assert metrics["opd/advantage"] == pytest.approx(float(out[valid].mean()), **approx)
    assert metrics["opd/weight_mean"] == pytest.approx(float(weights[valid].mean()), **approx)
    assert metrics["opd/weight_min"] == pytest.approx(float(weights[valid].min()), **approx)
    assert metrics["opd/weight_max"] == pytest.approx(float(weights[valid].max()), **approx)
    deciles, _ = position_decile_means(disc, m)
    for k in range(10):
        assert metrics[f"opd/discrepancy_decile/{k}"] == pytest.approx(float(deciles[k]), **approx)


def test_sorted_and_general_release_paths_agree():
    """Row-sorted ids take the block path; the same sentences with arbitrary ids at masked positions take the
    general path. Both must give the same release (the block path sums float32 margins within blocks of 64 in
    float32, so the gains agree to ~1e-6 relative)."""
    s, te, r, m, sids, margins, _ = _batch(5)
    adv = gopd_advantages(s, te, m)
    sorted_out = release(adv, m, sids, margins, 2, 1.0)
    scrambled = torch.where(m.bool(), sids, torch.randint(0, 1000, sids.shape))
    general_out = release(adv, m, scrambled, margins, 2, 1.0)
    for a, b in zip(sorted_out, general_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9, check_dtype=False)
    assert bool(sorted_out.accepted.any())


def test_release_index_skips_a_masked_first_token():
    # sentence 2 starts at position 4, which is masked: its first valid token is position 5
    adv = torch.ones(1, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 1, 1, 1]])
    sids = torch.tensor([[0, 0, 1, 1, 2, 2, 3, 3]])
    margins = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.5, 0.1, 0.1, 0.1]])
    out, index = apply_release(adv, mask, sids, margins, min_segment=2, penalty=0.0)
    assert index.tolist() == [5]
    assert out.tolist() == [[7 / 4] * 4 + [0.0] * 4]


@pytest.mark.parametrize("scramble", [False, True])
def test_nan_margin_names_its_batch_row_on_both_release_paths(monkeypatch, scramble):
    _one_row_blocks(monkeypatch)
    s, te, r, m, sids, margins, _ = _batch(4)
    m = torch.ones_like(m)
    if scramble:  # unsorted ids (a valid row may not descend, so scramble only a masked tail)
        m[:, -3:] = 0
        sids[:, -3:] = torch.tensor([7, 0, 3])
    margins[3, 5] = math.nan
    params = StageParams(release={"enabled": True})
    with pytest.raises(ValueError, match=r"margins has NaN/inf .*rows \[3\]"):
        compose_advantages(s.clamp_min(-10), te, m, params=params, sentence_ids=sids, margins=margins)
