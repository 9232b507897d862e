"""End-of-run summary and plot of a CPU demo run, read from veRL's file logger (`<run dir>/metrics.jsonl`)."""

from __future__ import annotations

import json
import math
import os

# Sampled-token estimate of KL(student || teacher) = E_student[log s - log t]: the plugin's estimators log
# `opd/discrepancy` = mean(log t - log s) (so the KL is its negative); veRL's built-in k1 loss logs it directly.
KL_SOURCES = (("opd/discrepancy", -1.0), ("actor/distillation/loss", 1.0))
REWARD_KEYS = ("critic/score/mean", "reward/score/mean", "critic/rewards/mean")


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


def summarize_run(cfg=None, run_dir: str | None = None, log=print) -> dict:
    """Print first-vs-last teacher-student reverse KL and task reward; save `summary.json` and `curves.png`."""
    if run_dir is None:
        run_dir = os.path.abspath(os.path.expanduser(str(cfg.trainer.default_local_dir)))
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        log(f"opd_verl: no metrics file at {path}; nothing to summarise")
        return {}
    rows = read_metrics(path)
    (kl_key, kl_sign), reward_key = kl_source(rows), pick_key(rows, REWARD_KEYS)
    summary: dict = {"run_dir": run_dir, "steps": len(rows), "kl_key": kl_key, "reward_key": reward_key}
    for name, key, sign in (("reverse_kl", kl_key, kl_sign), ("task_reward", reward_key, 1.0)):
        if key is None:
            continue
        steps, values = series(rows, key, sign)
        if values:
            summary[name] = {"first_step": steps[0], "first": values[0], "last_step": steps[-1], "last": values[-1]}
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    plot_path = plot_curves(rows, (kl_key, kl_sign), reward_key, os.path.join(run_dir, "curves.png"))
    lines = [f"opd_verl: CPU demo finished ({summary['steps']} steps), run dir {run_dir}"]
    for name, label in (("reverse_kl", "teacher-student reverse KL"), ("task_reward", "task reward")):
        if name in summary:
            s = summary[name]
            lines.append(
                f"  {label:28s} step {s['first_step']:>3d}: {s['first']:.4f}  ->  step {s['last_step']:>3d}: "
                f"{s['last']:.4f}"
            )
    if plot_path:
        lines.append(f"  plot: {plot_path}")
    log("\n".join(lines))
    return summary


def plot_curves(rows: list[dict], kl: tuple, reward_key: str | None, out_path: str) -> str | None:
    """Save a two-panel PNG of the reverse KL and task reward per step; returns its path (None without data).

    Args:
        kl: (metric key, sign) of the reverse-KL series, key None when absent.
    """
    kl_key, kl_sign = kl
    panels = [
        (k, sign, t)
        for k, sign, t in ((kl_key, kl_sign, "teacher-student reverse KL"), (reward_key, 1.0, "task reward"))
        if k
    ]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.5), squeeze=False)
    for ax, (key, sign, title) in zip(axes[0], panels):
        steps, values = series(rows, key, sign)
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_title(title)
        ax.set_xlabel("training step")
        ax.set_ylabel(("-" if sign < 0 else "") + key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
