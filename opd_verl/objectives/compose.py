"""Composition of the stages (docs/objectives.md section 6).

``A = release(weighting(signal)) + task_coef * task_advantages``. The parameter dataclasses mirror the ``opd:``
section of ``hydra_configs/opd_trainer.yaml`` field by field (``signal.*``, ``weighting.*``, ``release.*``,
``task_coef``), so a config maps onto them 1:1.

:func:`compose_advantages` evaluates all stages block of rows by block of rows (:mod:`opd_verl.objectives.rows`):
each input is read once, the result written once, and the metrics are accumulated as sums on the way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from opd_verl.objectives.release import (
    MARGIN_KINDS,
    RELEASE_BUFFERS,
    ReleasePlan,
    merge_plans,
    release_buffer_dtypes,
    release_rows,
    sorted_ids_width,
)
from opd_verl.objectives.rows import BlockPrefix, blocked_output, load_masked
from opd_verl.objectives.signals import (
    SIGNAL_BUFFERS,
    check_lam,
    check_ref_given,
    check_same_shape,
    load_signal_block,
    signal_rows,
)
from opd_verl.objectives.weighting import POSITION_MODES, cosine_fraction, iw_weights_rows, position_mask_weights

__all__ = [
    "SIGNAL_NAMES",
    "WEIGHTING_NAMES",
    "SignalParams",
    "WeightingParams",
    "ReleaseParams",
    "StageParams",
    "compose_advantages",
]

SIGNAL_NAMES = ("opd", "gopd", "opsd_sampled")
WEIGHTING_NAMES = ("none", "iw", *POSITION_MODES)


def _finite(name: str, value: Any, low: float | None = None, high: float | None = None, low_open: bool = False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo = "-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}]"
        raise ValueError(f"{name} must be a finite number in {lo}, {hi}, got {value!r}")


@dataclass
class SignalParams:
    """``opd.signal``: ``name`` in opd | gopd | opsd_sampled; ``lam`` the G-OPD reward scale (finite, > 0).

    ``opsd_sampled`` is OPSD's sampled-token variant: ``teacher_logprobs`` are then the privileged-context
    teacher's log-probs and the advantage is ``teacher - student`` (the full-vocabulary OPSD loss is not an
    advantage; use :func:`opd_verl.objectives.generalized_jsd`).
    """

    name: str = "opd"
    lam: float = 1.0

    def __post_init__(self):
        if self.name not in SIGNAL_NAMES:
            raise ValueError(f"opd.signal.name must be one of {list(SIGNAL_NAMES)}, got {self.name!r}")
        _finite("opd.signal.lam", self.lam, 0.0, low_open=True)
        if self.name != "gopd" and self.lam != 1.0:
            raise ValueError(f"opd.signal.lam={self.lam} applies only to signal.name=gopd; {self.name!r} needs lam=1")


@dataclass
class WeightingParams:
    """``opd.weighting``: ``name`` in none | iw | prefix_mask | suffix_mask | prefix_weight (section 3)."""

    name: str = "none"
    w_max: float = 1.5
    fraction: float = 0.3
    weight: float = 1.5
    anneal: bool = False
    fraction_end: float = 1.0

    def __post_init__(self):
        if self.name not in WEIGHTING_NAMES:
            raise ValueError(f"opd.weighting.name must be one of {list(WEIGHTING_NAMES)}, got {self.name!r}")
        _finite("opd.weighting.w_max", self.w_max, 1.0)
        _finite("opd.weighting.fraction", self.fraction, 0.0, 1.0, low_open=True)
        _finite("opd.weighting.weight", self.weight, 0.0)
        _finite("opd.weighting.fraction_end", self.fraction_end, 0.0, 1.0, low_open=True)
        if not isinstance(self.anneal, bool):
            raise ValueError(f"opd.weighting.anneal must be true or false, got {self.anneal!r}")
        if self.anneal and self.name not in ("prefix_mask", "prefix_weight"):
            raise ValueError(
                f"opd.weighting.anneal=true applies only to name in ['prefix_mask', 'prefix_weight'], got {self.name!r}"
            )


@dataclass
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
        if not isinstance(self.enabled, bool):
            raise ValueError(f"opd.release.enabled must be true or false, got {self.enabled!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 2:
            raise ValueError(f"opd.release.top_k must be an int >= 2, got {self.top_k!r}")
        if self.margin not in MARGIN_KINDS:
            raise ValueError(f"opd.release.margin must be one of {list(MARGIN_KINDS)}, got {self.margin!r}")
        if not isinstance(self.split_newlines, bool):
            raise ValueError(f"opd.release.split_newlines must be true or false, got {self.split_newlines!r}")
        if isinstance(self.min_segment, bool) or not isinstance(self.min_segment, int) or self.min_segment < 1:
            raise ValueError(f"opd.release.min_segment must be an int >= 1, got {self.min_segment!r}")
        _finite("opd.release.penalty", self.penalty, 0.0)
        _finite("opd.release.min_gain", self.min_gain)


@dataclass
class StageParams:
    """The three stages plus the task-reward coefficient: the ``opd:`` config section's stage fields."""

    signal: SignalParams = field(default_factory=SignalParams)
    weighting: WeightingParams = field(default_factory=WeightingParams)
    release: ReleaseParams = field(default_factory=ReleaseParams)
    task_coef: float = 0.0

    def __post_init__(self):
        for name, cls in (("signal", SignalParams), ("weighting", WeightingParams), ("release", ReleaseParams)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, _from_mapping(cls, value, f"opd.{name}"))
            elif not isinstance(value, cls):
                raise ValueError(f"opd.{name} must be a {cls.__name__} or a mapping, got {type(value).__name__}")
        _finite("opd.task_coef", self.task_coef)

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


_BUFFERS = (*SIGNAL_BUFFERS, "signal", "disc", "abs", "weights", "task", *RELEASE_BUFFERS)
_N_DECILES = 10


class _Totals:
    """Sums over the valid tokens of the batch, accumulated block by block (floats and small tensors)."""

    def __init__(self, device: torch.device):
        self.n_valid = 0.0
        self.sums = {"disc": 0.0, "abs": 0.0, "signal": 0.0, "weights": 0.0, "advantage": 0.0}
        self.w_min = math.inf
        self.w_max = -math.inf
        self.decile_sums = torch.zeros(_N_DECILES, dtype=torch.float64, device=device)
        self.decile_counts = torch.zeros(_N_DECILES, dtype=torch.int64, device=device)

    def mean(self, key: str) -> float:
        return self.sums[key] / self.n_valid if self.n_valid else 0.0


def _decile_sums(mask_prefix: BlockPrefix, disc_prefix: BlockPrefix) -> tuple[torch.Tensor, torch.Tensor]:
    """`(10,)` sums of the discrepancy and `(10,)` token counts per position decile of each row's valid tokens,
    over one row block.

    A valid token of rank r (0-based) of n falls in decile ``floor(10 r / n)``, i.e. ranks
    ``[ceil(k n / 10), ceil((k + 1) n / 10))`` form decile k (as :func:`position_decile_means`).
    """
    n = mask_prefix.before[:, -1:].round().long()
    k = torch.arange(_N_DECILES + 1, device=n.device)
    bounds = torch.div(k * n + _N_DECILES - 1, _N_DECILES, rounding_mode="floor")  # (R, 11) rank bounds
    prefix = disc_prefix.at(mask_prefix.first_reaching(bounds))
    return prefix.diff(dim=-1).sum(dim=0), bounds.diff(dim=-1).sum(dim=0)


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
        teacher_logprobs: `(B, T)` teacher log-probs of the same tokens (the privileged teacher's for
            ``opsd_sampled``).
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
            gain is defined and its mean over them.
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
    metrics: dict[str, float] = {}
    sp, wp, rp = params.signal, params.weighting, params.release
    if sp.name == "gopd":
        use_lam = check_lam(sp.lam if lam is None else lam, response_mask.shape[0])
        check_ref_given(use_lam, ref_logprobs)
        if isinstance(use_lam, torch.Tensor):
            use_lam = use_lam.to(student_logprobs.device)
    elif lam is not None:
        raise ValueError(f"lam applies only to signal.name=gopd, got signal.name={sp.name!r}")
    else:
        use_lam = 1.0
    fraction = wp.fraction
    if wp.anneal:
        if step is None or total_steps is None:
            raise ValueError("opd.weighting.anneal=true needs step and total_steps")
        fraction = cosine_fraction(step, total_steps, wp.fraction, wp.fraction_end)
        metrics["opd/weighting/fraction"] = fraction
    if rp.enabled and (sentence_ids is None or margins is None):
        raise ValueError("opd.release.enabled=true needs sentence_ids and margins")
    if rp.enabled and (sentence_ids.dtype.is_floating_point or sentence_ids.dtype == torch.bool):
        raise ValueError(f"sentence_ids must be an integer tensor, got dtype {sentence_ids.dtype}")
    if params.task_coef != 0.0 and task_advantages is None:
        raise ValueError(f"opd.task_coef={params.task_coef} != 0 needs task_advantages")

    with torch.no_grad():
        device = student_logprobs.device
        dtypes = release_buffer_dtypes(margins) if rp.enabled else {}
        out, blocks, bufs = blocked_output(response_mask.shape, device, _BUFFERS, dtypes)
        totals = _Totals(device)
        width = sorted_ids_width(sentence_ids) if rp.enabled else 0
        plans: list[ReleasePlan] = []
        rule = (rp.min_segment, rp.penalty, rp.min_gain)
        for start, end in blocks:
            n = end - start
            mask = response_mask[start:end]
            mask_f, student, teacher, row_lam, ref, input_sums = load_signal_block(
                bufs, start, end, response_mask, student_logprobs, teacher_logprobs, use_lam, ref_logprobs
            )
            # stage 1: signal (the discrepancy teacher - student drives the IW weights and the metrics)
            disc = torch.sub(teacher, student, out=bufs["disc", n])
            signal = disc if ref is None else signal_rows(bufs["signal", n], student, teacher, row_lam, ref)
            abs_disc = torch.abs(disc, out=bufs["abs", n])
            # stage 2: weighting
            mask_prefix = BlockPrefix(bufs.full("mask", n))
            n_rows = mask_prefix.before[:, -1]
            totals.n_valid += float(n_rows.sum())
            if wp.name == "iw":
                # h = g - 1 (nonzero at masked positions too); out = signal * (1 + h)
                h = iw_weights_rows(bufs["weights", n], abs_disc, wp.w_max)
                torch.addcmul(signal, signal, h, out=out[start:end])
                totals.sums["weights"] += float(n_rows.sum()) + float(
                    torch.dot(bufs.full("weights", n).view(-1), bufs.full("mask", n).view(-1))
                )
                # g is non-increasing along the valid tokens: w_max at the first, the minimum at the last
                rows = n_rows > 0
                if bool(rows.any()):
                    last = mask_prefix.first_reaching(n_rows[:, None]) - 1
                    h_last = h.gather(1, last.clamp_min(0))[:, 0]
                    totals.w_min = min(totals.w_min, 1.0 + float(h_last[rows].min()))
                    totals.w_max = max(totals.w_max, wp.w_max)
            else:
                if wp.name == "none":
                    weights = mask_f
                else:
                    weights = bufs["weights", n].copy_(position_mask_weights(mask, wp.name, fraction, wp.weight))
                torch.mul(signal, weights, out=out[start:end])
                totals.sums["weights"] += float(weights.sum())
                # minimum over valid tokens: masked positions read 1e30
                lifted = torch.mul(mask_f, -1e30, out=bufs["scratch", n]).add_(1e30).add_(weights)
                totals.w_min = min(totals.w_min, float(lifted.amin()))
                totals.w_max = max(totals.w_max, float(weights.amax()))
            # metric sums from the loaded inputs' sums: disc = teacher - student, signal linear in the inputs
            totals.sums["disc"] += input_sums["teacher"] - input_sums["student"]
            if isinstance(row_lam, float):
                linear = row_lam * input_sums["teacher"] + (1.0 - row_lam) * input_sums["ref"]
                totals.sums["signal"] += linear - input_sums["student"]
            else:
                totals.sums["signal"] += float(signal.sum())
            totals.sums["abs"] += float(abs_disc.sum())
            decile_sums, decile_counts = _decile_sums(mask_prefix, BlockPrefix(bufs.full("disc", n)))
            totals.decile_sums += decile_sums
            totals.decile_counts += decile_counts

            # stage 3: release, on this block's rows (the rule needs whole rows, which a block holds)
            adv = out[start:end]
            if rp.enabled:
                rows = (sentence_ids[start:end], margins[start:end])
                plans.append(release_rows(adv, mask, mask_prefix, bufs, start, width, *rows, rule))
            # task reward last, never released
            if params.task_coef != 0.0:
                task = bufs["task", n]
                load_masked(
                    task, task_advantages[start:end], mask_f, mask, "task_advantages", start, bufs.full("task", n)
                )
                adv.add_(task, alpha=params.task_coef)
            totals.sums["advantage"] += float(adv.sum())
        if rp.enabled:
            metrics.update(_release_metrics(plans))

    metrics["opd/discrepancy"] = totals.mean("disc")
    metrics["opd/abs_discrepancy"] = totals.mean("abs")
    metrics["opd/signal"] = totals.mean("signal")
    valid = totals.n_valid > 0
    metrics["opd/weight_mean"] = totals.mean("weights")
    metrics["opd/weight_min"] = totals.w_min if valid else 0.0
    metrics["opd/weight_max"] = totals.w_max if valid else 0.0
    metrics["opd/advantage"] = totals.mean("advantage")
    for k, (total, count) in enumerate(zip(totals.decile_sums.tolist(), totals.decile_counts.tolist())):
        metrics[f"opd/discrepancy_decile/{k}"] = total / count if count else 0.0
    return out, metrics


def _release_metrics(plans: list[ReleasePlan]) -> dict[str, float]:
    """Acceptance rate, mean kept fraction, mean BIC gain (where defined) and mean sentence count over the rows
    with at least one valid token (the plans of all row blocks)."""
    metrics: dict[str, float] = {}
    if not plans:
        return {
            "opd/release/accept_rate": 0.0,
            "opd/release/kept_fraction": 1.0,
            "opd/release/gain_defined_rate": 0.0,
            "opd/release/n_sentences": 0.0,
        }
    plan = merge_plans(plans)
    rows = plan.n_valid > 0
    n_rows = int(rows.sum())
    metrics["opd/release/accept_rate"] = float(plan.accepted[rows].float().mean()) if n_rows else 0.0
    kept_frac = plan.n_kept.double() / plan.n_valid.clamp_min(1).double()
    metrics["opd/release/kept_fraction"] = float(kept_frac[rows].mean()) if n_rows else 1.0
    defined = torch.isfinite(plan.gain) & rows
    metrics["opd/release/gain_defined_rate"] = float(defined[rows].float().mean()) if n_rows else 0.0
    if bool(defined.any()):
        metrics["opd/release/gain"] = float(plan.gain[defined].mean())
    metrics["opd/release/n_sentences"] = float(plan.n_sentences[rows].double().mean()) if n_rows else 0.0
    return metrics
