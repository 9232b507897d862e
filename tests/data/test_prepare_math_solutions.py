"""scripts/data/prepare_math_solutions.py on hand-made rows of each accepted schema."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from verl.utils.reward_score import default_compute_score

STUDENT = "Problem: {p}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."


def test_flat_schema_problem_solution_answer(tmp_path, run_converter, read_rows):
    src = tmp_path / "train.parquet"
    records = [
        # OPSD authors' dataset carries both spellings; lower-case wins.
        {"problem": "What is 2+3?", "solution": "2+3=5, so \\boxed{5}.", "Question": "ignored", "Answer": "5"},
        {"problem": "Square of 3?", "solution": "3*3 = 9. \\boxed{9}", "answer": " 9 "},
    ]
    pq.write_table(pa.Table.from_pylist(records), src)
    out = tmp_path / "o.parquet"
    proc = run_converter("prepare_math_solutions.py", ["--input", str(src), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out)
    assert len(rows) == 2
    assert rows[0]["prompt"] == [{"role": "user", "content": STUDENT.format(p="What is 2+3?")}]
    assert rows[0]["extra_info"]["problem"] == "What is 2+3?"
    assert rows[0]["extra_info"]["solution"] == "2+3=5, so \\boxed{5}."
    assert rows[0]["reward_model"]["ground_truth"] == "5"
    assert rows[1]["reward_model"]["ground_truth"] == "9"
    assert rows[1]["extra_info"]["index"] == 1
    for row in rows:
        gt = row["reward_model"]["ground_truth"]
        assert default_compute_score(row["data_source"], f"thus \\boxed{{{gt}}}", gt) == 1.0


def test_capitalised_question_answer_schema(tmp_path, run_converter, read_rows, write_jsonl):
    src = write_jsonl(tmp_path / "d.jsonl", [{"Question": "Q?", "solution": "long work", "Answer": "\\frac{3}{4}"}])
    out = tmp_path / "o.parquet"
    assert run_converter("prepare_math_solutions.py", ["--input", str(src), "--output", str(out)]).returncode == 0
    row = read_rows(out)[0]
    assert row["extra_info"]["problem"] == "Q?"
    assert row["extra_info"]["solution"] == "long work"
    assert row["reward_model"]["ground_truth"] == "\\frac{3}{4}"


def test_openthoughts_conversations_schema(tmp_path, run_converter, read_rows, write_jsonl):
    assistant = (
        "<|begin_of_thought|>\n\nLet me think... 6*7\n\n<|end_of_thought|>\n\n"
        "<|begin_of_solution|>\n\n6 times 7 is \\boxed{42}.\n\n<|end_of_solution|>"
    )
    record = {
        "system": "Your role as an assistant involves thoroughly exploring questions ...",
        "conversations": [{"from": "user", "value": "Compute 6*7."}, {"from": "assistant", "value": assistant}],
    }
    src = write_jsonl(tmp_path / "ot.jsonl", [record])
    out = tmp_path / "o.parquet"
    proc = run_converter("prepare_math_solutions.py", ["--input", str(src), "--output", str(out)])
    assert proc.returncode == 0, proc.stderr
    row = read_rows(out)[0]
    assert row["extra_info"]["problem"] == "Compute 6*7."
    assert row["extra_info"]["solution"] == "6 times 7 is \\boxed{42}."  # final part, thought removed
    assert row["reward_model"]["ground_truth"] == "42"  # from the solution's last \boxed{}
    out_full = tmp_path / "full.parquet"
    args = ["--input", str(src), "--output", str(out_full), "--solution-part", "full"]
    assert run_converter("prepare_math_solutions.py", args).returncode == 0
    assert read_rows(out_full)[0]["extra_info"]["solution"] == assistant.strip()


def test_messages_schema_and_forced_fields(tmp_path, run_converter, read_rows, write_jsonl):
    records = [
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "1+1?"},
                {"role": "assistant", "content": "It is \\boxed{2}."},
            ]
        },
        {"prob": "custom?", "ref": "custom work", "gt": 7},
    ]
    src = write_jsonl(tmp_path / "m.jsonl", records)
    out = tmp_path / "o.parquet"
    assert run_converter("prepare_math_solutions.py", ["--input", str(src), "--output", str(out)]).returncode == 0
    rows = read_rows(out)
    assert len(rows) == 1  # the custom row has no known columns
    assert rows[0]["extra_info"]["problem"] == "1+1?" and rows[0]["reward_model"]["ground_truth"] == "2"
    forced = ["--problem-field", "prob", "--solution-field", "ref", "--answer-field", "gt"]
    out2 = tmp_path / "o2.parquet"
    proc = run_converter("prepare_math_solutions.py", ["--input", str(src), "--output", str(out2), *forced])
    assert proc.returncode == 0, proc.stderr
    rows = read_rows(out2)
    assert len(rows) == 1
    assert rows[0]["extra_info"]["problem"] == "custom?"
    assert rows[0]["extra_info"]["solution"] == "custom work"
    assert rows[0]["reward_model"]["ground_truth"] == "7"


def test_drops_reported(tmp_path, run_converter, read_rows, write_jsonl):
    records = [
        {"problem": "keep", "solution": "s \\boxed{1}"},  # 1 kept
        {"problem": "no solution", "answer": "3"},  # 2
        {"problem": "no answer anywhere", "solution": "no box here"},  # 3
        {"solution": "orphan \\boxed{1}"},  # 4
        {"problem": "keep", "solution": "again \\boxed{1}"},  # 5 duplicate
        "a string",  # 6
        {"conversations": "not a list"},  # 7
    ]
    src = write_jsonl(tmp_path / "d.jsonl", records, raw_lines=("{oops",))  # 8
    out = tmp_path / "o.parquet"
    proc = run_converter("prepare_math_solutions.py", ["--input", str(src), "--output", str(out), "--dedup"])
    assert proc.returncode == 0, proc.stderr
    assert [r["extra_info"]["problem"] for r in read_rows(out)] == ["keep"]
    report = json.loads((tmp_path / "o.parquet.report.json").read_text())
    assert report["read"] == 8 and report["kept"] == 1
    assert report["dropped"] == {
        "duplicate_problem": 1,
        "malformed_json": 1,
        "missing_answer": 1,
        "missing_problem": 2,
        "missing_solution": 1,
        "not_an_object": 1,
    }
    assert report["examples"]["missing_solution"] == ["d.jsonl:2"]
    assert report["examples"]["missing_problem"] == ["d.jsonl:4", "d.jsonl:7"]


def test_eval_set_without_solutions(tmp_path, run_converter, read_rows, write_jsonl):
    """AIME-style problem/answer files (the G-OPD authors' eval format) pass with --allow-missing-solution."""
    src = write_jsonl(tmp_path / "aime.jsonl", [{"id": 60, "problem": "Find x.", "answer": "204"}])
    out = tmp_path / "o.parquet"
    args = ["--input", str(src), "--output", str(out), "--allow-missing-solution", "--split", "test"]
    args += ["--template", "gopd", "--dataset", "aime24"]
    assert run_converter("prepare_math_solutions.py", args).returncode == 0
    row = read_rows(out)[0]
    assert row["extra_info"]["solution"] is None
    assert row["extra_info"]["dataset"] == "aime24"
    assert row["prompt"][0]["content"].startswith("Find x.\nPlease reason step by step")
    assert row["reward_model"]["ground_truth"] == "204"


def test_columns_match_the_opsd_config_keys(tmp_path, run_converter, read_rows, write_jsonl):
    """The default opd.opsd.problem_key / solution_key (dotted paths into extra_info) find the written values."""
    from pathlib import Path

    import yaml

    base = Path(__file__).resolve().parents[2] / "opd_verl" / "hydra_configs" / "opd_trainer.yaml"
    opsd = yaml.safe_load(base.read_text())["opd"]["opsd"]
    src = write_jsonl(tmp_path / "d.jsonl", [{"problem": "P", "solution": "S \\boxed{1}"}])
    out = tmp_path / "o.parquet"
    assert run_converter("prepare_math_solutions.py", ["--input", str(src), "--output", str(out)]).returncode == 0
    row = read_rows(out)[0]

    def lookup(key):
        value = row
        for part in key.split("."):
            value = value[part]
        return value

    assert lookup(opsd["problem_key"]) == "P"
    assert lookup(opsd["solution_key"]) == "S \\boxed{1}"
