"""Checkpoints through the plugin trainer's save/load (veRL's own file writing faked): the pointer moves only after a
step is complete, a resume falls back past an incomplete newest step with a warning naming it, a corrupt plugin
state file is named with what to do, and a resumed run's metrics history is kept."""

import json
import os
from types import SimpleNamespace
from unittest import mock

import pytest
from omegaconf import OmegaConf

from opd_verl.health import HealthConfig
from opd_verl.trainer import checkpoints
from opd_verl.trainer.checkpoints import CheckpointError, ResumedFileLogger, choose_resume_folder
from opd_verl.trainer.health_monitor import HealthMonitor


@pytest.fixture
def trainer(tmp_path, monkeypatch):
    """An `OPDTrainer` whose veRL parent save writes an actor file, data.pt and the pointer, as veRL's does."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    from opd_verl.trainer.opd_trainer import OPDTrainer

    loads = []

    def fake_save(self):
        folder = tmp_path / f"global_step_{self.global_steps}"
        (folder / "actor").mkdir(parents=True, exist_ok=True)
        (folder / "actor" / "model.pt").write_bytes(b"w" * (100 + self.global_steps))
        if self.fail_after_actor:
            raise KeyboardInterrupt("killed while saving")
        (folder / "data.pt").write_bytes(b"d" * 10)
        (tmp_path / "latest_checkpointed_iteration.txt").write_text(str(self.global_steps))

    def fake_load(self):  # veRL's resume: the step from the pointer, or from resume_from_path
        cfg = self.config.trainer
        loads.append((cfg.resume_mode, cfg.resume_from_path))
        if cfg.resume_mode == "resume_path":
            self.global_steps = int(cfg.resume_from_path.split("global_step_")[-1])
        else:
            self.global_steps = int((tmp_path / "latest_checkpointed_iteration.txt").read_text())

    monkeypatch.setattr(PPOTrainer, "_save_checkpoint", fake_save)
    monkeypatch.setattr(PPOTrainer, "_load_checkpoint", fake_load)
    monkeypatch.setattr("verl.utils.tracking.FileLogger", checkpoints.FileLogger)
    tr = object.__new__(OPDTrainer)
    tr.config = OmegaConf.create(
        {
            "trainer": {"default_local_dir": str(tmp_path), "resume_mode": "auto", "resume_from_path": None},
            "actor_rollout_ref": {"actor": {"checkpoint": {"async_save": False}}},
        }
    )
    tr.opd_state = {"advantage_step": 0, "teacher_calls": 0}
    tr._saved_step = None
    tr.fail_after_actor = False
    tr.loads = loads
    tr.health = HealthMonitor(HealthConfig(), SimpleNamespace(teachers=SimpleNamespace(models=())), 1.0, str(tmp_path))
    yield tr
    ResumedFileLogger.resume_step = None


def _save(tr, step):
    tr.global_steps = step
    tr.opd_state.update(advantage_step=step, teacher_calls=step)
    tr._save_checkpoint()


def test_pointer_moves_only_after_a_complete_step(trainer, tmp_path):
    _save(trainer, 2)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert checkpoints.incomplete_reason(str(tmp_path / "global_step_2")) is None
    trainer.fail_after_actor = True
    with pytest.raises(KeyboardInterrupt):
        _save(trainer, 4)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert choose_resume_folder(str(tmp_path)) == (str(tmp_path / "global_step_2"), [])


def test_resume_falls_back_past_a_truncated_step_and_says_so(trainer, tmp_path, capsys):
    _save(trainer, 2)
    _save(trainer, 4)
    (tmp_path / "global_step_4" / "actor" / "model.pt").write_bytes(b"w" * 7)  # cut short
    trainer.opd_state = {"advantage_step": 0, "teacher_calls": 0}
    trainer._load_checkpoint()
    out = capsys.readouterr().out
    assert trainer.loads == [("resume_path", str(tmp_path / "global_step_2"))]
    assert trainer.config.trainer.resume_mode == "auto" and trainer.config.trainer.resume_from_path is None
    assert trainer.global_steps == 2 and trainer.opd_state == {"advantage_step": 2, "teacher_calls": 2}
    assert f"skipping the incomplete checkpoint {tmp_path / 'global_step_4'} (actor/model.pt has 7 bytes, 104" in out
    assert f"resumed at step 2 from {tmp_path / 'global_step_2'}; plugin state" in out
    assert str(tmp_path / "global_step_2" / "opd_state.json") in out


def test_resume_without_a_complete_step_is_refused(trainer, tmp_path):
    _save(trainer, 2)
    os.remove(tmp_path / "global_step_2" / "data.pt")
    with pytest.raises(CheckpointError, match="no complete checkpoint .* data.pt is missing.*resume_mode=disable"):
        trainer._load_checkpoint()


def test_corrupt_plugin_state_names_the_file(trainer, tmp_path):
    _save(trainer, 3)
    state = tmp_path / "global_step_3" / "opd_state.json"
    state.write_text("{" + "x" * (len(state.read_text()) - 1))  # same size, not JSON: the manifest still matches
    with pytest.raises(CheckpointError) as info:
        trainer._load_checkpoint()
    assert f"the plugin state file {state} is corrupt" in str(info.value)
    assert f"remove the folder {tmp_path / 'global_step_3'}" in str(info.value)


def test_resumed_metrics_keep_the_history(trainer, tmp_path, monkeypatch):
    from verl.utils import tracking

    metrics = tmp_path / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(metrics))
    metrics.write_text("".join(json.dumps({"step": s, "data": {"x": s}}) + "\n" for s in range(1, 6)) + '{"step": 6')
    _save(trainer, 3)
    trainer._load_checkpoint()
    log = tracking.FileLogger("p", "e")  # what veRL's Tracking builds in fit()
    log.log({"x": 40}, step=4)
    log.finish()
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [(r["step"], r["data"]["x"]) for r in rows] == [(1, 1), (2, 2), (3, 3), (4, 40)]

    ResumedFileLogger.resume_step = None  # a fresh run starts a new file, as veRL's logger does
    tracking.FileLogger("p", "e").finish()
    assert metrics.read_text() == ""


def test_preemption_still_saves_once(trainer):
    from opd_verl.trainer import preemption

    trainer.checkpoint_manager, trainer.timing_raw = mock.Mock(), {}
    trainer.global_steps, trainer.total_training_steps = 3, 10
    preemption.request_preemption("SIGTERM")
    try:
        trainer.on_step_end()
    finally:
        preemption.clear_preemption()
    assert trainer.total_training_steps == 3 and trainer._saved_step == 3
