"""Tokenizer compatibility: identical tokenizers pass; a different vocab or special token is refused by name."""

import pytest

from opd_verl.workers.tokenizer_check import TokenizerMismatchError, check_same_tokenizers


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    from transformers import AddedToken

    from opd_verl.demo.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("tok")
    same_a, same_b = str(root / "student"), str(root / "teacher")
    build_tokenizer(same_a)
    build_tokenizer(same_b)
    extra = build_tokenizer()
    extra.add_special_tokens({"additional_special_tokens": [AddedToken("<|tool|>", special=True)]})
    extra_dir = str(root / "teacher_extra")
    extra.save_pretrained(extra_dir)
    eos = build_tokenizer()
    eos.eos_token = "<|endoftext|>"
    eos_dir = str(root / "teacher_eos")
    eos.save_pretrained(eos_dir)
    return {"student": same_a, "teacher": same_b, "extra": extra_dir, "eos": eos_dir}


def test_identical_tokenizers_pass(tokenizer_dirs):
    check_same_tokenizers({"the student": tokenizer_dirs["student"], "teacher default": tokenizer_dirs["teacher"]})


def test_extra_token_is_refused_naming_both_models(tokenizer_dirs):
    with pytest.raises(TokenizerMismatchError) as err:
        check_same_tokenizers({"the student": tokenizer_dirs["student"], "teacher big": tokenizer_dirs["extra"]})
    msg = str(err.value)
    assert "teacher big" in msg and tokenizer_dirs["extra"] in msg
    assert "the student" in msg and tokenizer_dirs["student"] in msg
    assert "first difference: token id 259 is None in the student and '<|tool|>' in teacher big" in msg


def test_special_token_difference_is_refused(tokenizer_dirs):
    with pytest.raises(TokenizerMismatchError, match=r"first difference: eos_token is '<\|im_end\|>' in the student"):
        check_same_tokenizers({"the student": tokenizer_dirs["student"], "teacher x": tokenizer_dirs["eos"]})
