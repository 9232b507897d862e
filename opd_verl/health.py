"""Teacher-health alarms and per-position diagnostics of the OPD advantage step (pure torch).

The silent failures of on-policy distillation show in tensors the advantage step already holds: a teacher whose
weights were lost scores every token near ``-ln V``; NaN log-probs on a few rows; a release rule that releases
almost everything; IW weights stuck at ``w_max``; an advantage whose scale jumps by orders of magnitude; a teacher
scored at another temperature than the objective assumes. The functions here turn those tensors into figures and
fired alarms; the plugin trainer calls :func:`step_health` once per step and acts on the result (``warn``: log;
``stop``: checkpoint at the step boundary, then raise :class:`HealthAlarmError`).

The ``opd.health`` config section maps onto :class:`HealthConfig` (:func:`parse_health`), one entry per alarm in
:data:`ALARM_LIMITS` with an ``action`` (``warn`` | ``stop``) and its thresholds.

All tensors are `(B, T)` with a `(B, T)` ``response_mask`` (1 on response tokens) unless stated otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from opd_verl.objectives.weighting import iw_opd_weights

__all__ = [
    "ACTIONS",
    "ALARM_LIMITS",
    "Alarm",
    "AlarmConfig",
    "HealthAlarmError",
    "HealthConfig",
    "HealthReport",
    "advantage_jump",
    "collapse_counts",
    "decile_bins",
    "decile_means",
    "nonfinite_rows",
    "parse_health",
    "release_points",
    "sample_grid",
    "step_health",
    "temperature_mismatch",
    "topk_overlap_mass",
    "zero_rows",
]

ACTIONS = ("warn", "stop")

# alarm -> threshold -> (default, low, high, low_open, description of the allowed range)
ALARM_LIMITS: dict[str, dict[str, tuple[float, float, float, bool, str]]] = {
    "collapse": {
        "margin": (0.05, 0.0, 1.0, True, "a fraction of ln V in (0, 1]"),
        "fraction": (0.5, 0.0, 1.0, True, "a share of tokens in (0, 1]"),
    },
    "nonfinite": {"max_rows": (0, 0, math.inf, False, "an integer >= 0")},
    "temperature": {"tolerance": (1e-3, 0.0, math.inf, False, "a number >= 0")},
    "release": {
        "accept_rate": (0.99, 0.0, 1.0, False, "a share of rows in [0, 1]"),
        "kept_fraction": (0.05, 0.0, 1.0, False, "a fraction in [0, 1]"),
    },
    "iw": {"saturation": (0.99, 0.0, 1.0, True, "a fraction in (0, 1]")},
    "advantage_jump": {"factor": (100.0, 1.0, math.inf, True, "a number > 1")},
}


class HealthAlarmError(RuntimeError):
    """A health alarm with ``action: stop`` fired; the run stopped at the step boundary after a checkpoint."""


@dataclass(frozen=True)
class AlarmConfig:
    """One alarm of ``opd.health``: ``action`` (warn | stop) and its thresholds by name (see :data:`ALARM_LIMITS`)."""

    action: str = "warn"
    limits: dict[str, float] = field(default_factory=dict)

    def __getitem__(self, key: str) -> float:
        return self.limits[key]


def _default_alarms() -> dict[str, AlarmConfig]:
    return {a: AlarmConfig("warn", {k: v[0] for k, v in lim.items()}) for a, lim in ALARM_LIMITS.items()}


@dataclass(frozen=True)
class HealthConfig:
    """``opd.health``: alarms on or off, the diagnostics plot period, and one :class:`AlarmConfig` per alarm."""

    parses_own_keys: ClassVar[bool] = True  # parse_health names unknown keys (the alarms are keys of the section)

    enabled: bool = True
    plot_every: int = 10
    sample_tokens: int = 16384
    alarms: dict[str, AlarmConfig] = field(default_factory=_default_alarms)

    def __getitem__(self, alarm: str) -> AlarmConfig:
        return self.alarms[alarm]


def parse_health(raw: dict | None, error: type[Exception] = ValueError) -> HealthConfig:
    """Validate the plain-dict ``opd.health`` section (None: defaults); ``error`` is raised naming the field, its value
    and what is allowed."""

    def fail(name: str, value: Any, allowed: str) -> None:
        raise error(f"opd.health.{name}={value!r} is not allowed: {allowed}.")

    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        fail("", raw, "it must be a mapping")
    unknown = sorted(set(raw) - {"enabled", "plot_every", "sample_tokens", *ALARM_LIMITS})
    if unknown:
        keys = ", ".join(("enabled", "plot_every", "sample_tokens", *ALARM_LIMITS))
        fail(unknown[0], raw[unknown[0]], f"allowed keys are {keys}")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        fail("enabled", enabled, "it must be true or false")
    plot_every = raw.get("plot_every", 10)
    if isinstance(plot_every, bool) or not isinstance(plot_every, int) or plot_every < 0:
        fail("plot_every", plot_every, "it must be an integer >= 0 (0: plot at the end of the run only)")
    sample_tokens = raw.get("sample_tokens", 16384)
    if isinstance(sample_tokens, bool) or not isinstance(sample_tokens, int) or sample_tokens < 1:
        fail("sample_tokens", sample_tokens, "it must be an integer >= 1")
    alarms = {}
    for name, limits in ALARM_LIMITS.items():
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            fail(name, section, f"it must be a mapping with action and {', '.join(limits)}")
        extra = sorted(set(section) - {"action", *limits})
        if extra:
            fail(f"{name}.{extra[0]}", section[extra[0]], f"allowed keys are action, {', '.join(limits)}")
        action = section.get("action", "warn")
        if action not in ACTIONS:
            fail(f"{name}.action", action, f"allowed values are {', '.join(ACTIONS)}")
        values = {}
        for key, (default, low, high, low_open, allowed) in limits.items():
            v = section.get(key, default)
            integer = isinstance(default, int)
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            ok = ok and (v > low if low_open else v >= low) and v <= high and (not integer or isinstance(v, int))
            if not ok:
                fail(f"{name}.{key}", v, f"it must be {allowed}")
            values[key] = int(v) if integer else float(v)
        alarms[name] = AlarmConfig(action, values)
    return HealthConfig(enabled=enabled, plot_every=plot_every, sample_tokens=sample_tokens, alarms=alarms)


@dataclass(frozen=True)
class Alarm:
    """A fired alarm: which, for which teacher (None: the whole batch), the figure and the threshold it crossed."""

    name: str
    teacher: str | None
    figure: float
    threshold: str
    action: str
    detail: str = ""

    def message(self) -> str:
        who = f"teacher {self.teacher!r}" if self.teacher is not None else "the batch"
        text = f"opd_verl health alarm '{self.name}' ({self.action}) for {who}: figure {self.figure:.6g}"
        text = f"{text}, {self.threshold}"
        return f"{text}; {self.detail}" if self.detail else text


# ---------------------------------------------------------------------------------------------- figures


def nonfinite_rows(response_mask: torch.Tensor, **inputs: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, int]]:
    """Rows with a NaN/inf at a valid token in any of ``inputs`` and, per input, how many valid tokens are non-finite.

    Args:
        response_mask: `(B, T)`.
        inputs: `(B, T)` tensors by name (None entries are skipped), e.g. ``teacher=..., student=..., ref=...``.

    Returns:
        bad: `(B,)` bool, True where the row has a non-finite value at a valid token.
        counts: input name -> number of non-finite valid tokens.
    """
    mask = response_mask.bool()
    bad = torch.zeros(mask.shape[0], dtype=torch.bool, device=mask.device)
    counts: dict[str, int] = {}
    for name, x in inputs.items():
        if x is None:
            continue
        # fast path: a finite sum means every value is finite (one reduction; padding too must then be finite)
        if math.isfinite(float(x.sum())):
            counts[name] = 0
            continue
        hit = mask & ~torch.isfinite(x)
        counts[name] = int(hit.sum())
        bad |= hit.any(dim=1)
    return bad, counts


def zero_rows(bad: torch.Tensor, response_mask: torch.Tensor, **inputs: torch.Tensor | None):
    """Take the ``bad`` `(B,)` rows out of the step: their mask and every input set to 0 (so their advantage is 0).

    Returns:
        ``(response_mask, inputs)``: new tensors (the arguments are not modified); None inputs stay None.
    """
    keep = (~bad).to(response_mask.dtype)[:, None]
    out = {}
    for name, x in inputs.items():
        out[name] = None if x is None else torch.where(bad[:, None], torch.zeros((), dtype=x.dtype), x)
    return response_mask * keep, out


def collapse_counts(
    teacher_logprobs: torch.Tensor, response_mask: torch.Tensor, ln_vocab: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: valid tokens the teacher scores as a uniform distribution would, and the sum of ``-log t / ln V``.

    A token counts as collapsed when ``|log t + ln V| <= margin * ln V``: a teacher whose output layer was lost
    (zero logits) gives ``log t = -ln V`` on every token; a healthy teacher gives most sampled tokens far more
    mass than ``1 / V``.

    Args:
        teacher_logprobs: `(B, T)` teacher log-prob of the sampled token (finite at valid tokens).
        response_mask: `(B, T)`.
        ln_vocab: `(B,)` ``ln V`` of each row's teacher.
        margin: the band's half width as a fraction of ``ln V``.

    Returns:
        counts: `(B,)` float collapsed valid tokens; nll: `(B,)` float sum over valid tokens of ``-log t / ln V``.
    """
    mask = response_mask.bool()
    lnv = ln_vocab.to(teacher_logprobs.dtype)[:, None]
    scaled = torch.where(mask, teacher_logprobs / lnv, 0.0)  # -1 at a uniform teacher
    counts = (((scaled + 1.0).abs() <= margin) & mask).sum(dim=1).float()
    return counts, -scaled.sum(dim=1)


def topk_overlap_mass(teacher_logprobs_at_candidates: torch.Tensor) -> torch.Tensor:
    """The teacher's probability mass on the student's top-K candidate ids: ``sum_j exp(log t(c_j))``.

    Near 1 where the teacher puts its mass on what the student ranks highest; near ``K / V`` for a teacher that
    scores like a uniform distribution; low where the student's candidates are ones the teacher rules out.

    Args:
        teacher_logprobs_at_candidates: `(..., K)` teacher log-probs at the student's K highest-ranked ids (the
            release rule's candidates).

    Returns:
        `(...)` float32 in [0, 1] (detached).
    """
    return torch.logsumexp(teacher_logprobs_at_candidates.detach().float(), dim=-1).exp().clamp_max(1.0)


def release_points(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the share of its valid tokens before the release point: ``(rank of the last valid token whose
    advantage is nonzero + 1) / n_valid``; 1 for a row the rule did not release, 0 for a row without any nonzero
    advantage. Read from the final advantages, so valid only with ``task_coef == 0`` (a token where teacher and
    student log-probs are exactly equal also reads as released).

    Returns:
        `(B,)` float32 in [0, 1]; rows without a valid token give 1.
    """
    mask = response_mask.bool()
    rank = mask.long().cumsum(dim=1)  # 1-based rank at valid tokens
    n_valid = rank[:, -1]
    last = torch.where(mask & (advantages != 0), rank, 0).amax(dim=1)
    share = last.float() / n_valid.clamp_min(1).float()
    return torch.where(n_valid > 0, share, torch.ones_like(share))


def decile_bins(response_mask: torch.Tensor) -> torch.Tensor:
    """`(B, T)` int64 position decile of each valid token within its row's valid tokens, 10 at masked positions.

    A valid token of rank r (0-based) of n falls in decile ``floor(10 r / n)``, as
    :func:`opd_verl.objectives.position_decile_means`.
    """
    mask = response_mask.bool()
    rank = mask.long().cumsum(dim=1)
    n = rank[:, -1:].clamp_min(1)
    return torch.where(mask, torch.div((rank - 1) * 10, n, rounding_mode="floor"), 10)


def decile_means(bins: torch.Tensor, values: torch.Tensor) -> list[float]:
    """Mean of ``values`` `(B, T)` per decile of :func:`decile_bins` ``bins``: 10 floats, 0 for an empty decile."""
    flat = bins.reshape(-1)
    sums = torch.zeros(11, dtype=torch.float64, device=values.device).index_add_(0, flat, values.reshape(-1).double())
    counts = torch.bincount(flat, minlength=11).double()
    return (sums[:10] / counts[:10].clamp_min(1)).tolist()


def temperature_mismatch(scored: float, expected: float, tolerance: float) -> float | None:
    """``|scored - expected|`` when it exceeds ``tolerance``, else None."""
    gap = abs(float(scored) - float(expected))
    return gap if gap > tolerance else None


def advantage_jump(previous: float | None, current: float, factor: float) -> float | None:
    """The ratio ``max(current / previous, previous / current)`` of two steps' advantage scales when it is at least
    ``factor``, else None. Without a previous scale (first step, or a zero one) nothing fires; a scale falling to
    exactly 0 after a nonzero one is an infinite jump."""
    if previous is None or previous <= 0.0 or not math.isfinite(previous):
        return None
    if current <= 0.0:
        return math.inf
    ratio = max(current / previous, previous / current)
    return ratio if ratio >= factor else None


# ---------------------------------------------------------------------------------------------- one step


def sample_grid(shape: tuple[int, int], budget: int) -> tuple[int, int]:
    """Row and column strides ``(rs, cs)`` so that ``x[::rs, ::cs]`` of a `shape` tensor holds at most about
    ``budget`` elements: every row (down to a row stride only when rows alone exceed the budget), evenly spaced
    positions of each."""
    rows, cols = shape
    rs = max(1, math.ceil(rows / budget))
    cs = max(1, min(cols, math.ceil(math.ceil(rows / rs) * cols / budget)))
    return rs, cs


@dataclass
class HealthReport:
    """What :func:`step_health` found: ``metrics`` (floats for veRL's tracking), ``alarms`` fired, ``positions``
    (per-position profiles for the diagnostics plot: name -> list of 10 floats, ``release_points`` a list of
    per-row values) and ``adv_scale`` (this step's advantage std, the next step's reference)."""

    metrics: dict[str, float]
    alarms: list[Alarm]
    positions: dict[str, list[float]]
    adv_scale: float


def step_health(
    config: HealthConfig,
    *,
    student: torch.Tensor,
    teacher: torch.Tensor,
    response_mask: torch.Tensor,
    advantages: torch.Tensor,
    owners: list[int],
    teacher_names: list[str],
    vocab_sizes: list[int],
    nonfinite: tuple[torch.Tensor, dict[str, int]],
    scored_temperatures: dict[str, float],
    expected_temperature: float,
    stage_metrics: dict[str, float],
    weighting: str = "none",
    w_max: float = 1.5,
    release_enabled: bool = False,
    task_coef: float = 0.0,
    previous_adv_scale: float | None = None,
    adv_scale: float | None = None,
    topk_mass: torch.Tensor | None = None,
) -> HealthReport:
    """Figures and fired alarms of one advantage step.

    The per-token figures (collapse, per-teacher means, per-position profiles, release points) are estimated on
    an even grid of at most ``config.sample_tokens`` tokens (:func:`sample_grid`: every row, evenly spaced
    positions), so their cost does not grow with the batch; the non-finite rows (``nonfinite``) and the advantage
    scale use every token.

    Args:
        config: the ``opd.health`` section.
        student, teacher: `(B, T)` log-probs as handed to the estimator (non-finite rows already zeroed).
        response_mask: `(B, T)` the estimator's mask (zeroed rows included).
        advantages: `(B, T)` the estimator's output (0 where the mask is 0).
        owners: teacher index per row; ``teacher_names`` and ``vocab_sizes`` per teacher index.
        nonfinite: :func:`nonfinite_rows` of the raw inputs, ``(bad (B,), counts by input)``.
        scored_temperatures: teacher name -> temperature its forward was given this step.
        expected_temperature: what the objective assumes (the rollout temperature for sampled-token objectives).
        stage_metrics: the estimator's metrics (``opd/release/...``, ``opd/weight_mean``, ``opd/discrepancy_decile``).
        weighting, w_max, release_enabled, task_coef: the stages of the run.
        previous_adv_scale: the previous step's ``adv_scale`` (None on the first step).
        adv_scale: this step's std of the advantages over valid tokens when the caller has it; None: computed.
        topk_mass: `(B, T)` :func:`topk_overlap_mass` per token where the student's top-K ids exist (release
            rule), else None.
    """
    alarms: list[Alarm] = []

    def fire(name: str, teacher: str | None, figure: float, threshold: str, detail: str = "") -> None:
        alarms.append(Alarm(name, teacher, figure, threshold, config[name].action, detail))

    metrics: dict[str, float] = {}
    rs, cs = sample_grid(tuple(teacher.shape), config.sample_tokens)
    # one strided read of each input into a small contiguous tensor; everything below works on those
    mask = response_mask[::rs, ::cs].bool()
    t_s, s_s, a_s = (x[::rs, ::cs].contiguous() for x in (teacher, student, advantages))
    owner_t = torch.as_tensor(owners, dtype=torch.long, device=teacher.device)[::rs]
    cfg_c = config["collapse"]
    lnv_t = torch.log(torch.as_tensor(vocab_sizes, dtype=torch.float32, device=teacher.device))
    collapsed, nll = collapse_counts(t_s, mask, lnv_t[owner_t], cfg_c["margin"])
    n_tok = mask.sum(dim=1).float()
    adv_rows = torch.where(mask, a_s, 0.0).sum(dim=1)
    disc_rows = torch.where(mask, t_s - s_s, 0.0).sum(dim=1)
    bad, counts = nonfinite
    n_teachers = len(teacher_names)

    def per_teacher(x: torch.Tensor) -> list[float]:
        return torch.zeros(n_teachers, dtype=torch.float64).index_add_(0, owner_t.cpu(), x.double().cpu()).tolist()

    samples = [float(owners.count(i)) for i in range(n_teachers)]
    tokens, coll, nlls = per_teacher(n_tok), per_teacher(collapsed), per_teacher(nll)
    advs, discs = per_teacher(adv_rows), per_teacher(disc_rows)
    bad_list = bad.tolist()
    for i, name in enumerate(teacher_names):
        p = f"opd/teacher/{name}/"
        metrics[p + "samples"] = samples[i]
        metrics[p + "nonfinite_rows"] = float(sum(1 for o, b in zip(owners, bad_list, strict=True) if b and o == i))
        if samples[i] == 0:
            continue
        frac = coll[i] / tokens[i] if tokens[i] else 0.0
        metrics[p + "collapse_fraction"] = frac
        metrics[p + "nll_over_lnv"] = nlls[i] / tokens[i] if tokens[i] else 0.0
        metrics[p + "discrepancy"] = discs[i] / tokens[i] if tokens[i] else 0.0
        metrics[p + "advantage"] = advs[i] / tokens[i] if tokens[i] else 0.0
        if tokens[i] and frac >= cfg_c["fraction"]:
            fire(
                "collapse",
                name,
                frac,
                f"share of tokens with |log p_teacher + ln V| <= {cfg_c['margin']} ln V >= {cfg_c['fraction']}",
                f"V={vocab_sizes[i]}: the teacher scores like a uniform distribution (lost or zeroed weights?)",
            )
        if name in scored_temperatures:
            t = scored_temperatures[name]
            metrics[p + "temperature"] = float(t)
            gap = temperature_mismatch(t, expected_temperature, config["temperature"]["tolerance"])
            if gap is not None:
                fire(
                    "temperature",
                    name,
                    float(t),
                    f"expected {expected_temperature} +- {config['temperature']['tolerance']}",
                    "the teacher was scored at another temperature than the objective assumes",
                )

    n_bad = int(bad.sum())
    metrics["opd/health/nonfinite_rows"] = float(n_bad)
    for name, c in counts.items():
        metrics[f"opd/health/nonfinite_tokens/{name}"] = float(c)
    if n_bad > config["nonfinite"]["max_rows"]:
        who = [teacher_names[o] for o, b in zip(owners, bad.tolist(), strict=True) if b]
        fire(
            "nonfinite",
            ", ".join(sorted(set(who))),
            float(n_bad),
            f"rows with NaN/inf at a valid token > {config['nonfinite']['max_rows']}",
            f"non-finite valid tokens by input {counts}; those rows were given advantage 0",
        )

    if release_enabled and "opd/release/accept_rate" in stage_metrics:
        cr = config["release"]
        accept, kept = stage_metrics["opd/release/accept_rate"], stage_metrics["opd/release/kept_fraction"]
        if accept >= cr["accept_rate"] and kept <= cr["kept_fraction"]:
            fire(
                "release",
                None,
                kept,
                f"kept fraction <= {cr['kept_fraction']} with acceptance {accept:.3f} >= {cr['accept_rate']}",
                "the release rule zeroes almost every token",
            )

    if weighting == "iw" and w_max > 1.0 and "opd/weight_mean" in stage_metrics:
        saturation = (stage_metrics["opd/weight_mean"] - 1.0) / (w_max - 1.0)
        metrics["opd/health/iw_saturation"] = saturation
        if saturation >= config["iw"]["saturation"]:
            fire(
                "iw",
                None,
                saturation,
                f"(mean weight - 1) / (w_max - 1) >= {config['iw']['saturation']}",
                "IW weights sit at w_max: the accumulated discrepancy is ~0 on every row",
            )

    if adv_scale is None:
        full = response_mask.bool()
        adv_scale = float(advantages[full].std(unbiased=False)) if bool(full.any()) else 0.0
    metrics["opd/health/adv_scale"] = adv_scale
    jump = advantage_jump(previous_adv_scale, adv_scale, config["advantage_jump"]["factor"])
    if jump is not None:
        fire(
            "advantage_jump",
            None,
            jump,
            f"advantage std ratio to the previous step ({previous_adv_scale:.4g} -> {adv_scale:.4g}) >= "
            f"{config['advantage_jump']['factor']}",
        )

    # per-position profiles (deciles of each row's valid tokens)
    positions: dict[str, list[float]] = {
        "discrepancy": [stage_metrics.get(f"opd/discrepancy_decile/{k}", 0.0) for k in range(10)],
    }
    bins = decile_bins(mask)
    positions["advantage"] = decile_means(bins, a_s)
    if topk_mass is not None:
        m_s = topk_mass[::rs, ::cs]
        metrics["opd/health/topk_overlap_mass"] = float(torch.where(mask, m_s, 0.0).sum() / mask.sum().clamp_min(1))
        positions["topk_overlap_mass"] = decile_means(bins, torch.where(mask, m_s, 0.0))
    if weighting == "iw":
        # on the sampled positions: the sampled discrepancy's running share estimates the full one's
        weights = iw_opd_weights(t_s - s_s, mask, w_max)
        positions["iw_weight"] = decile_means(bins, weights)
    if release_enabled and task_coef == 0.0:
        rows = mask.any(dim=1)
        points = release_points(a_s, mask)[rows]
        positions["release_points"] = points.tolist()
        if points.numel():
            qs = torch.quantile(points, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], device=points.device)).tolist()
            for q, v in zip((10, 25, 50, 75, 90), qs, strict=True):
                metrics[f"opd/health/release_point/q{q}"] = v
    for name in ("advantage", "iw_weight", "topk_overlap_mass"):
        for k, v in enumerate(positions.get(name, ())):
            metrics[f"opd/health/{name}_decile/{k}"] = v
    for a in ("collapse", "nonfinite", "temperature", "release", "iw", "advantage_jump"):
        metrics[f"opd/health/alarm/{a}"] = float(any(x.name == a for x in alarms))
    return HealthReport(metrics=metrics, alarms=alarms, positions=positions, adv_scale=adv_scale)
