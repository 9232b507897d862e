"""Composition of the stages (docs/objectives.md section 6): ``A = release(weighting(signal)) + task_coef * task``.

The parameter dataclasses are the typed ``opd.signal``, ``opd.weighting`` and ``opd.release`` sections of
``hydra_configs/opd_trainer.yaml`` (`opd_verl.config.OPDConfig` holds them): frozen, each field validated once, on
construction, with the ``opd.*`` name in the error.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import torch

from opd_verl.objectives.checks import (
    check_choice,
    check_flag,
    check_int,
    check_lam,
    check_number,
    check_same_shape,
    masked,
    valid_mask,
)
from opd_verl.objectives.release import MARGIN_KINDS, ReleaseResult, release_masked
from opd_verl.objectives.signals import gopd_signal
from opd_verl.objectives.weighting import (
    POSITION_MODES,
    cosine_fraction,
    decile_sums,
    iw_weights,
    position_mask_weights,
)

__all__ = [
    "SIGNAL_NAMES",
    "ADVANTAGE_SIGNALS",
    "WEIGHTING_NAMES",
    "SignalParams",
    "WeightingParams",
    "ReleaseParams",
    "StageParams",
    "compose_advantages",
]

SIGNAL_NAMES = ("opd", "gopd", "opsd")
ADVANTAGE_SIGNALS = ("opd", "gopd")  # the signals computed here; opsd's losses are computed inside the actor
WEIGHTING_NAMES = ("none", "iw", *POSITION_MODES)
ANNEALED_WEIGHTINGS = ("prefix_mask", "prefix_weight")


def _set(params, name: str, value) -> None:
    """Store the validated (normalised) value of a field of a frozen dataclass in its ``__post_init__``."""
    object.__setattr__(params, name, value)


@dataclass(frozen=True)
class SignalParams:
    """``opd.signal``: ``name`` in opd | gopd | opsd; ``lam`` the G-OPD reward scale (finite, > 0; gopd only).

    ``opsd`` (on-policy self-distillation) selects a loss computed inside the actor (``opd.opsd.loss``, see
    `opd_verl.workers.opsd_actor`), not an advantage: :class:`StageParams` refuses it.
    """

    name: str = "opd"
    lam: float = 1.0

    def __post_init__(self):
        check_choice("opd.signal.name", self.name, SIGNAL_NAMES)
        _set(self, "lam", check_number("opd.signal.lam", self.lam, 0.0, low_open=True))
        if self.name != "gopd" and self.lam != 1.0:
            raise ValueError(
                f"opd.signal.lam={self.lam!r} is not allowed: lam applies to signal.name=gopd only "
                f"(got signal.name={self.name}); use gopd, or lam=1"
            )


@dataclass(frozen=True)
class WeightingParams:
    """``opd.weighting``: ``name`` in none | iw | prefix_mask | suffix_mask | prefix_weight (section 3)."""

    name: str = "none"
    w_max: float = 1.5
    fraction: float = 0.3
    weight: float = 1.5
    anneal: bool = False
    fraction_end: float = 1.0

    def __post_init__(self):
        check_choice("opd.weighting.name", self.name, WEIGHTING_NAMES)
        _set(self, "w_max", check_number("opd.weighting.w_max", self.w_max, 1.0))
        _set(self, "fraction", check_number("opd.weighting.fraction", self.fraction, 0.0, 1.0, low_open=True))
        _set(self, "weight", check_number("opd.weighting.weight", self.weight, 0.0))
        check_flag("opd.weighting.anneal", self.anneal)
        end = check_number("opd.weighting.fraction_end", self.fraction_end, 0.0, 1.0, low_open=True)
        _set(self, "fraction_end", end)
        if self.anneal and self.name not in ANNEALED_WEIGHTINGS:
            raise ValueError(
                f"opd.weighting.anneal=True is not allowed: annealing applies to prefix_mask and prefix_weight only "
                f"(got opd.weighting.name={self.name!r})"
            )


@dataclass(frozen=True)
class ReleaseParams:
    """``opd.release``: the Prefix-Teach release rule (section 4).

    ``top_k``, ``margin`` and ``split_newlines`` are used where the margins and sentence ids are produced
    (teacher worker, :func:`topk_margin`, :func:`batch_sentence_ids`); they are validated here too.
    """

    enabled: bool = False
    top_k: int = 8
    margin: str = "prob"
    split_newlines: bool = True
    min_segment: int = 2
    penalty: float = 2.0
    min_gain: float = 0.0

    def __post_init__(self):
        check_flag("opd.release.enabled", self.enabled)
        check_int("opd.release.top_k", self.top_k, 2)
        check_choice("opd.release.margin", self.margin, MARGIN_KINDS)
        check_flag("opd.release.split_newlines", self.split_newlines)
        check_int("opd.release.min_segment", self.min_segment, 1)
        _set(self, "penalty", check_number("opd.release.penalty", self.penalty, 0.0))
        _set(self, "min_gain", check_number("opd.release.min_gain", self.min_gain))


@dataclass(frozen=True)
class StageParams:
    """What :func:`compose_advantages` computes: signal, weighting, release and the task-reward coefficient (the
    ``opd:`` config section's fields of the same names). Mappings are accepted for the three parts."""

    signal: SignalParams = field(default_factory=SignalParams)
    weighting: WeightingParams = field(default_factory=WeightingParams)
    release: ReleaseParams = field(default_factory=ReleaseParams)
    task_coef: float = 0.0

    def __post_init__(self):
        for name, cls in (("signal", SignalParams), ("weighting", WeightingParams), ("release", ReleaseParams)):
            value = getattr(self, name)
            if isinstance(value, dict):
                _set(self, name, _from_mapping(cls, value, f"opd.{name}"))
            elif not isinstance(value, cls):
                raise ValueError(f"opd.{name} must be a {cls.__name__} or a mapping, got {type(value).__name__}")
        if self.signal.name not in ADVANTAGE_SIGNALS:
            raise ValueError(
                f"opd.signal.name={self.signal.name!r} is not allowed here: its losses are computed inside the actor "
                f"(opd_verl.workers.opsd_actor), not as advantages; allowed values are {', '.join(ADVANTAGE_SIGNALS)}"
            )
        _set(self, "task_coef", check_number("opd.task_coef", self.task_coef))

    @classmethod
    def from_config(cls, opd_section: Any) -> StageParams:
        """Build from the ``opd:`` section (a dict or OmegaConf node); keys other than the stages are ignored."""
        get = opd_section.get if hasattr(opd_section, "get") else (lambda k, d=None: getattr(opd_section, k, d))
        return cls(
            signal=_to_dict(get("signal", {})),
            weighting=_to_dict(get("weighting", {})),
            release=_to_dict(get("release", {})),
            task_coef=get("task_coef", 0.0),
        )


def _to_dict(node: Any) -> dict:
    if isinstance(node, dict):
        return dict(node)
    if hasattr(node, "items"):
        return dict(node.items())
    raise ValueError(f"expected a mapping, got {type(node).__name__}")


def _from_mapping(cls, values: dict, prefix: str):
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ValueError(f"{prefix} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    return cls(**values)


def compose_advantages(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    params: StageParams,
    ref_logprobs: torch.Tensor | None = None,
    sentence_ids: torch.Tensor | None = None,
    margins: torch.Tensor | None = None,
    task_advantages: torch.Tensor | None = None,
    step: int | None = None,
    total_steps: int | None = None,
    lam: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Final advantages ``release(weighting(signal)) + task_coef * task_advantages`` and metrics (section 6).

    Args:
        student_logprobs: `(B, T)` recomputed ``old_log_probs`` of the sampled tokens.
        teacher_logprobs: `(B, T)` teacher log-probs of the same tokens.
        response_mask: `(B, T)` 1 on response tokens.
        params: the stages.
        ref_logprobs: `(B, T)` reference log-probs; required when the signal is ``gopd`` with some lam != 1.
        sentence_ids: `(B, T)` int sentence index per token; required when release is enabled.
        margins: `(B, T)` teacher top-K margin per token; required when release is enabled.
        task_advantages: `(B, T)` task-reward advantages (e.g. GRPO's); required when ``task_coef != 0``.
        step, total_steps: 1-based training step and total; required when ``weighting.anneal``.
        lam: per-call override of ``params.signal.lam`` (a float, or `(B,)` per-row values for
            multi-teacher routing); gopd only.

    Returns:
        advantages: `(B, T)` float32, detached, 0 where the mask is 0.
        metrics: floats keyed ``opd/...``, over the valid tokens: means of the discrepancy ``teacher - student``,
            its absolute value, the signal, the weights (also their min and max) and the final advantages;
            ``opd/discrepancy_decile/{k}`` the mean discrepancy per position decile; with release, per row with a
            valid token: acceptance rate, mean kept fraction, mean sentence count, the share of rows where the BIC
            gain is defined and its mean over them; ``opd/stage/{signal,weighting,final}/adv_{mean,std}`` after the
            signal, after the weighting and at the end.
    """
    if not isinstance(params, StageParams):
        raise ValueError(f"params must be a StageParams, got {type(params).__name__}")
    check_same_shape(
        response_mask,
        student_logprobs=student_logprobs,
        teacher_logprobs=teacher_logprobs,
        ref_logprobs=ref_logprobs,
        sentence_ids=sentence_ids,
        margins=margins,
        task_advantages=task_advantages,
    )
    sp, wp, rp = params.signal, params.weighting, params.release
    if lam is not None and sp.name != "gopd":
        raise ValueError(f"lam applies only to signal.name=gopd, got signal.name={sp.name!r}")
    use_lam = check_lam(sp.lam if lam is None else lam, response_mask.shape[0]) if sp.name == "gopd" else 1.0
    if wp.anneal and (step is None or total_steps is None):
        raise ValueError("opd.weighting.anneal=true needs step and total_steps")
    if rp.enabled and (sentence_ids is None or margins is None):
        raise ValueError("opd.release.enabled=true needs sentence_ids and margins")
    if params.task_coef != 0.0 and task_advantages is None:
        raise ValueError(f"opd.task_coef={params.task_coef} != 0 needs task_advantages")

    metrics: dict[str, float] = {}
    mask = valid_mask(response_mask)
    n_valid = float(mask.sum())

    def mean(values: torch.Tensor) -> float:
        return float(values.sum()) / max(n_valid, 1.0)

    def stage(name: str, values: torch.Tensor) -> float:  # mean and std over the valid tokens after a stage
        # values are 0 off the mask: the valid tokens' sum of squares is the whole tensor's (one pass, no copy)
        average = mean(values)
        square_mean = float(torch.linalg.vector_norm(values)) ** 2 / max(n_valid, 1.0)
        metrics[f"opd/stage/{name}/adv_mean"] = average
        metrics[f"opd/stage/{name}/adv_std"] = max(square_mean - average * average, 0.0) ** 0.5
        return average

    # each stage's metrics are taken as it is computed; the stages after it then work in place
    with torch.no_grad():
        teacher = masked("teacher_logprobs", teacher_logprobs, mask)
        disc = masked("student_logprobs", student_logprobs, mask).neg_().add_(teacher)
        metrics["opd/discrepancy"] = mean(disc)
        metrics["opd/abs_discrepancy"] = float(torch.linalg.vector_norm(disc, ord=1)) / max(n_valid, 1.0)
        valid_count = mask.cumsum(dim=-1)  # valid tokens up to and including t (deciles, release rule)
        sums, counts = decile_sums(disc, mask, count=valid_count)
        for k, (total, count) in enumerate(zip(sums.tolist(), counts.tolist())):
            metrics[f"opd/discrepancy_decile/{k}"] = total / count if count else 0.0

        signal = disc if sp.name != "gopd" else gopd_signal(disc, teacher, mask, use_lam, ref_logprobs)
        metrics["opd/signal"] = stage("signal", signal)

        weights = None  # weighting "none": 1 on every valid token
        if wp.name == "iw":
            weights = iw_weights(disc.abs(), mask, wp.w_max)
        elif wp.name != "none":
            fraction = wp.fraction
            if wp.anneal:
                fraction = cosine_fraction(step, total_steps, wp.fraction, wp.fraction_end)
                metrics["opd/weighting/fraction"] = fraction
            weights = position_mask_weights(mask, wp.name, fraction, wp.weight)
        metrics.update(_weight_metrics(weights, mask, n_valid))
        advantages = signal if weights is None else weights.mul_(signal)
        stage("weighting", advantages)

        if rp.enabled:
            rule = (rp.min_segment, float(rp.penalty), float(rp.min_gain))
            result = release_masked(advantages, mask, sentence_ids, margins, *rule, count=valid_count)
            advantages = result.advantages
            metrics.update(_release_metrics(result))
        if params.task_coef != 0.0:
            advantages.add_(masked("task_advantages", task_advantages, mask), alpha=params.task_coef)
        metrics["opd/advantage"] = stage("final", advantages)
    return advantages, metrics


def _weight_metrics(weights: torch.Tensor | None, mask: torch.Tensor, n_valid: float) -> dict[str, float]:
    """Mean, min and max of the weights `(B, T)` (>= 0, 0 where the float 0/1 mask is 0; None = 1) over the
    valid tokens."""
    if not n_valid:
        return {"opd/weight_mean": 0.0, "opd/weight_min": 0.0, "opd/weight_max": 0.0}
    if weights is None:
        return {"opd/weight_mean": 1.0, "opd/weight_min": 1.0, "opd/weight_max": 1.0}
    high = float(weights.amax())
    return {
        "opd/weight_mean": float(weights.sum()) / n_valid,
        # masked positions (0) may hold the minimum of all positions, never the maximum: they are lifted above it
        "opd/weight_min": float(torch.sub(1.0, mask).mul_(high + 1.0).add_(weights).amin()),
        "opd/weight_max": high,
    }


def _release_metrics(result: ReleaseResult) -> dict[str, float]:
    """Acceptance rate, mean kept fraction, mean BIC gain (where defined) and mean sentence count over the rows
    with at least one valid token, and the mean release point (first released token) over the released rows."""
    rows = result.n_valid > 0
    if not bool(rows.any()):
        return {
            "opd/release/accept_rate": 0.0,
            "opd/release/kept_fraction": 1.0,
            "opd/release/gain_defined_rate": 0.0,
            "opd/release/n_sentences": 0.0,
        }
    kept_fraction = result.n_kept.double() / result.n_valid.clamp_min(1).double()
    defined = torch.isfinite(result.gain) & rows
    metrics = {
        "opd/release/accept_rate": float(result.accepted[rows].float().mean()),
        "opd/release/kept_fraction": float(kept_fraction[rows].mean()),
        "opd/release/gain_defined_rate": float(defined[rows].float().mean()),
        "opd/release/n_sentences": float(result.n_sentences[rows].double().mean()),
    }
    if bool(defined.any()):
        metrics["opd/release/gain"] = float(result.gain[defined].mean())
    accepted = result.accepted & rows
    if bool(accepted.any()):
        # where the released rows were cut: the first zeroed token's position, mean over the released rows
        metrics["opd/release/point_token"] = float(result.release_index[accepted].double().mean())
    return metrics
