"""The demo task (data rows, reward) and the end-of-run summary/plot from a metrics file."""

import json

import pandas as pd

from opd_verl.demo import task
from opd_verl.demo.summary import summarize_run


def test_problems_rows_and_reward(tmp_path):
    problems = task.make_problems(200, 1, 2, seed=4)
    assert all(0 <= a <= 99 and 0 <= b <= 99 for a, b in problems)
    assert problems == task.make_problems(200, 1, 2, seed=4)
    rows = task.make_rows(problems, "train")
    path = task.write_parquet(str(tmp_path / "d" / "train.parquet"), rows)
    df = pd.read_parquet(path)
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    a, b = problems[0]
    assert df.prompt[0][0]["content"] == f"{a}+{b}=" and df.reward_model[0]["ground_truth"] == str(a + b)
    assert df.extra_info[0]["solution"] == str(a + b)
    assert task.compute_score(task.DATA_SOURCE, "57<|im_end|>", "57") == 1.0
    assert task.compute_score(task.DATA_SOURCE, " 57 <|im_end|>junk", "57") == 1.0
    assert task.compute_score(task.DATA_SOURCE, "571<|im_end|>", "57") == 0.0
    assert task.compute_score(task.DATA_SOURCE, "5", "57") == 0.0


def test_summary_first_vs_last_and_plot(tmp_path):
    rows = [
        {"step": s, "data": {"actor/distillation/loss": 4.0 / s, "critic/score/mean": 0.1 * s, "other": 1}}
        for s in range(1, 6)
    ]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    printed = []
    summary = summarize_run(run_dir=str(tmp_path), log=printed.append)
    assert summary["reverse_kl"] == {"first_step": 1, "first": 4.0, "last_step": 5, "last": 0.8}
    assert summary["task_reward"]["first"] == 0.1 and abs(summary["task_reward"]["last"] - 0.5) < 1e-12
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 5
    assert "4.0000  ->  step   5: 0.8000" in printed[0]


def test_summary_reads_the_plugin_discrepancy_as_negative_kl(tmp_path):
    rows = [{"step": s, "data": {"opd/discrepancy": -3.0 + s, "actor/distillation/loss": 99.0}} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = summarize_run(run_dir=str(tmp_path), log=lambda *_: None)
    assert summary["kl_key"] == "opd/discrepancy"
    assert summary["reverse_kl"]["first"] == 2.0 and summary["reverse_kl"]["last"] == 1.0
