"""Checks 4 and 5: trainer runs through `python -m opd_verl.main` on the acceptance models, judged by their output.

Each run is a recipe plus Hydra overrides (the public surface: what a user types), started as a subprocess; it is
judged by its exit status, the per-step metrics veRL's file logger writes (``VERL_FILE_LOGGER_PATH``) and the
checkpoint folders. The dry run composes each run's config with the same overrides and puts it through the
driver's own checks (`opd_verl.main.check`) and veRL's `validate_config`, without starting anything.

GPU settings of every run: vLLM rollout, FSDP2, bf16 (veRL's mixed precision), flash-attention (veRL's default
attention on CUDA), ``use_remove_padding=true``, ``use_dynamic_bsz=true`` (token-budgeted micro-batches for the
actor, reference and log-prob passes) and the teachers colocated with the trainer.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys

from opd_verl.acceptance.report import CheckFailed

__all__ = ["TrainerRun", "plan", "command", "compose", "validate", "execute", "read_metrics", "judge_offload"]

TEACHER_PLACEMENT = "opd.teachers.placement"


@dataclasses.dataclass(frozen=True)
class TrainerRun:
    """One trainer run: check name, recipe, overrides, GPUs it needs, and how its output is judged."""

    name: str
    recipe: str
    overrides: tuple[str, ...]
    gpus: int
    verify: str  # opd | opd_server | opsd | resume
    steps: tuple[int, ...]
    what: str

    def metrics_file(self, work: str) -> str:
        return os.path.join(work, "runs", f"{self.name}.metrics.jsonl")

    def log_file(self, work: str) -> str:
        return os.path.join(work, "runs", f"{self.name}.log")


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def has_placement() -> bool:
    """Whether this build's `opd` section has ``teachers.placement`` (teachers colocated with the trainer)."""
    from importlib.resources import files

    from omegaconf import OmegaConf

    base = OmegaConf.load(str(files("opd_verl.hydra_configs") / "opd_trainer.yaml"))
    return OmegaConf.select(base, TEACHER_PLACEMENT, default=None) is not None


def common_overrides(assets, work: str, gpus: int) -> list[str]:
    """Data, models, reward and the GPU settings every run shares (sizes for a tiny model, a few minutes a run)."""
    from opd_verl.demo import task

    return [
        "opd.cpu_demo=false",
        f"data.train_files={assets.train_file}",
        f"data.val_files={assets.val_file}",
        "data.prompt_key=prompt",
        "data.train_batch_size=8",
        "data.max_prompt_length=64",
        "data.max_response_length=64",
        "data.filter_overlong_prompts=false",
        "data.truncation=error",
        "data.dataloader_num_workers=0",
        f"reward.custom_reward_function.path={os.path.abspath(task.__file__)}",
        "reward.custom_reward_function.name=compute_score",
        f"actor_rollout_ref.model.path={assets.student}",
        "actor_rollout_ref.model.use_remove_padding=true",
        "actor_rollout_ref.model.use_fused_kernels=false",
        "actor_rollout_ref.actor.strategy=fsdp2",
        "actor_rollout_ref.ref.strategy=fsdp2",
        "actor_rollout_ref.actor.use_dynamic_bsz=true",
        "actor_rollout_ref.actor.ppo_max_token_len_per_gpu=2048",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.optim.lr_warmup_steps_ratio=0.0",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.rollout.name=vllm",
        "actor_rollout_ref.rollout.tensor_model_parallel_size=1",
        "actor_rollout_ref.rollout.gpu_memory_utilization=0.3",
        "actor_rollout_ref.rollout.enforce_eager=true",
        "trainer.nnodes=1",
        f"trainer.n_gpus_per_node={gpus}",
        "trainer.val_before_train=false",
        "trainer.test_freq=-1",
        "trainer.logger=[console,file]",
        "trainer.project_name=opd_verl_acceptance",
    ]


def plan(assets, work: str, extra: list[str] | None = None) -> list[TrainerRun]:
    """The trainer runs: three on one GPU (check 4), two that need two GPUs (check 5)."""
    extra = list(extra or [])
    teacher = [f"opd.teachers.models.default.path={assets.teacher}"]
    # teachers in veRL's global pool with the actor and rollout, parameters in CPU memory outside their phase
    placement = [f"{TEACHER_PLACEMENT}=colocated", "opd.teachers.offload=true"] if has_placement() else []

    user_keys = {_key(o) for o in extra}

    def run(name, recipe, gpus, verify, steps, what, *overrides, trainer_gpus=None):
        run_dir = os.path.join(work, "runs", name.removesuffix("_resume"))
        own = [
            *common_overrides(assets, work, gpus if trainer_gpus is None else trainer_gpus),
            f"trainer.experiment_name={name}",
            f"trainer.default_local_dir={run_dir}",
            *overrides,
        ]
        own = [o for o in own if _key(o) not in user_keys] + extra  # the user's value of a key wins
        return TrainerRun(name, recipe, tuple(own), gpus, verify, steps, what)

    two_steps = ("trainer.total_training_steps=2", "trainer.resume_mode=disable")
    return [
        run(
            "exopd_iw_release",
            "exopd_iw_release",
            1,
            "opd",
            (1, 2),
            "ExOPD + IW + release, local teacher worker, student top-K hook",
            *teacher,
            *placement,
            *two_steps,
            "trainer.save_freq=-1",
        ),
        run(
            "opsd",
            "opsd",
            1,
            "opsd",
            (1, 2),
            "OPSD, LoRA, frozen teacher (adapter off), checkpoint every step",
            *two_steps,
            "trainer.save_freq=1",
        ),
        run(
            "opsd_resume",
            "opsd",
            1,
            "resume",
            (3,),
            "resume of the opsd run from its step-2 checkpoint",
            "trainer.total_training_steps=3",
            "trainer.resume_mode=auto",
            "trainer.save_freq=1",
        ),
        run(
            "two_gpu_sp_sharded",
            "exopd_iw_release",
            2,
            "opd",
            (1, 2),
            "Ulysses sequence parallelism 2, actor and teacher sharded over 2 ranks",
            *teacher,
            *placement,
            *two_steps,
            "trainer.save_freq=-1",
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
        ),
        run(
            "two_gpu_server_teachers",
            "exopd",
            2,
            "opd_server",
            (1, 2),
            "veRL's vLLM teacher server on its own GPU (opd.teachers.kind=server)",
            *teacher,
            *two_steps,
            "trainer.save_freq=-1",
            "opd.teachers.kind=server",
            "opd.teachers.n_gpus_per_node=1",
            "distillation.teacher_models.teacher_model.inference.name=vllm",
            "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=1",
            "distillation.teacher_models.teacher_model.inference.gpu_memory_utilization=0.3",
            "distillation.teacher_models.teacher_model.inference.enforce_eager=true",
            trainer_gpus=1,
        ),
    ]


def command(run: TrainerRun, work: str) -> list[str]:
    """The command line of a run (the metrics file also reaches Ray's workers through the runtime env)."""
    metrics = run.metrics_file(work)
    return [
        sys.executable,
        "-m",
        "opd_verl.main",
        f"+recipe={run.recipe}",
        *run.overrides,
        f"++ray_kwargs.ray_init.runtime_env.env_vars.VERL_FILE_LOGGER_PATH={metrics}",
        f"hydra.run.dir={os.path.join(work, 'runs', 'hydra_' + run.name)}",
    ]


def compose(run: TrainerRun, work: str):
    """The run's config as `python -m opd_verl.main` composes it (Hydra's compose API, same overrides)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    overrides = [a for a in command(run, work)[3:] if not a.startswith("hydra.")]
    with initialize_config_module(config_module="opd_verl.hydra_configs", version_base=None):
        return hydra_compose(config_name="opd_trainer", overrides=overrides)


def validate(run: TrainerRun, work: str) -> str:
    """Dry run of a trainer run: compose, the driver's checks, veRL's `validate_config`; figure: what it would run."""
    from omegaconf import OmegaConf

    from opd_verl.main import check, validate_verl

    cfg, opd = check(compose(run, work))
    note = ""
    try:
        validate_verl(cfg)
    except ValueError as err:
        # veRL's last check (a LoRA rank vLLM accepts) imports vLLM; without it, validate the rest and say so
        if "vllm version" not in str(err) or importlib.util.find_spec("vllm") is not None:
            raise
        trial = OmegaConf.create(OmegaConf.to_container(cfg))
        OmegaConf.update(trial, "actor_rollout_ref.model.lora.merge", True, force_add=True)
        validate_verl(trial)
        note = "; vLLM's LoRA-rank check not run (no vLLM here)"
    get = lambda key: OmegaConf.select(cfg, key)  # noqa: E731
    expected = {
        "actor_rollout_ref.rollout.name": "vllm",
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "actor_rollout_ref.model.use_remove_padding": True,
        "actor_rollout_ref.actor.use_dynamic_bsz": True,
        "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": True,
        "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": True,
    }
    wrong = {k: get(k) for k, v in expected.items() if get(k) != v}
    if wrong:
        raise CheckFailed(f"the composed config does not have the GPU settings: {wrong}")
    placement = OmegaConf.select(cfg, TEACHER_PLACEMENT, default=None)
    if opd.signal.name == "opsd":
        teacher = "teacher in the actor"
    elif opd.teachers.kind == "server":
        teacher = "teachers server (own pool)"
    elif placement:
        teacher = f"teachers local, placement {placement}"
    else:
        teacher = "teachers local, no opd.teachers.placement in this build (own pool)"
    return (
        f"config valid, not started: {run.gpus} GPU(s), {opd.signal.name}, {teacher}, "
        f"sp {get('actor_rollout_ref.actor.ulysses_sequence_parallel_size')}, steps {list(run.steps)}{note}"
    )


def read_metrics(path: str) -> dict[int, dict]:
    """Per-step metrics from veRL's file logger (JSON lines ``{"step": n, "data": {...}}``)."""
    by_step: dict[int, dict] = {}
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    by_step.setdefault(int(row["step"]), {}).update(row["data"])
    return by_step


def _finite(value) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def judge(run: TrainerRun, metrics: dict[int, dict], run_dir: str) -> str:
    """Judge a finished run by its metrics and checkpoints; figure: the numbers that show each path ran."""
    if sorted(metrics) != list(run.steps):
        raise CheckFailed(f"logged steps {sorted(metrics)}, expected {list(run.steps)}")
    last = metrics[run.steps[-1]]
    for step, data in metrics.items():
        bad = [k for k, v in data.items() if ("opd/" in k or "opsd/" in k) and not _finite(v)]
        if bad:
            raise CheckFailed(f"step {step}: not finite: {', '.join(sorted(bad)[:5])}")
        for key in ("actor/grad_norm", "actor/pg_loss", "actor/loss"):
            if key in data and not _finite(data[key]):
                raise CheckFailed(f"step {step}: {key}={data[key]}")

    def need(data, *keys):
        missing = [k for k in keys if k not in data]
        if missing:
            raise CheckFailed(f"missing metrics: {', '.join(missing)}")

    if run.verify == "opd":
        first = metrics[run.steps[0]]
        for data in metrics.values():
            # teacher log-probs reached the estimator; the reference pass ran (ExOPD, use_kl_loss); IW and release
            need(data, "opd/discrepancy", "opd/signal", "timing_s/opd_teacher", "timing_s/ref", "actor/kl_loss")
            need(data, "opd/weight_mean", "opd/release/accept_rate", "opd/release/n_sentences")
        # at the first step the reference is the actor itself, so ExOPD's signal is lam * discrepancy (lam 1.25):
        # true only if teacher and reference log-probs both reached the advantage
        signal, disc = first["opd/signal"], first["opd/discrepancy"]
        if not math.isclose(signal, 1.25 * disc, rel_tol=0.05, abs_tol=0.02):
            raise CheckFailed(f"step 1: opd/signal {signal:.4f} != 1.25 x opd/discrepancy {disc:.4f}")
        return (
            f"steps {sorted(metrics)}; step 1 signal {signal:.3f} = 1.25 x discrepancy {disc:.3f}; "
            f"teacher {first['timing_s/opd_teacher']:.1f} s, ref {first['timing_s/ref']:.1f} s; "
            f"release accept {last['opd/release/accept_rate']:.2f}, IW weight mean {last['opd/weight_mean']:.3f}; "
            f"step time {last.get('timing_s/step', float('nan')):.1f} s"
        )
    if run.verify == "opd_server":
        opd_keys = [k for k in last if "opd/" in k]
        if not opd_keys:
            raise CheckFailed("no opd/* metric logged: the plugin's distillation loss did not run")
        need(last, "actor/grad_norm")
        return f"steps {sorted(metrics)}; {len(opd_keys)} opd/* metrics finite; grad norm {last['actor/grad_norm']:.3g}"
    # opsd and its resume
    for data in metrics.values():
        need(data, "actor/opsd/loss", "actor/opsd/divergence_mean", "actor/opsd/teacher_adapter_off", "actor/grad_norm")
        if data["actor/opsd/teacher_adapter_off"] != 1.0:
            raise CheckFailed("the frozen OPSD teacher was not the base model with the LoRA adapter off")
    missing = [s for s in run.steps if not os.path.isdir(os.path.join(run_dir, f"global_step_{s}", "actor"))]
    if missing:
        raise CheckFailed(f"no actor checkpoint for steps {missing} in {run_dir}")
    latest = os.path.join(run_dir, "latest_checkpointed_iteration.txt")
    latest_step = open(latest).read().strip() if os.path.exists(latest) else "none"
    if latest_step != str(run.steps[-1]):
        raise CheckFailed(f"latest_checkpointed_iteration.txt says {latest_step}, expected {run.steps[-1]}")
    what = "resumed at step 3 from global_step_2" if run.verify == "resume" else f"checkpoints {list(run.steps)}"
    return (
        f"steps {sorted(metrics)}; {what}; opsd loss {last['actor/opsd/loss']:.4f}, "
        f"divergence {last['actor/opsd/divergence_mean']:.4f}, grad norm {last['actor/grad_norm']:.3g}"
    )


# the least share of its parameter shard's bytes a teacher process must free on the device at each offload
OFFLOAD_FREED_MIN = 0.9


def judge_offload(metrics: dict[int, dict]) -> str:
    """The colocated teachers' offload in a finished run (``opd.teachers.offload=true``): at every step each
    teacher worker process's ``torch.cuda.memory_allocated`` fell by at least `OFFLOAD_FREED_MIN` of its parameter
    shard's bytes when the parameters left the device after the teacher phase (metrics of
    `opd_verl.trainer.opd_trainer.offload_metrics`). Figure: the smallest share freed, the parameters offloaded
    and what a process still held."""
    keys = ("opd/teacher_offload/freed_fraction", "opd/teacher_offload/params_gib")
    if not metrics:
        raise CheckFailed("no step logged")
    for step, data in sorted(metrics.items()):
        missing = [k for k in keys if k not in data]
        if missing:
            raise CheckFailed(f"step {step}: missing {', '.join(missing)} (no offload measured on a CUDA device)")
        freed = float(data[keys[0]])
        if not freed >= OFFLOAD_FREED_MIN:
            raise CheckFailed(
                f"step {step}: the offload freed {freed:.0%} of a teacher process's parameter bytes on the device "
                f"(at least {OFFLOAD_FREED_MIN:.0%} expected): the parameters stayed there"
            )
    low = min(float(d[keys[0]]) for d in metrics.values())
    held = max(float(d.get("opd/teacher_offload/allocated_after_gib", math.nan)) for d in metrics.values())
    params = max(float(d[keys[1]]) for d in metrics.values())
    return (
        f"steps {sorted(metrics)}: each offload freed >= {low:.0%} of the teacher's {params:.3f} GiB of parameters "
        f"on the device; a teacher process held at most {held:.3f} GiB after it"
    )


def execute(run: TrainerRun, work: str, timeout_s: int) -> str:
    """Start the run, wait at most `timeout_s` (then end its whole process group), judge its output."""
    log_path, metrics_path = run.log_file(work), run.metrics_file(work)
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    if os.path.exists(metrics_path):
        os.remove(metrics_path)
    env = dict(os.environ, VERL_FILE_LOGGER_PATH=metrics_path, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = command(run, work)
    with open(log_path, "w") as log:
        log.write(shlex.join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise CheckFailed(f"still running after {timeout_s} s (log: {log_path})") from None
    if rc != 0:
        with open(log_path) as f:
            tail = [line.strip() for line in f.readlines()[-200:] if line.strip()]
        cause = next((line for line in reversed(tail) if "Error" in line or "error:" in line), tail[-1] if tail else "")
        raise CheckFailed(f"exit status {rc}: {cause[:200]} (log: {log_path})")
    run_dir = next(o.split("=", 1)[1] for o in run.overrides if o.startswith("trainer.default_local_dir="))
    return judge(run, read_metrics(metrics_path), run_dir)
