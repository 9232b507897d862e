"""``diagnostics.png``: where in the responses the distillation signal lives, over training (matplotlib).

Drawn from the per-step position profiles that `opd_verl.trainer.health_monitor.HealthMonitor` keeps (each a list
of 10 means over position deciles of each response's tokens, plus the per-row release points).
"""

from __future__ import annotations

__all__ = ["plot_diagnostics"]

DECILE_LABELS = [f"{10 * k}-{10 * (k + 1)}%" for k in range(10)]


def _profile_lines(ax, history: list[dict], key: str, ylabel: str, title: str, off: str) -> None:
    rows = [h for h in history if h.get(key)]
    if not rows:
        ax.text(0.5, 0.5, off, ha="center", va="center", transform=ax.transAxes, fontsize=10, color="gray")
        ax.set_title(title)
        ax.set_axis_off()
        return
    picks = sorted({0, len(rows) // 2, len(rows) - 1})
    for shade, i in zip((0.35, 0.65, 1.0), picks, strict=False):
        ax.plot(range(10), rows[i][key], marker="o", markersize=3, alpha=shade, label=f"step {rows[i]['step']}")
    ax.set_xticks(range(10), DECILE_LABELS, rotation=45, fontsize=7)
    ax.set_xlabel("position in the response (decile of its tokens)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_diagnostics(history: list[dict], out_path: str) -> str | None:
    """Save a four-panel PNG; returns its path (None without any step).

    Args:
        history: one dict per step: ``step``, ``discrepancy`` and ``advantage`` (10 floats each), optionally
            ``iw_weight`` (10 floats) and ``release_points`` (per-row shares in [0, 1]).
    """
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    fig.suptitle(
        "Where the distillation signal is, by position in the response (deciles of each response's tokens)",
        fontsize=12,
    )

    ax = axes[0][0]
    grid = np.array([h["discrepancy"] for h in history], dtype=float).T  # (10, steps)
    bound = float(np.nanmax(np.abs(grid))) or 1.0
    extent = (steps[0] - 0.5, steps[-1] + 0.5, -0.5, 9.5)
    im = ax.imshow(grid, aspect="auto", origin="lower", cmap="RdBu", vmin=-bound, vmax=bound, extent=extent)
    ax.set_yticks(range(10), DECILE_LABELS, fontsize=7)
    ax.set_xlabel("training step")
    ax.set_ylabel("position in the response")
    ax.set_title("teacher - student log-prob of the sampled token\n(blue: teacher likes it more; red: less)")
    fig.colorbar(im, ax=ax, label="mean log-prob difference (nats)")

    _profile_lines(
        axes[0][1],
        history,
        "advantage",
        "mean advantage",
        "final advantage by position\n(what the policy-gradient update pushes)",
        "no advantages",
    )
    _profile_lines(
        axes[1][1],
        history,
        "iw_weight",
        "mean IW weight",
        "IW-OPD weight by position\n(w_max at the start, falling as discrepancy accumulates)",
        "IW weighting is off (opd.weighting.name != iw)",
    )

    ax = axes[1][0]
    with_points = [h for h in history if h.get("release_points")]
    if with_points:
        recent = with_points[-min(10, len(with_points)) :]
        points = np.concatenate([np.asarray(h["release_points"], dtype=float) for h in recent])
        ax.hist(points, bins=np.linspace(0.0, 1.0, 21), color="tab:purple", alpha=0.8)
        ax.set_xlabel("release point: share of the response's tokens kept before it (1 = nothing released)")
        ax.set_ylabel("responses")
        first, last = recent[0]["step"], recent[-1]["step"]
        title = f"where the release rule stops the teacher's signal\n(steps {first}-{last}, {points.size} responses)"
        ax.set_title(title)
        ax.grid(alpha=0.3)
    else:
        ax.text(
            0.5,
            0.5,
            "release rule is off (opd.release.enabled=false)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            fontsize=10,
            color="gray",
        )
        ax.set_title("release points")
        ax.set_axis_off()

    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
