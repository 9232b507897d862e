"""Sentence segmentation of response tokens for the release rule (docs/objectives.md section 4 step 2).

The response is decoded, split into sentences with NLTK's Punkt sentence tokenizer (an untrained
``PunktSentenceTokenizer``: no downloaded data) and also at newlines, and every token is mapped to the sentence
in which its first character falls. Tokens that decode to no characters (special tokens, EOS) join the sentence
before them.

**[our choice]** details, fixed here and tested:

- The decoded text is the concatenation of each token's own decoding (cached per token id), so token character
  offsets are exact. It equals the decoding of the whole response except where one character's bytes are split
  over several tokens (each piece then shows as U+FFFD), which does not move sentence boundaries. Tokenizers
  that drop a word's leading space when a token is decoded alone (SentencePiece ``\u2581``) are handled by
  decoding each token after a fixed one-character anchor token.
- Whitespace between two sentences belongs to the sentence after it, so a token " The" (space first) starts the
  next sentence rather than ending the previous one.
"""

from __future__ import annotations

import weakref
from itertools import compress
from typing import Any

import torch

__all__ = ["sentence_spans", "token_sentence_ids", "batch_sentence_ids"]

_PUNKT = None
_PIECE_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ANCHOR_TEXT = "a"


def _punkt():
    global _PUNKT
    if _PUNKT is None:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        _PUNKT = PunktSentenceTokenizer()
    return _PUNKT


def _pieces_cache(tokenizer: Any) -> dict:
    try:
        cache = _PIECE_CACHE.get(tokenizer)
        if cache is None:
            cache = {}
            _PIECE_CACHE[tokenizer] = cache
        return cache
    except TypeError:  # not weak-referenceable: no cache across calls
        return {}


def _anchor(tokenizer: Any, cache: dict):
    if "__anchor__" not in cache:
        anchor = None
        try:
            ids = tokenizer.encode(_ANCHOR_TEXT, add_special_tokens=False)
            if len(ids) == 1 and _decode(tokenizer, ids) == _ANCHOR_TEXT:
                anchor = ids[0]
        except Exception:  # noqa: BLE001 - tokenizers without encode(): decode tokens alone
            anchor = None
        cache["__anchor__"] = anchor
    return cache["__anchor__"]


def _decode(tokenizer: Any, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _token_pieces(token_ids: list[int], tokenizer: Any) -> list[str]:
    """Text of each token as it appears inside a decoded response (cached per tokenizer and id)."""
    cache = _pieces_cache(tokenizer)
    try:
        return list(map(cache.__getitem__, token_ids))
    except KeyError:
        pass
    missing = {t for t in token_ids if t not in cache}
    if missing:
        anchor = _anchor(tokenizer, cache)
        for tok in missing:
            if anchor is None:
                cache[tok] = _decode(tokenizer, [tok])
                continue
            alone = _decode(tokenizer, [tok])
            after = _decode(tokenizer, [anchor, tok])
            cache[tok] = after[len(_ANCHOR_TEXT) :] if after.startswith(_ANCHOR_TEXT) else alone
    return [cache[t] for t in token_ids]


def _sentence_ends(text: str, split_newlines: bool) -> list[int]:
    """Exclusive end offsets of the non-empty sentences of ``text``, in order."""
    ends: list[int] = []
    for start, end in _punkt().span_tokenize(text):
        if not split_newlines:
            ends.append(end)
            continue
        pos = start
        while pos < end:
            nl = text.find("\n", pos, end)
            piece_end = end if nl == -1 else nl
            if text[pos:piece_end].strip():
                ends.append(piece_end)
            if nl == -1:
                break
            pos = nl + 1
    return ends


def token_sentence_ids(token_ids, tokenizer: Any, split_newlines: bool = True) -> list[int]:
    """Sentence index (0-based, non-decreasing, no gaps) of every response token.

    Args:
        token_ids: the response's token ids, `(L,)` (list or 1-D tensor).
        tokenizer: a Hugging Face tokenizer (``decode`` / ``encode``).
        split_newlines: also start a new sentence after every newline.

    Returns:
        list of L ints.
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D, got shape {tuple(token_ids.shape)}")
        token_ids = token_ids.tolist()
    token_ids = [int(t) for t in token_ids]
    if not token_ids:
        return []
    return _rows_sentence_ids([token_ids], tokenizer, split_newlines)[0, : len(token_ids)].tolist()


def _rows_sentence_ids(rows: list[list[int]], tokenizer: Any, split_newlines: bool) -> torch.Tensor:
    """Sentence ids of several responses at once, `(R, L_max)` int64 (row r valid in its first ``len(rows[r])``).

    Decoding and Punkt run per row (text work); the token-to-sentence mapping runs batched in torch: the first
    character of a token at offset o lies in the first sentence whose end is beyond o (the last sentence also
    takes any trailing whitespace, so its end is left out), empty tokens join the sentence before them (a running
    max) and the ids are renumbered without gaps (a sentence may hold no token start).
    """
    n_rows = len(rows)
    width = max((len(r) for r in rows), default=0)
    lengths = torch.zeros(n_rows, width, dtype=torch.int64)
    inner_rows: list[list[int]] = []
    for r, token_ids in enumerate(rows):
        if not token_ids:
            inner_rows.append([])
            continue
        pieces = _token_pieces(token_ids, tokenizer)
        row_lengths = list(map(len, pieces))
        lengths[r, : len(row_lengths)] = torch.tensor(row_lengths, dtype=torch.int64)
        inner_rows.append(_sentence_ends("".join(pieces), split_newlines)[:-1])
    if width == 0:
        return lengths
    n_inner = max(max((len(e) for e in inner_rows), default=0), 1)
    big = torch.iinfo(torch.int64).max
    inner = torch.full((n_rows, n_inner), big, dtype=torch.int64)
    for r, ends in enumerate(inner_rows):
        if ends:
            inner[r, : len(ends)] = torch.tensor(ends, dtype=torch.int64)
    offsets = lengths.cumsum(dim=-1).sub_(lengths)
    raw = torch.searchsorted(inner, offsets, right=True)
    raw = torch.where(lengths > 0, raw, torch.full((), -1, dtype=torch.int64))
    filled = raw.cummax(dim=-1).values.clamp_min_(0)
    rank = torch.zeros_like(filled)
    rank[:, 1:] = (filled[:, 1:] != filled[:, :-1]).cumsum(dim=-1)
    return rank


def sentence_spans(token_ids, tokenizer: Any, split_newlines: bool = True) -> list[tuple[int, int]]:
    """Token index spans ``(start, end)`` (end exclusive) of the response's sentences, contiguous and covering.

    Args:
        token_ids: the response's token ids `(L,)` (only the valid ones, in order).
        tokenizer: a Hugging Face tokenizer.
        split_newlines: also split at newlines (default true, **[our choice]**).

    Returns:
        list of ``(start, end)`` with ``spans[0][0] == 0``, ``spans[-1][1] == L`` and each start equal to the
        previous end; empty for an empty response.
    """
    ids = token_sentence_ids(token_ids, tokenizer, split_newlines)
    spans: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1]:
            spans.append((start, i))
            start = i
    return spans


def batch_sentence_ids(
    responses: torch.Tensor, response_mask: torch.Tensor, tokenizer: Any, split_newlines: bool = True
) -> torch.Tensor:
    """`(B, T)` int64 sentence ids for :func:`apply_release`, from each row's valid tokens in order.

    Masked positions (padding, or zeros inside a response) carry the id of the previous valid token (0 before
    the first), so ids stay non-decreasing.

    Args:
        responses: `(B, T)` response token ids.
        response_mask: `(B, T)` 1 on response tokens.
    """
    if responses.shape != response_mask.shape or responses.dim() != 2:
        raise ValueError(
            f"responses and response_mask must have the same (B, T) shape, got {tuple(responses.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    batch, length = responses.shape
    mask_cpu = response_mask.detach().cpu().bool()
    ids_rows = responses.detach().cpu().tolist()
    mask_rows = mask_cpu.tolist()
    rows = [list(compress(ids, keep)) for ids, keep in zip(ids_rows, mask_rows)]
    out = torch.full((batch, length), -1, dtype=torch.int64)
    if batch and length:
        sids = _rows_sentence_ids(rows, tokenizer, split_newlines)
        n_valid = torch.tensor([len(r) for r in rows], dtype=torch.int64)
        in_row = torch.arange(sids.shape[1])[None, :] < n_valid[:, None]
        out[mask_cpu] = sids[in_row]
        out = out.cummax(dim=-1).values.clamp_min_(0)
    else:
        out.zero_()
    return out.to(responses.device)
