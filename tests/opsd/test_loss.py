import copy

import pytest
import torch

from opd_verl.objectives import generalized_jsd, topk_generalized_jsd
from opd_verl.opsd.inputs import privileged_prompt_ids
from opd_verl.opsd.loss import (
    OPSDLossParams,
    opsd_metrics,
    opsd_response_divergences,
    opsd_token_divergence,
    sampled_token_advantages,
    teacher_response_logits,
)
from opd_verl.opsd.teacher import TeacherWeights

STUDENT_T = "Q: {problem}"
TEACHER_T = "Q: {problem}\nRef: {solution}"
PROBLEMS = [("1+2", "3"), ("2*2=?", "4, since 2+2")]
RESPONSES = [[51, 52, 53, 54, 55], [60, 61, 62]]


def _setup(tokenizer):
    pad = tokenizer.pad_token_id
    s_prompts = [privileged_prompt_ids(tokenizer, STUDENT_T, p, None) for p, _ in PROBLEMS]
    t_prompts = [privileged_prompt_ids(tokenizer, TEACHER_T, p, s) for p, s in PROBLEMS]
    width = max(len(r) for r in RESPONSES)
    responses = torch.full((2, width), pad)
    mask = torch.zeros(2, width, dtype=torch.long)
    for i, r in enumerate(RESPONSES):
        responses[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return pad, s_prompts, t_prompts, responses, mask


def _rows_unpadded(model, prompt, response):
    """Direct: one unpadded forward on prompt + response; logits predicting each response token."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0]
    return logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]


def _pipeline(model, teacher, params, s_prompts, t_prompts, responses, mask, pad, max_tokens=None):
    student = [_rows_unpadded(model, p, r) for p, r in zip(s_prompts, RESPONSES)]
    with torch.no_grad(), teacher.weights():
        t_logits = teacher_response_logits(model, t_prompts, responses, mask, pad, max_tokens=max_tokens)
    t_rows = [t_logits[i, : len(r)] for i, r in enumerate(RESPONSES)]
    divs, clips = opsd_response_divergences(student, t_rows, params)
    return torch.cat(divs), torch.cat(clips), t_logits


@pytest.mark.parametrize("mode", ["frozen", "current", "ema"])
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.9])
def test_loss_equals_direct_computation(tokenizer, tiny_model, mode, beta):
    pad, s_prompts, t_prompts, responses, mask = _setup(tokenizer)
    model = tiny_model()
    init = copy.deepcopy(model)
    teacher = TeacherWeights(model, mode, ema_decay=0.7)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the policy moves away from its initial weights; the EMA follows once
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    teacher.update()
    # independent teacher model for the direct computation
    ref = copy.deepcopy(model)
    if mode in ("frozen", "ema"):
        with torch.no_grad():
            for p, p0 in zip(ref.parameters(), init.parameters()):
                p.copy_(p0 if mode == "frozen" else 0.7 * p0 + 0.3 * p)
    params = OPSDLossParams(loss="full", beta=beta, temperature=1.1, pointwise_clip=None, chunk_size=2)

    div, _, _ = _pipeline(model, teacher, params, s_prompts, t_prompts, responses, mask, pad, max_tokens=5)
    div.mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    student = torch.cat([_rows_unpadded(model, p, r) for p, r in zip(s_prompts, RESPONSES)])
    with torch.no_grad():
        teacher_rows = torch.cat([_rows_unpadded(ref, p, r) for p, r in zip(t_prompts, RESPONSES)])
    direct = generalized_jsd(student, teacher_rows, beta=beta, temperature=1.1)
    direct.mean().backward()
    torch.testing.assert_close(div, direct, rtol=1e-4, atol=1e-5)
    assert direct.min() > 0
    # the gradient is that of the student side only (teacher logits are constants), for every mode
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-4, atol=1e-6)
    for shadow in teacher.shadow.values():
        assert shadow.grad is None and not shadow.requires_grad


def test_teacher_logits_carry_no_graph_and_padding_does_not_change_them(tokenizer, tiny_model):
    pad, _, t_prompts, responses, mask = _setup(tokenizer)
    model = tiny_model()
    teacher = TeacherWeights(model, "current")
    with torch.no_grad(), teacher.weights():
        together = teacher_response_logits(model, t_prompts, responses, mask, pad)
        apart = teacher_response_logits(model, t_prompts, responses, mask, pad, max_tokens=1)
    assert not together.requires_grad and together.shape == (2, responses.shape[1], len(tokenizer))
    torch.testing.assert_close(together, apart, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for i, r in enumerate(RESPONSES):
            torch.testing.assert_close(
                together[i, : len(r)], _rows_unpadded(model, t_prompts[i], r), rtol=1e-4, atol=1e-5
            )


def test_prescaled_student_logits_give_same_divergence():
    torch.manual_seed(0)
    s = torch.randn(6, 40)
    t = torch.randn(6, 40) * 2
    params = OPSDLossParams(loss="full", beta=0.3, temperature=1.1, pointwise_clip=0.05, chunk_size=4)
    (raw,), _ = opsd_response_divergences([s], [t], params)
    (pre,), _ = opsd_response_divergences([s / 0.7], [t], params, logits_temperature=0.7)
    torch.testing.assert_close(pre, raw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(raw, generalized_jsd(s, t, 0.3, 1.1, 0.05))


def test_topk_variant_and_clip_activation():
    torch.manual_seed(1)
    s = torch.randn(7, 30, requires_grad=True)
    t = torch.randn(7, 30) * 3
    params = OPSDLossParams(loss="topk", beta=0.0, temperature=1.0, pointwise_clip=None, topk=5, chunk_size=3)
    div, clipped = opsd_token_divergence(s, t, params)
    torch.testing.assert_close(div, topk_generalized_jsd(s, t, k=5, beta=0.0, temperature=1.0))
    assert not clipped.any()
    # a loop over tokens and the teacher's top-5 ids, by hand
    for i in range(7):
        ids = t[i].topk(5).indices
        pt = torch.softmax(t[i, ids], -1)
        ps = torch.softmax(s[i, ids].detach(), -1)
        torch.testing.assert_close(div[i], (pt * (pt.log() - ps.log())).sum(), rtol=1e-5, atol=1e-6)

    full = OPSDLossParams(loss="full", beta=0.0, temperature=1.0, pointwise_clip=0.02, chunk_size=3)
    div_c, clipped = opsd_token_divergence(s, t, full)
    terms = torch.softmax(t, -1) * (torch.log_softmax(t, -1) - torch.log_softmax(s.detach(), -1))
    expected_clipped = (terms > 0.02).any(-1)
    assert expected_clipped.any()
    assert torch.equal(clipped, expected_clipped)
    torch.testing.assert_close(div_c, terms.clamp(max=0.02).sum(-1), rtol=1e-5, atol=1e-6)


def _two_pass_token_divergence(s, t, params):
    """The OPSD loss's divergence and clip flags as computed before the flags came from the same pass: the clipped
    divergence, then a second full-vocabulary pass without the clip, flagged where the clipped sum is lower."""
    div = generalized_jsd(s, t, params.beta, params.temperature, params.pointwise_clip, params.chunk_size)
    with torch.no_grad():
        unclipped = generalized_jsd(s, t, params.beta, params.temperature, None, params.chunk_size)
        clipped = (unclipped - div.detach()) > 1e-6 * unclipped.abs().clamp(min=1.0)
    return div, clipped


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_clip_flags_equal_two_pass_and_loop_over_samples(beta):
    g = torch.Generator().manual_seed(2)
    lengths = [3, 0, 5, 1, 4]  # an empty response, chunk boundaries inside and across samples (chunk_size 2)
    vocab = 11
    s_rows = [torch.randn(n, vocab, generator=g) * 2 for n in lengths]
    t_rows = [torch.randn(n, vocab, generator=g) * 2 for n in lengths]
    t_rows[2][1] = s_rows[2][1]  # a token where both agree: never clipped
    params = OPSDLossParams(loss="full", beta=beta, temperature=1.1, pointwise_clip=0.05, chunk_size=2)
    leaves = [r.clone().requires_grad_(True) for r in s_rows]
    divs, clips = opsd_response_divergences(leaves, t_rows, params)
    assert [d.shape[0] for d in divs] == lengths and [c.shape[0] for c in clips] == lengths
    for s, t, d, c in zip(s_rows, t_rows, divs, clips):
        ref_d, ref_c = _two_pass_token_divergence(s, t, params)
        assert torch.equal(c, ref_c)
        torch.testing.assert_close(d, ref_d, rtol=0, atol=0)
        for i in range(s.shape[0]):  # naive loop over the vocabulary, float64
            ps = torch.softmax(s[i].double() / 1.1, -1)
            pt = torch.softmax(t[i].double() / 1.1, -1)
            m = beta * pt + (1 - beta) * ps
            if beta == 0:  # TRL convention: the ends are the plain KLs, not the mixture formula at 0 / 1
                terms = [pt[v] * (pt[v] / ps[v]).log() for v in range(vocab)]
            elif beta == 1:
                terms = [ps[v] * (ps[v] / pt[v]).log() for v in range(vocab)]
            else:
                terms = [
                    beta * pt[v] * (pt[v] / m[v]).log() + (1 - beta) * ps[v] * (ps[v] / m[v]).log()
                    for v in range(vocab)
                ]
            assert bool(c[i]) == any(float(x) > 0.05 for x in terms)
            assert float(d[i].detach()) == pytest.approx(sum(min(float(x), 0.05) for x in terms), rel=1e-5, abs=1e-6)
    flags = torch.cat(clips)
    assert 0 < int(flags.sum()) < flags.numel()
    # the clip rate counts only tokens with a privileged context (sample 3 has none: masked out)
    ctx = torch.cat([torch.full((n,), i != 3) for i, n in enumerate(lengths)])
    lp = torch.zeros(flags.numel())
    m = opsd_metrics(torch.cat(divs), flags, lp, lp, ctx, 4, 5)
    assert m["opsd/clip_rate"] == pytest.approx(float(flags[ctx].float().mean()))
    # the gradient is unchanged by the flags
    sum(d.sum() for d in divs).backward()
    for s, t, leaf in zip(s_rows, t_rows, leaves):
        other = s.clone().requires_grad_(True)
        _two_pass_token_divergence(other, t, params)[0].sum().backward()
        torch.testing.assert_close(leaf.grad, other.grad, rtol=0, atol=0)


def test_sampled_token_advantages():
    tch = torch.tensor([[-1.0, -2.0, float("-inf")], [-0.5, -0.1, -3.0]])
    stu = torch.tensor([[-1.5, -1.0, -2.0], [-0.5, -0.4, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    adv = sampled_token_advantages(tch, stu, mask)
    assert torch.equal(adv, torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.3, -2.0]]).float()) or torch.allclose(
        adv, torch.tensor([[0.5, -1.0, 0.0], [0.0, 0.3, -2.0]])
    )
    with pytest.raises(FloatingPointError):
        sampled_token_advantages(tch, stu, torch.ones_like(mask))


def test_metrics_only_count_tokens_with_context():
    div = torch.tensor([0.1, 0.3, 5.0])
    clipped = torch.tensor([True, False, True])
    ctx = torch.tensor([True, True, False])
    m = opsd_metrics(div, clipped, torch.tensor([-1.0, -2.0, -9.0]), torch.tensor([-1.5, -1.0, 0.0]), ctx, 1, 2)
    assert m["opsd/divergence_mean"] == pytest.approx(0.2)
    assert m["opsd/clip_rate"] == pytest.approx(0.5)
    assert m["opsd/sampled_gap_mean"] == pytest.approx(-0.25)
    assert m["opsd/context_fraction"] == pytest.approx(0.5)


def test_bad_params_named():
    with pytest.raises(ValueError, match="opd.opsd.loss='kl'"):
        OPSDLossParams(loss="kl")
    with pytest.raises(ValueError, match="opd.opsd.chunk_size=0"):
        OPSDLossParams(chunk_size=0)


def test_optimisation_steps_lower_the_divergence(tokenizer, tiny_model):
    pad, s_prompts, t_prompts, responses, mask = _setup(tokenizer)
    model = tiny_model(seed=3)
    teacher = TeacherWeights(model, "frozen")
    g = torch.Generator().manual_seed(5)
    with (
        torch.no_grad()
    ):  # the student drifts away from the frozen initial policy (a random model barely reads context)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))  # fixed privileged context and fixed teacher
    params = OPSDLossParams(loss="full", beta=0.0, temperature=1.1, pointwise_clip=None, chunk_size=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(15):
        div, _, _ = _pipeline(model, teacher, params, s_prompts, t_prompts, responses, mask, pad)
        loss = div.mean()
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < 0.5 * history[0], history
