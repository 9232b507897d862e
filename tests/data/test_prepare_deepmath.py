"""scripts/data/prepare_deepmath.py on hand-made DeepMath-103K rows."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from verl.utils.reward_score import default_compute_score

INSTRUCTION = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def deepmath_row(question, final_answer, difficulty=6.5, topic="Algebra", sol="<think>hmm</think>So \\boxed{2}."):
    return {
        "question": question,
        "final_answer": final_answer,
        "difficulty": difficulty,
        "topic": topic,
        "r1_solution_1": sol,
        "r1_solution_2": "second",
        "r1_solution_3": "third",
    }


def test_parquet_rows_to_verl_format(tmp_path, run_converter, read_rows):
    src = tmp_path / "train-00000.parquet"
    records = [
        deepmath_row("What is 1+1?", "2"),
        deepmath_row("Compute $\\frac{1}{2}+\\frac{1}{2}$.", "1", difficulty=7.0, topic="Calculus"),
    ]
    pq.write_table(pa.Table.from_pylist(records), src)
    out = tmp_path / "out" / "train.parquet"
    proc = run_converter("prepare_deepmath.py", ["--input", str(src), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert len(rows) == 2
    first = rows[0]
    assert first["data_source"] == "lighteval/MATH"
    assert first["ability"] == "math"
    assert first["prompt"] == [{"role": "user", "content": "What is 1+1?" + INSTRUCTION}]
    assert first["reward_model"] == {"style": "rule", "ground_truth": "2"}
    info = first["extra_info"]
    assert info["split"] == "train" and info["index"] == 0
    assert info["problem"] == "What is 1+1?"
    assert info["answer"] == "2"
    assert info["opd_teacher"] == "math"
    assert info["dataset"] == "zwhe99/DeepMath-103K"
    assert info["difficulty"] == 6.5 and info["topic"] == "Algebra"
    # final part of the R1 solution (the <think> block removed)
    assert info["solution"] == "So \\boxed{2}."
    assert rows[1]["extra_info"]["index"] == 1 and rows[1]["extra_info"]["topic"] == "Calculus"
    report = json.loads((tmp_path / "out" / "train.parquet.report.json").read_text())
    assert report == {"read": 2, "kept": 2, "dropped": {}, "examples": {}}


def test_ground_truth_is_scored_by_verls_own_verifier(tmp_path, run_converter, read_rows, write_jsonl):
    src = write_jsonl(tmp_path / "d.jsonl", [deepmath_row("Half of one?", "\\frac{1}{2}")])
    out = tmp_path / "t.parquet"
    assert run_converter("prepare_deepmath.py", ["--input", str(src), "--output", str(out)]).returncode == 0
    row = read_rows(out)[0]
    gt = row["reward_model"]["ground_truth"]
    ds = row["data_source"]
    assert default_compute_score(ds, "... so the answer is \\boxed{\\frac{1}{2}}", gt) == 1.0
    assert default_compute_score(ds, "... so the answer is \\boxed{\\dfrac{1}{2}}", gt) == 1.0
    assert default_compute_score(ds, "... so the answer is \\boxed{2}", gt) == 0.0


def test_malformed_rows_are_dropped_and_reported(tmp_path, run_converter, read_rows, write_jsonl):
    src = write_jsonl(
        tmp_path / "d.jsonl",
        [
            deepmath_row("ok", "3"),  # line 1 kept
            deepmath_row("", "3"),  # line 2 empty question
            deepmath_row("no answer", None),  # line 3
            deepmath_row("easy", "4", difficulty=3.0),  # line 4 below min
            deepmath_row("ok", "3"),  # line 5 duplicate of line 1
            ["not", "an", "object"],  # line 6
            deepmath_row("boxed answer", "\\boxed{5}"),  # line 7 kept, box removed
            deepmath_row("odd difficulty", "1", difficulty="hard"),  # line 8
        ],
        raw_lines=('{"question": "broken',),  # line 9
    )
    out = tmp_path / "t.parquet"
    proc = run_converter(
        "prepare_deepmath.py", ["--input", str(src), "--output", str(out), "--min-difficulty", "6", "--dedup"]
    )
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert [r["extra_info"]["problem"] for r in rows] == ["ok", "boxed answer"]
    assert rows[1]["reward_model"]["ground_truth"] == "5"
    report = json.loads(out.with_name("t.parquet.report.json").read_text())
    assert report["read"] == 9 and report["kept"] == 2
    assert report["dropped"] == {
        "below_min_difficulty": 1,
        "duplicate_problem": 1,
        "malformed_json": 1,
        "missing_final_answer": 1,
        "missing_question": 1,
        "non_numeric_difficulty": 1,
        "not_an_object": 1,
    }
    assert report["examples"]["missing_question"] == ["d.jsonl:2"]
    assert report["examples"]["malformed_json"] == ["d.jsonl:9"]
    assert "dropped       1 duplicate_problem" in proc.stdout


def test_options_route_template_solution_field_limit(tmp_path, run_converter, read_rows, write_jsonl):
    src = write_jsonl(tmp_path / "d.json.jsonl", [deepmath_row(f"q{i}", str(i)) for i in range(5)])
    out = tmp_path / "t.parquet"
    args = ["--input", str(src), "--output", str(out), "--route", "math_teacher", "--template", "opsd"]
    args += ["--solution-field", "r1_solution_2", "--limit", "3", "--split", "test", "--data-source", "math_dapo"]
    proc = run_converter("prepare_deepmath.py", args)
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert len(rows) == 3
    assert rows[2]["extra_info"]["opd_teacher"] == "math_teacher"
    assert rows[2]["extra_info"]["solution"] == "second"
    assert rows[2]["extra_info"]["split"] == "test"
    assert rows[0]["data_source"] == "math_dapo"
    assert rows[0]["prompt"][0]["content"] == (
        "Problem: q0\n\nPlease reason step by step, and put your final answer within \\boxed{}."
    )


def test_json_list_input(tmp_path, run_converter, read_rows):
    src = tmp_path / "d.json"
    src.write_text(json.dumps([deepmath_row("a", "1"), deepmath_row("b", 2)]))
    out = tmp_path / "t.parquet"
    assert run_converter("prepare_deepmath.py", ["--input", str(src), "--output", str(out)]).returncode == 0
    rows = read_rows(out)
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["1", "2"]


def test_bad_options_fail_clearly(tmp_path, run_converter, write_jsonl):
    src = write_jsonl(tmp_path / "d.jsonl", [deepmath_row("a", "1")])
    out = tmp_path / "t.parquet"
    proc = run_converter("prepare_deepmath.py", ["--input", str(src), "--output", str(out), "--data-source", "x"])
    assert proc.returncode == 2 and "--data-source 'x'" in proc.stderr
    proc = run_converter("prepare_deepmath.py", ["--input", str(src), "--output", str(out), "--template", "no slot"])
    assert proc.returncode == 2 and "--template" in proc.stderr
    proc = run_converter("prepare_deepmath.py", ["--input", str(tmp_path / "d.csv"), "--output", str(out)])
    assert proc.returncode == 2 and "is not a file" in proc.stderr
    bad = tmp_path / "d.csv"
    bad.write_text("question,final_answer\n")
    proc = run_converter("prepare_deepmath.py", ["--input", str(bad), "--output", str(out)])
    assert proc.returncode == 2 and ".parquet, .jsonl, .json" in proc.stderr
    empty = write_jsonl(tmp_path / "e.jsonl", [deepmath_row("", "1")])
    proc = run_converter("prepare_deepmath.py", ["--input", str(empty), "--output", str(out)])
    assert proc.returncode == 2 and "no rows left" in proc.stderr and "missing_question" in proc.stderr
    assert not out.exists()


def test_command_line(tmp_path, run_converter_cli, read_rows, write_jsonl):
    src = write_jsonl(tmp_path / "d.jsonl", [deepmath_row("a", "1"), deepmath_row("", "1")])
    out = tmp_path / "t.parquet"
    proc = run_converter_cli("prepare_deepmath.py", ["--input", str(src), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    assert "read 2 rows, kept 1, dropped 1" in proc.stdout
    assert len(read_rows(out)) == 1
