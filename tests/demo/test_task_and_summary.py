"""The demo task (data rows, reward) and the end-of-run summary/plot from a metrics file."""

import json

import pandas as pd
import pytest

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


def test_worked_variant_lines_carries_and_answer():
    # 347+285 by hand: 7+5=12 (write 2, carry 1), 4+8+1=13 (write 3, carry 1), 3+2+1=6 (carry 0) -> 632.
    assert task.worked_text(347, 285) == "7+5+0=12 carry 1\n4+8+1=13 carry 1\n3+2+1=6 carry 0\nanswer 632"
    for a, b in task.make_problems(300, 1, 4, seed=7):
        lines = task.worked_text(a, b).split("\n")
        assert len(lines) == max(len(str(a)), len(str(b))) + 1
        carry, digits = 0, []
        for i, line in enumerate(lines[:-1]):
            # every line is the i-th digits of a and b plus the incoming carry, its total and the outgoing carry
            lhs, rhs = line.split("=")
            x, y, c = (int(t) for t in lhs.split("+"))
            total, carry_out = int(rhs.split(" carry ")[0]), int(rhs.split(" carry ")[1])
            assert (x, y, c) == (a // 10**i % 10, b // 10**i % 10, carry) and total == x + y + c
            assert carry_out == total // 10
            carry = carry_out
            digits.append(total % 10)
        assert int(str(carry) + "".join(map(str, reversed(digits)))) == a + b  # the lines add up to the sum
        assert lines[-1] == f"answer {a + b}"


def test_worked_rows_reward_and_tokenizer_round_trip(tmp_path):
    from opd_verl.demo.tiny import build_tokenizer

    problems = task.make_problems(50, 3, 3, seed=1)
    rows = task.make_rows(problems, "test", "worked")
    tok = build_tokenizer()
    (newline,) = tok.encode("\n", add_special_tokens=False)
    for (a, b), row in zip(problems, rows):
        assert row["data_source"] == task.WORKED_DATA_SOURCE and row["reward_model"]["ground_truth"] == str(a + b)
        solution = row["extra_info"]["solution"]
        assert solution == task.worked_text(a, b)
        ids = tok.encode(solution + tok.eos_token, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == solution + tok.eos_token
        assert ids.count(newline) == 3  # one newline token per line break: 4 sentences
        assert len(ids) <= 64  # fits the preset's max_response_length for this variant
        assert task.compute_score(row["data_source"], tok.decode(ids), str(a + b)) == 1.0
    worked = task.WORKED_DATA_SOURCE
    assert task.compute_score(worked, "7+5+0=12 carry 1\nanswer 632<|im_end|>", "632") == 1.0
    assert task.compute_score(worked, "answer 632\n7+5+0=12 carry 1<|im_end|>", "632") == 0.0  # not the last line
    assert task.compute_score(worked, "7+5+0=12 carry 1\nanswer 633", "632") == 0.0
    assert task.compute_score(worked, "632", "632") == 0.0  # the worked variant wants its answer line
    assert task.compute_score(task.DATA_SOURCE, "answer 632", "632") == 0.0  # and the sums variant the bare sum
    with pytest.raises(ValueError, match="sums"):
        task.make_rows(problems, "train", "long")


def _write_metrics(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_summary_means_of_first_and_last_steps_and_held_out_accuracy(tmp_path):
    kl = [4.0, 3.0, 3.5, 2.0, 2.5, 1.0, 1.5, 0.5, 1.0, 0.7, 0.6, 0.2]
    rows = [{"step": 0, "data": {"val-core/opd_demo/addition/acc/mean@1": 0.25, "val-aux/x/reward/mean@1": 9.0}}]
    rows += [
        {"step": s, "data": {"actor/distillation/loss": kl[s - 1], "critic/score/mean": 0.05 * s, "other": 1}}
        for s in range(1, 13)
    ]
    rows[6]["data"]["val-core/opd_demo/addition/acc/mean@1"] = 0.5  # step 6
    rows[12]["data"]["val-core/opd_demo/addition/acc/mean@1"] = 0.625  # step 12
    _write_metrics(tmp_path / "metrics.jsonl", rows)
    (tmp_path / "teacher_eval.json").write_text(json.dumps({"greedy_accuracy": 0.875}))
    printed = []
    summary = summarize_run(run_dir=str(tmp_path), log=printed.append)
    # 12 training steps: windows of 5; means by hand
    assert summary["steps"] == 12
    r = summary["reverse_kl"]
    assert r["window"] == 5 and r["first_steps"] == [1, 5] and r["last_steps"] == [8, 12]
    assert r["first_mean"] == pytest.approx((4.0 + 3.0 + 3.5 + 2.0 + 2.5) / 5)
    assert r["last_mean"] == pytest.approx((0.5 + 1.0 + 0.7 + 0.6 + 0.2) / 5)
    assert summary["task_reward"]["last_mean"] == pytest.approx(0.05 * (8 + 9 + 10 + 11 + 12) / 5)
    h = summary["held_out_accuracy"]
    assert h == {"before_step": 0, "before": 0.25, "after_step": 12, "after": 0.625, "teacher": 0.875}
    assert json.loads((tmp_path / "summary.json").read_text())["held_out_accuracy"]["teacher"] == 0.875
    assert (tmp_path / "curves.png").stat().st_size > 1000
    text = printed[0]
    assert "mean of steps 1-5: 3.0000  ->  steps 8-12: 0.6000" in text
    assert "step 0: 0.2500  ->  step 12: 0.6250   (teacher, the ceiling: 0.8750)" in text


def test_summary_window_on_short_runs():
    from opd_verl.demo.summary import first_last_means

    assert first_last_means([1], [2.0]) == {
        "window": 1, "first_steps": [1, 1], "first_mean": 2.0, "last_steps": [1, 1], "last_mean": 2.0
    }  # fmt: skip
    m = first_last_means([1, 2, 3], [1.0, 5.0, 9.0])
    assert m["window"] == 1 and m["first_mean"] == 1.0 and m["last_mean"] == 9.0


def test_summary_reads_the_plugin_discrepancy_as_negative_kl(tmp_path):
    rows = [{"step": s, "data": {"opd/discrepancy": -3.0 + s, "actor/distillation/loss": 99.0}} for s in (1, 2)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    summary = summarize_run(run_dir=str(tmp_path), log=lambda *_: None)
    assert summary["kl_key"] == "opd/discrepancy"
    assert summary["reverse_kl"]["first_mean"] == 2.0 and summary["reverse_kl"]["last_mean"] == 1.0


def test_console_step_lines_follow_the_metrics_file(tmp_path):
    from opd_verl.demo.console import StepPrinter, step_line

    data = {"opd/discrepancy": -2.5, "critic/score/mean": 0.25, "perf/time_per_step": 4.04, "noise/x": 1.0}
    assert step_line(3, 50, data) == "step 3/50  reverse KL 2.500  reward 0.25  s/step 4.0"
    data.update({"opd/release/accept_rate": 0.375, "opd/release/kept_fraction": 0.8125})
    assert step_line(3, None, data) == "step 3  reverse KL 2.500  reward 0.25  released 0.38  kept 0.81  s/step 4.0"
    data.update({"opd/health/alarm/collapse": 0.0, "opd/health/alarm/iw": 0.0})
    assert step_line(3, None, data).endswith("s/step 4.0")  # no alarm fired: nothing added
    data.update({"opd/health/alarm/collapse": 1.0, "opd/health/alarm/advantage_jump": 1.0})
    assert step_line(3, 50, data).endswith("s/step 4.0  HEALTH ALARM advantage_jump, collapse (docs/health.md)")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 9, "data": {}}\n')  # a previous run's file is not printed as this run's
    printed = []
    with StepPrinter(str(metrics), 2, log=printed.append) as printer:
        with open(metrics, "w") as f:
            f.write(json.dumps({"step": 0, "data": {"val-core/d/acc/mean@1": 0.5}}) + "\n")
            f.write(json.dumps({"step": 1, "data": {"critic/score/mean": 0.5}}) + "\n")
            f.write('{"step": 2, "da')  # a line still being written is held back
            f.flush()
            printer.poll()
            assert printed == ["before training: held-out accuracy 0.500", "step 1/2  reward 0.50"]
            f.write('ta": {"critic/score/mean": 1.0}}\n')
    assert printed[2:] == ["step 2/2  reward 1.00"]


def test_greedy_accuracy_batches_rows_like_one_at_a_time(tmp_path):
    from transformers import AutoTokenizer

    from opd_verl.cpu_port.hf_rollout import load_causal_lm, sample_tokens
    from opd_verl.demo.teacher_sft import greedy_accuracy
    from opd_verl.demo.tiny import build_tiny_qwen2

    tiny_model_dir = build_tiny_qwen2(str(tmp_path / "model"), hidden_size=32, seed=0)

    model, tok = load_causal_lm(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = task.make_rows(task.make_problems(66, 1, 3, seed=2), "test")  # 66 rows: two generate calls, ragged
    for row in rows:  # ground truth := the model's own greedy answer, decoded one row at a time
        prompt = tok.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        ids, _ = sample_tokens(model, tok.encode(prompt, add_special_tokens=False), 6, temperature=0,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
        row["reward_model"]["ground_truth"] = task.extract_answer(tok.decode(ids, skip_special_tokens=False))
    assert greedy_accuracy(model, tok, rows, max_new_tokens=6) == 1.0
    for row in rows[::2]:
        row["reward_model"]["ground_truth"] += "x"
    assert greedy_accuracy(model, tok, rows, max_new_tokens=6) == pytest.approx(33 / 66)


def test_console_keeps_a_resumed_runs_history_and_prints_only_new_steps(tmp_path):
    from opd_verl.demo.console import StepPrinter

    metrics = tmp_path / "metrics.jsonl"
    history = "".join(json.dumps({"step": s, "data": {"critic/score/mean": 0.5}}) + "\n" for s in (1, 2))
    metrics.write_text(history)
    printed = []
    with StepPrinter(str(metrics), 3, log=printed.append):
        with open(metrics, "a") as f:  # the resumed run appends after the kept rows
            f.write(json.dumps({"step": 3, "data": {"critic/score/mean": 1.0}}) + "\n")
    assert metrics.read_text().startswith(history)  # the history is left in place
    assert printed == ["step 3/3  reward 1.00"]
