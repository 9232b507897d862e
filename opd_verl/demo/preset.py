"""The CPU demo preset: point a composed config at the locally built demo and at veRL's CPU settings.

`maybe_apply_cpu_demo(cfg)` reads `opd.cpu_demo` (auto | true | false). With `auto` the preset applies when no CUDA
device is present and the config names no model or data path of the user's (with one, `auto` refuses: see
`demo_wanted`); with `true` always; with `false` never. The preset

- picks the task variant (`opd_verl.demo.task`): `worked` (one line per digit with the carries, then the answer)
  when the recipe enables the release rule, which needs responses of several sentences, else `sums`,
- builds (once, cached under the user's cache dir) that variant's addition data set, a briefly trained tiny
  student, an SFT-trained tiny teacher and the teacher's held-out greedy accuracy (`opd_verl.demo.assets`),
- points data, student, teacher (both `opd.teachers.models.default.path` and veRL's built-in
  `distillation.teacher_models`) and the reward function at them,
- applies the settings veRL's trainer needs on CPU (strategy fsdp2, sdpa attention, fp32, `hf` rollout, gloo,
  logical Ray GPUs, one TransferQueue storage unit) and small batch sizes and lengths; packed sequences
  (`use_remove_padding`) and token-budgeted micro-batches (`use_dynamic_bsz`) are on as in the GPU recipes, for the
  actor, the reference, the rollout's log-prob pass and the plugin's teachers, with budgets sized for the demo,
- evaluates the student's greedy accuracy on the held-out problems through veRL's validation before training and
  every `trainer.test_freq` steps, and copies the teacher's (the ceiling) into the run dir,
- keeps the console to a progress bar, one line per step and the summary (`opd_verl.demo.console`); every metric
  goes to `<run dir>/metrics.jsonl` (for the end-of-run summary and plot).

Values the user gave on the command line for the demo's tunables (`trainer.total_training_steps`, batch sizes, lr,
lengths) win over the preset; the recipe's values for those (sized for GPU runs) do not. CPU-mandatory settings
always apply.
"""

from __future__ import annotations

import os
import shutil

from omegaconf import DictConfig, OmegaConf, open_dict

from opd_verl.config import OPDConfigError, parse_cpu_demo
from opd_verl.demo import console, task

DEMO_EXPERIMENT_PREFIX = "cpu_demo"

DEMO_LORA_RANK = 8

# Sizes of the demo run (2-core CPU; a few seconds a step after start-up): 16 prompts x 4 samples, one update a step.
# lr 3e-4: (Ex)OPD's per-token advantages are mostly negative (no baseline), and with lr 1e-3 and 2 samples a prompt
# the student's reverse KL to the teacher rose over the run instead of falling.
# Held-out greedy accuracy (veRL's validation) before training and every 10 steps.
DEMO_DEFAULTS = {
    "data.train_batch_size": 16,
    "data.max_prompt_length": 32,
    "data.max_response_length": 8,
    "actor_rollout_ref.rollout.n": 4,
    "actor_rollout_ref.actor.ppo_mini_batch_size": 16,
    "actor_rollout_ref.actor.optim.lr": 3.0e-4,
    "trainer.total_training_steps": 50,
    "trainer.test_freq": 10,
}
# The worked variant's responses: 3 digit lines of up to 16 characters and the answer line, ~60 tokens; its steps
# take longer, so fewer of them keep the run within ~10 minutes on 2 cores.
VARIANT_DEFAULTS = {"worked": {"data.max_response_length": 64, "trainer.total_training_steps": 30}}
# Token budgets per forward (use_dynamic_bsz), in full-length rows (max_prompt_length + max_response_length): the
# actor's update takes 16 such rows a micro-batch, the log-prob passes (rollout, reference, teachers) 32.
DEMO_UPDATE_ROWS = 16
DEMO_LOG_PROB_ROWS = 32


def task_variant(cfg: DictConfig) -> str:
    """`worked` when the release rule is on (it needs several sentences a response), else `sums`."""
    return "worked" if OmegaConf.select(cfg, "opd.release.enabled", default=False) else "sums"


def cpu_demo_mode(cfg: DictConfig) -> str:
    """`opd.cpu_demo` as auto | true | false (the `opd` section's own parser); a clear error for anything else."""
    return parse_cpu_demo(OmegaConf.select(cfg, "opd.cpu_demo", default="auto"))


def cuda_present() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# Fields whose veRL default is a placeholder path; any other value is the user's own model or data.
VERL_PLACEHOLDER_FIELDS = ("actor_rollout_ref.model.path", "data.train_files", "data.val_files")


def _verl_defaults() -> DictConfig:
    """veRL's own composed `ppo_trainer` defaults (the file veRL generates from its config tree)."""
    import verl.trainer.config as verl_config

    return OmegaConf.load(os.path.join(os.path.dirname(verl_config.__file__), "_generated_ppo_trainer.yaml"))


def user_paths(cfg: DictConfig) -> dict[str, str]:
    """Model and data paths the user gave: veRL fields that differ from veRL's placeholder defaults, and every
    teacher / reference path of the `opd` section that is set. Maps field -> value."""
    defaults = _verl_defaults()
    given = {}
    for key in VERL_PLACEHOLDER_FIELDS:
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value != OmegaConf.select(defaults, key, default=None):
            given[key] = str(value)
    opd_paths = {"opd.reference.path": OmegaConf.select(cfg, "opd.reference.path", default=None)}
    for name, entry in (OmegaConf.select(cfg, "opd.teachers.models", default=None) or {}).items():
        for field in ("path", "reference_path"):
            opd_paths[f"opd.teachers.models.{name}.{field}"] = (entry or {}).get(field)
    given.update({k: str(v) for k, v in opd_paths.items() if v})
    return given


def demo_wanted(cfg: DictConfig) -> bool:
    """Whether the CPU demo replaces the config. ``auto`` picks it only without a CUDA device *and* without any
    model or data path of the user's (`user_paths`); a config naming its own paths is refused (`OPDConfigError`)
    rather than silently turned into the demo (a driver on a CPU-only head node still launches GPU workers)."""
    mode = cpu_demo_mode(cfg)
    if mode != "auto":
        return mode == "true"
    if cuda_present():
        return False
    given = user_paths(cfg)
    if given:
        field, value = next(iter(given.items()))
        raise OPDConfigError(
            f"opd.cpu_demo=auto sees no CUDA device in this process and would run the CPU demo, which replaces the "
            f"config's models and data, but the config names its own ({field}={value}"
            f"{f' and {len(given) - 1} more' if len(given) > 1 else ''}). Set opd.cpu_demo=false to run them (the "
            "driver need not see a GPU: Ray places the workers), or opd.cpu_demo=true for the demo."
        )
    return True


def maybe_apply_cpu_demo(cfg: DictConfig) -> DictConfig:
    """Apply the CPU demo preset when `opd.cpu_demo` asks for it (see module doc); otherwise return cfg unchanged."""
    if not demo_wanted(cfg):
        return cfg
    return apply_cpu_demo(cfg)


def _set(cfg: DictConfig, key: str, value) -> None:
    OmegaConf.update(cfg, key, value, merge=False, force_add=True)


def command_line_keys() -> set[str]:
    """Config keys the user set on the command line (Hydra overrides), empty outside a Hydra app."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except Exception:  # noqa: BLE001 - not running under Hydra
        return set()
    keys = set()
    for item in overrides:
        key = item.split("=", 1)[0].lstrip("+~")
        if key and not key.startswith("recipe"):
            keys.add(key)
    return keys


def _set_default(cfg: DictConfig, key: str, value, user_keys: set[str]) -> None:
    """Set `key` unless the user set it on the command line (recipe values for GPU runs are replaced)."""
    if key not in user_keys:
        _set(cfg, key, value)


def run_dir_of(cfg: DictConfig) -> str:
    """Absolute directory of the run (veRL's `trainer.default_local_dir`): checkpoints, metrics, summary, plot."""
    return os.path.abspath(os.path.expanduser(str(cfg.trainer.default_local_dir)))


def apply_cpu_demo(cfg: DictConfig, assets=None) -> DictConfig:
    """Return `cfg` pointed at the demo assets with every setting veRL's trainer needs on a CPU machine.

    Args:
        cfg: composed config (veRL's ppo_trainer + opd section + recipe). Modified in place and returned.
        assets: `opd_verl.demo.assets.DemoAssets`; built or loaded from the cache when None.
    """
    from opd_verl.cpu_port.ray_setup import apply_cpu_runtime
    from opd_verl.demo.assets import ensure_demo_assets

    if assets is None:
        assets = ensure_demo_assets(variant=task_variant(cfg))
    user_keys = command_line_keys()
    console.silence_known_driver_warnings()

    with open_dict(cfg):
        # Demo data, models and reward.
        _set(cfg, "data.train_files", assets.train_file)
        _set(cfg, "data.val_files", assets.val_file)
        _set(cfg, "data.prompt_key", "prompt")
        _set(cfg, "data.dataloader_num_workers", 0)
        _set(cfg, "data.filter_overlong_prompts", False)
        _set(cfg, "data.truncation", "error")
        _set(cfg, "actor_rollout_ref.model.path", assets.student_path)
        _set(cfg, "opd.teachers.models.default.path", assets.teacher_path)
        _set(cfg, "reward.custom_reward_function.path", os.path.abspath(task.__file__))
        _set(cfg, "reward.custom_reward_function.name", "compute_score")
        _set(cfg, "reward.num_workers", 1)
        for key, value in {**DEMO_DEFAULTS, **VARIANT_DEFAULTS.get(assets.variant, {})}.items():
            _set_default(cfg, key, value, user_keys)
        # Held-out evaluation: greedy, one sample a problem, the whole validation file at once.
        _set(cfg, "actor_rollout_ref.rollout.val_kwargs.do_sample", False)
        _set(cfg, "actor_rollout_ref.rollout.val_kwargs.temperature", 0.0)
        _set(cfg, "actor_rollout_ref.rollout.val_kwargs.n", 1)

        # Model / engine settings veRL needs on CPU.
        model = "actor_rollout_ref.model"
        # Packed rows (veRL's remove-padding path: on CPU, sdpa with the per-sequence mask transformers builds from
        # position ids), as in the GPU recipes.
        _set_default(cfg, f"{model}.use_remove_padding", True, user_keys)
        _set(cfg, f"{model}.enable_gradient_checkpointing", False)
        _set(cfg, f"{model}.override_config.attn_implementation", "sdpa")
        _set(cfg, f"{model}.use_fused_kernels", False)
        if (OmegaConf.select(cfg, f"{model}.lora_rank", default=0) or 0) > 0:
            # LoRA (e.g. the opsd recipe): the HF replica takes merged weights only; a rank sized for the tiny model.
            _set(cfg, f"{model}.lora.merge", True)
            _set_default(cfg, f"{model}.lora_rank", DEMO_LORA_RANK, user_keys)
            _set_default(cfg, f"{model}.lora_alpha", 2 * DEMO_LORA_RANK, user_keys)
        for role in ("actor", "ref"):
            _set(cfg, f"actor_rollout_ref.{role}.strategy", "fsdp2")
            _set(cfg, f"actor_rollout_ref.{role}.use_torch_compile", False)
            _set(cfg, f"actor_rollout_ref.{role}.fsdp_config.use_torch_compile", False)
            _set(cfg, f"actor_rollout_ref.{role}.fsdp_config.param_offload", False)
            _set(cfg, f"actor_rollout_ref.{role}.fsdp_config.dtype", "float32")
            _set(cfg, f"actor_rollout_ref.{role}.fsdp_config.model_dtype", "fp32")
            # veRL's FSDP engine computes in bf16 unless mixed_precision says otherwise; the demo's rollout and
            # teachers compute in float32, so the student's log-probs must too (else they differ by ~0.04 nats).
            _set(cfg, f"actor_rollout_ref.{role}.fsdp_config.mixed_precision", {"param_dtype": "fp32"})
        _set(cfg, "actor_rollout_ref.actor.fsdp_config.optimizer_offload", False)
        # Micro-batches by token budget (the reference's and the rollout's log-prob passes follow the actor's
        # use_dynamic_bsz through veRL's defaults; the plugin's teachers follow the reference's); the row counts are
        # read only with use_dynamic_bsz=false.
        _set_default(cfg, "actor_rollout_ref.actor.use_dynamic_bsz", True, user_keys)
        row_tokens = int(cfg.data.max_prompt_length) + int(cfg.data.max_response_length)
        _set_default(cfg, "actor_rollout_ref.actor.ppo_max_token_len_per_gpu", DEMO_UPDATE_ROWS * row_tokens, user_keys)
        for role in ("ref", "rollout"):
            _set_default(
                cfg,
                f"actor_rollout_ref.{role}.log_prob_max_token_len_per_gpu",
                DEMO_LOG_PROB_ROWS * row_tokens,
                user_keys,
            )
        _set(cfg, "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu", DEMO_UPDATE_ROWS)
        _set(cfg, "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu", DEMO_LOG_PROB_ROWS)
        _set(cfg, "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio", 0.0)
        _set(cfg, "actor_rollout_ref.actor.optim.weight_decay", 0.0)

        # Rollout: HF generate server, one replica on the single trainer worker.
        rollout = "actor_rollout_ref.rollout"
        _set(cfg, f"{rollout}.name", "hf")
        _set(cfg, f"{rollout}.mode", "async")
        _set(cfg, f"{rollout}.tensor_model_parallel_size", 1)
        _set(cfg, f"{rollout}.data_parallel_size", 1)
        _set(cfg, f"{rollout}.pipeline_model_parallel_size", 1)
        _set(cfg, f"{rollout}.dtype", "float32")
        _set(cfg, f"{rollout}.load_format", "auto")
        _set(cfg, f"{rollout}.free_cache_engine", False)
        _set(cfg, f"{rollout}.enforce_eager", True)
        _set(cfg, f"{rollout}.log_prob_micro_batch_size_per_gpu", DEMO_LOG_PROB_ROWS)
        _set(cfg, f"{rollout}.agent.num_workers", 1)
        _set(cfg, f"{rollout}.max_num_seqs", 64)
        _set(cfg, f"{rollout}.max_num_batched_tokens", 4096)
        _set(cfg, f"{rollout}.checkpoint_engine.backend", "naive")

        # Teachers served by veRL's distillation teacher loop (the plugin's `kind=server` translation) run on the
        # HF teacher replica.
        teacher_inference = "distillation.teacher_models.teacher_model.inference"
        _set(cfg, f"{teacher_inference}.name", "hf")
        _set(cfg, f"{teacher_inference}.tensor_model_parallel_size", 1)
        _set(cfg, f"{teacher_inference}.dtype", "float32")

        # Trainer: one CPU "GPU" worker (or as many logical GPUs as the command line asks for: each is a gloo rank
        # with its own HF rollout replica), console + file metrics, checkpoints in the run dir.
        _set(cfg, "trainer.device", "cpu")
        _set(cfg, "trainer.nnodes", 1)
        _set_default(cfg, "trainer.n_gpus_per_node", 1, user_keys)
        _set(cfg, "trainer.logger", ["console", "file"])
        _set_default(cfg, "trainer.val_before_train", True, user_keys)
        _set_default(cfg, "trainer.save_freq", -1, user_keys)
        _set(cfg, "trainer.balance_batch", False)
        _set(cfg, "trainer.v1.trainer_mode", "sync")
        experiment = str(OmegaConf.select(cfg, "trainer.experiment_name", default="run"))
        if not experiment.startswith(DEMO_EXPERIMENT_PREFIX):
            _set(cfg, "trainer.experiment_name", f"{DEMO_EXPERIMENT_PREFIX}_{experiment}")
        _set(cfg, "trainer.default_local_dir", run_dir_of(cfg))
        _set(cfg, "opd.cpu_demo", "true")

        # Quiet console (opd_verl.demo.console): worker output stays in Ray's logs unless the user asks for it;
        # TransferQueue's thread count fits the machine.
        _set_default(cfg, "ray_kwargs.ray_init.log_to_driver", False, user_keys)
        quiet_env = console.quiet_environment()
        os.environ.update(quiet_env)
        for name, value in quiet_env.items():
            _set(cfg, f"ray_kwargs.ray_init.runtime_env.env_vars.{name}", value)

    run_dir = run_dir_of(cfg)
    apply_cpu_runtime(cfg, metrics_file=os.path.join(run_dir, "metrics.jsonl"))
    if os.path.exists(assets.teacher_eval_file):
        shutil.copyfile(assets.teacher_eval_file, os.path.join(run_dir, os.path.basename(assets.teacher_eval_file)))
    return cfg


def metrics_file_of(cfg: DictConfig) -> str:
    return os.path.join(run_dir_of(cfg), "metrics.jsonl")
