"""Pure-torch on-policy distillation objectives (ALGORITHMS.md). Imports only torch (and nltk for sentences)."""

from opd_verl.objectives.divergences import generalized_jsd, topk_generalized_jsd

__all__ = ["generalized_jsd", "topk_generalized_jsd"]
