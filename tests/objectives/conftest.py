"""Tiny tokenizers built locally (no downloads) for the sentence tests."""

import pytest

CORPUS = [
    "The cat sat on the mat. It was happy! Was it? Yes.",
    "Step 1: add the numbers.\nStep 2: divide by two.\n\nSo the answer is 42.",
    "We compute x = 3.5 and y = 2. Then x + y = 5.5. Done.",
    "Dr. Smith went to Washington. He arrived at 5 p.m. and left early.",
] * 20


def _wrap(tok):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


@pytest.fixture(scope="session")
def byte_level_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<eos>", "<unk>"])
    tok.train_from_iterator(CORPUS, trainer)
    return _wrap(tok)
