"""The HF rollout/teacher server: generation lengths, log-probs against a direct forward, weight updates."""

import asyncio
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from opd_verl.cpu_port.hf_rollout import HFRolloutServer, load_causal_lm, prompt_logprobs, sample_batch, sample_tokens


def _forward_logprobs(model, ids: list[int], temperature: float = 1.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 by a plain full-sequence forward. Returns [len(ids) - 1]."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0, :-1].float() / temperature
    return torch.log_softmax(logits, -1).gather(-1, x[0, 1:].unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def model_and_tok(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sample_tokens_lengths_and_logprobs_match_forward(model_and_tok, temperature):
    model, tok = model_and_tok
    prompt = tok.encode("<|im_start|>user\n12+7=<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)
    ids, lps = sample_tokens(model, prompt, 12, temperature=temperature, ignore_eos=True, generator_seed=3)
    assert len(ids) == len(lps) == 12
    scale = temperature if temperature > 0 else 1.0
    direct = _forward_logprobs(model, prompt + ids, scale)[len(prompt) - 1 :]
    torch.testing.assert_close(torch.tensor(lps), direct, atol=2e-4, rtol=1e-4)


def test_sample_tokens_stops_at_eos(model_and_tok):
    model, tok = model_and_tok
    prompt = tok.encode("1+1=", add_special_tokens=False)
    # Make the eos token overwhelmingly likely: generation must stop right after emitting it.
    eos = tok.eos_token_id
    boost = torch.zeros(model.config.vocab_size)
    boost[eos] = 50.0
    handle = model.lm_head.register_forward_hook(lambda module, inputs, out: out + boost)
    try:
        ids, lps = sample_tokens(model, prompt, 10, temperature=1.0, eos_token_id=eos, pad_token_id=tok.pad_token_id)
    finally:
        handle.remove()
    assert ids == [eos] and len(lps) == 1


@pytest.mark.parametrize("k", [0, 3])
def test_prompt_logprobs_layout(model_and_tok, k):
    model, tok = model_and_tok
    seq = tok.encode("<|im_start|>user\n3+4=<|im_end|>\n<|im_start|>assistant\n7<|im_end|>", add_special_tokens=False)
    ids, lps = prompt_logprobs(model, seq, k)
    width = max(k, 1)
    assert len(ids) == len(lps) == len(seq) and all(len(r) == width for r in ids + lps)
    assert ids[-1] == [0] * width and lps[-1] == [0.0] * width
    x = torch.tensor([seq])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=x).logits[0, :-1].float(), -1)
    if k == 0:
        assert [r[0] for r in ids[:-1]] == seq[1:]
        torch.testing.assert_close(torch.tensor(lps[:-1])[:, 0], _forward_logprobs(model, seq), atol=1e-5, rtol=1e-5)
    else:
        top_lp, top_ids = torch.topk(logp, k, dim=-1)
        assert torch.equal(torch.tensor(ids[:-1]), top_ids)
        torch.testing.assert_close(torch.tensor(lps[:-1]), top_lp, atol=1e-5, rtol=1e-5)


def _server(path):
    cfg = SimpleNamespace(response_length=8, prompt_length=32, max_model_len=None)
    return HFRolloutServer(cfg, {"local_path": path}, replica_rank=0, torch_threads=1)


def test_server_generate_and_teacher_request(tiny_model_dir):
    server = _server(tiny_model_dir)
    prompt = list(range(40, 60))
    out = asyncio.run(server.generate(prompt, {"temperature": 1.0, "logprobs": True, "ignore_eos": True}, "r1"))
    assert len(out.token_ids) == 8 and len(out.log_probs) == 8  # response_length caps the default
    out = asyncio.run(server.generate(prompt, {"max_tokens": 3, "logprobs": False, "ignore_eos": True}, "r2"))
    assert len(out.token_ids) == 3 and out.log_probs is None
    teacher = asyncio.run(server.generate(prompt, {"max_tokens": 1, "prompt_logprobs": 0, "temperature": 1.0}, "r3"))
    assert len(teacher.extra_fields["prompt_ids"]) == len(teacher.extra_fields["prompt_logprobs"]) == len(prompt)
    with pytest.raises(ValueError, match="no room"):
        asyncio.run(server.generate(list(range(45)), {}, "r4"))


def test_server_weight_update_changes_outputs(tiny_model_dir, tmp_path):
    from opd_verl.demo.tiny import build_tiny_qwen2

    server = _server(tiny_model_dir)
    seq = list(range(30, 50))
    before = asyncio.run(server.generate(seq, {"max_tokens": 1, "prompt_logprobs": 0}, "a")).extra_fields
    other = load_causal_lm(build_tiny_qwen2(str(tmp_path / "other"), hidden_size=32, seed=7))
    state = other.state_dict()  # includes the tied lm_head.weight, as veRL's engine sends it
    assert asyncio.run(server.update_weights(state, global_steps=5)) == len(state)
    after = asyncio.run(server.generate(seq, {"max_tokens": 1, "prompt_logprobs": 0}, "b")).extra_fields
    assert not torch.allclose(torch.tensor(before["prompt_logprobs"]), torch.tensor(after["prompt_logprobs"]))
    _, expected = prompt_logprobs(other, seq, 0)
    torch.testing.assert_close(torch.tensor(after["prompt_logprobs"]), torch.tensor(expected))
    assert after["global_steps"] == 5 and after["weight_version"] == 1
    with pytest.raises(KeyError, match="does not exist"):
        asyncio.run(server.update_weights({"no.such.weight": torch.zeros(1)}))


def test_batched_sampling_matches_single_prompts(model_and_tok):
    model, tok = model_and_tok
    prompts = [tok.encode(t, add_special_tokens=False) for t in ("1+2=", "<|im_start|>user\n33+44=", "9")]
    batched = sample_batch(model, prompts, 6, temperature=0, ignore_eos=True)
    for prompt, (ids, lps) in zip(prompts, batched):
        single_ids, single_lps = sample_tokens(model, prompt, 6, temperature=0, ignore_eos=True)
        assert ids == single_ids and len(ids) == 6
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(single_lps), atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(
            torch.tensor(lps), _forward_logprobs(model, prompt + ids)[len(prompt) - 1 :], atol=2e-4, rtol=1e-4
        )


def test_server_batches_concurrent_requests(tiny_model_dir, monkeypatch):
    import opd_verl.cpu_port.hf_rollout as hf

    calls = []
    real = hf.sample_batch
    monkeypatch.setattr(
        hf, "sample_batch", lambda model, prompts, *a, **k: calls.append(len(prompts)) or real(model, prompts, *a, **k)
    )
    server = _server(tiny_model_dir)

    async def many():
        reqs = [
            server.generate(
                list(range(40, 50 + i)), {"max_tokens": 2 + i, "ignore_eos": True, "logprobs": True}, f"r{i}"
            )
            for i in range(5)
        ]
        return await asyncio.gather(*reqs)

    outs = asyncio.run(many())
    assert [len(o.token_ids) for o in outs] == [2, 3, 4, 5, 6]  # each request keeps its own budget
    assert all(len(o.log_probs) == len(o.token_ids) for o in outs)
    assert calls == [5]  # one generate call served all five
