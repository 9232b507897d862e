"""Generalized JSD: per-position loop reference, TRL GKD oracle, chunked == unchunked, top-k, edge cases."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from opd_verl.objectives import generalized_jsd, topk_generalized_jsd

BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def _loop_reference(student, teacher, beta, temperature, clip, with_flags=False):
    """Per-position, per-vocab-entry float64 loop straight from the definition (and, optionally, the clip flags:
    whether some term of the position is above the clip)."""
    s = torch.log_softmax(student.double() / temperature, -1)
    t = torch.log_softmax(teacher.double() / temperature, -1)
    out = torch.zeros(student.shape[:-1], dtype=torch.float64)
    flags = torch.zeros(student.shape[:-1], dtype=torch.bool)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in student.shape[:-1]]).reshape(-1, student.dim() - 1):
        idx = tuple(idx.tolist())
        total = 0.0
        for v in range(student.shape[-1]):
            ps, pt = math.exp(s[idx + (v,)]), math.exp(t[idx + (v,)])
            if beta == 0:
                term = pt * (t[idx + (v,)] - s[idx + (v,)]) if pt > 0 else 0.0
            elif beta == 1:
                term = ps * (s[idx + (v,)] - t[idx + (v,)])
            else:
                m = beta * pt + (1 - beta) * ps
                term = (beta * pt * (math.log(pt) - math.log(m)) if pt > 0 else 0.0) + (1 - beta) * ps * (
                    math.log(ps) - math.log(m)
                )
            if clip is not None:
                flags[idx] |= bool(term > clip)
                term = min(term, clip)
            total += float(term)
        out[idx] = total
    return (out, flags) if with_flags else out


def _two_pass_flags(student, teacher, beta, temperature, clip):
    """The clip flags as computed before they came from the divergence's own pass: a second full-vocabulary pass
    without the clip, flagged where the clipped sum is lower (same tolerance as that code had)."""
    with torch.no_grad():
        clipped = generalized_jsd(student, teacher, beta=beta, temperature=temperature, pointwise_clip=clip)
        unclipped = generalized_jsd(student, teacher, beta=beta, temperature=temperature)
    return (unclipped - clipped) > 1e-6 * unclipped.abs().clamp(min=1.0)


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_matches_per_position_loop(beta, clip):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=g) * 2
    teacher = torch.randn(2, 3, 7, generator=g) * 2
    got = generalized_jsd(student, teacher, beta=beta, temperature=1.3, pointwise_clip=clip)
    ref = _loop_reference(student, teacher, beta, 1.3, clip)
    assert got.shape == (2, 3)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


def test_hand_worked_two_token_kl():
    # p_T = (1/2, 1/2), p_S = (1/4, 3/4): KL(T||S) = 0.5 ln 2 + 0.5 ln(2/3), KL(S||T) = 0.25 ln .5 + 0.75 ln 1.5.
    student = torch.log(torch.tensor([[0.25, 0.75]]))
    teacher = torch.zeros(1, 2)
    fwd = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    rev = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert generalized_jsd(student, teacher, beta=0.0).item() == pytest.approx(fwd, rel=1e-6)
    assert generalized_jsd(student, teacher, beta=1.0).item() == pytest.approx(rev, rel=1e-6)
    # clip at 0.1 caps the per-entry terms 0.5 ln 2 = 0.347 -> 0.1 and leaves 0.5 ln(2/3) < 0.
    clipped = generalized_jsd(student, teacher, beta=0.0, pointwise_clip=0.1).item()
    assert clipped == pytest.approx(0.1 + 0.5 * math.log(2.0 / 3.0), rel=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_matches_trl_gkd(beta):
    gkd = pytest.importorskip("trl.experimental.gkd")
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 5, 11, generator=g) * 3
    teacher = torch.randn(2, 5, 11, generator=g) * 3
    temperature = 0.7
    ref = gkd.GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=temperature, reduction="none")
    got = generalized_jsd(student, teacher, beta=beta, temperature=temperature)
    torch.testing.assert_close(got, ref.sum(-1), rtol=1e-5, atol=1e-6)
    # gradients w.r.t. the student logits agree too
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    gkd.GKDTrainer.generalized_jsd_loss(s1, teacher, beta=beta, temperature=temperature, reduction="sum").backward()
    generalized_jsd(s2, teacher, beta=beta, temperature=temperature).sum().backward()
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("clip", [None, 0.02])
def test_chunked_equals_unchunked(chunk_size, beta, clip):
    g = torch.Generator().manual_seed(2)
    student = torch.randn(3, 7, 13, generator=g) * 2
    teacher = torch.randn(3, 7, 13, generator=g) * 2
    weights = torch.randn(3, 7, generator=g)
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    full = generalized_jsd(s1, teacher, beta=beta, temperature=1.1, pointwise_clip=clip)
    chunked = generalized_jsd(s2, teacher, beta=beta, temperature=1.1, pointwise_clip=clip, chunk_size=chunk_size)
    # rows are computed independently; only the vectorised kernels' float32 rounding may differ (1 ulp)
    torch.testing.assert_close(chunked, full, rtol=1e-6, atol=1e-7)
    (full * weights).sum().backward()
    (chunked * weights).sum().backward()
    # the chunked backward is closed-form: equal to autograd through the unchunked graph up to float32 rounding
    torch.testing.assert_close(s2.grad, s1.grad, rtol=1e-5, atol=1e-6)


def test_chunked_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    student = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(5, 4, generator=g, dtype=torch.float64)
    # float32 inside: compare the chunked gradient with the unchunked one on the same float32 path
    out = generalized_jsd(student, teacher, beta=0.3, chunk_size=2)
    (grad,) = torch.autograd.grad(out.sum(), student)
    student2 = student.detach().clone().requires_grad_(True)
    (grad2,) = torch.autograd.grad(generalized_jsd(student2, teacher, beta=0.3).sum(), student2)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, grad2)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    v=st.integers(2, 12),
    chunk=st.integers(1, 10),
    beta=st.sampled_from(BETAS),
    seed=st.integers(0, 10_000),
)
def test_chunked_property(n, v, chunk, beta, seed):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(n, v, generator=g) * 4
    teacher = torch.randn(n, v, generator=g) * 4
    s1 = student.clone().requires_grad_(True)
    s2 = student.clone().requires_grad_(True)
    a = generalized_jsd(s1, teacher, beta=beta)
    b = generalized_jsd(s2, teacher, beta=beta, chunk_size=chunk)
    # float32 rounding only: a chunk is reduced in another order than the whole batch
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(a).all() and (a >= -1e-5).all()
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-5)


def test_bf16_input_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    student = (torch.randn(4, 9, generator=g) * 2).bfloat16()
    teacher = (torch.randn(4, 9, generator=g) * 2).bfloat16()
    out = generalized_jsd(student, teacher, beta=0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, generalized_jsd(student.float(), teacher.float(), beta=0.5))


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("clip", [None, 0.05])
def test_neg_inf_teacher_logits_finite_loss_and_grad(beta, clip):
    student = torch.randn(3, 6, requires_grad=True)
    teacher = torch.randn(3, 6)
    teacher[:, -2:] = float("-inf")  # e.g. padded vocabulary entries
    out = generalized_jsd(student, teacher, beta=beta, pointwise_clip=clip, chunk_size=2)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(student.grad).all()
    # same gradient as autograd through the unchunked computation
    other = student.detach().clone().requires_grad_(True)
    generalized_jsd(other, teacher, beta=beta, pointwise_clip=clip).sum().backward()
    torch.testing.assert_close(student.grad, other.grad, rtol=1e-5, atol=1e-6)


def test_neg_inf_teacher_reverse_kl_is_inf_not_nan():
    # KL(student || teacher) is truly infinite when the teacher gives 0 where the student does not
    student = torch.zeros(1, 3)
    teacher = torch.tensor([[0.0, 0.0, float("-inf")]])
    out = generalized_jsd(student, teacher, beta=1.0)
    assert out.item() == float("inf")


def test_teacher_gets_no_gradient():
    student = torch.randn(2, 5, requires_grad=True)
    teacher = torch.randn(2, 5, requires_grad=True)
    generalized_jsd(student, teacher, beta=0.5, chunk_size=1).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"beta": 1.5}, "beta"),
        ({"beta": float("nan")}, "beta"),
        ({"temperature": 0.0}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"pointwise_clip": float("nan")}, "pointwise_clip"),
    ],
)
def test_bad_arguments_raise(kwargs, field):
    with pytest.raises(ValueError, match=field):
        generalized_jsd(torch.zeros(2, 3), torch.zeros(2, 3), **kwargs)


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        generalized_jsd(torch.zeros(2, 3), torch.zeros(2, 4))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_topk_equals_gjsd_on_gathered_renormalised(beta):
    g = torch.Generator().manual_seed(5)
    student = torch.randn(2, 4, 20, generator=g) * 2
    teacher = torch.randn(2, 4, 20, generator=g) * 2
    k = 5
    got = topk_generalized_jsd(student, teacher, k=k, beta=beta, temperature=1.2)
    ids = teacher.topk(k, -1).indices
    # independent: loop reference on the gathered k-way logits (renormalisation happens inside the softmax)
    ref = _loop_reference(student.gather(-1, ids), teacher.gather(-1, ids), beta, 1.2, None)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)
    # the teacher's top-k log-probs (shifted by a per-position constant) give the same value
    logprobs = torch.log_softmax(teacher, -1).gather(-1, ids)
    alt = topk_generalized_jsd(
        student, k=k, beta=beta, temperature=1.2, teacher_topk_values=logprobs, teacher_topk_ids=ids
    )
    torch.testing.assert_close(alt, got, rtol=1e-5, atol=1e-6)
    # k = V equals the full-vocabulary divergence
    full_k = topk_generalized_jsd(student, teacher, k=20, beta=beta, temperature=1.2)
    torch.testing.assert_close(
        full_k, generalized_jsd(student, teacher, beta=beta, temperature=1.2), rtol=1e-5, atol=1e-6
    )


def test_topk_bad_arguments():
    with pytest.raises(ValueError, match="k must be"):
        topk_generalized_jsd(torch.zeros(2, 3), torch.zeros(2, 3), k=4)
    with pytest.raises(ValueError, match="teacher_logits"):
        topk_generalized_jsd(torch.zeros(2, 3))


def _flag_case():
    """Hand-made rows around a clip of 0.05: one-sided, near-equal and equal rows, -inf teacher entries."""
    g = torch.Generator().manual_seed(11)
    student = torch.randn(7, 9, generator=g) * 2
    teacher = torch.randn(7, 9, generator=g) * 2
    teacher[1] = student[1]  # identical rows: every term is 0, never clipped
    teacher[4] = student[4] + 0.01 * torch.randn(9, generator=g)  # tiny terms, below the clip
    teacher[2, -3:] = float("-inf")  # masked vocabulary entries (probability 0 under the teacher)
    teacher[5, :4] = float("-inf")
    return student, teacher


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 6, 7])
def test_clip_flags_from_the_same_pass(beta, chunk_size):
    student, teacher = _flag_case()
    if beta == 1.0:  # KL(S || T) is infinite where the teacher has -inf; keep those rows finite for this variant
        teacher = teacher.clamp(min=-30.0)
    clip = 0.05
    leaf = student.clone().requires_grad_(True)
    div, flags = generalized_jsd(
        leaf, teacher, beta=beta, temperature=1.1, pointwise_clip=clip, chunk_size=chunk_size, return_clipped=True
    )
    ref, ref_flags = _loop_reference(student, teacher, beta, 1.1, clip, with_flags=True)
    assert flags.dtype == torch.bool and flags.shape == (7,)
    assert 0 < int(flags.sum()) < 7  # the case has flagged and unflagged rows
    assert not flags[1] and not flags[4]
    assert torch.equal(flags, ref_flags)
    assert torch.equal(flags, _two_pass_flags(student, teacher, beta, 1.1, clip))
    torch.testing.assert_close(div.double(), ref, rtol=1e-5, atol=1e-6)
    # the value (and its gradient) is the one the call without flags returns
    plain = student.clone().requires_grad_(True)
    alone = generalized_jsd(plain, teacher, beta=beta, temperature=1.1, pointwise_clip=clip, chunk_size=chunk_size)
    assert torch.equal(div, alone)
    weights = torch.arange(1.0, 8.0)
    (div * weights).sum().backward()
    (alone * weights).sum().backward()
    torch.testing.assert_close(leaf.grad, plain.grad, rtol=0, atol=0)
    assert not flags.requires_grad


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_clip_flags_off_and_topk(beta):
    student, teacher = _flag_case()
    teacher = teacher.clamp(min=-30.0)
    div, flags = generalized_jsd(student, teacher, beta=beta, chunk_size=2, return_clipped=True)
    assert not flags.any()
    torch.testing.assert_close(div, generalized_jsd(student, teacher, beta=beta))
    # top-k: the flags are those of the k-way distributions
    ids = teacher.topk(4, dim=-1).indices
    div_k, flags_k = topk_generalized_jsd(student, teacher, k=4, beta=beta, pointwise_clip=0.05, return_clipped=True)
    s_k, t_k = student.gather(-1, ids), teacher.gather(-1, ids)
    ref, ref_flags = _loop_reference(s_k, t_k, beta, 1.0, 0.05, with_flags=True)
    assert torch.equal(flags_k, ref_flags) and ref_flags.any()
    torch.testing.assert_close(div_k.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5])
def test_chunked_graph_keeps_only_the_inputs_even_within_one_chunk(beta):
    """With a chunk size, a call's graph saves its two inputs only (the backward recomputes), also when every
    position fits in one chunk: many such calls waiting for one backward hold no `(N, V)` intermediates."""
    g = torch.Generator().manual_seed(5)
    student = torch.randn(6, 50, generator=g, requires_grad=True)
    teacher = torch.randn(6, 50, generator=g)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    for chunk_size, bound in ((None, None), (6, 2 * 6 * 50), (64, 2 * 6 * 50), (4, 2 * 6 * 50)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = generalized_jsd(student, teacher, beta=beta, pointwise_clip=0.05, chunk_size=chunk_size)
        if bound is None:
            assert sum(saved) > 3 * 6 * 50  # plain autograd keeps several (N, V) intermediates
            ref = out
            ref_grad = torch.autograd.grad(out.sum(), student)[0]
            continue
        assert sum(saved) <= bound, (chunk_size, saved)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.autograd.grad(out.sum(), student)[0], ref_grad, rtol=1e-5, atol=1e-7)
