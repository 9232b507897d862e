"""What the plugin's two trainers share: veRL's synchronous v1 trainer run under the plugin's registered name, the
parsed ``opd:`` config, plugin state saved beside veRL's checkpoints, preemption at step boundaries, and the
teacher-health monitor's step-boundary side (``diagnostics.png``; a ``stop`` alarm: checkpoint, then
`opd_verl.health.HealthAlarmError`)."""

from __future__ import annotations

import logging
import os
from typing import Any

from omegaconf import DictConfig, open_dict
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from opd_verl.config import OPDConfig, load_opd_config
from opd_verl.health import HealthAlarmError
from opd_verl.trainer import preemption
from opd_verl.trainer.checkpoints import STATE_FILE
from opd_verl.trainer.health_monitor import HealthMonitor

__all__ = ["PluginTrainer", "STATE_FILE"]

logger = logging.getLogger(__name__)


class PluginTrainer(PPOTrainerSync):
    """veRL's synchronous trainer selected by ``trainer_name`` (the name a subclass is registered under)."""

    trainer_name: str

    def __init__(self, config: DictConfig):
        # selected by its registered name; veRL's synchronous trainer expects its own mode name
        with open_dict(config):
            if config.trainer.v1.trainer_mode == self.trainer_name:
                config.trainer.v1.trainer_mode = "sync"
        self.opd: OPDConfig = load_opd_config(config)
        self.opd_state: dict[str, Any] = {"advantage_step": 0, "teacher_calls": 0}
        self._saved_step = None
        run_dir = os.path.abspath(os.path.expanduser(str(config.trainer.default_local_dir)))
        self.health = HealthMonitor(self.opd.health, self.opd, config.actor_rollout_ref.rollout.temperature, run_dir)
        super().__init__(config)
        self._check_supported()

    def _check_supported(self) -> None:
        """Refuse, once veRL's config is complete, what the trainer cannot run (nothing here)."""

    # ------------------------------------------------------------------ checkpoints and preemption
    def _save_checkpoint(self):
        """veRL's save with the plugin state first and the completeness manifest last (`checkpoints`); the pointer
        is rewritten only after the manifest."""
        from opd_verl.trainer.checkpoints import MANIFEST, write_json, write_manifest, write_pointer

        root = self.config.trainer.default_local_dir
        folder = os.path.join(root, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(os.path.join(folder, MANIFEST)):
            os.remove(os.path.join(folder, MANIFEST))  # a step saved again is incomplete until its new manifest
        self.opd_state.update(self.health.state())
        write_json(os.path.join(folder, STATE_FILE), {**self.opd_state, "global_step": int(self.global_steps)})
        super()._save_checkpoint()
        if not self.config.actor_rollout_ref.actor.get("checkpoint", {}).get("async_save", False):
            write_manifest(folder)
            write_pointer(root, self.global_steps)
        self._saved_step = self.global_steps

    def _load_checkpoint(self):
        """veRL's resume from the newest complete step (an incomplete newest step is skipped with a warning), then
        the plugin state; says what was restored."""
        from verl.utils import tracking

        from opd_verl.trainer.checkpoints import ResumedFileLogger, choose_resume_folder, load_state

        trainer = self.config.trainer
        mode, given = trainer.resume_mode, trainer.get("resume_from_path")
        folder, skipped = (given if mode == "resume_path" else None), []
        if mode == "auto":
            folder, skipped = choose_resume_folder(os.path.abspath(os.path.expanduser(trainer.default_local_dir)))
            for bad, why in skipped:
                print(f"opd_verl: WARNING: skipping the incomplete checkpoint {bad} ({why}); resuming from {folder}")
        if skipped:  # veRL's own resume, pointed at the complete step
            with open_dict(self.config):
                trainer.resume_mode, trainer.resume_from_path = "resume_path", folder
        try:
            super()._load_checkpoint()
        finally:
            with open_dict(self.config):
                trainer.resume_mode, trainer.resume_from_path = mode, given
        if not self.global_steps:
            return
        path = os.path.join(folder, STATE_FILE)
        if os.path.exists(path):
            state = load_state(path)
            self.opd_state.update({k: v for k, v in state.items() if k != "global_step"})
            self.health.load_state(self.opd_state)
            restored = f"plugin state {self.opd_state} from {path}"
        else:
            restored = f"WARNING: no {STATE_FILE} beside it: plugin state starts fresh"
        print(f"opd_verl: resumed at step {self.global_steps} from {folder}; {restored}", flush=True)
        ResumedFileLogger.resume_step = int(self.global_steps)
        tracking.FileLogger = ResumedFileLogger  # the file logger fit() creates keeps the steps up to here

    def on_step_end(self):
        # Checkpoints of this step are written before veRL's `on_step_end`, whose `update_weights` wakes the rollout
        # engine (weights and KV cache back on the device): here the engine still sleeps since the step's sampling,
        # as it does at veRL's own periodic save, so a save with parameter offload has the device memory it needs.
        self.health.maybe_plot(self.global_steps, last=self.global_steps >= self.total_training_steps)
        if self.health.stop_message is not None:
            # an alarm with action=stop: the preemption path (checkpoint, leave the loop), then `fit` raises
            if self._saved_step != self.global_steps:
                self._save_checkpoint()
            self.health.maybe_plot(self.global_steps, last=True)
            self.total_training_steps = self.global_steps
            super().on_step_end()
            return
        if preemption.should_save_and_exit():
            if self._saved_step != self.global_steps:
                self._save_checkpoint()
            logger.warning(
                "opd_verl: %s requested; checkpoint of step %d saved, leaving the training loop",
                preemption.preemption_reason(),
                self.global_steps,
            )
            self.total_training_steps = self.global_steps  # veRL's fit() leaves its loop after this step
        super().on_step_end()

    def fit(self, *args, **kwargs):
        out = super().fit(*args, **kwargs)
        if self.health.stop_message is not None:
            raise HealthAlarmError(
                f"{self.health.stop_message}. Checkpoint of step {self._saved_step} saved in "
                f"{self.config.trainer.default_local_dir}; to go on, set the alarm's action to warn (or fix the "
                "cause) and resume with trainer.resume_mode=auto"
            )
        return out
