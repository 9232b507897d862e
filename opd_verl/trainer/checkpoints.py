"""Checkpoints that survive a kill while saving, and a metrics history that survives a resume.

veRL writes a step's files (``global_step_N/actor``, ``data.pt``) and then the pointer
``latest_checkpointed_iteration.txt``; a job killed while saving (or a file cut short by a full disk) can leave
the pointer at a step whose files are incomplete, and the relaunch then fails although the previous step is
intact. The plugin trainer adds:

- a manifest ``global_step_N/opd_complete.json`` written last, after veRL's files and the plugin state
  (``opd_state.json``): the size of every file of the step. The pointer is then rewritten (atomically) to N. A
  step counts as complete only when its manifest matches the files on disk.
- on resume (``trainer.resume_mode=auto``) :func:`choose_resume_folder`: from the pointer's step downwards, the
  newest complete step; every step skipped is returned with the reason, for a warning.
- :func:`load_state`: the plugin state, or an error naming the file and what to do.
- `ResumedFileLogger`: veRL's file logger (``trainer.logger`` ``file``) that, on a resumed run, keeps the rows of
  the steps up to the checkpoint and appends, where veRL's truncates the file.
"""

from __future__ import annotations

import json
import os
import re

from verl.utils.tracking import FileLogger

__all__ = [
    "MANIFEST",
    "POINTER",
    "STATE_FILE",
    "CheckpointError",
    "ResumedFileLogger",
    "choose_resume_folder",
    "incomplete_reason",
    "load_state",
    "read_pointer",
    "write_json",
    "write_manifest",
    "write_pointer",
]

MANIFEST = "opd_complete.json"
STATE_FILE = "opd_state.json"
POINTER = "latest_checkpointed_iteration.txt"
STEP_DIR = re.compile(r"^global_step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed from (names the file and what to do)."""


def write_json(path: str, data) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.replace(path + ".tmp", path)


def _files(folder: str) -> dict[str, int]:
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out[rel] = os.path.getsize(path)
    return out


def write_manifest(folder: str) -> None:
    """Record the size of every file of a step folder (call once everything of the step is written)."""
    write_json(os.path.join(folder, MANIFEST), {"files": _files(folder)})


def incomplete_reason(folder: str) -> str | None:
    """Why a step folder is not a complete checkpoint, or None when its manifest matches its files."""
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return f"no {MANIFEST} (the save did not finish)"
    try:
        with open(path) as f:
            expected = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for rel, size in expected.items():
        full = os.path.join(folder, rel)
        if not os.path.exists(full):
            return f"{rel} is missing"
        if os.path.getsize(full) != size:
            return f"{rel} has {os.path.getsize(full)} bytes, {size} were written"
    return None


def read_pointer(root: str) -> int | None:
    """The step in ``root/latest_checkpointed_iteration.txt``; None when absent or not a number."""
    try:
        with open(os.path.join(root, POINTER)) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def write_pointer(root: str, step: int) -> None:
    with open(os.path.join(root, POINTER) + ".tmp", "w") as f:
        f.write(str(int(step)))
    os.replace(os.path.join(root, POINTER) + ".tmp", os.path.join(root, POINTER))


def choose_resume_folder(root: str) -> tuple[str | None, list[tuple[str, str]]]:
    """The newest complete step at or below the pointer's step, and the steps skipped on the way (folder, reason).

    Returns (None, []) when there is nothing to resume (no pointer and no step folder).

    Raises:
        CheckpointError: step folders exist but none is complete.
    """
    if not os.path.isdir(root):
        return None, []
    pointer = read_pointer(root)
    steps = sorted((int(m.group(1)) for n in os.listdir(root) if (m := STEP_DIR.match(n))), reverse=True)
    if pointer is not None:
        steps = [s for s in steps if s <= pointer]
        if pointer not in steps:
            steps.insert(0, pointer)
    skipped = []
    for step in steps:
        folder = os.path.join(root, f"global_step_{step}")
        why = "the folder is missing" if not os.path.isdir(folder) else incomplete_reason(folder)
        if why is None:
            return folder, skipped
        skipped.append((folder, why))
    if skipped:
        listed = "; ".join(f"{f}: {why}" for f, why in skipped)
        raise CheckpointError(
            f"no complete checkpoint under {root} ({listed}). Resume one by hand with trainer.resume_mode=resume_path "
            "trainer.resume_from_path=<global_step_N>, or start afresh with trainer.resume_mode=disable"
        )
    return None, []


def load_state(path: str) -> dict:
    """The plugin state saved beside a checkpoint.

    Raises:
        CheckpointError: naming the file, when it is not a JSON object.
    """
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state, dict):
            raise ValueError(f"expected a JSON object, got {type(state).__name__}")
    except ValueError as err:
        step_folder = os.path.dirname(path)
        raise CheckpointError(
            f"the plugin state file {path} is corrupt ({err}). Restore it from a copy, or remove the folder "
            f"{step_folder} so that the run resumes from the previous complete checkpoint, or set "
            "trainer.resume_mode=disable to start afresh"
        ) from err
    return state


class ResumedFileLogger(FileLogger):
    """veRL's file logger that keeps a resumed run's history: the rows up to ``resume_step`` stay, new rows append.

    ``resume_step`` is set by the trainer after it resumed; None (a fresh run) starts a new file as veRL does.
    """

    resume_step: int | None = None

    def __init__(self, project_name: str, experiment_name: str):
        if not self.resume_step:
            super().__init__(project_name, experiment_name)
            return
        self.project_name, self.experiment_name = project_name, experiment_name
        path = os.getenv("VERL_FILE_LOGGER_PATH")
        if path is None:
            directory = os.path.join(os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", ".")), project_name)
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, f"{experiment_name}.jsonl")
        kept = []
        if os.path.exists(path):
            with open(path) as f:
                for line in f:
                    try:
                        if int(json.loads(line)["step"]) <= self.resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by the kill
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        print(f"Appending to file logger at {os.path.abspath(path)} ({len(kept)} rows of steps <= {self.resume_step})")
        self.filepath = path
        self.fp = open(path, "ab", buffering=0)
