"""OPD / G-OPD signals: hand-worked values, properties, masking, errors."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_verl.objectives import discrepancy, gopd_advantages, opd_advantages


def test_hand_worked_gopd():
    s = torch.tensor([[-1.0, -2.0, -0.5]])
    t = torch.tensor([[-0.5, -1.0, -3.0]])
    r = torch.tensor([[-1.5, -1.0, -1.0]])
    m = torch.tensor([[1, 1, 0]])
    # lam=1.25: 1.25*t - 0.25*r - s
    got = gopd_advantages(s, t, m, lam=1.25, ref_logprobs=r)
    expected = torch.tensor([[1.25 * -0.5 - 0.25 * -1.5 + 1.0, 1.25 * -1.0 - 0.25 * -1.0 + 2.0, 0.0]])
    torch.testing.assert_close(got, expected)
    # lam=0.5 interpolates teacher and reference
    got = gopd_advantages(s, t, m, lam=0.5, ref_logprobs=r)
    torch.testing.assert_close(got, torch.tensor([[0.5 * -0.5 + 0.5 * -1.5 + 1.0, 0.5 * -1.0 + 0.5 * -1.0 + 2.0, 0.0]]))
    torch.testing.assert_close(opd_advantages(s, t, m), torch.tensor([[0.5, 1.0, 0.0]]))


def _tensors(seed, b, t):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(b, t, generator=g) * 5
    te = -torch.rand(b, t, generator=g) * 5
    r = -torch.rand(b, t, generator=g) * 5
    m = (torch.rand(b, t, generator=g) > 0.3).long()
    return s, te, r, m


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), b=st.integers(1, 4), t=st.integers(1, 12))
def test_lam_one_is_opd_and_ignores_ref(seed, b, t):
    s, te, r, m = _tensors(seed, b, t)
    bad_ref = torch.full_like(r, float("nan"))
    a = gopd_advantages(s, te, m, lam=1.0, ref_logprobs=bad_ref)
    assert torch.equal(a, gopd_advantages(s, te, m))
    assert torch.equal(a, torch.where(m.bool(), te - s, torch.zeros(())))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 4),
    t=st.integers(1, 12),
    lam=st.floats(0.05, 4.0, allow_nan=False),
)
def test_masked_positions_zero_and_padding_inf_safe(seed, b, t, lam):
    s, te, r, m = _tensors(seed, b, t)
    pad = ~m.bool()
    s = s.masked_fill(pad, float("-inf"))
    te = te.masked_fill(pad, float("nan"))
    r = r.masked_fill(pad, float("-inf"))
    a = gopd_advantages(s, te, m, lam=lam, ref_logprobs=r)
    assert torch.isfinite(a).all()
    assert (a[pad] == 0).all()
    # per-token formula at valid positions (float64 reference)
    ref = lam * te.double() + (1 - lam) * r.double() - s.double()
    torch.testing.assert_close(a[~pad].double(), ref[~pad], rtol=1e-5, atol=1e-5)


def test_per_row_lam_tensor():
    s, te, r, m = _tensors(0, 3, 5)
    lam = torch.tensor([1.0, 1.25, 0.5])
    a = gopd_advantages(s, te, m, lam=lam, ref_logprobs=r)
    for row, value in enumerate(lam.tolist()):
        single = gopd_advantages(s[row : row + 1], te[row : row + 1], m[row : row + 1], value, r[row : row + 1])
        torch.testing.assert_close(a[row : row + 1], single)
    # rows with lam == 1 never read the reference
    r_nan = r.clone()
    r_nan[0] = float("nan")
    assert torch.isfinite(gopd_advantages(s, te, m, lam=lam, ref_logprobs=r_nan)).all()
    with pytest.raises(ValueError, match="ref_logprobs"):
        gopd_advantages(s, te, m, lam=lam)
    assert torch.equal(gopd_advantages(s, te, m, lam=torch.ones(3)), opd_advantages(s, te, m))


@pytest.mark.parametrize("lam", [0.0, -1.0, math.inf, math.nan, True, "1"])
def test_bad_lam(lam):
    s, te, r, m = _tensors(0, 2, 3)
    with pytest.raises(ValueError, match="lam"):
        gopd_advantages(s, te, m, lam=lam, ref_logprobs=r)


def test_lam_not_one_needs_ref():
    s, te, _, m = _tensors(0, 2, 3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        gopd_advantages(s, te, m, lam=1.25)


def test_non_finite_at_valid_token_raises():
    s, te, r, m = _tensors(0, 2, 3)
    m = torch.ones_like(m)
    te[1, 1] = float("-inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        discrepancy(s, te, m)


def test_shape_mismatch_names_argument():
    with pytest.raises(ValueError, match="teacher_logprobs"):
        gopd_advantages(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))


def test_detached_and_float32():
    s = torch.randn(2, 3, dtype=torch.bfloat16, requires_grad=True)
    te = torch.randn(2, 3, dtype=torch.bfloat16)
    a = gopd_advantages(s, te, torch.ones(2, 3))
    assert a.dtype == torch.float32 and not a.requires_grad


def test_all_masked_and_length_one():
    s, te, r, _ = _tensors(1, 2, 1)
    m = torch.tensor([[0], [1]])
    a = gopd_advantages(s, te, m, lam=1.5, ref_logprobs=r)
    assert a[0, 0] == 0 and torch.isfinite(a).all()
