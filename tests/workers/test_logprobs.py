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
