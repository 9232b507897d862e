"""The driver's data check (`opd_verl.data_check`): every kind of bad row is found with its file, row and column;
`opd.data.on_bad_row=skip` trains on a filtered copy and counts what it dropped; a routing key no row has is
refused and rows per teacher are counted."""

import pandas as pd
import pyarrow.parquet as pq
import pytest

from opd_verl.config import load_opd_config
from opd_verl.data_check import DataError, check_data, check_file, teacher_counts


def _row(i, prompt="default", data_source="src", ground_truth="ok", route=None):
    prompt = [{"role": "user", "content": f"{i}+1="}] if prompt == "default" else prompt
    return {
        "data_source": data_source,
        "prompt": prompt,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"index": i, "teacher": route},
    }


# row index -> (row, the column its problem is reported under)
BAD = {
    2: (_row(2, prompt=[{"role": "user", "content": "   "}]), "'prompt': the prompt has no message with text"),
    4: (_row(4, data_source=None), "'data_source': None"),
    5: (_row(5, ground_truth=None), "'reward_model.ground_truth': None"),
    7: (_row(7, prompt=None), "'prompt': the prompt is None"),
}
LONG = 9  # prompt of 80 bytes: 80 tokens with the byte-level tokenizer, over max_prompt_length=64


def _rows(n=11):
    rows = [_row(i) for i in range(n)]
    for i, (row, _) in BAD.items():
        rows[i] = row
    rows[LONG] = _row(LONG, prompt=[{"role": "user", "content": "7" * 80}])
    return rows


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    from opd_verl.demo.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("student")
    build_tokenizer(str(path))
    return path


def _cfg(compose_cfg, tmp_path, student, *overrides):
    return compose_cfg(
        "opd.teachers.models.default.path=/models/teacher",
        f"actor_rollout_ref.model.path={student}",
        f"trainer.default_local_dir={tmp_path / 'run'}",
        "data.max_prompt_length=64",
        *overrides,
    )


def test_each_bad_row_found_with_its_column(tmp_path, student, compose_cfg):
    path = tmp_path / "train.parquet"
    pd.DataFrame(_rows()[:8]).to_parquet(path)  # all in one column type (message lists)
    from opd_verl.data_check import _PromptLength

    cfg = _cfg(compose_cfg, tmp_path, student)
    report = check_file(str(path), max_prompt_length=64, length=_PromptLength(cfg), batch_rows=3)
    expected = {i: reason for i, (_, reason) in BAD.items()}
    assert report.bad == set(expected)
    for i, reason in expected.items():
        [found] = [r for r in report.reasons if reason in r]
        assert report.first[found] == i and report.reasons[found] == 1


def test_overlong_prompt_measured_with_the_chat_template(tmp_path, student, compose_cfg):
    from transformers import AutoTokenizer

    from opd_verl.data_check import _PromptLength

    rows = [_row(0, prompt=[{"role": "user", "content": "7" * n}]) for n in range(40, 60)]
    path = tmp_path / "lengths.parquet"
    pd.DataFrame(rows).to_parquet(path)
    tok = AutoTokenizer.from_pretrained(student)
    texts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    limit = lengths[7]  # rows 8.. are longer
    cfg = _cfg(compose_cfg, tmp_path, student)
    report = check_file(str(path), max_prompt_length=limit, length=_PromptLength(cfg))
    assert report.bad == {i for i, n in enumerate(lengths) if n > limit} == set(range(8, 20))


def test_error_names_file_row_and_column(tmp_path, student, compose_cfg):
    good, bad = tmp_path / "good.parquet", tmp_path / "bad.parquet"
    pd.DataFrame([_row(i) for i in range(4)]).to_parquet(good)
    pd.DataFrame(_rows()[:8]).to_parquet(bad)
    cfg = _cfg(compose_cfg, tmp_path, student, f"data.train_files=[{good}]", f"data.val_files=[{bad}]")
    with pytest.raises(DataError) as info:
        check_data(cfg, load_opd_config(cfg))
    message = str(info.value)
    assert message.startswith(f"{bad}: 4 bad rows of 8: row 2, column 'prompt': the prompt has no message with text")
    assert "row 4, column 'data_source': None" in message
    assert "opd.data.on_bad_row=skip" in message


def test_skip_trains_on_a_filtered_copy_and_counts(tmp_path, student, compose_cfg):
    path = tmp_path / "train.parquet"
    rows = _rows()
    pd.DataFrame(rows[:8] + rows[9:]).to_parquet(path)
    cfg = _cfg(compose_cfg, tmp_path, student, f"data.train_files={path}", f"data.val_files={path}")
    cfg.opd.data.on_bad_row = "skip"
    said = []
    out = check_data(cfg, load_opd_config(cfg), log=said.append)
    kept = pq.read_table(cfg.data.train_files[0]).to_pylist()
    # independent: the rows whose fields are all present, whose prompt has text and fits in 64 bytes
    expected = [
        r
        for r in rows[:8] + rows[9:]
        if r["prompt"] and any(m["content"].strip() for m in r["prompt"]) and r["data_source"]
        if r["reward_model"]["ground_truth"] is not None and len(r["prompt"][0]["content"]) < 64
    ]
    assert [r["extra_info"]["index"] for r in kept] == [r["extra_info"]["index"] for r in expected]
    assert cfg.data.train_files[0].startswith(str(tmp_path / "run" / "data"))
    assert len(expected) == 5 and out["bad"] == 2 * 5
    assert len(said) == 2 and "skipped" in said[0] and "5 bad rows of 10" in said[0]


def test_routing_key_no_row_has_is_refused(tmp_path):
    path = tmp_path / "t.parquet"
    pd.DataFrame([_row(i) for i in range(5)]).to_parquet(path)
    with pytest.raises(DataError) as info:
        teacher_counts([str(path)], "extra_info.teachr", ["a", None])
    assert "no training row has extra_info.teachr" in str(info.value)


def test_rows_per_teacher_counted(tmp_path):
    routes = ["a", "b", "a", None, "c", "a", "b"]
    path = tmp_path / "t.parquet"
    pd.DataFrame([_row(i, route=r) for i, r in enumerate(routes)]).to_parquet(path)
    counts = teacher_counts([str(path)], "extra_info.teacher", ["a", "b", None])
    naive = [sum(r == "a" for r in routes), sum(r == "b" for r in routes), sum(r not in ("a", "b") for r in routes)]
    assert counts == naive == [3, 2, 2]
    with pytest.raises(DataError, match="2 training rows have a value no teacher serves"):
        teacher_counts([str(path)], "extra_info.teacher", ["a", "b"])


def test_opsd_check_streams_through_the_shared_reader(tmp_path):
    from opd_verl.opsd.inputs import OPSDDataError, check_solutions_in_files

    rows = [{**_row(i), "extra_info": {"problem": "p", "solution": "s" if i != 70 else None}} for i in range(100)]
    path = tmp_path / "o.parquet"
    pd.DataFrame(rows).to_parquet(path, row_group_size=16)
    report = check_solutions_in_files(str(path), "extra_info.problem", "extra_info.solution", "skip")
    assert report["rows"] == 100 and report["skipped"] == 1 and not report["flags"][str(path)][70]
    with pytest.raises(OPSDDataError, match="row 70 has no reference solution"):
        check_solutions_in_files(str(path), "extra_info.problem", "extra_info.solution", "error")
