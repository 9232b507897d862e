"""IW-OPD weights and position masks: loop reference, TRL IWOPDTrainer oracle, properties, errors."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_verl.objectives import (
    cosine_fraction,
    iw_opd_advantages,
    iw_opd_weights,
    position_decile_means,
    position_mask_weights,
)


def _loop_iw(disc, mask, w_max):
    """Naive per-token loop, straight from docs/objectives.md section 3 (float64)."""
    out = torch.zeros(disc.shape, dtype=torch.float64)
    for b in range(disc.shape[0]):
        total = sum(abs(float(disc[b, t])) for t in range(disc.shape[1]) if mask[b, t])
        acc = 0.0
        for t in range(disc.shape[1]):
            if not mask[b, t]:
                continue
            frac = acc / (total + 1e-8)
            out[b, t] = 1 + (w_max - 1) * min(max(1 - frac, 0.0), 1.0)
            acc += abs(float(disc[b, t]))
    return out


def test_hand_worked_iw():
    # |D| = 1, 3, (masked), 0, 4 -> total 8; exclusive prefix 0, 1, -, 4, 4 -> F = 0, 1/8, 1/2, 1/2
    disc = torch.tensor([[1.0, -3.0, 7.0, 0.0, 4.0]])
    mask = torch.tensor([[1, 1, 0, 1, 1]])
    w = iw_opd_weights(disc, mask, w_max=2.0)
    torch.testing.assert_close(w, torch.tensor([[2.0, 1 + 7 / 8, 0.0, 1.5, 1.5]]))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 4),
    t=st.integers(1, 16),
    w_max=st.floats(1.0, 3.0),
    zero_rows=st.booleans(),
)
def test_iw_matches_loop_and_properties(seed, b, t, w_max, zero_rows):
    g = torch.Generator().manual_seed(seed)
    disc = torch.randn(b, t, generator=g) * 2
    mask = (torch.rand(b, t, generator=g) > 0.3).long()
    if zero_rows:
        disc[0] = 0.0
    disc_padded = disc.masked_fill(~mask.bool(), float("-inf"))
    w = iw_opd_weights(disc_padded, mask, w_max)
    torch.testing.assert_close(w.double(), _loop_iw(disc, mask, w_max), rtol=1e-5, atol=1e-5)
    assert torch.isfinite(w).all()
    assert (w[~mask.bool()] == 0).all()
    for row in range(b):
        valid = w[row][mask[row].bool()]
        if valid.numel():
            assert valid[0] == pytest.approx(w_max)
            assert (valid >= 1 - 1e-6).all() and (valid <= w_max + 1e-6).all()
            assert (valid[1:] <= valid[:-1] + 1e-6).all()
    if zero_rows and mask[0].any():
        assert torch.allclose(w[0][mask[0].bool()], torch.full((int(mask[0].sum()),), w_max))


def test_iw_matches_trl_iwopd_loss():
    iw_mod = pytest.importorskip("trl.experimental.iw_opd.iw_opd_trainer")
    g = torch.Generator().manual_seed(7)
    b, t, v = 3, 9, 17
    logits = torch.randn(b, t, v, generator=g)
    tokens = torch.randint(0, v, (b, t), generator=g)
    teacher = -torch.rand(b, t, generator=g) * 4
    mask = torch.ones(b, t, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3] = 0  # a zero inside the response
    labels = torch.where(mask.bool(), tokens, torch.full_like(tokens, -100))
    gamma, temperature = 0.7, 1.0
    fake = SimpleNamespace(
        temperature=temperature,
        iw_opd_gamma=gamma,
        iw_opd_epsilon=1e-8,
        model=SimpleNamespace(training=True),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    trl_logits = logits.clone().requires_grad_(True)
    trl_loss = iw_mod.IWOPDTrainer._compute_iw_opd_loss(fake, trl_logits, tokens, labels, teacher)
    trl_loss.backward()

    ours_logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(ours_logits / temperature, -1).gather(-1, tokens[..., None]).squeeze(-1)
    adv = iw_opd_advantages(teacher - logp.detach(), mask, w_max=1 + gamma)
    ours = -(logp * adv * mask).sum() / mask.sum()
    ours.backward()
    torch.testing.assert_close(ours, trl_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad, rtol=1e-5, atol=1e-7)
    w = iw_opd_weights(teacher - logp.detach(), mask, 1 + gamma)
    assert fake._metrics["train"]["iw_opd/mean_weight"][0] == pytest.approx(float(w[mask.bool()].mean()), rel=1e-5)


def test_iw_advantages_uses_given_discrepancy():
    adv = torch.tensor([[2.0, 2.0, 2.0]])
    disc = torch.tensor([[1.0, 0.0, 1.0]])
    mask = torch.ones(1, 3)
    out = iw_opd_advantages(adv, mask, w_max=1.5, discrepancy=disc)
    torch.testing.assert_close(out, 2.0 * iw_opd_weights(disc, mask, 1.5))


@pytest.mark.parametrize("w_max", [0.99, math.nan, math.inf, -1.0])
def test_bad_w_max(w_max):
    with pytest.raises(ValueError, match="w_max"):
        iw_opd_weights(torch.zeros(1, 2), torch.ones(1, 2), w_max=w_max)


def _loop_position(mask, mode, fraction, weight):
    out = torch.zeros(mask.shape)
    for b in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[b, t]]
        k = math.ceil(round(fraction * len(idx), 9))
        for rank, t in enumerate(idx):
            if mode == "prefix_mask":
                out[b, t] = 1.0 if rank < k else 0.0
            elif mode == "suffix_mask":
                out[b, t] = 1.0 if rank >= len(idx) - k else 0.0
            else:
                out[b, t] = weight if rank < k else 1.0
    return out


def test_hand_worked_position():
    mask = torch.tensor([[1] * 10, [1, 1, 0, 1, 1, 1, 1, 0, 0, 0]])
    # 0.3 * 10 = 3 tokens exactly (no float round-up to 4); 0.3 * 6 = 1.8 -> 2 valid tokens
    pm = position_mask_weights(mask, "prefix_mask", 0.3)
    assert pm[0].tolist() == [1.0] * 3 + [0.0] * 7
    assert pm[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    sm = position_mask_weights(mask, "suffix_mask", 0.3)
    assert sm[1].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    pw = position_mask_weights(mask, "prefix_weight", 0.3, weight=2.0)
    assert pw[1].tolist() == [2, 2, 0, 1, 1, 1, 1, 0, 0, 0]


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    mode=st.sampled_from(["prefix_mask", "suffix_mask", "prefix_weight"]),
    fraction=st.sampled_from([0.1, 0.25, 0.3, 0.5, 0.7, 1.0]),
    t=st.integers(1, 20),
)
def test_position_matches_loop(seed, mode, fraction, t):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(3, t, generator=g) > 0.4).long()
    got = position_mask_weights(mask, mode, fraction, weight=1.7)
    torch.testing.assert_close(got, _loop_position(mask, mode, fraction, 1.7))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"mode": "middle"}, "mode"),
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.1}, "fraction"),
        ({"weight": -1.0}, "weight"),
    ],
)
def test_position_bad_args(kwargs, field):
    args = {"mode": "prefix_mask", "fraction": 0.3, "weight": 1.5} | kwargs
    with pytest.raises(ValueError, match=field):
        position_mask_weights(torch.ones(1, 3), **args)


def test_cosine_fraction():
    assert cosine_fraction(1, 11) == pytest.approx(0.3)
    assert cosine_fraction(11, 11) == pytest.approx(1.0)
    assert cosine_fraction(6, 11) == pytest.approx(0.65)  # p = 0.5 -> halfway
    assert cosine_fraction(3, 11) == pytest.approx(0.3 + 0.7 * (1 - math.cos(math.pi * 0.2)) / 2)
    assert cosine_fraction(50, 11) == pytest.approx(1.0)  # clamped
    assert cosine_fraction(1, 1) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="step"):
        cosine_fraction(0, 10)
    with pytest.raises(ValueError, match="total_steps"):
        cosine_fraction(1, 0)


def test_position_decile_means_hand_worked():
    values = torch.arange(20, dtype=torch.float32)[None, :]
    mask = torch.ones(1, 20)
    means, counts = position_decile_means(values, mask)
    assert counts.tolist() == [2] * 10
    torch.testing.assert_close(means, torch.arange(10, dtype=torch.float32) * 2 + 0.5)
    # masked tokens are skipped; rows with different lengths map to relative positions
    values = torch.tensor([[1.0, 2.0, 99.0], [5.0, 6.0, 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    means, counts = position_decile_means(values, mask, n_bins=2)
    # row0: ranks 0,1 of 2 -> bins 0,1 ; row1: ranks 0,1,2 of 3 -> bins 0,0,1
    assert counts.tolist() == [3, 2]
    torch.testing.assert_close(means, torch.tensor([(1 + 5 + 6) / 3, (2 + 7) / 2]))
