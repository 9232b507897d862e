"""Pure-torch on-policy distillation objectives (docs/objectives.md). Imports only torch (and nltk for sentences)."""

from opd_verl.objectives.compose import (
    ADVANTAGE_SIGNALS,
    SIGNAL_NAMES,
    WEIGHTING_NAMES,
    ReleaseParams,
    SignalParams,
    StageParams,
    WeightingParams,
    compose_advantages,
)
from opd_verl.objectives.divergences import generalized_jsd, topk_generalized_jsd
from opd_verl.objectives.release import (
    MARGIN_KINDS,
    ReleaseResult,
    apply_release,
    release,
    release_change_point,
    topk_margin,
)
from opd_verl.objectives.sentences import batch_sentence_ids, sentence_spans, token_sentence_ids
from opd_verl.objectives.signals import discrepancy, gopd_advantages, opd_advantages
from opd_verl.objectives.weighting import (
    POSITION_MODES,
    cosine_fraction,
    iw_opd_advantages,
    iw_opd_weights,
    position_decile_means,
    position_mask_weights,
)

__all__ = [
    "ADVANTAGE_SIGNALS",
    "MARGIN_KINDS",
    "POSITION_MODES",
    "SIGNAL_NAMES",
    "WEIGHTING_NAMES",
    "ReleaseParams",
    "ReleaseResult",
    "SignalParams",
    "StageParams",
    "WeightingParams",
    "apply_release",
    "batch_sentence_ids",
    "compose_advantages",
    "cosine_fraction",
    "discrepancy",
    "generalized_jsd",
    "gopd_advantages",
    "iw_opd_advantages",
    "iw_opd_weights",
    "opd_advantages",
    "position_decile_means",
    "position_mask_weights",
    "release",
    "release_change_point",
    "sentence_spans",
    "token_sentence_ids",
    "topk_generalized_jsd",
    "topk_margin",
]
