"""Chunked log-prob gather vs a direct transformers forward + log_softmax + gather of the same tiny model."""

import pytest
import torch

from opd_verl.workers.logprobs import chunked_logprobs, response_logprobs


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import Qwen2ForCausalLM

    from opd_verl.demo.tiny import tiny_qwen2_config

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=259, hidden_size=32, num_layers=2))
    return model.eval()


def _batch(seed=1, bsz=4, vocab=259):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(n),), generator=g) for n in torch.randint(2, 7, (bsz,), generator=g)]
    responses = [torch.randint(0, vocab, (int(n),), generator=g) for n in torch.randint(1, 9, (bsz,), generator=g)]
    responses[1] = responses[1][:1]
    return prompts, responses


def _direct(model, prompt, response, temperature=1.0):
    """Unpadded single-row forward: full-vocabulary log-softmax at the response positions."""
    ids = torch.cat([prompt, response]).unsqueeze(0)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    start = prompt.numel() - 1
    return logp[start : start + response.numel()]  # (n, V)


@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_direct_forward(tiny_model, chunk_size, temperature):
    prompts, responses = _batch()
    g = torch.Generator().manual_seed(5)
    cands = [torch.randint(0, 259, (r.numel(), 4), generator=g) for r in responses]
    out = response_logprobs(
        tiny_model, prompts, responses, candidates=cands, topk=3, chunk_size=chunk_size, temperature=temperature
    )
    t_max = max(r.numel() for r in responses)
    assert out["log_probs"].shape == (4, t_max)
    assert out["candidate_log_probs"].shape == (4, t_max, 4)
    assert out["topk_ids"].shape == (4, t_max, 3)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        n = r.numel()
        full = _direct(tiny_model, p, r, temperature)
        torch.testing.assert_close(
            out["log_probs"][i, :n], full.gather(-1, r.unsqueeze(-1)).squeeze(-1), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(out["candidate_log_probs"][i, :n], full.gather(-1, cands[i]), atol=1e-5, rtol=0)
        vals, ids = torch.topk(full, 3, dim=-1)
        torch.testing.assert_close(out["topk_log_probs"][i, :n], vals, atol=1e-5, rtol=0)
        torch.testing.assert_close(out["topk_ids"][i, :n], ids)
        assert out["response_mask"][i, :n].eq(1).all() and out["response_mask"][i, n:].eq(0).all()
        # padding positions are exactly 0
        assert out["log_probs"][i, n:].eq(0).all()
        assert out["candidate_log_probs"][i, n:].eq(0).all()
        assert out["topk_log_probs"][i, n:].eq(0).all() and out["topk_ids"][i, n:].eq(0).all()


def test_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 16, generator=g)
    weight = torch.randn(50, 16, generator=g)
    bias = torch.randn(50, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    cands = torch.randint(0, 50, (37, 5), generator=g)
    ref = chunked_logprobs(hidden, weight, labels, cands, topk=4, chunk_size=10_000, bias=bias)
    full = torch.log_softmax(hidden @ weight.T + bias, dim=-1)
    torch.testing.assert_close(ref["log_probs"], full.gather(-1, labels[:, None]).squeeze(-1), atol=1e-5, rtol=0)
    for chunk in (1, 7, 36):
        got = chunked_logprobs(hidden, weight, labels, cands, topk=4, chunk_size=chunk, bias=bias)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=0)


def test_chunked_logprobs_bad_input():
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), chunk_size=0)
    with pytest.raises(ValueError, match="weight must be"):
        chunked_logprobs(torch.zeros(2, 3), torch.zeros(4, 5))
    with pytest.raises(ValueError, match="labels"):
        chunked_logprobs(torch.zeros(2, 3), torch.zeros(4, 3), labels=torch.zeros(3, dtype=torch.long))


def _ragged_batch(vocab=259):
    """Rows of very different lengths: an empty response, a length-1 response and long ones."""
    g = torch.Generator().manual_seed(11)
    resp_lens = [0, 1, 40, 3, 0, 17, 1, 64]
    prompts = [torch.randint(0, vocab, (int(n),), generator=g) for n in (3, 1, 9, 2, 5, 12, 30, 4)]
    responses = [torch.randint(0, vocab, (n,), generator=g) for n in resp_lens]
    cands = [torch.randint(0, vocab, (n, 3), generator=g) for n in resp_lens]
    return prompts, responses, cands


@pytest.mark.parametrize("max_tokens", [None, 1, 50, 10_000])
def test_packed_equals_padded_and_direct(tiny_model, max_tokens):
    prompts, responses, cands = _ragged_batch()
    padded = response_logprobs(tiny_model, prompts, responses, candidates=cands, topk=2, packed=False, max_tokens=None)
    packed = response_logprobs(tiny_model, prompts, responses, candidates=cands, topk=2, max_tokens=max_tokens)
    for key in padded:
        torch.testing.assert_close(packed[key], padded[key], atol=1e-5, rtol=0)
    assert packed["response_mask"].sum(-1).tolist() == [r.numel() for r in responses]
    for i, (p, r) in enumerate(zip(prompts, responses)):
        if r.numel():
            full = _direct(tiny_model, p, r)
            want = full.gather(-1, r.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(packed["log_probs"][i, : r.numel()], want, atol=1e-5, rtol=0)
            torch.testing.assert_close(
                packed["candidate_log_probs"][i, : r.numel()], full.gather(-1, cands[i]), atol=1e-5, rtol=0
            )
        assert packed["log_probs"][i, r.numel() :].eq(0).all()


def test_packed_forwards_hold_no_padding_and_respect_the_budget(tiny_model):
    prompts, responses, _ = _ragged_batch()
    shapes = []
    handle = tiny_model.base_model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append((tuple(kw["input_ids"].shape), kw["attention_mask"])), with_kwargs=True
    )
    try:
        response_logprobs(tiny_model, prompts, responses, max_tokens=50)
    finally:
        handle.remove()
    seq = [p.numel() + r.numel() for p, r in zip(prompts, responses) if r.numel()]
    assert all(s[0][0] == 1 and s[1] is None for s in shapes)  # one packed row, no padding mask
    assert sum(s[0][1] for s in shapes) == sum(seq)  # every token once, no padding
    # within the budget, except a row longer than it, which runs alone
    assert all(s[0][1] <= max(50, max(seq)) for s in shapes) and len(shapes) > 1


def test_micro_batches_cover_rows_once_within_budget():
    from opd_verl.workers.logprobs import micro_batches

    g = torch.Generator().manual_seed(2)
    lens = torch.randint(1, 200, (37,), generator=g).tolist()
    for budget in (200, 450, 5000):
        groups = micro_batches(lens, max_tokens=budget)
        assert sorted(i for grp in groups for i in grp) == list(range(37))
        assert all(sum(lens[i] for i in grp) <= budget for grp in groups)
        # the fewest forwards a budget allows is ceil(total / budget); veRL's helper gets close to it
        assert len(groups) >= -(-sum(lens) // budget)
    assert micro_batches(lens, rows_per_batch=10) == [list(range(s, min(s + 10, 37))) for s in range(0, 37, 10)]
    assert micro_batches([]) == []
    with pytest.raises(ValueError, match="max_tokens"):
        micro_batches(lens, max_tokens=0)


def test_empty_responses_with_candidates():
    """A batch whose responses are all empty (or partly empty) with candidate ids: zero-width outputs, no error."""
    from transformers import Qwen2ForCausalLM

    from opd_verl.demo.tiny import tiny_qwen2_config

    model = Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=259, hidden_size=32, num_layers=1)).eval()
    prompts = [torch.tensor([1, 2]), torch.tensor([3])]
    empty = [torch.zeros(0, dtype=torch.long)] * 2
    out = response_logprobs(model, prompts, empty, candidates=[torch.zeros(0, 4, dtype=torch.long)] * 2, topk=2)
    assert out["log_probs"].shape == (2, 0) and out["candidate_log_probs"].shape == (2, 0, 4)
    with pytest.raises(ValueError, match="one K"):
        response_logprobs(
            model, prompts, [torch.tensor([5]), torch.tensor([6])], candidates=[torch.zeros(1, 4), torch.zeros(1, 3)]
        )


def test_bf16_head_is_float32():
    """With a bf16 model, log-probs equal a float32 projection + log-softmax of its own last hidden states.

    The logits are scaled up to a realistic spread (log-probs down to ~-50 nats), where rounding them to bf16 before
    the log-softmax (what a bf16 ``lm_head`` returns) is off by more than 1e-3 nats.
    """
    from transformers import Qwen2ForCausalLM

    from opd_verl.demo.tiny import tiny_qwen2_config
    from opd_verl.workers.logprobs import backbone_hidden_states

    torch.manual_seed(4)
    model = Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=259, hidden_size=64, num_layers=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    model = model.to(torch.bfloat16)
    prompts, responses, _ = _ragged_batch()
    out = response_logprobs(model, prompts, responses)
    worst_ours, worst_bf16 = 0.0, 0.0
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, responses)):
            if not r.numel():
                continue
            ids = torch.cat([p, r])[None]
            pos = torch.arange(r.numel()) + p.numel() - 1
            hidden = backbone_hidden_states(model, ids, None, torch.arange(ids.shape[1])[None])[0, pos]
            exact = torch.log_softmax(hidden.double() @ model.lm_head.weight.double().T, -1)
            exact = exact.gather(-1, r[:, None]).squeeze(-1)
            bf16_logits = torch.log_softmax(model(input_ids=ids).logits[0, pos].float(), -1)
            bf16_lp = bf16_logits.gather(-1, r[:, None]).squeeze(-1)
            assert exact.min() < -20  # a realistic spread of log-probs
            worst_ours = max(worst_ours, float((out["log_probs"][i, : r.numel()] - exact).abs().max()))
            worst_bf16 = max(worst_bf16, float((bf16_lp - exact).abs().max()))
    assert worst_ours < 1e-4
    assert worst_bf16 > 1e-3  # the error the float32 head removes
