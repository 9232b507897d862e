"""Plugin state beside veRL's checkpoint, restored on resume; a preemption request saves and ends the loop."""

import json
from types import SimpleNamespace
from unittest import mock

import pytest
from omegaconf import OmegaConf

from opd_verl.health import HealthConfig
from opd_verl.trainer import preemption
from opd_verl.trainer.health_monitor import HealthMonitor


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from opd_verl.trainer.opd_trainer import OPDTrainer

    saved = []

    def fake_save(self):  # veRL's own save: actor/dataloader files, not needed here
        saved.append(self.global_steps)

    def fake_load(self):  # veRL's own resume: sets the step from the latest checkpoint folder
        self.global_steps = 7

    monkeypatch.setattr(PPOTrainer, "_save_checkpoint", fake_save)
    monkeypatch.setattr(PPOTrainer, "_load_checkpoint", fake_load)
    tr = object.__new__(OPDTrainer)
    tr.config = OmegaConf.create(
        {
            "trainer": {"default_local_dir": str(tmp_path), "resume_mode": "auto", "resume_from_path": None},
            "actor_rollout_ref": {"actor": {"checkpoint": {}}},
        }
    )
    tr.opd_state = {"advantage_step": 0, "teacher_calls": 0}
    tr._saved_step = None
    tr.checkpoint_manager = mock.Mock()
    tr.timing_raw = {}
    tr.saved = saved
    tr.health = HealthMonitor(HealthConfig(), SimpleNamespace(teachers=SimpleNamespace(models=())), 1.0, str(tmp_path))
    yield tr
    preemption.clear_preemption()


def test_state_saved_and_restored(trainer, tmp_path):
    trainer.global_steps = 7
    trainer.opd_state.update(advantage_step=7, teacher_calls=7)
    trainer._save_checkpoint()
    state = json.loads((tmp_path / "global_step_7" / "opd_state.json").read_text())
    assert state == {"advantage_step": 7, "teacher_calls": 7, "global_step": 7}

    trainer.health.previous_adv_scale = 0.25  # the advantage-jump alarm's reference survives a resume
    trainer._save_checkpoint()
    trainer.opd_state = {"advantage_step": 0, "teacher_calls": 0}
    trainer.health.previous_adv_scale = None
    trainer._load_checkpoint()
    assert trainer.global_steps == 7
    assert trainer.opd_state == {"advantage_step": 7, "teacher_calls": 7, "health_adv_scale": 0.25}
    assert trainer.health.previous_adv_scale == 0.25


def test_preemption_saves_once_and_ends_the_loop(trainer):
    trainer.global_steps, trainer.total_training_steps = 3, 10
    trainer.on_step_end()  # no request: nothing happens
    assert trainer.saved == [] and trainer.total_training_steps == 10
    trainer.checkpoint_manager.update_weights.assert_called_with(3)

    preemption.request_preemption("SIGUSR1")
    trainer.on_step_end()
    assert trainer.saved == [3] and trainer.total_training_steps == 3

    trainer.global_steps, trainer.total_training_steps = 4, 10
    trainer._saved_step = 4  # veRL's periodic save already ran this step
    trainer.on_step_end()
    assert trainer.saved == [3] and trainer.total_training_steps == 4


def test_stop_alarm_saves_once_and_ends_the_loop(trainer):
    trainer.global_steps, trainer.total_training_steps = 2, 10
    trainer.health.stop_message = "step 2: opd_verl health alarm 'collapse' (stop) for teacher 'default': figure 1"
    trainer.on_step_end()
    assert trainer.saved == [2] and trainer.total_training_steps == 2
    trainer.on_step_end()  # saved this step already: not again
    assert trainer.saved == [2]


def test_preemption_checkpoint_is_written_while_the_rollout_engine_sleeps(trainer, monkeypatch):
    """veRL's sync trainer sleeps the rollout replicas after sampling and wakes them in `update_weights` (its
    `on_step_end`); the preemption save must come before that wake-up, as veRL's own periodic save does."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    events = []
    monkeypatch.setattr(PPOTrainer, "_save_checkpoint", lambda self: events.append("save"))
    trainer.checkpoint_manager.update_weights.side_effect = lambda step: events.append("update_weights")
    trainer.checkpoint_manager.sleep_replicas.side_effect = lambda: events.append("sleep")
    trainer.global_steps, trainer.total_training_steps = 5, 10
    trainer.curr_step_profile = False
    trainer.on_sample_end()  # veRL's sync trainer: sampling done, replicas sleep
    preemption.request_preemption("SIGUSR1")
    trainer.on_step_end()
    assert events == ["sleep", "save", "update_weights"]
    assert trainer.total_training_steps == 5
