import pytest

from opd_verl.demo.tiny import build_tiny_qwen2


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Qwen2 model + tokenizer saved to a temp dir (hidden 32, 2 layers)."""
    return build_tiny_qwen2(str(tmp_path_factory.mktemp("tiny") / "model"), hidden_size=32, seed=0)
