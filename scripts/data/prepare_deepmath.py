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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from verl_rows import (  # noqa: E402
    DEFAULT_DATA_SOURCE,
    ConversionError,
    DropReport,
    check_data_source,
    clean_answer,
    clean_text,
    finish,
    make_row,
    read_records,
    render_prompt,
    solution_text,
)

DATASET = "zwhe99/DeepMath-103K"
SOLUTION_FIELDS = ("r1_solution_1", "r1_solution_2", "r1_solution_3", "none")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="local .parquet/.jsonl/.json files")
    p.add_argument("--output", required=True, help="output parquet path")
    p.add_argument("--split", default="train", help="written to extra_info.split (default: train)")
    p.add_argument(
        "--data-source",
        default=DEFAULT_DATA_SOURCE,
        help=f"veRL scorer key (default: {DEFAULT_DATA_SOURCE}, i.e. verl.utils.reward_score.math_reward)",
    )
    p.add_argument("--template", default="gopd", help="gopd | opsd | a string containing {problem} (default: gopd)")
    p.add_argument("--route", default="math", help="extra_info.opd_teacher, the multi-teacher routing value")
    p.add_argument("--min-difficulty", type=float, default=None, help="keep rows with difficulty >= this")
    p.add_argument("--max-difficulty", type=float, default=None, help="keep rows with difficulty <= this")
    p.add_argument(
        "--solution-field",
        default="r1_solution_1",
        choices=SOLUTION_FIELDS,
        help="column copied to extra_info.solution (default: r1_solution_1; none: leave it empty)",
    )
    p.add_argument("--solution-part", default="final", choices=("final", "full"), help="see verl_rows.solution_text")
    p.add_argument("--require-solution", action="store_true", help="drop rows without a solution (OPSD)")
    p.add_argument("--dedup", action="store_true", help="drop repeated problems (exact text), keeping the first")
    p.add_argument("--limit", type=int, default=None, help="stop after this many kept rows")
    p.add_argument("--report", default=None, help="drop report path (default: <output>.report.json)")
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> tuple[list[dict], DropReport]:
    render_prompt(args.template, "x")  # validate the template before reading anything
    check_data_source(args.data_source)
    if args.require_solution and args.solution_field == "none":
        raise ConversionError("--require-solution needs a --solution-field other than 'none'")
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
            problem = clean_text(record.get("question"))
            if problem is None:
                report.drop("missing_question", where)
                continue
            answer = clean_answer(record.get("final_answer"))
            if answer is None:
                report.drop("missing_final_answer", where)
                continue
            difficulty = record.get("difficulty")
            if difficulty is not None and not isinstance(difficulty, int | float):
                report.drop("non_numeric_difficulty", where)
                continue
            if args.min_difficulty is not None or args.max_difficulty is not None:
                if difficulty is None:
                    report.drop("missing_difficulty", where)
                    continue
                if args.min_difficulty is not None and difficulty < args.min_difficulty:
                    report.drop("below_min_difficulty", where)
                    continue
                if args.max_difficulty is not None and difficulty > args.max_difficulty:
                    report.drop("above_max_difficulty", where)
                    continue
            solution = None
            if args.solution_field != "none":
                solution = solution_text(record.get(args.solution_field), args.solution_part)
            if args.require_solution and solution is None:
                report.drop("missing_solution", where)
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
                    dataset=DATASET,
                    solution=solution,
                    route=args.route,
                    difficulty=difficulty,
                    topic=clean_text(record.get("topic")),
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
        print(f"prepare_deepmath: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
