"""End-of-run summary and plot of a CPU demo run, read from veRL's file logger (`<run dir>/metrics.jsonl`).

Training metrics are compared as the mean of the first few steps against the mean of the last few (a single step
of 64 samples is noise). The held-out accuracy is veRL's validation score (`val-core/<data source>/acc/mean@1`,
or `.../reward/...` when the reward manager reports no accuracy), greedy, from `trainer.val_before_train` at
step 0 and every `trainer.test_freq` steps; it is shown beside the teacher's greedy accuracy on the same problems
(`<run dir>/teacher_eval.json`, written by the demo preset), the ceiling distillation aims at.
"""

from __future__ import annotations

import json
import math
import os
import re

# Sampled-token estimate of KL(student || teacher) = E_student[log s - log t]: the plugin's estimators log
# `opd/discrepancy` = mean(log t - log s) (so the KL is its negative); veRL's built-in k1 loss logs it directly.
KL_SOURCES = (("opd/discrepancy", -1.0), ("actor/distillation/loss", 1.0))
REWARD_KEYS = ("critic/score/mean", "reward/score/mean", "critic/rewards/mean")
# veRL's validation score: `val-core/<data source>/acc/mean@<n>` (or `.../reward/...`; n = val_kwargs.n, greedy in
# the demo).
HELD_OUT_KEY = re.compile(r"^val-core/.+/(acc|reward)/mean@\d+$")
# Training metrics are summarised as the mean of this many first and last steps (fewer on short runs).
MEAN_WINDOW = 5
TEACHER_EVAL_FILE = "teacher_eval.json"


def read_metrics(path: str) -> list[dict]:
    """Rows of veRL's file logger: [{"step": int, "data": {name: value}}], last entry per step kept."""
    by_step: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                row = json.loads(line)
                by_step.setdefault(int(row["step"]), {}).update(row["data"])
    return [{"step": s, "data": by_step[s]} for s in sorted(by_step)]


def pick_key(rows: list[dict], candidates: tuple[str, ...]) -> str | None:
    for key in candidates:
        if any(key in r["data"] for r in rows):
            return key
    return None


def held_out_key(rows: list[dict]) -> str | None:
    """The first validation-reward key in the rows (sorted by name), None when the run never validated."""
    keys = sorted({k for r in rows for k in r["data"] if HELD_OUT_KEY.match(k)})
    return keys[0] if keys else None


def series(rows: list[dict], key: str, sign: float = 1.0) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for r in rows:
        v = r["data"].get(key)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            steps.append(r["step"])
            values.append(sign * float(v))
    return steps, values


def kl_source(rows: list[dict]) -> tuple[str | None, float]:
    for key, sign in KL_SOURCES:
        if any(key in r["data"] for r in rows):
            return key, sign
    return None, 1.0


def first_last_means(steps: list[int], values: list[float], window: int = MEAN_WINDOW) -> dict:
    """Means of the first and last `k` values, `k = min(window, len // 2)` (at least 1), and the steps they cover.

    Args:
        steps, values: one series, in step order (equal lengths, at least one value).
    """
    k = max(1, min(window, len(values) // 2))
    return {
        "window": k,
        "first_steps": [steps[0], steps[k - 1]],
        "first_mean": sum(values[:k]) / k,
        "last_steps": [steps[-k], steps[-1]],
        "last_mean": sum(values[-k:]) / k,
    }


def read_teacher_accuracy(run_dir: str) -> float | None:
    try:
        with open(os.path.join(run_dir, TEACHER_EVAL_FILE)) as f:
            return float(json.load(f)["greedy_accuracy"])
    except (OSError, KeyError, ValueError):
        return None


def summarize_run(cfg=None, run_dir: str | None = None, log=print) -> dict:
    """Print the first-vs-last means of the teacher-student reverse KL and the task reward, and the held-out greedy
    accuracy before/after with the teacher's as ceiling; save `summary.json` and `curves.png` in the run dir."""
    if run_dir is None:
        run_dir = os.path.abspath(os.path.expanduser(str(cfg.trainer.default_local_dir)))
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        log(f"opd_verl: no metrics file at {path}; nothing to summarise")
        return {}
    rows = read_metrics(path)
    (kl_key, kl_sign), reward_key, val_key = kl_source(rows), pick_key(rows, REWARD_KEYS), held_out_key(rows)
    train_rows = [r for r in rows if r["step"] > 0]  # step 0 holds only the validation before training
    summary: dict = {
        "run_dir": run_dir,
        "steps": len(train_rows),
        "kl_key": kl_key,
        "reward_key": reward_key,
        "held_out_key": val_key,
    }
    for name, key, sign in (("reverse_kl", kl_key, kl_sign), ("task_reward", reward_key, 1.0)):
        if key is None:
            continue
        steps, values = series(train_rows, key, sign)
        if values:
            summary[name] = first_last_means(steps, values)
    teacher = read_teacher_accuracy(run_dir)
    if val_key is not None:
        steps, values = series(rows, val_key)
        if values:
            summary["held_out_accuracy"] = {
                "before_step": steps[0],
                "before": values[0],
                "after_step": steps[-1],
                "after": values[-1],
                "teacher": teacher,
            }
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_path = plot_curves(rows, (kl_key, kl_sign), reward_key, os.path.join(run_dir, "curves.png"), val_key, teacher)
    log("\n".join(summary_lines(summary, plot_path)))
    return summary


def summary_lines(summary: dict, plot_path: str | None = None) -> list[str]:
    lines = [f"opd_verl: CPU demo finished ({summary['steps']} steps), run dir {summary['run_dir']}"]
    for name, label in (("reverse_kl", "teacher-student reverse KL"), ("task_reward", "task reward (samples)")):
        if name in summary:
            s = summary[name]
            first, last = s["first_steps"], s["last_steps"]
            lines.append(
                f"  {label:28s} mean of steps {first[0]}-{first[1]}: {s['first_mean']:.4f}  ->  "
                f"steps {last[0]}-{last[1]}: {s['last_mean']:.4f}"
            )
    if "held_out_accuracy" in summary:
        h = summary["held_out_accuracy"]
        teacher = "n/a" if h["teacher"] is None else f"{h['teacher']:.4f}"
        lines.append(
            f"  {'held-out greedy accuracy':28s} step {h['before_step']}: {h['before']:.4f}  ->  "
            f"step {h['after_step']}: {h['after']:.4f}   (teacher, the ceiling: {teacher})"
        )
    if plot_path:
        lines.append(f"  plot: {plot_path}")
    return lines


def plot_curves(
    rows: list[dict],
    kl: tuple,
    reward_key: str | None,
    out_path: str,
    val_key: str | None = None,
    teacher: float | None = None,
) -> str | None:
    """Save a PNG with one panel per series (reverse KL, task reward, held-out accuracy); returns its path (None
    without data). The held-out panel draws the student's validation accuracy per step and the teacher's as a
    dashed horizontal line.

    Args:
        kl: (metric key, sign) of the reverse-KL series, key None when absent.
    """
    candidates = (
        (kl[0], kl[1], "teacher-student reverse KL"),
        (reward_key, 1.0, "task reward (training samples)"),
        (val_key, 1.0, "held-out greedy accuracy"),
    )
    panels = [(k, sign, t) for k, sign, t in candidates if k]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, sign, title) in zip(axes[0], panels):
        steps, values = series(rows, key, sign)
        ax.plot(steps, values, marker="o", markersize=3, label="student")
        if key == val_key:
            if teacher is not None:
                ax.axhline(teacher, color="tab:green", linestyle="--", label=f"teacher ({teacher:.2f})")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(loc="lower right")
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(("-" if sign < 0 else "") + key.split("/mean@")[0].replace("val-core/", ""))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
