"""Tiny models and a character-level chat tokenizer, built locally (no downloads).

Used by the CPU demo and by tests: `build_tokenizer` writes a Hugging Face fast tokenizer with a Qwen2-style chat
template (`<|im_start|>`, `<|im_end|>`, `"\\n"` a single token, as veRL's Qwen chat token builder requires), and
`build_tiny_qwen2` writes a randomly initialised `Qwen2ForCausalLM` that uses it. Both save to a directory that
`AutoTokenizer.from_pretrained` / `AutoModelForCausalLM.from_pretrained` (and so veRL's `model.path`) can load.
"""

from __future__ import annotations

import os

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, IM_END)

# Qwen2's ChatML template (system turn only when given), enough for veRL's chat-template tokenisation.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins of GPT-2 / Qwen2 byte-level BPE, in byte order (byte b -> one token)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = [], 0
    for b in range(256):
        if b in printable:
            codes.append(b)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tokenizer(save_dir: str | None = None):
    """Build a byte-level Qwen2 tokenizer without merges (every byte is one token) and a ChatML chat template.

    It is veRL's and transformers' own `Qwen2Tokenizer` class (so a saved model dir with `model_type=qwen2` reloads
    it unchanged); ids 0..255 are the bytes, then `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos).

    Args:
        save_dir: if given, the tokenizer is saved there (`save_pretrained`).

    Returns:
        The tokenizer.
    """
    from transformers import AddedToken
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for tok in SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=4096,
    )
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(IM_START, special=True), AddedToken(IM_END, special=True)]}
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        os.makedirs(save_dir, exist_ok=True)
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def tiny_qwen2_config(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, max_positions: int = 512, **kw):
    """A `Qwen2Config` for a tiny model (4 heads, 2 KV heads, MLP 2x hidden, sdpa attention)."""
    from transformers import Qwen2Config

    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=256 + SPECIAL_TOKENS.index(IM_END),
        pad_token_id=256 + SPECIAL_TOKENS.index(PAD_TOKEN),
        **kw,
    )
    cfg._attn_implementation = "sdpa"
    return cfg


def build_tiny_qwen2(
    save_dir: str,
    hidden_size: int = 64,
    num_layers: int = 2,
    seed: int = 0,
    max_positions: int = 512,
    tokenizer=None,
):
    """Build a randomly initialised tiny `Qwen2ForCausalLM` with the local tokenizer and save both to `save_dir`.

    Args:
        save_dir: directory written with `config.json`, weights (fp32 safetensors), generation config, tokenizer.
        hidden_size: model width (32-64 keeps a CPU step fast).
        num_layers: decoder layers.
        seed: torch seed for the random init (same seed, same weights).
        max_positions: maximum sequence length.
        tokenizer: tokenizer to save with the model; `build_tokenizer()` if None.

    Returns:
        save_dir.
    """
    import torch
    from transformers import GenerationConfig, Qwen2ForCausalLM

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    cfg = tiny_qwen2_config(len(tokenizer), hidden_size, num_layers, max_positions)
    cfg.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id, bos_token_id=None, do_sample=True
    )
    os.makedirs(save_dir, exist_ok=True)
    model.save_pretrained(save_dir)
    tokenizer.save_pretrained(save_dir)
    return save_dir
