"""OPSD privileged teacher inputs (docs/objectives.md section 5): prompts from templates, dataset checks, batching.

The teacher scores the student's own response under a privileged prompt (problem plus reference solution). Its
input is the teacher prompt, tokenised through the model's chat template as one user message with the generation
prompt (as veRL tokenises the student prompt), followed by the student's response token ids unchanged: the
response is never decoded and re-tokenised. Prompts are left padded and responses right padded as in veRL's
rollout batches, so response token ``j`` sits at column ``prompt_width + j`` in both the student and the teacher
tensors, and the logits that predict it sit one column earlier.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from opd_verl.data_check import DataError, iter_rows

__all__ = [
    "MISSING_POLICIES",
    "OPSDDataError",
    "TeacherBatch",
    "build_teacher_batch",
    "check_solutions",
    "check_solutions_in_files",
    "fill_template",
    "has_value",
    "lookup_field",
    "privileged_prompt_ids",
    "response_logit_index",
]

MISSING_POLICIES = ("error", "skip")


class OPSDDataError(DataError):
    """A dataset row lacks a field OPSD needs (named with the row index and the column)."""


def lookup_field(row: Mapping[str, Any], path: str) -> Any:
    """Value at a dotted path of a dataset row, e.g. ``extra_info.solution`` or ``reward_model.ground_truth``.

    A path that names a top-level column literally (even with dots in it) wins over the nested reading.

    Args:
        row: one dataset row (mapping of column -> value; nested columns are mappings).
        path: column name or dotted path.

    Returns:
        The value, or None when any part of the path is absent.
    """
    if not isinstance(path, str) or not path:
        raise ValueError(f"field path must be a non-empty string, got {path!r}")
    if isinstance(row, Mapping) and path in row:
        return row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def has_value(value: Any) -> bool:
    """Whether a looked-up field holds usable text: not None/NaN, and not empty or whitespace only."""
    if value is None:
        return False
    if isinstance(value, float) and value != value:  # NaN from pandas
        return False
    if isinstance(value, (list, tuple)):
        return len(value) > 0 and all(has_value(v) for v in value)
    return bool(str(value).strip())


def _as_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return str(value)


def fill_template(template: str, problem: Any, solution: Any | None = None) -> str:
    """Replace the placeholders ``{problem}`` and ``{solution}`` literally; other braces (``\\boxed{}``) stay.

    Args:
        template: prompt template (``str.format`` is not used, so braces need no escaping).
        problem: problem text.
        solution: reference solution text (templates without ``{solution}`` ignore it).

    Returns:
        The filled prompt text.
    """
    # Substitute both at once so a problem containing the text "{solution}" is not filled in turn.
    parts = template.split("{problem}")
    filled = []
    for part in parts:
        filled.append(part if solution is None else part.replace("{solution}", _as_text(solution)))
    return _as_text(problem).join(filled)


def _token_list(encoded: Any) -> list[int]:
    """Token ids from what `apply_chat_template(tokenize=True)` returns across transformers versions."""
    if isinstance(encoded, Mapping) or hasattr(encoded, "input_ids"):
        encoded = encoded["input_ids"]
    if isinstance(encoded, torch.Tensor):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], (list, tuple)):
        if len(encoded) != 1:
            raise ValueError(f"expected one tokenised conversation, got {len(encoded)}")
        encoded = encoded[0]
    return [int(t) for t in encoded]


def privileged_prompt_ids(
    tokenizer,
    template: str,
    problem: Any,
    solution: Any | None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of a filled template as one user message through the chat template, with the generation prompt.

    Args:
        tokenizer: a Hugging Face tokenizer with a chat template.
        template: teacher (or student) template with ``{problem}`` (and ``{solution}``) placeholders.
        problem, solution: field values of the row.
        chat_template_kwargs: extra keyword arguments of `apply_chat_template` (veRL's
            ``data.apply_chat_template_kwargs``, e.g. ``enable_thinking``), so teacher and student prompts match.

    Returns:
        The prompt token ids.
    """
    kwargs = dict(chat_template_kwargs or {})
    for key in ("tokenize", "return_dict", "return_tensors", "add_generation_prompt"):
        kwargs.pop(key, None)
    messages = [{"role": "user", "content": fill_template(template, problem, solution)}]
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return _token_list(encoded)


def check_solutions(
    rows: Iterable[Mapping[str, Any]],
    problem_key: str,
    solution_key: str,
    missing_solution: str = "error",
    source: str = "dataset",
) -> list[bool]:
    """Check that every row has a problem and a reference solution, before any worker starts.

    Args:
        rows: dataset rows in order (row index = position).
        problem_key, solution_key: dotted field paths (``opd.opsd.problem_key`` / ``solution_key``).
        missing_solution: ``error`` raises on the first row without a solution; ``skip`` flags it.
        source: name of the data (file) for the messages.

    Returns:
        Per row, whether it has a privileged context (False only for rows skipped under ``skip``).

    Raises:
        OPSDDataError: a row without a problem (always), or without a solution under ``error``.
    """
    if missing_solution not in MISSING_POLICIES:
        raise ValueError(
            f"opd.opsd.missing_solution={missing_solution!r} is not allowed: allowed values are "
            f"{', '.join(MISSING_POLICIES)}"
        )
    flags = []
    for index, row in enumerate(rows):
        if not has_value(lookup_field(row, problem_key)):
            raise OPSDDataError(
                f"{source}: row {index} has no problem text in column {problem_key!r} (opd.opsd.problem_key)"
            )
        ok = has_value(lookup_field(row, solution_key))
        if not ok and missing_solution == "error":
            raise OPSDDataError(
                f"{source}: row {index} has no reference solution in column {solution_key!r} "
                f"(opd.opsd.solution_key); fill it, point opd.opsd.solution_key at the right column, or set "
                f"opd.opsd.missing_solution=skip to train such rows without the distillation loss"
            )
        flags.append(ok)
    return flags


def check_solutions_in_files(
    files: str | Sequence[str],
    problem_key: str,
    solution_key: str,
    missing_solution: str = "error",
) -> dict[str, Any]:
    """Run :func:`check_solutions` over parquet files (veRL's ``data.train_files``), streamed, and count the outcome.

    Returns:
        ``{"rows": int, "with_context": int, "skipped": int, "flags": {file: list[bool]}}``.
    """
    paths = [files] if isinstance(files, str) else list(files)
    report: dict[str, Any] = {"rows": 0, "with_context": 0, "skipped": 0, "flags": {}}
    for path in paths:
        flags = check_solutions(iter_rows(path), problem_key, solution_key, missing_solution, source=str(path))
        report["flags"][str(path)] = flags
        report["rows"] += len(flags)
        report["with_context"] += sum(flags)
        report["skipped"] += len(flags) - sum(flags)
    return report


class TeacherBatch(dict):
    """Padded teacher inputs: ``input_ids``, ``attention_mask``, ``position_ids`` `(B, P_t + R)`, ``prompt_width``."""


def build_teacher_batch(
    teacher_prompt_ids: Sequence[Sequence[int]],
    responses: torch.Tensor,
    response_mask: torch.Tensor,
    pad_token_id: int,
) -> TeacherBatch:
    """Batch teacher prompts (left padded) with the student's response ids (right padded), as veRL does.

    Args:
        teacher_prompt_ids: B lists of teacher prompt token ids (lengths may differ; each >= 1).
        responses: `(B, R)` int64 student response ids, right padded (the rollout's ``responses``).
        response_mask: `(B, R)` 1 on the response's tokens (the rollout's attention over the response part).
        pad_token_id: id written at padding.

    Returns:
        TeacherBatch with ``input_ids`` `(B, P_t + R)` (columns ``P_t:`` are ``responses`` unchanged),
        ``attention_mask`` `(B, P_t + R)` int64, ``position_ids`` `(B, P_t + R)` (0 at the first real token,
        counting real tokens only, clamped at 0 on left padding) and ``prompt_width`` = P_t.
    """
    if responses.dim() != 2 or response_mask.shape != responses.shape:
        raise ValueError(
            f"responses and response_mask must both be (B, R), got {tuple(responses.shape)} and "
            f"{tuple(response_mask.shape)}"
        )
    batch = responses.shape[0]
    if len(teacher_prompt_ids) != batch:
        raise ValueError(f"got {len(teacher_prompt_ids)} teacher prompts for {batch} responses")
    if any(len(p) == 0 for p in teacher_prompt_ids):
        raise ValueError("every teacher prompt needs at least one token")
    width = max(len(p) for p in teacher_prompt_ids)
    device = responses.device
    prompt = torch.full((batch, width), int(pad_token_id), dtype=torch.long, device=device)
    prompt_mask = torch.zeros((batch, width), dtype=torch.long, device=device)
    for i, ids in enumerate(teacher_prompt_ids):
        prompt[i, width - len(ids) :] = torch.as_tensor(list(ids), dtype=torch.long, device=device)
        prompt_mask[i, width - len(ids) :] = 1
    input_ids = torch.cat([prompt, responses.long()], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask.long()], dim=1)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return TeacherBatch(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, prompt_width=width
    )


def response_logit_index(prompt_width: int, response_length: int, device=None) -> torch.Tensor:
    """Columns of a left-padded prompt + right-padded response batch whose logits predict response tokens.

    Returns:
        `(R,)` int64: ``prompt_width - 1 + j`` for response token ``j``.
    """
    return torch.arange(response_length, device=device) + (prompt_width - 1)
