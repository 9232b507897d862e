"""DeepMath-103K (local parquet/jsonl/json) -> veRL parquet for the OPD, ExOPD, G-OPD, IW-OPD and release recipes.

Source schema (zwhe99/DeepMath-103K): question, final_answer, difficulty (float), topic,
r1_solution_1, r1_solution_2, r1_solution_3. Download the files with your own tools, then e.g.::

    python scripts/data/prepare_deepmath.py --input deepmath/data/train-*.parquet \\
        --output data/deepmath/train.parquet --min-difficulty 6

Output rows: see verl_rows.py. The prompt is the G-OPD authors' math instruction (`--template gopd`); the
ground truth is `final_answer`, scored by veRL's math scorer selected by `--data-source`; the reference solution
(`extra_info.solution`, for OPSD on this data) comes from `--solution-field`. Rows dropped and why are printed and
written to `<output>.report.json`.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from verl_rows import (  # noqa: E402
    ConversionError,
    DropReport,
    clean_answer,
    clean_text,
    convert_records,
    converter_parser,
    run_converter,
    solution_text,
)

DATASET = "zwhe99/DeepMath-103K"
SOLUTION_FIELDS = ("r1_solution_1", "r1_solution_2", "r1_solution_3", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = converter_parser(__doc__, template="gopd")
    p.add_argument("--min-difficulty", type=float, default=None, help="keep rows with difficulty >= this")
    p.add_argument("--max-difficulty", type=float, default=None, help="keep rows with difficulty <= this")
    p.add_argument(
        "--solution-field",
        default="r1_solution_1",
        choices=SOLUTION_FIELDS,
        help="column copied to extra_info.solution (default: r1_solution_1; none: leave it empty)",
    )
    p.add_argument("--require-solution", action="store_true", help="drop rows without a solution (OPSD)")
    return p.parse_args(argv)


def row_fields(args: argparse.Namespace, record: dict, report: DropReport, where: str) -> dict | None:
    """The output fields of one DeepMath record, or None (reason recorded in ``report``)."""
    problem = clean_text(record.get("question"))
    if problem is None:
        return report.drop("missing_question", where)
    answer = clean_answer(record.get("final_answer"))
    if answer is None:
        return report.drop("missing_final_answer", where)
    difficulty = record.get("difficulty")
    if difficulty is not None and not isinstance(difficulty, int | float):
        return report.drop("non_numeric_difficulty", where)
    if args.min_difficulty is not None or args.max_difficulty is not None:
        if difficulty is None:
            return report.drop("missing_difficulty", where)
        if args.min_difficulty is not None and difficulty < args.min_difficulty:
            return report.drop("below_min_difficulty", where)
        if args.max_difficulty is not None and difficulty > args.max_difficulty:
            return report.drop("above_max_difficulty", where)
    solution = None
    if args.solution_field != "none":
        solution = solution_text(record.get(args.solution_field), args.solution_part)
    if args.require_solution and solution is None:
        return report.drop("missing_solution", where)
    return {
        "problem": problem,
        "answer": answer,
        "dataset": DATASET,
        "solution": solution,
        "difficulty": difficulty,
        "topic": clean_text(record.get("topic")),
    }


def convert(args: argparse.Namespace) -> tuple[list[dict], DropReport]:
    if args.require_solution and args.solution_field == "none":
        raise ConversionError("--require-solution needs a --solution-field other than 'none'")
    return convert_records(args, partial(row_fields, args))


def main(argv: list[str] | None = None) -> int:
    return run_converter("prepare_deepmath", convert, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
