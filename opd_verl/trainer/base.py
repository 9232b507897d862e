"""What the plugin's two trainers share: veRL's synchronous v1 trainer run under the plugin's registered name, the
parsed ``opd:`` config, plugin state saved beside veRL's checkpoints, and preemption at step boundaries."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from omegaconf import DictConfig, open_dict
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

from opd_verl.config import OPDConfig, load_opd_config
from opd_verl.trainer import preemption

__all__ = ["PluginTrainer", "STATE_FILE"]

logger = logging.getLogger(__name__)

STATE_FILE = "opd_state.json"


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
        super().__init__(config)
        self._check_supported()

    def _check_supported(self) -> None:
        """Refuse, once veRL's config is complete, what the trainer cannot run (nothing here)."""

    # ------------------------------------------------------------------ checkpoints and preemption
    def _save_checkpoint(self):
        super()._save_checkpoint()
        folder = os.path.join(self.config.trainer.default_local_dir, f"global_step_{self.global_steps}")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, STATE_FILE), "w") as f:
            json.dump({**self.opd_state, "global_step": int(self.global_steps)}, f)
        self._saved_step = self.global_steps

    def _load_checkpoint(self):
        super()._load_checkpoint()
        if not self.global_steps:
            return
        folder = self._resume_folder()
        path = None if folder is None else os.path.join(folder, STATE_FILE)
        if path and os.path.exists(path):
            with open(path) as f:
                state = json.load(f)
            self.opd_state.update({k: v for k, v in state.items() if k != "global_step"})
            logger.info("opd_verl: restored plugin state %s from %s", self.opd_state, path)
        else:
            logger.warning("opd_verl: no %s beside the resumed checkpoint; plugin state starts fresh", STATE_FILE)

    def _resume_folder(self) -> str | None:
        trainer = self.config.trainer
        if trainer.resume_mode == "resume_path":
            return trainer.resume_from_path
        folder = os.path.join(trainer.default_local_dir, f"global_step_{self.global_steps}")
        return folder if os.path.isdir(folder) else None

    def on_step_end(self):
        super().on_step_end()
        if preemption.should_save_and_exit():
            if self._saved_step != self.global_steps:
                self._save_checkpoint()
            logger.warning(
                "opd_verl: %s requested; checkpoint of step %d saved, leaving the training loop",
                preemption.preemption_reason(),
                self.global_steps,
            )
            self.total_training_steps = self.global_steps  # veRL's fit() leaves its loop after this step
