"""Start-up checks of the model paths (driver side, before Ray or any worker starts).

Every model path the run loads (the student, each teacher, each reward-correction base model) must be a local
directory or a hub id already in the local Hugging Face cache: otherwise a worker fails minutes later with an
`OSError` about a repo id that names no config field. The student, teachers and base models must share one
tokenizer (token-level objectives); a mismatch is refused with one message (`opd_verl.workers.tokenizer_check`).
Only config and tokenizer files are read: no weights, no device memory.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from opd_verl.config import OPDConfig, OPDConfigError

__all__ = ["check_model_paths", "check_tokenizers", "model_paths", "reference_paths"]

REMOTE_PREFIXES = ("hdfs://", "s3://", "gs://", "oss://")


def reference_paths(opd: OPDConfig) -> list[str | None]:
    """Per teacher: its reward-correction base model path, or None (student-init reference or lam == 1)."""
    out = []
    for t in opd.teachers.models:
        use_base = opd.signal.name == "gopd" and t.lam != 1.0 and t.reference_path
        out.append(t.reference_path if use_base else None)
    return out


def model_paths(cfg: DictConfig, opd: OPDConfig) -> dict[str, str]:
    """Config field -> model path for every model the run loads (the student first)."""
    out = {"actor_rollout_ref.model.path": str(OmegaConf.select(cfg, "actor_rollout_ref.model.path"))}
    if opd.signal.name == "opsd":
        return out
    for t, ref in zip(opd.teachers.models, reference_paths(opd), strict=True):
        out[f"opd.teachers.models.{t.name}.path"] = t.path
        if ref:
            own = ref == t.reference_path and OmegaConf.select(cfg, f"opd.teachers.models.{t.name}.reference_path")
            out[f"opd.teachers.models.{t.name}.reference_path" if own else "opd.reference.path"] = ref
    return out


def _available(path: str) -> bool:
    if os.path.isdir(os.path.expanduser(path)) or path.startswith(REMOTE_PREFIXES):
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except Exception:  # not a valid repo id
        return False


def check_model_paths(cfg: DictConfig, opd: OPDConfig) -> None:
    """Refuse a model path that is neither a local directory nor a hub id in the local cache, naming the field."""
    for field_name, path in model_paths(cfg, opd).items():
        if path and not _available(path):
            raise OPDConfigError(
                f"{field_name}={path!r} is not allowed: it must be a local model directory or a hub id already in "
                "the local Hugging Face cache (nothing is downloaded on the workers); no such directory exists"
            )


def check_tokenizers(cfg: DictConfig, opd: OPDConfig, load=None) -> None:
    """Refuse a teacher or base model whose tokenizer differs from the student's (plugin teacher workers only).

    Raises:
        opd_verl.workers.tokenizer_check.TokenizerMismatchError: naming both models and the first difference.
    """
    from opd_verl.workers.tokenizer_check import check_same_tokenizers

    if opd.signal.name == "opsd" or opd.teachers.kind != "local":
        return
    models = {"the student (actor_rollout_ref.model.path)": str(cfg.actor_rollout_ref.model.path)}
    for t, ref in zip(opd.teachers.models, reference_paths(opd), strict=True):
        models[f"teacher {t.name} (opd.teachers.models.{t.name}.path)"] = t.path
        if ref:
            models[f"the reference of teacher {t.name}"] = ref
    check_same_tokenizers(models, load=load)
