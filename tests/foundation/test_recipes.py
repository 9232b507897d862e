"""`python -m opd_verl.main +recipe=NAME --cfg job` prints each recipe's choices, starts nothing, and every
recipe (with the paths a user must supply) passes the plugin's validation."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opd_verl.config import load_opd_config

RECIPE_DIR = Path(__file__).resolve().parents[2] / "opd_verl" / "hydra_configs" / "recipe"

# recipe -> fields its printed config must show (plugin section and veRL's algorithm/actor fields).
EXPECTED = {
    "opd": {"opd.signal.name": "opd", "opd.signal.lam": 1.0, "actor_rollout_ref.actor.optim.lr": 1e-5},
    "exopd": {
        "opd.signal.name": "gopd",
        "opd.signal.lam": 1.25,
        "opd.reference.kind": "student_init",
        "actor_rollout_ref.actor.use_kl_loss": True,
        "actor_rollout_ref.actor.kl_loss_coef": 0.0,
        "algorithm.rollout_correction.rollout_is_threshold": 5.0,
    },
    "gopd_rc": {"opd.signal.lam": 1.25, "opd.reference.kind": "base_model", "opd.teachers.kind": "local"},
    "iw_opd": {"opd.signal.name": "opd", "opd.weighting.name": "iw", "opd.weighting.w_max": 1.5},
    "prefix_release": {"opd.release.enabled": True, "opd.release.top_k": 8, "opd.release.min_segment": 2},
    "exopd_iw_release": {
        "opd.signal.lam": 1.25,
        "opd.weighting.name": "iw",
        "opd.release.enabled": True,
        "actor_rollout_ref.actor.use_kl_loss": True,
    },
    "opsd": {
        "opd.signal.name": "opsd",
        "opd.opsd.beta": 0.0,
        "opd.opsd.temperature": 1.1,
        "opd.opsd.pointwise_clip": 0.05,
        "actor_rollout_ref.model.lora_rank": 64,
        "actor_rollout_ref.actor.optim.lr": 2e-4,
    },
}

# What a user must still set per recipe (the recipe headers say so).
USER_FIELDS = {
    "gopd_rc": ["opd.reference.path=/models/teacher-base"],
    "opsd": [],
}


def test_every_recipe_is_covered():
    assert {p.stem for p in RECIPE_DIR.glob("*.yaml")} == set(EXPECTED)


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_cfg_job_prints_recipe_choices(recipe, tmp_path):
    env = {**os.environ, "RAY_ADDRESS": "", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "-m", "opd_verl.main", f"+recipe={recipe}", "--cfg", "job"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    cfg = OmegaConf.create(out.stdout)
    for key, value in EXPECTED[recipe].items():
        assert OmegaConf.select(cfg, key) == value, key
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.log"))


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_validates_with_user_paths(recipe, compose_cfg):
    teacher = [] if recipe == "opsd" else ["opd.teachers.models.default.path=/models/teacher"]
    cfg = compose_cfg(f"+recipe={recipe}", *teacher, *USER_FIELDS.get(recipe, []))
    parsed = load_opd_config(cfg)
    assert parsed.signal.name == EXPECTED[recipe].get("opd.signal.name", parsed.signal.name)


def test_gopd_rc_without_base_model_is_refused(compose_cfg):
    from opd_verl.config import OPDConfigError

    with pytest.raises(OPDConfigError, match="opd.reference.path"):
        load_opd_config(compose_cfg("+recipe=gopd_rc", "opd.teachers.models.default.path=/m/t"))


def test_unknown_recipe_lists_the_available_ones(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "opd_verl.main", "+recipe=no_such_recipe", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode != 0
    assert "no_such_recipe" in out.stderr
    for recipe in EXPECTED:
        assert f"\t{recipe}\n" in out.stderr


QWEN3_STYLE_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def test_opsd_recipe_follows_the_authors_sampling_and_per_side_thinking(compose_cfg):
    """Authors (siyan-zhao/OPSD, scripts/run_opsd.sh, data_collator.py): sampling at the distillation temperature
    1.1 with top_p 0.95 / top_k 20; the teacher's prompt in thinking mode, the student's not."""
    import copy

    from opd_verl.demo.tiny import build_tokenizer
    from opd_verl.opsd.inputs import privileged_prompt_ids
    from opd_verl.trainer.opsd_trainer import opsd_worker_settings

    cfg = compose_cfg("+recipe=opsd")
    rollout = cfg.actor_rollout_ref.rollout
    assert (rollout.temperature, rollout.top_p, rollout.top_k) == (1.1, 0.95, 20)
    assert rollout.temperature == load_opd_config(cfg).opsd.temperature
    student_kwargs = OmegaConf.to_container(cfg.data.apply_chat_template_kwargs)
    teacher_kwargs = opsd_worker_settings(cfg)["chat_template_kwargs"]  # what the actor workers build prompts with
    assert student_kwargs == {"enable_thinking": False} and teacher_kwargs == {"enable_thinking": True}

    tokenizer = copy.deepcopy(build_tokenizer())
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    teacher = tokenizer.decode(privileged_prompt_ids(tokenizer, "{problem} {solution}", "1+1", "2", teacher_kwargs))
    student = tokenizer.decode(privileged_prompt_ids(tokenizer, "{problem}", "1+1", None, student_kwargs))
    assert "</think>" not in teacher and student.endswith("<think>\n\n</think>\n\n")

    # Without teacher_chat_template_kwargs the teacher uses the student's setting.
    cfg = compose_cfg("+recipe=opsd", "opd.opsd.teacher_chat_template_kwargs=null")
    assert opsd_worker_settings(cfg)["chat_template_kwargs"] == {"enable_thinking": False}


def test_teacher_chat_template_kwargs_must_be_a_mapping(compose_cfg):
    from opd_verl.config import OPDConfigError

    with pytest.raises(OPDConfigError, match="opd.opsd.teacher_chat_template_kwargs"):
        load_opd_config(compose_cfg("+recipe=opsd", "opd.opsd.teacher_chat_template_kwargs=yes"))
