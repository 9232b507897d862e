"""Demo assets, built once and cached: addition data (veRL parquet), a fresh tiny student, an SFT-trained teacher.

The cache lives in `$OPD_VERL_CACHE` or `<user cache dir>/opd_verl` (`$XDG_CACHE_HOME` or `~/.cache`), one
sub-directory per asset version; a file lock makes concurrent first runs build it once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import time

from opd_verl.demo import task
from opd_verl.demo.tiny import build_tiny_qwen2, build_tokenizer

ASSET_VERSION = "demo_v3"
STUDENT_SEED = 1
TEACHER_INIT_SEED = 2
TEACHER_SFT_STEPS = 1000
# The student is a different, weaker model: a shorter SFT with label smoothing leaves it uncertain (~90% greedy
# accuracy, but only ~30% of its temperature-1 samples are right, and its reverse KL to the teacher is ~3 nats a
# token), while the teacher (plain SFT, ~97% greedy) is confident. On-policy distillation closes that gap within the
# demo's few dozen steps. A student that does not know the sums at all (a few % accuracy) needs far more samples
# than a 2-core CPU run of a few minutes can draw before its reverse KL falls.
STUDENT_SFT_STEPS = 700
STUDENT_LABEL_SMOOTHING = 0.3
HIDDEN_SIZE = 64
NUM_LAYERS = 2
TRAIN_PROBLEMS = 4096
VAL_PROBLEMS = 128
MIN_DIGITS, MAX_DIGITS = 1, 2


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    root: str
    train_file: str
    val_file: str
    student_path: str
    teacher_path: str


def cache_root() -> str:
    explicit = os.environ.get("OPD_VERL_CACHE")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "opd_verl")


def _paths(root: str) -> DemoAssets:
    return DemoAssets(
        root=root,
        train_file=os.path.join(root, "data", "train.parquet"),
        val_file=os.path.join(root, "data", "val.parquet"),
        student_path=os.path.join(root, "student"),
        teacher_path=os.path.join(root, "teacher"),
    )


def _done(path: str) -> bool:
    return os.path.exists(os.path.join(path, ".complete"))


def _mark_done(path: str) -> None:
    with open(os.path.join(path, ".complete"), "w") as f:
        f.write(time.strftime("%Y-%m-%d %H:%M:%S"))


def ensure_demo_assets(root: str | None = None, teacher_sft: bool = True, log=print) -> DemoAssets:
    """Build the demo assets if missing (data ~1 s, student SFT ~20 s, teacher SFT ~30 s when idle); return paths."""
    root = root or os.path.join(cache_root(), ASSET_VERSION)
    os.makedirs(root, exist_ok=True)
    assets = _paths(root)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data_dir = os.path.dirname(assets.train_file)
        if not _done(data_dir):
            os.makedirs(data_dir, exist_ok=True)
            problems = task.make_problems(TRAIN_PROBLEMS + VAL_PROBLEMS, MIN_DIGITS, MAX_DIGITS, seed=0)
            task.write_parquet(assets.train_file, task.make_rows(problems[:TRAIN_PROBLEMS], "train"))
            task.write_parquet(assets.val_file, task.make_rows(problems[TRAIN_PROBLEMS:], "test"))
            _mark_done(data_dir)
        tokenizer = build_tokenizer()
        if not _done(assets.student_path):
            build_tiny_qwen2(assets.student_path, HIDDEN_SIZE, NUM_LAYERS, seed=STUDENT_SEED, tokenizer=tokenizer)
            if teacher_sft:
                from opd_verl.demo.teacher_sft import train_teacher

                log(f"opd_verl: briefly training the demo student (once; cached in {assets.student_path})")
                train_teacher(
                    assets.student_path,
                    assets.train_file,
                    steps=STUDENT_SFT_STEPS,
                    label_smoothing=STUDENT_LABEL_SMOOTHING,
                    log=log,
                )
            _mark_done(assets.student_path)
        if not _done(assets.teacher_path):
            build_tiny_qwen2(assets.teacher_path, HIDDEN_SIZE, NUM_LAYERS, seed=TEACHER_INIT_SEED, tokenizer=tokenizer)
            if teacher_sft:
                from opd_verl.demo.teacher_sft import train_teacher

                log(f"opd_verl: training the demo teacher on addition (once; cached in {assets.teacher_path})")
                train_teacher(assets.teacher_path, assets.train_file, steps=TEACHER_SFT_STEPS, log=log)
            _mark_done(assets.teacher_path)
    return assets
