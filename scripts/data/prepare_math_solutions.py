"""Math problems with reference solutions (OpenThoughts-style, local files) -> veRL parquet for OPSD.

OPSD's privileged teacher reads the problem and a verified reference solution; veRL's reward (for validation
and logging) needs the final answer. Accepted source schemas, detected per row (or forced with --*-field):

- flat columns: problem | Question | question, solution | ground_truth_solution | reference_solution,
  answer | Answer | final_answer | ground_truth (e.g. the OPSD authors' Openthoughts_math_30k_opsd, OpenR1-Math);
- chat columns: `conversations` ([{"from": "user"|"human"|"assistant"|"gpt", "value": ...}], OpenThoughts-114k)
  or `messages` ([{"role", "content"}]): the first user turn is the problem, the first assistant turn after it the
  solution.

Without an answer column the answer is the last \\boxed{} of the solution (veRL's extraction). Problem-only files
(evaluation sets such as AIME with problem/answer) pass with --allow-missing-solution. Example::

    python scripts/data/prepare_math_solutions.py --input openthoughts_math/train.parquet \\
        --output data/opsd/train.parquet

The prompt is the OPSD authors' student instruction (`--template opsd`). Rows dropped and why are printed and
written to `<output>.report.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from verl_rows import (  # noqa: E402
    DEFAULT_DATA_SOURCE,
    ConversionError,
    DropReport,
    check_data_source,
    clean_answer,
    clean_text,
    finish,
    last_boxed,
    make_row,
    read_records,
    render_prompt,
    solution_text,
)

PROBLEM_FIELDS = ("problem", "Question", "question")
SOLUTION_FIELDS = ("solution", "ground_truth_solution", "reference_solution")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "ground_truth")
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="local .parquet/.jsonl/.json files")
    p.add_argument("--output", required=True, help="output parquet path")
    p.add_argument("--split", default="train", help="written to extra_info.split (default: train)")
    p.add_argument("--dataset", default="openthoughts_math", help="written to extra_info.dataset")
    p.add_argument(
        "--data-source",
        default=DEFAULT_DATA_SOURCE,
        help=f"veRL scorer key (default: {DEFAULT_DATA_SOURCE}, i.e. verl.utils.reward_score.math_reward)",
    )
    p.add_argument("--template", default="opsd", help="opsd | gopd | a string containing {problem} (default: opsd)")
    p.add_argument("--route", default="math", help="extra_info.opd_teacher, the multi-teacher routing value")
    p.add_argument("--problem-field", default=None, help="force the problem column")
    p.add_argument("--solution-field", default=None, help="force the solution column")
    p.add_argument("--answer-field", default=None, help="force the answer column")
    p.add_argument("--solution-part", default="final", choices=("final", "full"), help="see verl_rows.solution_text")
    p.add_argument("--allow-missing-solution", action="store_true", help="keep rows without a solution")
    p.add_argument("--dedup", action="store_true", help="drop repeated problems (exact text), keeping the first")
    p.add_argument("--limit", type=int, default=None, help="stop after this many kept rows")
    p.add_argument("--report", default=None, help="drop report path (default: <output>.report.json)")
    return p.parse_args(argv)


def _first(record: dict, forced: str | None, candidates: tuple[str, ...]) -> Any:
    if forced is not None:
        return record.get(forced)
    for name in candidates:
        if record.get(name) is not None:
            return record[name]
    return None


def _chat_turns(record: dict) -> tuple[str | None, str | None] | None:
    """(problem, solution) from `conversations` or `messages`; None when the row has neither column."""
    for column, role_key, text_key in (("conversations", "from", "value"), ("messages", "role", "content")):
        turns = record.get(column)
        if turns is None:
            continue
        if not isinstance(turns, list):
            return None, None
        problem = solution = None
        for turn in turns:
            if not isinstance(turn, dict):
                continue
            role = turn.get(role_key)
            if problem is None and role in USER_ROLES:
                problem = turn.get(text_key)
            elif problem is not None and role in ASSISTANT_ROLES:
                solution = turn.get(text_key)
                break
        return problem, solution
    return None


def extract(record: dict, args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """(problem, solution, answer) of one source row; None for what it lacks."""
    problem = _first(record, args.problem_field, PROBLEM_FIELDS)
    solution = _first(record, args.solution_field, SOLUTION_FIELDS)
    if args.problem_field is None and problem is None or args.solution_field is None and solution is None:
        chat = _chat_turns(record)
        if chat is not None:
            problem = problem if problem is not None else chat[0]
            solution = solution if solution is not None else chat[1]
    problem = clean_text(problem)
    full_solution = clean_text(solution)
    kept_solution = solution_text(full_solution, args.solution_part)
    answer = clean_answer(_first(record, args.answer_field, ANSWER_FIELDS))
    if answer is None and full_solution is not None:
        answer = clean_answer(last_boxed(full_solution))
    return problem, kept_solution, answer


def convert(args: argparse.Namespace) -> tuple[list[dict], DropReport]:
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
            problem, solution, answer = extract(record, args)
            if problem is None:
                report.drop("missing_problem", where)
                continue
            if solution is None and not args.allow_missing_solution:
                report.drop("missing_solution", where)
                continue
            if answer is None:
                report.drop("missing_answer", where)
                continue
            if args.dedup:
                if problem in seen:
                    report.drop("duplicate_problem", where)
                    continue
                seen.add(problem)
            rows.append(
                make_row(
                    problem=problem,
                    answer=answer,
                    data_source=args.data_source,
                    template=args.template,
                    split=args.split,
                    index=len(rows),
                    dataset=args.dataset,
                    solution=solution,
                    route=args.route,
                )
            )
    report.kept = len(rows)
    return rows, report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rows, report = convert(args)
        finish(rows, report, args.output, args.report)
    except ConversionError as err:
        print(f"prepare_math_solutions: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
