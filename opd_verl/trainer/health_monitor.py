"""The plugin trainer's side of the teacher-health alarms (`opd_verl.health`): one object per run.

`HealthMonitor.sanitize` takes rows with NaN/inf log-probs out of a step the estimator refused (their advantage is
then 0); `HealthMonitor.check` runs `opd_verl.health.step_health` on the step's tensors, adds the
figures to the step's metrics, logs fired alarms and remembers a ``stop``; the trainer then checkpoints at the step
boundary and raises `opd_verl.health.HealthAlarmError` (`stop_message`). Per-position profiles are kept per step
for `opd_verl.trainer.diagnostics_plot` (``diagnostics.png`` in ``trainer.default_local_dir``).
"""

from __future__ import annotations

import logging
import os
import time

import torch

from opd_verl.health import HealthConfig, nonfinite_rows, step_health, zero_rows

__all__ = ["HealthMonitor"]

logger = logging.getLogger(__name__)


def _vocab_size(path: str | None) -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(path).vocab_size)


class HealthMonitor:
    """Alarms and diagnostics of a run (see the module docstring).

    Args:
        config: the ``opd.health`` section.
        opd: the whole validated ``opd`` section (teachers and stages).
        expected_temperature: the temperature the objective assumes teacher log-probs were scored at.
        out_dir: where ``diagnostics.png`` goes.
    """

    def __init__(self, config: HealthConfig, opd, expected_temperature: float, out_dir: str):
        self.config = config
        self.opd = opd
        self.expected_temperature = float(expected_temperature)
        self.out_dir = out_dir
        self.teacher_names = [t.name for t in opd.teachers.models]
        self._vocab_sizes: list[int] | None = None
        self.previous_adv_scale: float | None = None
        self.stop_message: str | None = None
        self.history: list[dict] = []  # per step: {"step", "discrepancy", "advantage", "iw_weight", "release_points"}

    @property
    def vocab_sizes(self) -> list[int]:
        if self._vocab_sizes is None:
            self._vocab_sizes = [_vocab_size(t.path) for t in self.opd.teachers.models]
        return self._vocab_sizes

    def sanitize(self, tensors: dict, error: Exception) -> tuple[dict, tuple[torch.Tensor, dict[str, int]]]:
        """After the estimator refused the step with ``error``: rows with a non-finite teacher/reference/student
        log-prob at a valid token get mask 0 and values 0 (their advantage is then 0).

        The estimator checks its inputs anyway, so a healthy step costs nothing here. ``error`` is raised again when
        ``enabled=false`` or when no input has a non-finite valid value (it was about something else).

        Args:
            tensors: the estimator's inputs (``response_mask``, ``student``, ``teacher``, ``ref``, ...), `(B, T)`.

        Returns:
            the tensors with those rows taken out (new tensors) and ``(bad rows (B,), non-finite counts by input)``.
        """
        names = ("teacher", "ref", "student")
        bad, counts = nonfinite_rows(tensors["response_mask"], **{n: tensors[n] for n in names})
        if not self.config.enabled or not bool(bad.any()):
            raise error
        mask, clean = zero_rows(bad, tensors["response_mask"], **{n: tensors[n] for n in names})
        logger.warning("opd_verl: %d rows with NaN/inf log-probs %s get advantage 0", int(bad.sum()), counts)
        return {**tensors, **clean, "response_mask": mask}, (bad, counts)

    def check(
        self,
        step: int,
        tensors: dict,
        advantages: torch.Tensor,
        owners: list[int],
        nonfinite,
        stage_metrics: dict[str, float],
        scored_temperatures: dict[str, float],
        metrics: dict,
    ) -> None:
        """Figures and alarms of one advantage step into ``metrics``; warnings logged; a ``stop`` remembered.

        ``nonfinite``: what :meth:`sanitize` returned, or None when the estimator took every row.
        """
        if not self.config.enabled:
            return
        t0 = time.perf_counter()
        opd = self.opd
        if nonfinite is None:
            nonfinite = (torch.zeros(advantages.shape[0], dtype=torch.bool, device=advantages.device), {})
        report = step_health(
            self.config,
            student=tensors["student"],
            teacher=tensors["teacher"],
            response_mask=tensors["response_mask"],
            advantages=advantages,
            owners=owners,
            teacher_names=self.teacher_names,
            vocab_sizes=self.vocab_sizes,
            nonfinite=nonfinite,
            scored_temperatures=scored_temperatures,
            expected_temperature=self.expected_temperature,
            stage_metrics=stage_metrics,
            weighting=opd.weighting.name,
            w_max=opd.weighting.w_max,
            release_enabled=opd.release.enabled,
            task_coef=opd.task_coef,
            previous_adv_scale=self.previous_adv_scale,
            adv_scale=stage_metrics.get("opd/stage/final/adv_std"),
            topk_mass=tensors.get("topk_mass"),
        )
        self.previous_adv_scale = report.adv_scale
        metrics.update(report.metrics)
        metrics["opd/health/time_s"] = time.perf_counter() - t0
        for alarm in report.alarms:
            logger.warning("step %d: %s", step, alarm.message())
            if alarm.action == "stop" and self.stop_message is None:
                self.stop_message = f"step {step}: {alarm.message()}"
        self.history.append({"step": int(step), **report.positions})

    # ------------------------------------------------------------------ state and plot
    def state(self) -> dict:
        """What a checkpoint keeps: the last advantage scale (the advantage-jump reference), once there is one."""
        return {} if self.previous_adv_scale is None else {"health_adv_scale": self.previous_adv_scale}

    def load_state(self, state: dict) -> None:
        self.previous_adv_scale = state.get("health_adv_scale")

    def maybe_plot(self, step: int, last: bool) -> str | None:
        """Write ``diagnostics.png`` every ``plot_every`` steps and at the last step; its path, or None."""
        every = self.config.plot_every
        if not self.config.enabled or not self.history or not (last or (every and step % every == 0)):
            return None
        from opd_verl.trainer.diagnostics_plot import plot_diagnostics

        os.makedirs(self.out_dir, exist_ok=True)
        try:
            return plot_diagnostics(self.history, os.path.join(self.out_dir, "diagnostics.png"))
        except Exception as exc:  # a plot must never end a training run
            logger.warning("opd_verl: diagnostics.png not written: %r", exc)
            return None
