"""Hydra entry point: `python -m opd_verl.main +recipe=NAME [overrides]`.

Composes veRL's `ppo_trainer` with the plugin's `opd` section and a recipe, validates everything in the driver
(before Ray or any worker starts), then runs veRL's trainer with the plugin loaded. `--cfg job` prints the
composed config and starts nothing.
"""

from __future__ import annotations

import os
import sys
import tempfile

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from opd_verl.config import OPDConfig, OPDConfigError, load_opd_config


def prepare(cfg: DictConfig) -> DictConfig:
    """Apply presets that rewrite the config (the CPU demo) before validation."""
    from opd_verl.demo.preset import maybe_apply_cpu_demo

    return maybe_apply_cpu_demo(cfg)


def validate_before_demo(cfg: DictConfig) -> None:
    """Check the `opd` section before the CPU demo builds its assets (the teacher SFT takes a minute or two).

    The demo supplies the teacher path itself, so the check runs on a copy that has a stand-in path for it.
    """
    from opd_verl.demo.preset import demo_wanted

    if not demo_wanted(cfg):
        return
    trial = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    with open_dict(trial):
        OmegaConf.update(trial, "opd.teachers.models.default.path", "<cpu demo teacher>", force_add=True)
    load_opd_config(trial)


def install_preemption_handlers(cfg: DictConfig) -> None:
    """USR1/TERM -> checkpoint at the next step boundary (opd_verl.trainer.preemption), also inside Ray actors.

    The request travels through a flag file whose path Ray's workers inherit; without one from the launcher
    (the Slurm script sets it), a fresh per-run path is used.
    """
    from opd_verl.trainer.preemption import FLAG_FILE_ENV, install_signal_handlers

    if not os.environ.get(FLAG_FILE_ENV):
        os.environ[FLAG_FILE_ENV] = os.path.join(tempfile.mkdtemp(prefix="opd_verl_"), "PREEMPT_REQUESTED")
    with open_dict(cfg):
        OmegaConf.update(
            cfg, f"ray_kwargs.ray_init.runtime_env.env_vars.{FLAG_FILE_ENV}", os.environ[FLAG_FILE_ENV], force_add=True
        )
    install_signal_handlers()


def _task_runner(opd: OPDConfig):
    """The plugin trainer's task runner, unless only veRL's own distillation servers are used (kind=server)."""
    from verl.trainer.main_ppo import TaskRunnerV1

    if opd.teachers.kind == "server" and opd.signal.name != "opsd":
        return TaskRunnerV1
    if opd.signal.name == "opsd":
        from opd_verl.trainer.opsd_trainer import OPSDTaskRunner

        return OPSDTaskRunner
    from opd_verl.trainer.opd_trainer import OPDTaskRunner

    return OPDTaskRunner


def validate_verl(cfg: DictConfig) -> None:
    """veRL's own validation of the composed config (batch sizes against GPUs, micro-batches, ...), in the driver."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    import opd_verl.integration.plugin  # noqa: F401  (registers the estimators in this process too)

    auto_set_device(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


def announce_resume(cfg: DictConfig) -> None:
    """With ``trainer.resume_mode=auto``, say in the driver which checkpoint the run resumes from, which incomplete
    ones it skips and which plugin state it restores (the trainer, in a Ray actor, does the same loading); a corrupt
    plugin state file or a folder with no complete step stops the run here, before Ray starts."""
    from opd_verl.trainer.checkpoints import STATE_FILE, CheckpointError, choose_resume_folder, load_state

    if OmegaConf.select(cfg, "trainer.resume_mode") != "auto":
        return
    root = os.path.abspath(os.path.expanduser(cfg.trainer.default_local_dir))
    try:
        folder, skipped = choose_resume_folder(root)
    except CheckpointError as err:
        sys.exit(f"opd_verl: cannot resume: {err}")
    for bad, why in skipped:
        print(f"opd_verl: WARNING: skipping the incomplete checkpoint {bad} ({why}); resuming from {folder}")
    if folder is not None:
        path = os.path.join(folder, STATE_FILE)
        try:
            state = f"plugin state {load_state(path)} from {path}" if os.path.exists(path) else f"no {STATE_FILE}"
        except CheckpointError as err:
            sys.exit(f"opd_verl: cannot resume: {err}")
        step = folder.rstrip("/").rsplit("global_step_", 1)[-1]
        print(f"opd_verl: resuming at step {step} from {folder}; {state}", flush=True)


def launch(cfg: DictConfig, opd: OPDConfig) -> None:
    """Validate veRL's own fields and run its trainer (Ray driver side)."""
    from verl.trainer.main_ppo import run_ppo

    from opd_verl.cpu_port.activate import is_active as cpu_shims_active

    validate_verl(cfg)
    announce_resume(cfg)
    if cpu_shims_active():
        from opd_verl.cpu_port.ray_setup import check_cpu_runtime

        check_cpu_runtime(cfg)
    import ray

    from opd_verl.trainer.preemption import handlers_kept_through

    install_preemption_handlers(cfg)
    demo = cpu_shims_active() and str(cfg.opd.get("cpu_demo", "")) == "true"
    if not demo:
        with handlers_kept_through(ray, "init"):  # Ray's own SIGTERM handler must not take TERM from the plugin
            run_ppo(cfg, task_runner_class=_task_runner(opd))
        return
    from opd_verl.demo.console import StepPrinter
    from opd_verl.demo.preset import metrics_file_of
    from opd_verl.demo.summary import summarize_run

    with StepPrinter(metrics_file_of(cfg), int(cfg.trainer.total_training_steps)):
        with handlers_kept_through(ray, "init"):  # Ray's own SIGTERM handler must not take TERM from the plugin
            run_ppo(cfg, task_runner_class=_task_runner(opd))
    summarize_run(cfg)


def check_inputs(cfg: DictConfig, opd: OPDConfig) -> None:
    """Model paths, tokenizers and data files, in the driver (opd_verl.model_check, opd_verl.data_check)."""
    from opd_verl.data_check import check_data
    from opd_verl.model_check import check_model_paths, check_tokenizers

    check_model_paths(cfg, opd)
    check_tokenizers(cfg, opd)
    check_data(cfg, opd)


def check_opsd_data(cfg: DictConfig, opd: OPDConfig) -> None:
    """OPSD: every training row has a problem and a reference solution (error names file, row and column)."""
    from opd_verl.opsd.inputs import check_solutions_in_files

    files = OmegaConf.select(cfg, "data.train_files")
    files = [files] if isinstance(files, str) else list(files)
    report = check_solutions_in_files(files, opd.opsd.problem_key, opd.opsd.solution_key, opd.opsd.missing_solution)
    if report["skipped"]:
        print(
            f"opd_verl: OPSD: {report['skipped']} of {report['rows']} training rows have no reference solution; "
            "they are trained without the distillation loss (opd.opsd.missing_solution=skip)"
        )


def check(cfg: DictConfig) -> tuple[DictConfig, OPDConfig]:
    """What the driver checks and rewrites before veRL's validation: presets, the `opd` section, OPSD's data,
    the translation to veRL's teacher servers, the placement of the pools on the launch's GPUs. Raises
    `OPDConfigError` / `OPSDDataError`."""
    validate_before_demo(cfg)
    cfg = prepare(cfg)
    opd = load_opd_config(cfg)
    if opd.signal.name == "opsd":
        check_opsd_data(cfg, opd)
    if opd.teachers.kind == "server" and opd.signal.name != "opsd":
        from opd_verl.integration.server_teachers import apply_server_teachers

        apply_server_teachers(cfg, opd)
    from opd_verl.placement import check_placement

    check_placement(cfg)
    return cfg, opd


def run(cfg: DictConfig) -> None:
    from opd_verl.data_check import DataError
    from opd_verl.workers.tokenizer_check import TokenizerMismatchError

    try:
        cfg, opd = check(cfg)
        check_inputs(cfg, opd)  # files on disk: after `check`, so dry runs without the models and data skip it
    except (OPDConfigError, TokenizerMismatchError) as err:
        sys.exit(f"opd_verl: invalid config: {err}")
    except DataError as err:
        sys.exit(f"opd_verl: invalid data: {err}")
    launch(cfg, opd)


@hydra.main(config_path="hydra_configs", config_name="opd_trainer", version_base=None)
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
