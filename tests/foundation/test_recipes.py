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
    # what the actor workers build prompts with
    teacher_kwargs = opsd_worker_settings(load_opd_config(cfg).opsd, cfg)["chat_template_kwargs"]
    assert student_kwargs == {"enable_thinking": False} and teacher_kwargs == {"enable_thinking": True}

    tokenizer = copy.deepcopy(build_tokenizer())
    tokenizer.chat_template = QWEN3_STYLE_TEMPLATE
    teacher = tokenizer.decode(privileged_prompt_ids(tokenizer, "{problem} {solution}", "1+1", "2", teacher_kwargs))
    student = tokenizer.decode(privileged_prompt_ids(tokenizer, "{problem}", "1+1", None, student_kwargs))
    assert "</think>" not in teacher and student.endswith("<think>\n\n</think>\n\n")

    # Without teacher_chat_template_kwargs the teacher uses the student's setting.
    cfg = compose_cfg("+recipe=opsd", "opd.opsd.teacher_chat_template_kwargs=null")
    assert opsd_worker_settings(load_opd_config(cfg).opsd, cfg)["chat_template_kwargs"] == {"enable_thinking": False}


def test_teacher_chat_template_kwargs_must_be_a_mapping(compose_cfg):
    from opd_verl.config import OPDConfigError

    with pytest.raises(OPDConfigError, match="opd.opsd.teacher_chat_template_kwargs"):
        load_opd_config(compose_cfg("+recipe=opsd", "opd.opsd.teacher_chat_template_kwargs=yes"))


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory):
    """A tiny local student and teacher and a one-row parquet: the paths a user must set, with nothing downloaded."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from opd_verl.demo.tiny import build_tiny_qwen2

    root = tmp_path_factory.mktemp("recipe_paths")
    data = str(root / "train.parquet")
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "1+1?"}]], "data_source": ["math"]}), data)
    return {
        "student": build_tiny_qwen2(str(root / "student"), hidden_size=32, seed=1),
        "teacher": build_tiny_qwen2(str(root / "teacher"), hidden_size=32, seed=2),
        "data": data,
    }


def _stub_vllm_lora_check(monkeypatch) -> list[int]:
    """veRL's config check asks vLLM (the GPU stack, absent on CPU) which LoRA ranks it serves; without vLLM this
    records the rank and checks it against the ranks veRL itself falls back to when vLLM does not say."""
    import importlib.util
    import types

    asked: list[int] = []
    if importlib.util.find_spec("vllm") is not None:
        return asked
    allowed = (1, 8, 16, 32, 64, 128, 256, 320, 512)

    def get_vllm_max_lora_rank(rank: int) -> int:
        asked.append(rank)
        assert rank <= allowed[-1], rank
        return next(r for r in allowed if rank <= r)

    package = types.ModuleType("verl.workers.rollout.vllm_rollout")
    utils = types.ModuleType("verl.workers.rollout.vllm_rollout.utils")
    utils.get_vllm_max_lora_rank = get_vllm_max_lora_rank
    package.utils = utils
    monkeypatch.setitem(sys.modules, "verl.workers.rollout.vllm_rollout", package)
    monkeypatch.setitem(sys.modules, "verl.workers.rollout.vllm_rollout.utils", utils)
    return asked


@pytest.mark.parametrize("recipe", sorted(EXPECTED))
def test_recipe_passes_verl_validation_on_a_gpu_node(recipe, compose_cfg, tiny_paths, monkeypatch):
    """Each recipe, given only the fields its header says a user must set (tiny local models and data here) and
    opd.cpu_demo=false, passes what the driver runs before Ray on one 8-GPU node: the `opd` validation, the
    placement checks and veRL's own `validate_config` (which refused the recipes without micro-batch settings)."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from opd_verl.demo.preset import demo_wanted
    from opd_verl.placement import check_placement

    must = [
        f"data.train_files={tiny_paths['data']}",
        f"data.val_files={tiny_paths['data']}",
        f"actor_rollout_ref.model.path={tiny_paths['student']}",
    ]
    if recipe != "opsd":
        must.append(f"opd.teachers.models.default.path={tiny_paths['teacher']}")
    if recipe == "gopd_rc":
        must.append(f"opd.reference.path={tiny_paths['teacher']}")
    # what scripts/slurm/opd_verl.sbatch adds on one node of 8 GPUs
    cfg = compose_cfg(f"+recipe={recipe}", "opd.cpu_demo=false", "trainer.nnodes=1", "trainer.n_gpus_per_node=8", *must)
    assert demo_wanted(cfg) is False
    load_opd_config(cfg)
    check_placement(cfg, {"SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "8"})
    asked = _stub_vllm_lora_check(monkeypatch)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    if recipe == "opsd" and asked:
        assert asked == [64]
    # the GPU-scale settings every recipe carries (authors' scripts)
    a = cfg.actor_rollout_ref
    assert a.model.use_remove_padding and a.model.enable_gradient_checkpointing
    assert a.actor.use_dynamic_bsz and a.actor.ppo_max_token_len_per_gpu >= cfg.data.max_response_length // 2
    assert a.rollout.name == "vllm" and a.rollout.log_prob_micro_batch_size_per_gpu >= 1
    if recipe != "opsd":
        assert a.actor.ppo_max_token_len_per_gpu >= cfg.data.max_prompt_length + cfg.data.max_response_length
        assert a.rollout.tensor_model_parallel_size == 4 and cfg.opd.teachers.placement == "colocated"
