"""veRL's RL parquet format, shared by the converters in this folder.

One output row (what `verl.utils.dataset.RLHFDataset` and veRL's reward loop read)::

    data_source   str   selects veRL's scorer in verl.utils.reward_score.default_compute_score
    prompt        list  chat messages: [{"role": "user", "content": <instruction text with the problem>}]
    ability       str   "math"
    reward_model  dict  {"style": "rule", "ground_truth": <final answer, no \\boxed{}>}
    extra_info    dict  {split, index, dataset, problem, solution, answer, opd_teacher, difficulty, topic}

`extra_info.problem` / `extra_info.solution` are what OPSD's privileged teacher reads (`opd.opsd.problem_key`,
`opd.opsd.solution_key`); `extra_info.opd_teacher` is the routing key of multi-teacher runs
(`opd.teachers.routing_key=extra_info.opd_teacher`, the field name the G-OPD authors use).

Inputs are local files only (`.parquet`, `.jsonl`, `.json`); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Instruction templates, user message; `{problem}` is replaced literally.
TEMPLATES = {
    # G-OPD authors' math prompt (their evaluation script appends this line to the problem).
    "gopd": "{problem}\nPlease reason step by step, and put your final answer within \\boxed{}.",
    # OPSD authors' student prompt (docs/objectives.md section 5).
    "opsd": "Problem: {problem}\n\nPlease reason step by step, and put your final answer within \\boxed{}.",
}

# veRL 0.9.1 routes these data_source names to a math scorer that reads the last \boxed{} of the response:
# lighteval/MATH and its aliases -> math_reward (MATH normalisation); math_dapo -> math_dapo ("Answer:" first,
# then \boxed{}). Anything else raises NotImplementedError in veRL's default scorer.
DEFAULT_DATA_SOURCE = "lighteval/MATH"
ROUTING_FIELD = "opd_teacher"


class ConversionError(ValueError):
    """Bad converter input or option (names the field / option and what is allowed)."""


def render_prompt(template: str, problem: str) -> str:
    """Fill a template; a preset name ("gopd", "opsd") or a literal string containing {problem}."""
    text = TEMPLATES.get(template, template)
    if "{problem}" not in text:
        raise ConversionError(
            f"--template must be one of {sorted(TEMPLATES)} or a string containing {{problem}}; got {template!r}"
        )
    return text.replace("{problem}", problem)


def check_data_source(data_source: str) -> None:
    """Refuse a data_source that veRL's default scorer cannot score as math (it would fail at the first reward)."""
    from verl.utils.reward_score import default_compute_score

    try:
        result = default_compute_score(data_source, "so the answer is \\boxed{7}", "7")
    except NotImplementedError as err:
        raise ConversionError(
            f"--data-source {data_source!r} is not scored by veRL's default_compute_score; use a math name such as "
            f"'lighteval/MATH' (math_reward) or 'math_dapo'"
        ) from err
    score = result["score"] if isinstance(result, dict) else float(result)
    if score <= 0:
        raise ConversionError(f"--data-source {data_source!r} does not score a correct boxed answer as correct")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} in `text` (veRL's own extraction), or None."""
    from verl.utils.reward_score.math_reward import last_boxed_only_string, remove_boxed

    boxed = last_boxed_only_string(text)
    if boxed is None:
        return None
    try:
        return remove_boxed(boxed)
    except AssertionError:
        return None


_FULL_BOX = re.compile(r"^\\boxed\{.*\}$", re.S)


def clean_answer(answer: Any) -> str | None:
    """Answer as the ground-truth string: str/int/float accepted, whitespace stripped, an outer \\boxed{} removed."""
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, int | float):
        if answer != answer:  # NaN
            return None
        answer = str(int(answer)) if float(answer).is_integer() else str(answer)
    if not isinstance(answer, str):
        return None
    answer = answer.strip()
    if _FULL_BOX.match(answer):
        inner = last_boxed(answer)
        answer = inner.strip() if inner is not None else answer
    return answer or None


def clean_text(value: Any) -> str | None:
    """A non-empty stripped string, or None."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def make_row(
    *,
    problem: str,
    answer: str,
    data_source: str,
    template: str,
    split: str,
    index: int,
    dataset: str,
    solution: str | None = None,
    route: str | None = None,
    difficulty: float | None = None,
    topic: str | None = None,
) -> dict:
    """One veRL row. `index` is the position in the output file."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": render_prompt(template, problem)}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {
            "split": split,
            "index": index,
            "dataset": dataset,
            "problem": problem,
            "solution": solution,
            "answer": answer,
            ROUTING_FIELD: route,
            "difficulty": None if difficulty is None else float(difficulty),
            "topic": topic,
        },
    }


@dataclass
class DropReport:
    """Rows read, kept and dropped, with the reason and the first few source positions of each reason."""

    read: int = 0
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    max_examples: int = 5

    def drop(self, reason: str, where: str) -> None:
        self.dropped[reason] += 1
        seen = self.examples.setdefault(reason, [])
        if len(seen) < self.max_examples:
            seen.append(where)

    def as_dict(self) -> dict:
        return {
            "read": self.read,
            "kept": self.kept,
            "dropped": dict(sorted(self.dropped.items())),
            "examples": {k: v for k, v in sorted(self.examples.items())},
        }

    def summary(self) -> str:
        lines = [f"read {self.read} rows, kept {self.kept}, dropped {sum(self.dropped.values())}"]
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  dropped {count:>7} {reason} (e.g. {', '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)


def read_records(path: str | Path, report: DropReport) -> Iterator[tuple[str, Any]]:
    """Yield (position, record) from a local .parquet, .jsonl or .json file.

    Unparsable JSON lines are reported as `malformed_json` and skipped; records that are not objects are yielded
    as they are (the converter reports them). Position is "file:line" (jsonl) or "file:row" (parquet/json).
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"--input {str(path)!r} is not a file")
    name = path.name
    suffix = "".join(path.suffixes[-1:]).lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        for i, record in enumerate(table.to_pylist()):
            yield f"{name}:{i}", record
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    report.read += 1
                    report.drop("malformed_json", f"{name}:{lineno}")
                    continue
                yield f"{name}:{lineno}", record
    elif suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            # {"train": [...]} or {"data": [...]}: take the single list value.
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ConversionError(f"--input {str(path)!r}: a JSON object must hold exactly one list of records")
            data = lists[0]
        if not isinstance(data, list):
            raise ConversionError(f"--input {str(path)!r}: expected a JSON list of records")
        for i, record in enumerate(data):
            yield f"{name}:{i}", record
    else:
        raise ConversionError(f"--input {str(path)!r}: allowed file types are .parquet, .jsonl, .json")


def write_parquet(rows: list[dict], path: str | Path) -> None:
    """Write rows with one explicit schema (so empty/None fields do not change column types between files)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema(
        [
            ("data_source", pa.string()),
            ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
            ("ability", pa.string()),
            ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
            (
                "extra_info",
                pa.struct(
                    [
                        ("split", pa.string()),
                        ("index", pa.int64()),
                        ("dataset", pa.string()),
                        ("problem", pa.string()),
                        ("solution", pa.string()),
                        ("answer", pa.string()),
                        (ROUTING_FIELD, pa.string()),
                        ("difficulty", pa.float64()),
                        ("topic", pa.string()),
                    ]
                ),
            ),
        ]
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def finish(rows: list[dict], report: DropReport, output: str | Path, report_path: str | Path | None) -> None:
    """Write the parquet and the drop report (JSON), print the summary; refuse an empty result."""
    if not rows:
        raise ConversionError(f"no rows left to write to {str(output)!r}\n{report.summary()}")
    write_parquet(rows, output)
    report_file = Path(report_path) if report_path else Path(str(output) + ".report.json")
    report_file.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
    print(report.summary())
    print(f"wrote {len(rows)} rows to {output} (report: {report_file})")


def converter_parser(description: str, template: str) -> argparse.ArgumentParser:
    """The arguments every converter takes; the converter adds its own. ``template`` is the default template."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="local .parquet/.jsonl/.json files")
    p.add_argument("--output", required=True, help="output parquet path")
    p.add_argument("--split", default="train", help="written to extra_info.split (default: train)")
    p.add_argument(
        "--data-source",
        default=DEFAULT_DATA_SOURCE,
        help=f"veRL scorer key (default: {DEFAULT_DATA_SOURCE}, i.e. verl.utils.reward_score.math_reward)",
    )
    others = " | ".join(name for name in TEMPLATES if name != template)
    p.add_argument(
        "--template",
        default=template,
        help=f"{template} | {others} | a string containing {{problem}} (default: {template})",
    )
    p.add_argument("--route", default="math", help="extra_info.opd_teacher, the multi-teacher routing value")
    p.add_argument("--solution-part", default="final", choices=("final", "full"), help="see verl_rows.solution_text")
    p.add_argument("--dedup", action="store_true", help="drop repeated problems (exact text), keeping the first")
    p.add_argument("--limit", type=int, default=None, help="stop after this many kept rows")
    p.add_argument("--report", default=None, help="drop report path (default: <output>.report.json)")
    return p


def convert_records(
    args: argparse.Namespace, row_fields: Callable[[dict, DropReport, str], dict | None]
) -> tuple[list[dict], DropReport]:
    """Rows of every record of ``args.input``: ``row_fields(record, report, where)`` returns the :func:`make_row`
    fields the record gives (``problem``, ``answer``, ``dataset``, ...), or None after recording why it drops it.

    Checks the template and data source before reading anything; applies ``--dedup`` and ``--limit`` to the kept
    rows.
    """
    render_prompt(args.template, "x")
    check_data_source(args.data_source)
    report = DropReport()
    rows: list[dict] = []
    seen: set[str] = set()
    for path in args.input:
        for where, record in read_records(path, report):
            if args.limit is not None and len(rows) >= args.limit:
                break
            report.read += 1
            if not isinstance(record, dict):
                report.drop("not_an_object", where)
                continue
            fields = row_fields(record, report, where)
            if fields is None:
                continue
            if args.dedup:
                if fields["problem"] in seen:
                    report.drop("duplicate_problem", where)
                    continue
                seen.add(fields["problem"])
            common = {"data_source": args.data_source, "template": args.template, "split": args.split}
            rows.append(make_row(**common, index=len(rows), route=args.route, **fields))
    report.kept = len(rows)
    return rows, report


def run_converter(name: str, convert: Callable[[argparse.Namespace], tuple[list[dict], DropReport]], args) -> int:
    """Convert and write; a :class:`ConversionError` is printed with the converter's name (exit code 2)."""
    try:
        rows, report = convert(args)
        finish(rows, report, args.output, args.report)
    except ConversionError as err:
        print(f"{name}: {err}", file=sys.stderr)
        return 2
    return 0


_THOUGHT_SOLUTION = re.compile(r"<\|begin_of_solution\|>(.*?)(?:<\|end_of_solution\|>|$)", re.S)
_THINK_BLOCK = re.compile(r"^\s*<think>.*?</think>", re.S)


def solution_text(text: str | None, part: str) -> str | None:
    """The reference solution to keep: `full` text, or its `final` part without the reasoning trace.

    `final` keeps what is inside OpenThoughts' <|begin_of_solution|>...<|end_of_solution|> markers, or what follows
    a leading <think>...</think> block (R1 style); text with neither marker is kept whole.
    """
    if part not in ("full", "final"):
        raise ConversionError(f"--solution-part must be 'full' or 'final'; got {part!r}")
    text = clean_text(text)
    if text is None or part == "full":
        return text
    match = _THOUGHT_SOLUTION.search(text)
    if match:
        return clean_text(match.group(1))
    if _THINK_BLOCK.match(text):
        return clean_text(_THINK_BLOCK.sub("", text, count=1))
    return text
