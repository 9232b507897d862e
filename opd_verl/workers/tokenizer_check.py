"""Startup check: student, teachers and references must share one tokenizer (token-level objectives need it).

Only tokenizer files are read (no weights, no device memory), so a mismatch is refused before any worker starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["TokenizerMismatchError", "check_same_tokenizers", "first_tokenizer_difference"]


class TokenizerMismatchError(ValueError):
    """Two models that must share a tokenizer do not."""


def _special(tok: Any) -> dict[str, Any]:
    out = {}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        out[name] = getattr(tok, name, None)
        out[f"{name}_id"] = getattr(tok, f"{name}_id", None)
    out["all_special_tokens"] = sorted(str(t) for t in (getattr(tok, "all_special_tokens", None) or []))
    return out


def first_tokenizer_difference(a: Any, b: Any, name_a: str = "the first", name_b: str = "the second") -> str | None:
    """A sentence describing the first difference between two tokenizers (vocab by id, then special tokens), or None.

    Args:
        a, b: Hugging Face tokenizers.
        name_a, name_b: how the sentence names them.
    """
    vocab_a, vocab_b = a.get_vocab(), b.get_vocab()
    ids_a = {i: t for t, i in vocab_a.items()}
    ids_b = {i: t for t, i in vocab_b.items()}
    for i in sorted(set(ids_a) | set(ids_b)):
        ta, tb = ids_a.get(i), ids_b.get(i)
        if ta != tb:
            return (
                f"token id {i} is {ta!r} in {name_a} and {tb!r} in {name_b} "
                f"(vocab sizes {len(vocab_a)} and {len(vocab_b)})"
            )
    sa, sb = _special(a), _special(b)
    for key in sa:
        if sa[key] != sb[key]:
            return f"{key} is {sa[key]!r} in {name_a} and {sb[key]!r} in {name_b}"
    return None


def check_same_tokenizers(models: Mapping[str, str], load=None) -> None:
    """Refuse models whose tokenizers differ from the first one's.

    Args:
        models: role name -> model path, the reference tokenizer first (e.g. ``{"student": ..., "teacher default":
            ..., "reference of default": ...}``). Paths repeated under several names are loaded once.
        load: path -> tokenizer; ``transformers.AutoTokenizer.from_pretrained`` by default.

    Raises:
        TokenizerMismatchError: naming both models (role and path) and the first difference.
    """
    if load is None:
        from transformers import AutoTokenizer

        def load(path):
            return AutoTokenizer.from_pretrained(path, trust_remote_code=False)

    items = [(name, path) for name, path in models.items() if path]
    if len(items) < 2:
        return
    cache: dict[str, Any] = {}
    base_name, base_path = items[0]
    cache[base_path] = load(base_path)
    for name, path in items[1:]:
        if path not in cache:
            cache[path] = load(path)
        diff = first_tokenizer_difference(cache[base_path], cache[path], base_name, name)
        if diff is not None:
            raise TokenizerMismatchError(
                f"the tokenizer of {name} ({path}) differs from that of {base_name} ({base_path}): first difference: "
                f"{diff}. "
                "Token-level distillation needs one shared tokenizer (same vocab and special tokens)."
            )
