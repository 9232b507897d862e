"""The CPU demo's console: one line per training step, validation results and the summary, nothing else.

veRL's workers print their whole configuration, per-process start-up notices and a several-hundred-key metrics
line per step; on a first run that hides what the run does. The demo therefore keeps Ray's worker output out of
the console (`ray_kwargs.ray_init.log_to_driver=false`; it stays in Ray's session logs, and
`ray_kwargs.ray_init.log_to_driver=true` on the command line streams it again) and the driver follows veRL's file
logger (`<run dir>/metrics.jsonl`) instead, printing a progress bar and a short line per step with the keys a
reader needs. Errors still reach the console: a failing worker raises in the driver with its traceback.

The thread count TransferQueue uses for its tensor work (`TQ_NUM_THREADS`, default 8) is set to the machine's
physical cores, so TransferQueue has no reason to warn that it exceeds them.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import warnings

from opd_verl.demo.summary import HELD_OUT_KEY

# (metric key, label, format) printed per step when present; the first KL key present is used.
STEP_KEYS = (
    ("opd/discrepancy", "reverse KL", "{:.3f}", -1.0),
    ("actor/distillation/loss", "reverse KL", "{:.3f}", 1.0),
    ("critic/score/mean", "reward", "{:.2f}", 1.0),
    ("opd/release/accept_rate", "released", "{:.2f}", 1.0),
    ("opd/release/kept_fraction", "kept", "{:.2f}", 1.0),
    ("opd/release/point_token", "cut at token", "{:.0f}", 1.0),
    ("perf/time_per_step", "s/step", "{:.1f}", 1.0),
)
POLL_SECONDS = 0.5
# `opd/health/alarm/NAME`: 1 when the alarm fired at the step
ALARM_PREFIX = "opd/health/alarm/"


def physical_cores() -> int:
    import psutil

    return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)


def quiet_environment() -> dict[str, str]:
    """Environment for the driver and Ray's workers: TransferQueue's thread count sized to the physical cores."""
    return {"TQ_NUM_THREADS": str(physical_cores())}


def silence_known_driver_warnings() -> None:
    """veRL warns at import, in every process, about each optional engine not installed (megatron, torchtitan, ...);
    none is used by the demo."""
    warnings.filterwarnings("ignore", message=r".* engine is not available", category=UserWarning)


def step_line(step: int, total: int | None, data: dict) -> str:
    """`step 3/50  reverse KL 2.757  reward 0.12  ...` from one step's metrics (keys absent are left out), with the
    names of the health alarms that fired."""
    parts = [f"step {step}/{total}" if total else f"step {step}"]
    seen = set()
    for key, label, fmt, sign in STEP_KEYS:
        value = data.get(key)
        if label in seen or not isinstance(value, (int, float)):
            continue
        seen.add(label)
        parts.append(f"{label} {fmt.format(sign * float(value))}")
    held_out = sorted(k for k in data if HELD_OUT_KEY.match(k))
    for key in held_out:
        parts.append(f"held-out accuracy {float(data[key]):.3f}")
    # alarms with action `warn` are logged by the trainer, in Ray's worker log: the step line names them
    fired = sorted(k[len(ALARM_PREFIX) :] for k, v in data.items() if k.startswith(ALARM_PREFIX) and v)
    if fired:
        parts.append(f"HEALTH ALARM {', '.join(fired)} (docs/health.md)")
    return "  ".join(parts)


class StepPrinter:
    """Follow `metrics_file` in a thread and print a progress bar and one `step_line` per logged step.

    Use as a context manager around the training call. Lines already in the file (the history a resumed run keeps)
    are not printed again; once that history is no longer the file's beginning (veRL's file logger starts a fresh
    run's file empty) the file is read from its start.
    """

    def __init__(self, metrics_file: str, total_steps: int | None, log=None):
        self.metrics_file = metrics_file
        self.total_steps = total_steps
        self._log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._offset = 0
        self._history = b""
        self._partial = b""
        self._bar = None

    def __enter__(self) -> StepPrinter:
        if os.path.exists(self.metrics_file):
            with open(self.metrics_file, "rb") as f:
                self._history = f.read()
            self._offset = len(self._history)
        if self._log is None:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total_steps, desc="training", unit="step", dynamic_ncols=True)
        self._thread = threading.Thread(target=self._follow, name="opd-demo-steps", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.poll()
        if self._bar is not None:
            self._bar.close()

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
            sys.stdout.flush()  # a pipe (`| tee`) shows each step when it is logged
        else:
            self._log(line)

    def _follow(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.poll()

    def poll(self) -> None:
        """Print the complete lines appended to the metrics file since the last call."""
        try:
            with open(self.metrics_file, "rb") as f:
                content = f.read()
        except FileNotFoundError:
            return
        if self._history and not content.startswith(self._history):  # rewritten since: read it from its start
            self._history, self._offset, self._partial = b"", 0, b""
        chunk = content[self._offset :]
        self._offset += len(chunk)
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        for raw in lines:
            if not raw.strip():
                continue
            row = json.loads(raw)
            step, data = int(row["step"]), row["data"]
            line = step_line(step, self.total_steps, data)
            if step == 0:  # veRL's validation before training (val_before_train) logs at step 0
                line = "before training: " + line.split("  ", 1)[-1]
            self._write(line)
            if step == 0:
                continue
            if self._bar is not None:
                self._bar.update(step - self._bar.n)
