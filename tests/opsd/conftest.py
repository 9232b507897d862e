import pytest
import torch


@pytest.fixture(scope="session")
def tokenizer():
    from opd_verl.demo.tiny import build_tokenizer

    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer):
    """A randomly initialised 2-layer Qwen2 (hidden 32) on the local byte tokenizer, float32, eval mode."""

    def _build(seed: int = 0):
        from transformers import Qwen2ForCausalLM

        from opd_verl.demo.tiny import tiny_qwen2_config

        cfg = tiny_qwen2_config(len(tokenizer), hidden_size=32, num_layers=2)
        cfg.dtype = torch.float32
        torch.manual_seed(seed)
        return Qwen2ForCausalLM(cfg).eval()

    return _build
