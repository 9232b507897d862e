"""Bad input refused in the driver with the field named, before Ray or any worker: unknown `opd.*` keys (the
closest known key suggested), model paths that do not exist, tokenizer mismatches, bad data rows."""

import dataclasses
import os
import subprocess
import sys

import pandas as pd
import pytest
from omegaconf import OmegaConf

from opd_verl.config import OPDConfig, OPDConfigError, load_opd_config, unknown_keys
from opd_verl.model_check import check_model_paths, check_tokenizers

TEACHER = "opd.teachers.models.default.path=/models/teacher"


@pytest.mark.parametrize(
    "override, message",
    [
        ("+opd.signal.lamm=2", "opd.signal.lamm is not a known key (did you mean opd.signal.lam?)"),
        ("+opd.weighting.wmax=3", "opd.weighting.wmax is not a known key (did you mean opd.weighting.w_max?)"),
        (
            "+opd.teachers.models.default.paht=/m",
            "opd.teachers.models.default.paht is not a known key (did you mean opd.teachers.models.default.path?)",
        ),
        ("+opd.data.on_bad_rows=skip", "did you mean opd.data.on_bad_row?"),
        ("+opd.zzz=1", "opd.zzz is not a known key (known keys: cpu_demo, signal,"),
    ],
)
def test_unknown_key_refused_with_closest_known_key(compose_cfg, override, message):
    with pytest.raises(OPDConfigError) as info:
        load_opd_config(compose_cfg(TEACHER, override))
    assert message in str(info.value)


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict) and value and key != "models":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def test_schema_and_base_config_agree(compose_cfg):
    """Every field of the base config's `opd` section is known, and every dataclass field has a base-config field."""
    raw = OmegaConf.to_container(compose_cfg(TEACHER).opd, resolve=True)
    assert unknown_keys(raw) == []
    leaves = set(_leaves(raw))

    def fields(cls, prefix=""):
        for f in dataclasses.fields(cls):
            sub = f.type if dataclasses.is_dataclass(f.type) else None
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                yield from fields(type(default), f"{prefix}{f.name}.")
            elif f.name == "alarms":  # opd.health: one section per alarm, its action and its thresholds
                for alarm, conf in default.items():
                    yield f"{prefix}{alarm}.action"
                    yield from (f"{prefix}{alarm}.{limit}" for limit in conf.limits)
            elif sub is None:
                yield f"{prefix}{f.name}"

    assert set(fields(OPDConfig)) == leaves


def test_base_config_values_are_the_dataclass_defaults(compose_cfg):
    """The base config writes every default of the `opd` section once more (with its comment); both agree, and
    the OPSD loss settings of the actor workers default to the same values."""
    from opd_verl.opsd import OPSDLossParams

    parsed, default = load_opd_config(compose_cfg(TEACHER)), OPDConfig()
    for section in ("cpu_demo", "signal", "reference", "weighting", "release", "task_coef", "data", "health"):
        assert getattr(parsed, section) == getattr(default, section), section
    assert dataclasses.replace(parsed.teachers, models=()) == default.teachers
    # the prompt templates have no dataclass default (the parser refuses an empty one): the base config's are used
    templates = {"student_template": "", "teacher_template": ""}
    assert dataclasses.replace(parsed.opsd, **templates) == default.opsd
    loss_defaults = dataclasses.asdict(OPSDLossParams())
    assert loss_defaults == {key: getattr(parsed.opsd, key) for key in loss_defaults}


def test_model_paths_named(compose_cfg, tmp_path):
    student = tmp_path / "student"
    student.mkdir()
    cfg = compose_cfg(
        "+recipe=gopd_rc", f"actor_rollout_ref.model.path={student}", f"opd.teachers.models.default.path={student}"
    )
    cfg.opd.reference.path = "/nowhere/base"
    with pytest.raises(OPDConfigError, match=r"opd.reference.path='/nowhere/base' is not allowed: it must be a local"):
        check_model_paths(cfg, load_opd_config(cfg))
    cfg.opd.reference.path = str(student)
    cfg.opd.teachers.models.default.path = "no-such-org/no-such-model"
    with pytest.raises(OPDConfigError, match=r"opd.teachers.models.default.path='no-such-org/no-such-model'"):
        check_model_paths(cfg, load_opd_config(cfg))
    cfg.opd.teachers.models.default.path = str(student)
    check_model_paths(cfg, load_opd_config(cfg))


def test_tokenizer_mismatch_names_the_field(compose_cfg):
    from opd_verl.workers.tokenizer_check import TokenizerMismatchError

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def get_vocab(self):
            return self.vocab

    toks = {"/s": Tok({"a": 0, "b": 1}), "/t": Tok({"a": 0, "c": 1})}
    cfg = compose_cfg("actor_rollout_ref.model.path=/s", "opd.teachers.models.default.path=/t")
    with pytest.raises(TokenizerMismatchError) as info:
        check_tokenizers(cfg, load_opd_config(cfg), load=toks.__getitem__)
    assert "teacher default (opd.teachers.models.default.path) (/t) differs from that of the student" in str(info.value)
    assert "token id 1 is 'b' in the student (actor_rollout_ref.model.path) and 'c'" in str(info.value)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tokenizer-only model dirs: the demo's byte-level tokenizer, and one with an extra special token."""
    from opd_verl.demo.tiny import build_tokenizer

    root = tmp_path_factory.mktemp("models")
    build_tokenizer(str(root / "student"))
    other = build_tokenizer()
    other.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    other.save_pretrained(str(root / "other"))
    data = root / "train.parquet"
    row = {"data_source": "s", "reward_model": {"style": "rule", "ground_truth": "1"}, "extra_info": {"i": 0}}
    pd.DataFrame([{**row, "prompt": [{"role": "user", "content": c}]} for c in ("1+0=", "", "2+0=")]).to_parquet(data)
    return root


def test_main_refuses_unknown_key_before_ray(tmp_path, models):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": "", "RAY_ADDRESS": ""}
    cmd = [sys.executable, "-m", "opd_verl.main", "+recipe=opd", "opd.cpu_demo=false", "+opd.signal.lamm=2"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode != 0
    assert "opd_verl: invalid config: opd.signal.lamm is not a known key (did you mean opd.signal.lam?)" in out.stderr
    assert "ray init" not in out.stdout.lower() and "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "case, message",
    [
        ("teacher_path", "opd_verl: invalid config: opd.teachers.models.default.path='{root}/missing' is not allowed"),
        ("tokenizer", "opd_verl: invalid config: the tokenizer of teacher default (opd.teachers.models.default.path)"),
        ("data_row", "opd_verl: invalid data: {root}/train.parquet: 1 bad rows of 3: row 1, column 'prompt'"),
    ],
)
def test_run_refuses_before_ray(compose_cfg, tmp_path, models, monkeypatch, case, message):
    """`opd_verl.main.run` (what `python -m opd_verl.main` calls) exits with the message; veRL's launch never runs."""
    import ray

    import opd_verl.main as main

    monkeypatch.setattr(main, "launch", lambda *a: pytest.fail("launched despite bad input"))
    student, train = models / "student", models / "train.parquet"
    teacher = {"teacher_path": models / "missing", "tokenizer": models / "other"}.get(case, student)
    cfg = compose_cfg(
        "+recipe=opd",
        "opd.cpu_demo=false",
        f"actor_rollout_ref.model.path={student}",
        f"opd.teachers.models.default.path={teacher}",
        f"data.train_files={train}",
        f"data.val_files={train}",
        f"trainer.default_local_dir={tmp_path}",
    )
    with pytest.raises(SystemExit) as info:
        main.run(cfg)
    assert str(info.value).startswith(message.format(root=models)), str(info.value)
    assert not ray.is_initialized()
