"""Start-up check of the training and validation files (driver side, before Ray or any worker starts).

veRL's dataset trains on rows it cannot use without a word, or fails on them deep inside a worker with no row
number. Each parquet file of ``data.train_files`` and ``data.val_files`` is streamed once (pyarrow record batches,
column-wise: a million rows take seconds, see ``scripts/bench_data_check.py``) and a row is bad when:

- its prompt (``data.prompt_key``) is None, has no message, or no message with text;
- its ``data_source`` is None;
- its ``reward_model.ground_truth`` is None;
- with ``data.truncation=error``: its prompt, through the student's chat template with the generation prompt
  (as veRL tokenises it), is longer than ``data.max_prompt_length`` tokens. Only rows whose text bytes plus the
  template's own tokens exceed the limit are tokenised: a byte-level BPE token covers at least one byte.

``opd.data.on_bad_row=error`` refuses the run naming the file, the row, the column and the reason;
``skip`` writes a copy of each affected file without its bad rows under ``<trainer.default_local_dir>/data/``,
points veRL at the copies and reports the count per file and reason.

With ``opd.teachers.routing_key=extra_info.FIELD``, a field that no training row has is refused (every sample
would go to the fallback teacher); the rows per teacher are reported.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["BATCH_ROWS", "DataError", "FileReport", "check_data", "check_file", "iter_rows", "teacher_counts"]

BATCH_ROWS = 65536


class DataError(ValueError):
    """A data file cannot be trained on as configured (names the file, the row and the column)."""


@dataclass
class FileReport:
    """What the check found in one file: rows read, bad rows by reason, the first bad row of each reason."""

    path: str
    rows: int = 0
    bad: set[int] = field(default_factory=set)
    reasons: Counter = field(default_factory=Counter)
    first: dict[str, int] = field(default_factory=dict)

    def add(self, rows: np.ndarray, reason: str, offset: int) -> None:
        rows = np.flatnonzero(rows) + offset
        if rows.size:
            self.reasons[reason] += int(rows.size)
            self.first.setdefault(reason, int(rows[0]))
            self.bad.update(rows.tolist())


def iter_rows(path: str, columns: Sequence[str] | None = None, batch_rows: int = BATCH_ROWS) -> Iterator[dict]:
    """Rows of a parquet file as dicts, streamed batch by batch (never the whole file in memory)."""
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
        yield from batch.to_pylist()


def _nulls(array) -> np.ndarray:
    return np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)


def _prompt_stats(prompt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a ``list<struct<content: string>>`` column: has a message with text, text bytes, messages."""
    import pyarrow.compute as pc

    n = len(prompt)
    messages = pc.list_value_length(prompt).fill_null(0).to_numpy(zero_copy_only=False)
    flat = pc.list_flatten(prompt)
    parents = pc.list_parent_indices(prompt).to_numpy(zero_copy_only=False)
    content = pc.struct_field(flat, "content")
    text = pc.utf8_length(pc.utf8_trim_whitespace(content)).fill_null(0).to_numpy(zero_copy_only=False) > 0
    nbytes = pc.binary_length(content).fill_null(0).to_numpy(zero_copy_only=False)
    has_text = np.bincount(parents[text], minlength=n) > 0
    return has_text, np.bincount(parents, weights=nbytes, minlength=n), messages


def _is_message_list(arrow_type) -> bool:
    import pyarrow as pa

    if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
        return False
    item = arrow_type.value_type
    return (
        pa.types.is_struct(item)
        and item.get_field_index("content") >= 0
        and pa.types.is_string(item.field("content").type)
    )


def _python_prompt_stats(prompt) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_prompt_stats` for any other prompt column type (row by row)."""
    rows = prompt.to_pylist()
    has_text = np.zeros(len(rows), dtype=bool)
    nbytes = np.zeros(len(rows))
    messages = np.zeros(len(rows), dtype=np.int64)
    for i, msgs in enumerate(rows):
        msgs = [msgs] if isinstance(msgs, (str, dict)) else list(msgs or [])
        messages[i] = len(msgs)
        for m in msgs:
            text = m.get("content") if isinstance(m, dict) else m
            text = "" if text is None else str(text)
            has_text[i] |= bool(text.strip())
            nbytes[i] += len(text.encode())
    return has_text, nbytes, messages


class _PromptLength:
    """Prompt length in tokens as veRL's dataset counts it (chat template, generation prompt), loaded lazily."""

    def __init__(self, cfg):
        from omegaconf import OmegaConf

        self.path = OmegaConf.select(cfg, "actor_rollout_ref.model.tokenizer_path") or OmegaConf.select(
            cfg, "actor_rollout_ref.model.path"
        )
        kwargs = OmegaConf.select(cfg, "data.apply_chat_template_kwargs") or {}
        self.kwargs = {k: v for k, v in dict(kwargs).items() if k not in ("tokenize", "return_dict", "return_tensors")}
        self._tok = None
        self._overhead = None

    def tokens(self, messages: list) -> int:
        from opd_verl.opsd.inputs import _token_list

        return len(
            _token_list(
                self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **self.kwargs)
            )
        )

    @property
    def tokenizer(self):
        if self._tok is None:
            from transformers import AutoTokenizer

            self._tok = AutoTokenizer.from_pretrained(self.path)
        return self._tok

    @property
    def overhead(self) -> int:
        """Tokens the template adds around one empty user message (system prompt and generation prompt included)."""
        if self._overhead is None:
            self._overhead = self.tokens([{"role": "user", "content": ""}])
        return self._overhead


def check_file(
    path: str,
    prompt_key: str = "prompt",
    max_prompt_length: int | None = None,
    length: _PromptLength | None = None,
    batch_rows: int = BATCH_ROWS,
) -> FileReport:
    """Find the bad rows of one parquet file (see the module docstring); `max_prompt_length` None skips lengths."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise DataError(f"{path}: the data file does not exist")
    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    for column in (prompt_key, "data_source", "reward_model"):
        if column not in names:
            raise DataError(f"{path}: column {column!r} is missing (columns: {', '.join(sorted(names))})")
    report = FileReport(path=str(path))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=[prompt_key, "data_source", "reward_model"]):
        offset, n = report.rows, batch.num_rows
        prompt = batch.column(prompt_key)
        null_prompt = _nulls(prompt)
        stats = _prompt_stats if _is_message_list(prompt.type) else _python_prompt_stats
        has_text, nbytes, messages = stats(prompt)
        report.add(null_prompt, f"column {prompt_key!r}: the prompt is None", offset)
        report.add(~null_prompt & ~has_text, f"column {prompt_key!r}: the prompt has no message with text", offset)
        report.add(_nulls(batch.column("data_source")), "column 'data_source': None", offset)
        rm = batch.column("reward_model")
        gt_null = _nulls(rm)
        if rm.type.num_fields and rm.type.get_field_index("ground_truth") >= 0:
            gt_null |= _nulls(pc.struct_field(rm, "ground_truth"))
        else:
            gt_null[:] = True
        report.add(gt_null, "column 'reward_model.ground_truth': None", offset)
        if max_prompt_length is not None and length is not None:
            bound = nbytes + np.maximum(messages, 1) * length.overhead
            candidates = np.flatnonzero(has_text & (bound > max_prompt_length))
            if candidates.size:
                rows = prompt.take(candidates).to_pylist()
                long = np.zeros(n, dtype=bool)
                for i, msgs in zip(candidates, rows, strict=True):
                    long[i] = length.tokens(msgs) > max_prompt_length
                reason = (
                    f"column {prompt_key!r}: the prompt is longer than data.max_prompt_length={max_prompt_length} "
                    "tokens (data.truncation=error)"
                )
                report.add(long, reason, offset)
        report.rows += n
    return report


def _describe(report: FileReport) -> str:
    reasons = sorted(report.reasons, key=report.first.get)
    parts = [f"row {report.first[r]}, {r} ({report.reasons[r]} such rows)" for r in reasons]
    return f"{report.path}: {len(report.bad)} bad rows of {report.rows}: " + "; ".join(parts)


def _write_filtered(report: FileReport, out_dir: str, batch_rows: int = BATCH_ROWS) -> str:
    """Copy of the file without its bad rows, at ``out_dir/<name>.checked.parquet``; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.splitext(os.path.basename(report.path))[0]
    out = os.path.join(out_dir, f"{stem}.checked.parquet")
    bad = np.zeros(report.rows, dtype=bool)
    bad[list(report.bad)] = True
    pf = pq.ParquetFile(report.path)
    offset = 0
    with pq.ParquetWriter(out + ".tmp", pf.schema_arrow) as writer:
        for batch in pf.iter_batches(batch_size=batch_rows):
            keep = pa.array(~bad[offset : offset + batch.num_rows])
            writer.write_batch(batch.filter(keep))
            offset += batch.num_rows
    os.replace(out + ".tmp", out)
    return out


def _files(value) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def teacher_counts(files: Sequence[str], routing_key: str, routes: Sequence[str | None]) -> list[int]:
    """Training rows per teacher (``opd.teachers.models`` order) under the routing key.

    Raises:
        DataError: ``extra_info.FIELD`` that no row has (every sample would silently go to the fallback teacher), or
            rows whose value no teacher serves when there is no fallback teacher.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    counts = [0] * (len(routes) + 1)
    by_route = {r: i for i, r in enumerate(routes) if r is not None}
    fallback = next((i for i, r in enumerate(routes) if r is None), len(routes))
    column = "data_source" if routing_key == "data_source" else "extra_info"
    name = routing_key.split(".", 1)[1] if column == "extra_info" else None
    present = 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            values = batch.column(column)
            if name is not None:
                if values.type.num_fields == 0 or values.type.get_field_index(name) < 0:
                    counts[fallback] += batch.num_rows
                    continue
                values = pc.struct_field(values, name)
            present += batch.num_rows - values.null_count
            for item in pc.value_counts(values.cast("string")).to_pylist():
                counts[by_route.get(item["values"], fallback)] += item["counts"]
    if name is not None and present == 0:
        raise DataError(
            f"opd.teachers.routing_key={routing_key}: no training row has extra_info.{name}, so every sample would go "
            f"to the fallback teacher; files: {', '.join(files)}. Name a field the rows have, or route by data_source"
        )
    if counts[-1]:
        raise DataError(
            f"opd.teachers.routing_key={routing_key}: {counts[-1]} training rows have a value no teacher serves "
            f"(routes: {sorted(by_route)}) and no teacher has route: null; add that teacher or a fallback"
        )
    return counts[:-1]


def check_data(cfg, opd, log=print) -> dict[str, Any]:
    """Check ``data.train_files`` and ``data.val_files`` of a composed config; apply ``opd.data.on_bad_row``.

    Under ``skip`` the config's file lists are rewritten (in place) to the filtered copies.

    Returns:
        ``{"rows": int, "bad": int, "files": {path: FileReport}, "teachers": [rows per teacher] or None}``.

    Raises:
        DataError: naming the file, the first bad row and its column (``error``), or a routing key no row has.
    """
    from omegaconf import OmegaConf, open_dict

    data = cfg.data
    prompt_key = data.get("prompt_key", "prompt") or "prompt"
    max_len = int(data.max_prompt_length) if data.get("truncation", "error") == "error" else None
    length = _PromptLength(cfg) if max_len is not None else None
    out: dict[str, Any] = {"rows": 0, "bad": 0, "files": {}, "teachers": None}
    out_dir = os.path.join(os.path.expanduser(str(cfg.trainer.default_local_dir)), "data")
    for key in ("train_files", "val_files"):
        files = _files(OmegaConf.select(cfg, f"data.{key}"))
        kept = []
        for path in files:
            report = check_file(path, prompt_key, max_len, length)
            out["files"][path] = report
            out["rows"] += report.rows
            out["bad"] += len(report.bad)
            if not report.bad:
                kept.append(path)
            elif opd.data.on_bad_row == "error":
                raise DataError(
                    _describe(report)
                    + ". Fix or drop these rows, or set opd.data.on_bad_row=skip to train without them"
                )
            else:
                kept.append(_write_filtered(report, out_dir))
                log(f"opd_verl: data: skipped {_describe(report)} (opd.data.on_bad_row=skip); training on {kept[-1]}")
        if kept != files:
            with open_dict(cfg):
                OmegaConf.update(cfg, f"data.{key}", kept, merge=False)
    if opd.signal.name != "opsd" and opd.teachers.models:
        train = _files(OmegaConf.select(cfg, "data.train_files"))
        counts = teacher_counts(train, opd.teachers.routing_key, [t.route for t in opd.teachers.models])
        out["teachers"] = counts
        if len(opd.teachers.models) > 1:
            per = ", ".join(f"{t.name} {n}" for t, n in zip(opd.teachers.models, counts, strict=True))
            log(f"opd_verl: training rows per teacher ({opd.teachers.routing_key}): {per}")
            idle = [t.name for t, n in zip(opd.teachers.models, counts, strict=True) if n == 0]
            if idle:
                log(f"opd_verl: WARNING: no training row is routed to teacher(s) {', '.join(idle)}")
    return out
