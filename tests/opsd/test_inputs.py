import importlib.resources

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from opd_verl.opsd.inputs import (
    OPSDDataError,
    build_teacher_batch,
    check_solutions,
    check_solutions_in_files,
    fill_template,
    lookup_field,
    privileged_prompt_ids,
    response_logit_index,
)

TEACHER_TEMPLATE = "P: {problem}\nS: {solution}\nAnswer in \\boxed{}."


def test_lookup_field_dotted_paths_and_literal_columns():
    row = {"extra_info": {"solution": "x=2", "deep": {"a": 1}}, "reward_model": {"ground_truth": "2"}, "a.b": 5}
    assert lookup_field(row, "extra_info.solution") == "x=2"
    assert lookup_field(row, "reward_model.ground_truth") == "2"
    assert lookup_field(row, "extra_info.deep.a") == 1
    assert lookup_field(row, "a.b") == 5
    assert lookup_field(row, "extra_info.missing") is None
    assert lookup_field(row, "reward_model.ground_truth.x") is None


def test_fill_template_is_literal():
    out = fill_template(TEACHER_TEMPLATE, "1+1 {x}", "{problem} is 2")
    assert out == "P: 1+1 {x}\nS: {problem} is 2\nAnswer in \\boxed{}."
    # a problem that contains the text "{solution}" is not filled in turn
    assert fill_template("{problem}|{solution}", "a{solution}", "b") == "a{solution}|b"


def test_authors_default_template_fields_filled():
    yaml = importlib.resources.files("opd_verl.hydra_configs").joinpath("opd_trainer.yaml").read_text()
    tpl = OmegaConf.create(yaml).opd.opsd.teacher_template
    text = fill_template(tpl, "What is 2+3?", "2+3=5, so \\boxed{5}")
    assert "Problem: What is 2+3?\n\n" in text
    assert "=== Reference Solution Begin ===\n2+3=5, so \\boxed{5}\n=== Reference Solution End ===" in text
    assert text.endswith("put your final answer within \\boxed{}.")
    assert "{problem}" not in text and "{solution}" not in text


def test_privileged_prompt_goes_through_chat_template(tokenizer):
    ids = privileged_prompt_ids(tokenizer, TEACHER_TEMPLATE, "q", "s")
    expected_text = "<|im_start|>user\nP: q\nS: s\nAnswer in \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tokenizer(expected_text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == expected_text


def _student_batch(prompts, responses, pad):
    """veRL's rollout layout, built independently: left-padded prompts + right-padded responses."""
    width = max(len(p) for p in prompts)
    rwidth = max(len(r) for r in responses)
    ids, mask = [], []
    for p, r in zip(prompts, responses):
        ids.append([pad] * (width - len(p)) + p + r + [pad] * (rwidth - len(r)))
        mask.append([0] * (width - len(p)) + [1] * (len(p) + len(r)) + [0] * (rwidth - len(r)))
    return torch.tensor(ids), torch.tensor(mask), width, rwidth


def test_teacher_batch_keeps_response_ids_aligned(tokenizer):
    pad = tokenizer.pad_token_id
    student_prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    responses = [[20, 21, 22, 23], [30, 31]]
    teacher_prompts = [privileged_prompt_ids(tokenizer, TEACHER_TEMPLATE, "a", "b"), [9, 9, 9]]
    s_ids, s_mask, s_width, rwidth = _student_batch(student_prompts, responses, pad)
    resp = s_ids[:, s_width:]
    resp_mask = s_mask[:, s_width:]
    tb = build_teacher_batch(teacher_prompts, resp, resp_mask, pad)
    t_width = tb["prompt_width"]
    assert t_width == max(len(p) for p in teacher_prompts)
    # response ids identical and at the same offset from the end (same column relative to the prompt width)
    assert torch.equal(tb["input_ids"][:, t_width:], s_ids[:, s_width:])
    assert torch.equal(tb["attention_mask"][:, t_width:], s_mask[:, s_width:])
    for i, (tp, r) in enumerate(zip(teacher_prompts, responses)):
        row = tb["input_ids"][i]
        assert row[t_width - len(tp) : t_width].tolist() == tp
        assert row[: t_width - len(tp)].eq(pad).all()
        assert row[t_width : t_width + len(r)].tolist() == r
        # positions count real tokens: response token j is at position len(teacher prompt) + j
        assert tb["position_ids"][i, t_width : t_width + len(r)].tolist() == list(range(len(tp), len(tp) + len(r)))
        assert tb["attention_mask"][i].sum().item() == len(tp) + len(r)
    idx = response_logit_index(t_width, rwidth)
    assert idx.tolist() == list(range(t_width - 1, t_width - 1 + rwidth))


def test_teacher_batch_rejects_bad_shapes(tokenizer):
    with pytest.raises(ValueError, match="teacher prompts"):
        build_teacher_batch([[1]], torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), 0)
    with pytest.raises(ValueError, match="at least one token"):
        build_teacher_batch([[]], torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), 0)


ROWS = [
    {"extra_info": {"problem": "p0", "solution": "s0"}},
    {"extra_info": {"problem": "p1", "solution": "  "}},
    {"extra_info": {"problem": "p2", "solution": "s2"}},
    {"extra_info": {"problem": "p3"}},
]


def test_missing_solution_error_names_row_and_column():
    with pytest.raises(OPSDDataError, match=r"row 1 .*'extra_info\.solution'"):
        check_solutions(ROWS, "extra_info.problem", "extra_info.solution", "error")


def test_missing_solution_skip_flags_rows():
    assert check_solutions(ROWS, "extra_info.problem", "extra_info.solution", "skip") == [True, False, True, False]


def test_missing_problem_always_errors():
    rows = [{"extra_info": {"problem": "p", "solution": "s"}}, {"extra_info": {"solution": "s"}}]
    with pytest.raises(OPSDDataError, match=r"row 1 .*'extra_info\.problem'"):
        check_solutions(rows, "extra_info.problem", "extra_info.solution", "skip")


def test_bad_policy_named():
    with pytest.raises(ValueError, match="missing_solution='drop'"):
        check_solutions(ROWS, "extra_info.problem", "extra_info.solution", "drop")


def test_parquet_check_with_nested_columns(tmp_path):
    table = pa.Table.from_pylist(
        [
            {"extra_info": {"problem": "p0"}, "reward_model": {"ground_truth": "4"}},
            {"extra_info": {"problem": "p1"}, "reward_model": {"ground_truth": None}},
        ]
    )
    path = str(tmp_path / "train.parquet")
    pq.write_table(table, path)
    report = check_solutions_in_files(path, "extra_info.problem", "reward_model.ground_truth", "skip")
    assert report["rows"] == 2 and report["with_context"] == 1 and report["skipped"] == 1
    assert report["flags"][path] == [True, False]
    with pytest.raises(OPSDDataError, match=r"train\.parquet: row 1 .*reward_model\.ground_truth"):
        check_solutions_in_files([path], "extra_info.problem", "reward_model.ground_truth", "error")
