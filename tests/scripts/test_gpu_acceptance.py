"""scripts/gpu_acceptance.sh / `python -m opd_verl.acceptance`: the parts that need no CUDA.

The dry run builds the models, composes and validates every trainer run's config and prints the table; the
component checks run on CPU in the one slow test. The judging of trainer-run output is checked on synthetic
metrics files (a real one needs a GPU).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from opd_verl.acceptance import __main__ as cli
from opd_verl.acceptance import runs
from opd_verl.acceptance.report import Report

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_acceptance.sh"


def _wrapper(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OPD_PYTHON=sys.executable)
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _rows(out: str) -> dict[str, list[str]]:
    """The summary table: check -> [result, figure, time]."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4 and cells[0] not in ("check", "total"):
            rows[cells[0]] = cells[1:]
    return rows


def test_report_table_counts_and_failures():
    report = Report(log=lambda _: None)
    report.run("good", lambda: "1.5 GiB | bound 2")
    report.run("bad", lambda: 1 / 0)
    report.skip("later", "needs 2 GPUs")
    lines = report.table().splitlines()
    assert lines[0] == "| check | result | figure | time |"
    assert lines[2].startswith("| good | pass | 1.5 GiB / bound 2 |")  # a "|" in a figure cannot break the table
    assert lines[3].startswith("| bad | FAIL | ZeroDivisionError: division by zero |")
    assert lines[4] == "| later | not run | needs 2 GPUs | 0.0 s |"
    assert lines[5].startswith("| total | 1 pass, 1 FAIL, 1 not run |")
    assert report.failed == ["bad"] and report.passed("good") and not report.passed("later")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "teacher_logprobs,bogus"], "unknown check(s) bogus; allowed: environment, models"),
        (["--cpu-components"], "--cpu-components needs --dry-run"),
        (["--dry-run", "--override", "trainer.total_training_steps"], "--override needs KEY=VALUE"),
        (["--run-timeout", "0"], "--run-timeout must be >= 1"),
    ],
)
def test_bad_arguments_exit_2_through_the_wrapper(args, message):
    proc = _wrapper(*args, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("dry")
    proc = _wrapper("--dry-run", "--work-dir", str(work))
    return proc, work


def test_dry_run_passes_with_every_check_in_the_table(dry_run):
    proc, work = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(proc.stdout)
    assert list(rows) == list(cli.CHECKS)
    assert rows["environment"][0] == "pass" and "verl 0.9.1" in rows["environment"][1]
    assert rows["models"][0] == "pass" and "(tied)" in rows["models"][1] and "(untied)" in rows["models"][1]
    for name in cli.COMPONENTS:
        assert rows[name][:2] == ["not run", "--dry-run (--cpu-components runs it on CPU)"]
    for name in cli.RUNS:
        assert rows[name][0] == "pass" and rows[name][1].startswith("config valid, not started"), rows[name]
    assert "sp 2" in rows["two_gpu_sp_sharded"][1] and "teachers server" in rows["two_gpu_server_teachers"][1]
    assert rows["teacher_offload"][:2] == [
        "not run",
        "needs a GPU: on CPU the teacher's parameters already live in host memory",
    ]
    assert (work / "summary.md").read_text().splitlines()[0] == "| check | result | figure | time |"
    assert proc.stdout.rstrip().endswith("gpu_acceptance: no check failed")


def test_dry_run_models_are_qwen3_with_tied_and_untied_embeddings(dry_run):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    _, work = dry_run
    models = work / "assets" / "models"
    student, teacher = (AutoConfig.from_pretrained(models / n) for n in ("student", "teacher"))
    assert (student.model_type, teacher.model_type) == ("qwen3", "qwen3")
    assert student.tie_word_embeddings and not teacher.tie_word_embeddings
    assert teacher.hidden_size > student.hidden_size and teacher.num_hidden_layers > student.num_hidden_layers
    tok = AutoTokenizer.from_pretrained(models / "student")
    assert student.vocab_size == len(tok) and GenerationConfig.from_pretrained(models / "teacher").eos_token_id == (
        tok.convert_tokens_to_ids("<|im_end|>")
    )


def test_dry_run_prints_each_command_with_the_gpu_settings(dry_run):
    proc, work = dry_run
    commands = {line.split(": ", 1)[0]: line.split(": ", 1)[1] for line in proc.stdout.splitlines() if ": " in line}
    for name in cli.RUNS:
        cmd = commands[name]
        assert " -m opd_verl.main +recipe=" in cmd
        for setting in (
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.actor.strategy=fsdp2",
            "actor_rollout_ref.model.use_remove_padding=true",
            "actor_rollout_ref.actor.use_dynamic_bsz=true",
            f"VERL_FILE_LOGGER_PATH={work}/runs/{name}.metrics.jsonl",
        ):
            assert setting in cmd, (name, setting)
    assert "trainer.save_freq=1" in commands["opsd"] and "trainer.resume_mode=auto" in commands["opsd_resume"]
    assert f"trainer.default_local_dir={work}/runs/opsd " in commands["opsd_resume"]  # resumes the opsd run's folder
    for setting in ("opd.teachers.placement=colocated", "opd.teachers.offload=true"):  # what teacher_offload judges
        assert (setting in commands["exopd_iw_release"]) == runs.has_placement()


def test_topk_hook_and_opsd_step_on_the_dry_run_student(dry_run):
    from opd_verl.acceptance import components

    student = str(dry_run[1] / "assets" / "models" / "student")
    figure = components.student_topk_hook(student, "cpu")
    assert "sdpa float32: same id set 100.0%, max value gap 0.0e+00" in figure  # packed rows kept apart
    figure = components.opsd_lora_step(student, "cpu")
    assert "teacher adapter off: 1.0" in figure and "0 of 24 base tensors changed" in figure


def test_failed_check_is_named_and_exits_1(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rc = cli.main(["--dry-run", "--work-dir", str(blocker / "work"), "--only", "exopd_iw_release"])
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rc == 1
    assert rows["models"][0] == "FAIL" and "Error" in rows["models"][1]
    assert rows["exopd_iw_release"] == ["not run", "needs the models", "0.0 s"]
    assert out.rstrip().splitlines()[-1] == "gpu_acceptance: FAILED: models"


def test_trainer_run_config_without_the_gpu_settings_fails_by_name(tmp_path, capsys):
    rc = cli.main(
        [
            "--dry-run",
            "--work-dir",
            str(tmp_path),
            "--only",
            "exopd_iw_release",
            "--override",
            "actor_rollout_ref.model.use_remove_padding=false",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 1 and out.rstrip().splitlines()[-1] == "gpu_acceptance: FAILED: exopd_iw_release"
    assert "use_remove_padding': False" in _rows(out)["exopd_iw_release"][1]
    assert "actor_rollout_ref.model.use_remove_padding=true" not in out  # the user's value replaced the script's


def _write_metrics(path: Path, steps: dict[int, dict]) -> None:
    path.write_text("".join(json.dumps({"step": s, "data": d}) + "\n" for s, d in steps.items()))


def _opd_step(disc: float, signal: float) -> dict:
    return {
        "opd/discrepancy": disc,
        "opd/signal": signal,
        "opd/weight_mean": 1.0,
        "opd/release/accept_rate": 0.5,
        "opd/release/n_sentences": 3.0,
        "timing_s/opd_teacher": 1.2,
        "timing_s/ref": 0.8,
        "timing_s/step": 9.0,
        "actor/kl_loss": 0.0,
        "actor/grad_norm": 0.3,
    }


def _run(name: str) -> runs.TrainerRun:
    return next(r for r in runs.plan(_Assets(), "/w") if r.name == name)


class _Assets:
    student = teacher = "/m"
    train_file = val_file = "/d.parquet"


def test_judge_opd_run_from_its_metrics(tmp_path):
    run = _run("exopd_iw_release")
    path = tmp_path / "m.jsonl"
    _write_metrics(path, {1: _opd_step(-0.4, -0.5), 2: _opd_step(-0.3, -0.2)})
    figure = runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))
    assert "step 1 signal -0.500 = 1.25 x discrepancy -0.400" in figure

    # the signal of step 1 is not lam x discrepancy: teacher or reference log-probs did not reach the advantage
    _write_metrics(path, {1: _opd_step(-0.4, -0.4), 2: _opd_step(-0.3, -0.2)})
    with pytest.raises(AssertionError, match=r"opd/signal -0.4000 != 1.25 x opd/discrepancy"):
        runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))
    bad = _opd_step(-0.3, -0.2) | {"opd/weight_max": math.nan}
    _write_metrics(path, {1: _opd_step(-0.4, -0.5), 2: bad})
    with pytest.raises(AssertionError, match="step 2: not finite: opd/weight_max"):
        runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))
    no_ref = {k: v for k, v in _opd_step(-0.4, -0.5).items() if k != "timing_s/ref"}
    _write_metrics(path, {1: no_ref, 2: _opd_step(-0.3, -0.2)})
    with pytest.raises(AssertionError, match="missing metrics: timing_s/ref"):
        runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))
    _write_metrics(path, {1: _opd_step(-0.4, -0.5)})
    with pytest.raises(AssertionError, match=r"logged steps \[1\], expected \[1, 2\]"):
        runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))


def test_judge_opsd_resume_needs_its_checkpoints(tmp_path):
    run = _run("opsd_resume")
    step = {
        "actor/opsd/loss": 0.05,
        "actor/opsd/divergence_mean": 0.05,
        "actor/opsd/teacher_adapter_off": 1.0,
        "actor/grad_norm": 0.2,
    }
    path = tmp_path / "m.jsonl"
    _write_metrics(path, {3: step})
    with pytest.raises(AssertionError, match=r"no actor checkpoint for steps \[3\]"):
        runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))
    (tmp_path / "global_step_3" / "actor").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    assert "resumed at step 3" in runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))
    _write_metrics(path, {1: step, 2: step, 3: step})  # started from scratch instead of resuming
    with pytest.raises(AssertionError, match=r"logged steps \[1, 2, 3\], expected \[3\]"):
        runs.judge(run, runs.read_metrics(str(path)), str(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_component_checks_pass_on_cpu(tmp_path):
    only = ",".join(cli.COMPONENTS)
    proc = _wrapper("--dry-run", "--cpu-components", "--only", only, "--work-dir", str(tmp_path), timeout=800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = _rows(proc.stdout)
    assert [rows[n][0] for n in cli.COMPONENTS] == ["pass"] * 4, rows
    assert "float32 (sdpa) max err padded" in rows["teacher_logprobs"][1]
    assert "same id set 100.0%" in rows["student_topk_hook"][1]  # float32: no near-ties reorder
    assert "0 of " in rows["opsd_lora_step"][1] and "base tensors changed" in rows["opsd_lora_step"][1]
    assert "L=4096 V=32768" in rows["logprob_memory"][1]


def test_judge_teacher_offload_from_the_run_metrics(tmp_path):
    """teacher_offload (GPU only): every step's offload freed >= 90% of a teacher process's parameter bytes."""
    step = {
        "opd/teacher_offload/freed_fraction": 0.998,
        "opd/teacher_offload/params_gib": 0.25,
        "opd/teacher_offload/allocated_after_gib": 0.01,
    }
    path = tmp_path / "m.jsonl"
    _write_metrics(path, {1: step, 2: step})
    figure = runs.judge_offload(runs.read_metrics(str(path)))
    assert figure.startswith("steps [1, 2]: each offload freed >= 100% of the teacher's 0.250 GiB")
    _write_metrics(path, {1: step, 2: step | {"opd/teacher_offload/freed_fraction": 0.1}})
    with pytest.raises(AssertionError, match="step 2: the offload freed 10% .* the parameters stayed there"):
        runs.judge_offload(runs.read_metrics(str(path)))
    _write_metrics(path, {1: _opd_step(-0.4, -0.5)})  # a CPU-like run: no CUDA measurement was logged
    with pytest.raises(AssertionError, match="step 1: missing opd/teacher_offload/freed_fraction"):
        runs.judge_offload(runs.read_metrics(str(path)))
