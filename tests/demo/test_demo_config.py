"""The CPU demo preset and the start-up guard on the composed config (no Ray started)."""

import os

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from opd_verl.config import OPDConfigError, load_opd_config
from opd_verl.cpu_port.ray_setup import CPURuntimeError, check_cpu_runtime, required_logical_gpus
from opd_verl.demo.assets import DemoAssets
from opd_verl.demo.preset import apply_cpu_demo, cpu_demo_mode, maybe_apply_cpu_demo


@pytest.fixture
def restore_env():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def _compose(*overrides):
    with initialize_config_module(config_module="opd_verl.hydra_configs", version_base=None):
        return compose(config_name="opd_trainer", overrides=list(overrides))


def _assets(tmp_path, variant="sums"):
    return DemoAssets(
        root=str(tmp_path),
        train_file=str(tmp_path / "train.parquet"),
        val_file=str(tmp_path / "val.parquet"),
        student_path=str(tmp_path / "student"),
        teacher_path=str(tmp_path / "teacher"),
        variant=variant,
    )


def test_preset_sets_cpu_settings_and_demo_assets(tmp_path, restore_env):
    cfg = apply_cpu_demo(
        _compose("+recipe=exopd", "trainer.default_local_dir=" + str(tmp_path / "run")), _assets(tmp_path)
    )
    a = cfg.actor_rollout_ref
    assert a.model.path == str(tmp_path / "student") and cfg.opd.teachers.models.default.path == str(
        tmp_path / "teacher"
    )
    assert a.actor.strategy == "fsdp2" and a.ref.strategy == "fsdp2"
    assert a.model.override_config.attn_implementation == "sdpa"
    # veRL's FSDP engine computes in bf16 unless mixed_precision says otherwise; the rollout and teachers run float32.
    assert a.actor.fsdp_config.mixed_precision.param_dtype == a.ref.fsdp_config.mixed_precision.param_dtype == "fp32"
    # Packed rows and token budgets for the actor, the reference (whose settings the teachers follow) and the
    # rollout's log-prob pass: (32 + 8)-token rows, 16 a micro-batch for the update, 32 for log-probs.
    assert a.model.use_remove_padding is True and a.actor.use_dynamic_bsz is True
    assert a.ref.log_prob_use_dynamic_bsz is True and a.rollout.log_prob_use_dynamic_bsz is True
    assert a.actor.ppo_max_token_len_per_gpu == 16 * 40
    assert a.ref.log_prob_max_token_len_per_gpu == a.rollout.log_prob_max_token_len_per_gpu == 32 * 40
    assert a.rollout.name == "hf" and a.rollout.tensor_model_parallel_size == 1
    assert cfg.trainer.device == "cpu" and cfg.trainer.n_gpus_per_node == 1
    # Recipe sizes meant for GPU runs are replaced by the demo's.
    assert cfg.data.train_batch_size == 16 and a.actor.ppo_mini_batch_size == 16 and cfg.data.max_response_length == 8
    assert cfg.transfer_queue.backend.SimpleStorage.num_data_storage_units == 1
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars
    assert env.VERL_PLATFORM == "cpu" and "opd_verl.cpu_port.activate" in env.VERL_USE_EXTERNAL_MODULES
    assert env.VERL_FILE_LOGGER_PATH == str(tmp_path / "run" / "metrics.jsonl")
    assert cfg.ray_kwargs.ray_init.num_gpus == required_logical_gpus(cfg) >= 1
    assert cfg.reward.custom_reward_function.path.endswith("opd_verl/demo/task.py")
    check_cpu_runtime(cfg)  # a complete preset passes the guard
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_guard_names_the_field_that_would_hang(tmp_path, restore_env):
    cfg = apply_cpu_demo(_compose("+recipe=exopd"), _assets(tmp_path))
    cfg.ray_kwargs.ray_init.num_gpus = 0
    with pytest.raises(CPURuntimeError, match="ray_kwargs.ray_init.num_gpus"):
        check_cpu_runtime(cfg)
    cfg.ray_kwargs.ray_init.num_gpus = 8
    cfg.ray_kwargs.ray_init.num_cpus = 2
    with pytest.raises(CPURuntimeError, match="ray_kwargs.ray_init.num_cpus"):
        check_cpu_runtime(cfg)
    cfg.ray_kwargs.ray_init.num_cpus = 32
    cfg.actor_rollout_ref.actor.strategy = "fsdp"
    with pytest.raises(CPURuntimeError, match="fsdp2"):
        check_cpu_runtime(cfg)


def test_cpu_demo_switch():
    cfg = _compose("opd.cpu_demo=false")
    assert cpu_demo_mode(cfg) == "false"
    assert maybe_apply_cpu_demo(cfg) is cfg and cfg.actor_rollout_ref.rollout.get("name") != "hf"
    # the preset and the `opd` section validation read the field with one parser: what one refuses, both refuse
    cfg = _compose("opd.cpu_demo=no")
    with pytest.raises(OPDConfigError, match="opd.cpu_demo='no' is not allowed"):
        cpu_demo_mode(cfg)
    with pytest.raises(OPDConfigError, match="opd.cpu_demo='no' is not allowed"):
        load_opd_config(cfg)
    cfg = _compose("opd.cpu_demo=maybe")
    with pytest.raises(ValueError, match="opd.cpu_demo=.maybe. is not allowed: allowed values are auto, true, false"):
        cpu_demo_mode(cfg)


def test_preset_quiet_console_and_held_out_evaluation(tmp_path, restore_env, monkeypatch):
    from opd_verl.demo import console

    monkeypatch.setattr(console, "physical_cores", lambda: 3)
    (tmp_path / "teacher_eval.json").write_text('{"greedy_accuracy": 0.75}')
    cfg = apply_cpu_demo(
        _compose("+recipe=exopd", "trainer.default_local_dir=" + str(tmp_path / "run")), _assets(tmp_path)
    )
    # TransferQueue's thread count is the machine's physical cores, in the driver and in every Ray worker.
    assert cfg.ray_kwargs.ray_init.runtime_env.env_vars.TQ_NUM_THREADS == "3" and os.environ["TQ_NUM_THREADS"] == "3"
    assert cfg.ray_kwargs.ray_init.log_to_driver is False
    # veRL's validation: greedy, one sample, before training and every test_freq steps.
    assert cfg.trainer.val_before_train is True and cfg.trainer.test_freq == 10
    val = cfg.actor_rollout_ref.rollout.val_kwargs
    assert val.do_sample is False and val.temperature == 0.0 and val.n == 1
    # The teacher's held-out accuracy (the ceiling) travels into the run dir for the summary.
    assert (tmp_path / "run" / "teacher_eval.json").read_text() == '{"greedy_accuracy": 0.75}'


def test_release_recipes_use_the_worked_task_variant(tmp_path, restore_env):
    from opd_verl.demo.preset import task_variant

    for recipe, variant in (("exopd", "sums"), ("iw_opd", "sums"), ("prefix_release", "worked")):
        assert task_variant(_compose(f"+recipe={recipe}")) == variant
    assert task_variant(_compose("+recipe=exopd_iw_release")) == "worked"
    cfg = apply_cpu_demo(_compose("+recipe=prefix_release"), _assets(tmp_path, "worked"))
    assert cfg.data.max_response_length == 64 and cfg.data.train_batch_size == 16
    assert cfg.actor_rollout_ref.ref.log_prob_max_token_len_per_gpu == 32 * (32 + 64)


def test_auto_never_replaces_a_users_models_or_data(monkeypatch):
    """Without CUDA, `auto` runs the demo only for a config with veRL's placeholder paths; a config naming the user's
    own model, data or teacher is refused with the field and the two ways out, never silently replaced."""
    from opd_verl.demo import preset as demo

    monkeypatch.setattr(demo, "cuda_present", lambda: False)
    assert demo.demo_wanted(_compose("+recipe=exopd")) is True  # nothing of the user's: the demo
    for override, field in [
        ("actor_rollout_ref.model.path=/models/student", "actor_rollout_ref.model.path=/models/student"),
        ("data.train_files=/data/train.parquet", "data.train_files=/data/train.parquet"),
        ("opd.teachers.models.default.path=/models/teacher", "opd.teachers.models.default.path=/models/teacher"),
        ("opd.reference.path=/models/base", "opd.reference.path=/models/base"),
    ]:
        cfg = _compose("+recipe=exopd", override)
        with pytest.raises(OPDConfigError, match="opd.cpu_demo=auto") as err:
            maybe_apply_cpu_demo(cfg)
        assert field in str(err.value) and "opd.cpu_demo=false" in str(err.value)
        assert "opd.cpu_demo=true" in str(err.value)
        assert cfg.actor_rollout_ref.rollout.get("name") != "hf"  # the config was not touched
        # the explicit switches still decide without asking
        assert demo.demo_wanted(_compose("+recipe=exopd", override, "opd.cpu_demo=false")) is False
        assert demo.demo_wanted(_compose("+recipe=exopd", override, "opd.cpu_demo=true")) is True
    monkeypatch.setattr(demo, "cuda_present", lambda: True)
    assert demo.demo_wanted(_compose("+recipe=exopd", "data.train_files=/data/train.parquet")) is False


def test_main_refuses_auto_demo_over_user_paths_before_ray(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "opd_verl.main", "+recipe=opd", "data.train_files=/nowhere/train.parquet"]
    out = subprocess.run(
        cmd, capture_output=True, text=True, cwd=str(tmp_path), env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    )
    assert out.returncode != 0
    assert "opd.cpu_demo=auto" in out.stderr and "data.train_files=/nowhere/train.parquet" in out.stderr
    assert "ray" not in out.stdout.lower()
