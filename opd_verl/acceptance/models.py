"""Check 2: the models and data of the acceptance run, built locally (random weights, nothing downloaded).

The demo's byte-level chat tokenizer (`opd_verl.demo.tiny.build_tokenizer`), a Qwen3-architecture student with tied
embeddings and a larger Qwen3 teacher with untied ones (the two layouts of the output embedding the teacher worker
and vLLM must handle), each saved with its tokenizer and a generation config (vLLM reads it), and the demo's
addition prompts in veRL's parquet format (`opd_verl.demo.task`; rows carry the problem and solution OPSD needs).
"""

from __future__ import annotations

import dataclasses
import os

from opd_verl.demo import task
from opd_verl.demo.tiny import IM_END, PAD_TOKEN, build_tokenizer

__all__ = ["STUDENT", "TEACHER", "Assets", "ModelSpec", "build_assets", "qwen3_config", "check_saved_model"]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """Size of a Qwen3 model (head_dim 64: a size flash-attn and vLLM's kernels take)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    tie_word_embeddings: bool
    seed: int


STUDENT = ModelSpec(hidden_size=256, num_layers=2, num_heads=4, num_kv_heads=2, tie_word_embeddings=True, seed=1)
TEACHER = ModelSpec(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, tie_word_embeddings=False, seed=2)
MAX_POSITIONS = 4096  # the OPSD teacher's privileged prompt (~700 byte tokens) + response fits
TRAIN_PROBLEMS, VAL_PROBLEMS = 256, 16


@dataclasses.dataclass(frozen=True)
class Assets:
    root: str
    student: str
    teacher: str
    train_file: str
    val_file: str


def qwen3_config(vocab_size: int, spec: ModelSpec, eos_token_id: int, pad_token_id: int, max_positions: int):
    """A `Qwen3Config` of the given size (MLP 2x hidden, head_dim 64)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=2 * spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=64,
        max_position_embeddings=max_positions,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=None,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )


def _build_model(path: str, spec: ModelSpec, tokenizer) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3ForCausalLM

    eos, pad = tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    cfg = qwen3_config(len(tokenizer), spec, eos, pad, MAX_POSITIONS)
    cfg.dtype = torch.bfloat16
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = Qwen3ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None, do_sample=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def check_saved_model(path: str, spec: ModelSpec) -> int:
    """Reload a saved model directory as vLLM and veRL would read it; return its parameter count.

    Raises:
        AssertionError: the architecture, embedding layout or generation config is not what was asked for.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    cfg = AutoConfig.from_pretrained(path)
    assert cfg.model_type == "qwen3", f"{path}: model_type {cfg.model_type!r}, expected qwen3"
    assert cfg.architectures == ["Qwen3ForCausalLM"], f"{path}: architectures {cfg.architectures}"
    assert bool(cfg.tie_word_embeddings) == spec.tie_word_embeddings, f"{path}: tie_word_embeddings not as built"
    gen = GenerationConfig.from_pretrained(path)
    assert gen.eos_token_id == cfg.eos_token_id, f"{path}: generation config eos {gen.eos_token_id}"
    with torch.device("meta"):  # the layout only, no weights
        model = AutoModelForCausalLM.from_config(cfg)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == spec.tie_word_embeddings, (
        f"{path}: output embedding tied={tied}, expected {spec.tie_word_embeddings}"
    )
    return sum(p.numel() for p in model.parameters())


def build_assets(root: str) -> Assets:
    """Write tokenizer, student, teacher and data under `root` (rebuilt every run: a few seconds)."""
    from opd_verl.workers.tokenizer_check import check_same_tokenizers

    root = os.path.abspath(root)
    assets = Assets(
        root=root,
        student=os.path.join(root, "models", "student"),
        teacher=os.path.join(root, "models", "teacher"),
        train_file=os.path.join(root, "data", "train.parquet"),
        val_file=os.path.join(root, "data", "val.parquet"),
    )
    tokenizer = build_tokenizer()
    _build_model(assets.student, STUDENT, tokenizer)
    _build_model(assets.teacher, TEACHER, tokenizer)
    check_same_tokenizers({"student": assets.student, "teacher": assets.teacher})
    problems = task.make_problems(TRAIN_PROBLEMS + VAL_PROBLEMS, 1, 2, seed=0)
    task.write_parquet(assets.train_file, task.make_rows(problems[:TRAIN_PROBLEMS], "train"))
    task.write_parquet(assets.val_file, task.make_rows(problems[TRAIN_PROBLEMS:], "test"))
    return assets
