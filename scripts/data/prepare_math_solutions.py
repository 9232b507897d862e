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
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from verl_rows import (  # noqa: E402
    DropReport,
    clean_answer,
    clean_text,
    convert_records,
    converter_parser,
    last_boxed,
    run_converter,
    solution_text,
)

PROBLEM_FIELDS = ("problem", "Question", "question")
SOLUTION_FIELDS = ("solution", "ground_truth_solution", "reference_solution")
ANSWER_FIELDS = ("answer", "Answer", "final_answer", "ground_truth")
USER_ROLES = ("user", "human")
ASSISTANT_ROLES = ("assistant", "gpt")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = converter_parser(__doc__, template="opsd")
    p.add_argument("--dataset", default="openthoughts_math", help="written to extra_info.dataset")
    p.add_argument("--problem-field", default=None, help="force the problem column")
    p.add_argument("--solution-field", default=None, help="force the solution column")
    p.add_argument("--answer-field", default=None, help="force the answer column")
    p.add_argument("--allow-missing-solution", action="store_true", help="keep rows without a solution")
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


def row_fields(args: argparse.Namespace, record: dict, report: DropReport, where: str) -> dict | None:
    """The output fields of one source record, or None (reason recorded in ``report``)."""
    problem, solution, answer = extract(record, args)
    if problem is None:
        return report.drop("missing_problem", where)
    if solution is None and not args.allow_missing_solution:
        return report.drop("missing_solution", where)
    if answer is None:
        return report.drop("missing_answer", where)
    return {"problem": problem, "answer": answer, "dataset": args.dataset, "solution": solution}


def convert(args: argparse.Namespace) -> tuple[list[dict], DropReport]:
    return convert_records(args, partial(row_fields, args))


def main(argv: list[str] | None = None) -> int:
    return run_converter("prepare_math_solutions", convert, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
