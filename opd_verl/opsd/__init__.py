"""OPSD (on-policy self-distillation, docs/objectives.md section 5): privileged teacher inputs, weights, losses."""

from opd_verl.opsd.inputs import (
    OPSDDataError,
    build_teacher_batch,
    check_solutions,
    check_solutions_in_files,
    fill_template,
    lookup_field,
    privileged_prompt_ids,
)
from opd_verl.opsd.loss import (
    OPSDLossParams,
    opsd_metrics,
    opsd_response_divergences,
    opsd_token_divergence,
    sampled_token_advantages,
    teacher_response_logits,
)
from opd_verl.opsd.teacher import TEACHER_MODES, TeacherWeights, is_peft_model

__all__ = [
    "TEACHER_MODES",
    "OPSDDataError",
    "OPSDLossParams",
    "TeacherWeights",
    "build_teacher_batch",
    "check_solutions",
    "check_solutions_in_files",
    "fill_template",
    "is_peft_model",
    "lookup_field",
    "opsd_metrics",
    "opsd_response_divergences",
    "opsd_token_divergence",
    "privileged_prompt_ids",
    "sampled_token_advantages",
    "teacher_response_logits",
]
