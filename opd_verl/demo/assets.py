"""Demo assets, built once and cached: addition data (veRL parquet), a briefly trained tiny student, an SFT-trained
teacher and the teacher's greedy accuracy on the held-out problems (the ceiling the demo's summary shows).

One asset set per task variant (`opd_verl.demo.task`): `sums` (answers of ~3 tokens) and `worked` (one line per
digit with the carries, ~60 tokens, for the release recipes). The cache lives in `$OPD_VERL_CACHE` or
`<user cache dir>/opd_verl` (`$XDG_CACHE_HOME` or `~/.cache`), one sub-directory per asset version; a file lock
makes concurrent first runs build it once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import time

from opd_verl.demo import task
from opd_verl.demo.tiny import build_tiny_qwen2, build_tokenizer

STUDENT_SEED = 1
TEACHER_INIT_SEED = 2


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    """How one task variant's assets are built (models: width, layers; SFT: steps, label smoothing, batch size).

    `teacher_from_student`: the teacher starts from the student's trained weights (its own width and layers are
    then the student's) and continues the SFT without label smoothing: a sharper version of the same model.
    """

    version: str
    min_digits: int
    max_digits: int
    student_hidden: int
    student_layers: int
    student_sft_steps: int
    student_label_smoothing: float
    teacher_hidden: int
    teacher_layers: int
    teacher_sft_steps: int
    train_problems: int = 4096
    val_problems: int = 128
    teacher_from_student: bool = False
    sft_batch_size: int = 64


# sums: a shorter SFT with label smoothing leaves the student uncertain (~90% greedy accuracy, but only ~30% of its
# temperature-1 samples are right, and its reverse KL to the teacher is ~3 nats a token). The teacher is the same
# model with the SFT continued without label smoothing: confident, and at least as accurate. (A teacher trained
# from another random init for 1000 steps reached only ~64% greedy accuracy: below the student, no ceiling.)
# On-policy distillation closes the gap in samples within the demo's few dozen steps. A student that does not know
# the sums at all (a few % accuracy) needs far more samples than a 2-core CPU run of a few minutes can draw.
# worked: 3-digit operands, so every response has 3 digit lines and the answer line (4 sentences, the least the
# release rule splits with min_segment 2). Its sequences are ~4x longer: smaller SFT batches.
VARIANT_SPECS = {
    "sums": VariantSpec("demo_v4", 1, 2, 64, 2, 700, 0.3, 64, 2, 400, teacher_from_student=True),
    "worked": VariantSpec(
        "demo_worked_v1", 3, 3, 64, 2, 250, 0.1, 64, 2, 300, teacher_from_student=True, sft_batch_size=32
    ),
}
TEACHER_EVAL_FILE = "teacher_eval.json"


@dataclasses.dataclass(frozen=True)
class DemoAssets:
    root: str
    train_file: str
    val_file: str
    student_path: str
    teacher_path: str
    variant: str = "sums"

    @property
    def teacher_eval_file(self) -> str:
        return os.path.join(self.root, TEACHER_EVAL_FILE)

    def teacher_accuracy(self) -> float | None:
        """The teacher's greedy accuracy on the held-out file (cached when the assets were built), else None."""
        try:
            with open(self.teacher_eval_file) as f:
                return float(json.load(f)["greedy_accuracy"])
        except (OSError, KeyError, ValueError):
            return None


def cache_root() -> str:
    explicit = os.environ.get("OPD_VERL_CACHE")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "opd_verl")


def _paths(root: str, variant: str = "sums") -> DemoAssets:
    return DemoAssets(
        variant=variant,
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


def variant_spec(variant: str) -> VariantSpec:
    if variant not in VARIANT_SPECS:
        raise ValueError(f"demo task variant must be one of {sorted(VARIANT_SPECS)}, got {variant!r}")
    return VARIANT_SPECS[variant]


def ensure_demo_assets(
    root: str | None = None, teacher_sft: bool = True, log=print, variant: str = "sums"
) -> DemoAssets:
    """Build the demo assets of `variant` if missing (sums: data ~1 s, student SFT ~20 s, teacher SFT ~30 s when
    idle; worked: a few minutes); return their paths."""
    spec = variant_spec(variant)
    root = root or os.path.join(cache_root(), spec.version)
    os.makedirs(root, exist_ok=True)
    assets = _paths(root, variant)
    with open(os.path.join(root, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data_dir = os.path.dirname(assets.train_file)
        if not _done(data_dir):
            os.makedirs(data_dir, exist_ok=True)
            n_train = spec.train_problems
            problems = task.make_problems(n_train + spec.val_problems, spec.min_digits, spec.max_digits, seed=0)
            task.write_parquet(assets.train_file, task.make_rows(problems[:n_train], "train", variant))
            task.write_parquet(assets.val_file, task.make_rows(problems[n_train:], "test", variant))
            _mark_done(data_dir)
        tokenizer = build_tokenizer()
        for name, path, hidden, layers, seed, steps, smoothing in (
            ("student", assets.student_path, spec.student_hidden, spec.student_layers, STUDENT_SEED,
             spec.student_sft_steps, spec.student_label_smoothing),
            ("teacher", assets.teacher_path, spec.teacher_hidden, spec.teacher_layers, TEACHER_INIT_SEED,
             spec.teacher_sft_steps, 0.0),
        ):  # fmt: skip
            if _done(path):
                continue
            if name == "teacher" and spec.teacher_from_student and teacher_sft:
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(assets.student_path, path, ignore=shutil.ignore_patterns(".complete"))
            else:
                build_tiny_qwen2(path, hidden, layers, seed=seed, tokenizer=tokenizer)
            if teacher_sft:
                from opd_verl.demo.teacher_sft import train_teacher

                log(f"opd_verl: training the demo {name} on addition ({variant}; once, cached in {path})")
                train_teacher(
                    path,
                    assets.train_file,
                    steps=steps,
                    batch_size=spec.sft_batch_size,
                    label_smoothing=smoothing,
                    log=log,
                )
            _mark_done(path)
        if teacher_sft and assets.teacher_accuracy() is None:
            from opd_verl.demo.teacher_sft import evaluate_teacher

            accuracy = evaluate_teacher(assets.teacher_path, assets.val_file)
            with open(assets.teacher_eval_file, "w") as f:
                json.dump({"greedy_accuracy": accuracy, "val_file": assets.val_file}, f)
            log(f"opd_verl: demo teacher's greedy accuracy on the held-out problems: {accuracy:.3f} (cached)")
    return assets
