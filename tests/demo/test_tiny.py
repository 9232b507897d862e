"""The locally built tokenizer and tiny model load through the Auto classes and meet veRL's Qwen2 requirements."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd_verl.demo.tiny import IM_END, build_tiny_qwen2


def test_tokenizer_and_model_round_trip(tmp_path):
    path = build_tiny_qwen2(str(tmp_path / "m"), hidden_size=32, seed=3)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    # veRL's Qwen chat token builder: "\n" is one token and <|im_end|> exists.
    assert len(tok.encode("\n", add_special_tokens=False)) == 1
    assert tok.convert_tokens_to_ids(IM_END) == tok.eos_token_id == model.config.eos_token_id
    text = "12+345=357 ok\n"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+2="}], add_generation_prompt=True, tokenize=False)
    assert prompt == "<|im_start|>user\n1+2=<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.vocab_size == len(tok)
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    logits = model(torch.tensor([tok.encode(prompt)])).logits
    assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()


def test_same_seed_same_weights(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_qwen2(str(tmp_path / "a"), seed=1))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_qwen2(str(tmp_path / "b"), seed=1))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_qwen2(str(tmp_path / "c"), seed=2))
    wa, wb, wc = (m.model.embed_tokens.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
