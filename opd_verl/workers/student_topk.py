"""The actor's loss function that also hands veRL the student's top-K ids per token, from the forward it already
runs (the release rule's candidate set; docs/objectives.md section 4 step 1)."""

from __future__ import annotations

import torch

from opd_verl.workers.forward_worker import STUDENT_TOPK_FIELD

__all__ = ["StudentTopKLoss"]


class StudentTopKLoss:
    """Actor loss function that, as veRL's logits processor, also returns the student's top-K ids per token.

    veRL's FSDP engine calls the worker's loss function with ``student_logits`` `(1, nnz, V)` when the micro-batch
    flag ``distillation_use_topk`` is set; each returned `(1, nnz)` tensor is all-gathered over the Ulysses SP group
    (NCCL takes contiguous tensors only) and stored per token with the batch. The ids are returned as K contiguous
    int32 fields (vocabularies are far below 2**31): half the bytes of int64 in TransferQueue. The trainer reads
    them once, in the teacher phase, and leaves them out of the actor update's fields.
    Called as the final loss it delegates to ``inner`` (veRL's ``ppo_loss``), except in the old-log-prob pass
    (flag ``opd_collect_student_topk``), where no loss exists yet and a zero is returned.
    """

    def __init__(self, inner, k: int):
        self.inner = inner
        self.k = int(k)

    def __call__(self, model_output=None, data=None, dp_group=None, student_logits=None):
        from verl.utils import tensordict_utils as tu

        if student_logits is not None:
            ids = torch.topk(student_logits, self.k, dim=-1).indices.to(torch.int32)  # (1, nnz, K)
            ids = ids.transpose(1, 2).contiguous()  # (1, K, nnz): row j is one contiguous (1, nnz) block
            return {STUDENT_TOPK_FIELD.format(j): ids[:, j] for j in range(self.k)}
        if tu.get_non_tensor_data(data=data, key="opd_collect_student_topk", default=False):
            return torch.zeros((), device=student_logits_device(model_output)), {}
        return self.inner(model_output=model_output, data=data, dp_group=dp_group)


def student_logits_device(model_output) -> torch.device:
    for value in (model_output or {}).values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
