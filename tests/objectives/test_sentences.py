"""Sentence segmentation: token-to-sentence rule on locally built tokenizers."""

import pytest
import torch

from opd_verl.objectives import batch_sentence_ids, sentence_spans, token_sentence_ids


def _decoded_spans(tok, ids, spans):
    return [tok.decode(ids[a:b], skip_special_tokens=True) for a, b in spans]


@pytest.mark.parametrize("fixture", ["byte_level_tokenizer", "metaspace_tokenizer"])
def test_spans_follow_punkt_sentences(fixture, request):
    tok = request.getfixturevalue(fixture)
    text = "The cat sat on the mat. It was happy! Was it? Yes."
    ids = tok.encode(text, add_special_tokens=False)
    spans = sentence_spans(ids, tok)
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    assert all(a < b for a, b in spans) and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    pieces = [p.strip() for p in _decoded_spans(tok, ids, spans)]
    assert pieces == ["The cat sat on the mat.", "It was happy!", "Was it?", "Yes."]


def test_newline_split_and_toggle(byte_level_tokenizer):
    tok = byte_level_tokenizer
    text = "Step 1: add the numbers\nStep 2: divide by two\n\nSo the answer is 42."
    ids = tok.encode(text, add_special_tokens=False)
    with_nl = _decoded_spans(tok, ids, sentence_spans(ids, tok, split_newlines=True))
    assert [p.strip() for p in with_nl] == ["Step 1: add the numbers", "Step 2: divide by two", "So the answer is 42."]
    without = sentence_spans(ids, tok, split_newlines=False)
    assert len(without) == 1


def test_special_tokens_join_previous_sentence(byte_level_tokenizer):
    tok = byte_level_tokenizer
    eos = tok.convert_tokens_to_ids("<eos>")
    ids = tok.encode("It was happy! Yes.", add_special_tokens=False)
    sids = token_sentence_ids([eos] + ids + [eos, eos], tok)
    # a leading empty token has no previous sentence: sentence 0; trailing EOS tokens stay in the last sentence
    assert sids[0] == 0 and sids[-1] == sids[-2] == sids[-3] == max(sids)
    assert sorted(set(sids)) == [0, 1]


def test_whitespace_before_sentence_belongs_to_it(byte_level_tokenizer):
    tok = byte_level_tokenizer
    ids = tok.encode("It was happy! Was it?", add_special_tokens=False)
    pieces = [tok.decode([i]) for i in ids]
    sids = token_sentence_ids(ids, tok)
    second_start = sids.index(1)
    # the first token of sentence 2 is the one that carries " Was" (space first)
    assert pieces[second_start].startswith(" ") and "W" in pieces[second_start]


def test_abbreviation_and_decimal_not_split_mid_number(byte_level_tokenizer):
    tok = byte_level_tokenizer
    text = "We compute x = 3.5 and y = 2. Then x + y = 5.5. Done."
    ids = tok.encode(text, add_special_tokens=False)
    pieces = [p.strip() for p in _decoded_spans(tok, ids, sentence_spans(ids, tok))]
    assert pieces == ["We compute x = 3.5 and y = 2.", "Then x + y = 5.5.", "Done."]


def test_empty_and_tensor_input(byte_level_tokenizer):
    assert sentence_spans([], byte_level_tokenizer) == []
    ids = torch.tensor(byte_level_tokenizer.encode("Yes. No.", add_special_tokens=False))
    assert len(sentence_spans(ids, byte_level_tokenizer)) == 2
    with pytest.raises(ValueError, match="token_ids"):
        token_sentence_ids(ids[None, :], byte_level_tokenizer)


def test_batch_sentence_ids_masked_positions(byte_level_tokenizer):
    tok = byte_level_tokenizer
    a = tok.encode("Yes. It was happy! Done.", add_special_tokens=False)
    b = tok.encode("Was it? Yes.", add_special_tokens=False)
    length = max(len(a), len(b) + 1) + 2
    pad = tok.pad_token_id
    responses = torch.full((2, length), pad)
    mask = torch.zeros(2, length, dtype=torch.long)
    responses[0, : len(a)] = torch.tensor(a)
    mask[0, : len(a)] = 1
    # row 1: one masked token (e.g. tool output) inside the response
    responses[1, 0] = b[0]
    responses[1, 1] = tok.encode("cat", add_special_tokens=False)[0]
    responses[1, 2 : len(b) + 1] = torch.tensor(b[1:])
    mask[1, 0] = 1
    mask[1, 2 : len(b) + 1] = 1
    out = batch_sentence_ids(responses, mask, tok)
    assert out[0, : len(a)].tolist() == token_sentence_ids(a, tok)
    valid1 = out[1][mask[1].bool()].tolist()
    assert valid1 == token_sentence_ids(b, tok)
    assert (out[:, 1:] >= out[:, :-1]).all()
    assert out[1, 1] == out[1, 0]
