"""Forward-only model worker: a teacher (or a reward-correction reference) scoring the student's rollouts.

A Ray worker of veRL's single controller (`verl.single_controller.base.Worker`), built into a `RayWorkerGroup` on
the plugin's own resource pool. It loads one causal LM from a path, shards it with veRL's FSDP2 helper when the
group has more than one rank, keeps no optimizer, and for a batch of (prompt, response) rows returns per response
token, computed from the last hidden states in chunks of positions (`opd_verl.workers.logprobs`):

- ``{prefix}_log_probs``: log-prob of the sampled id;
- ``{prefix}_margins``: the release rule's top-1 minus top-2 margin over the student's top-K ids, when the batch
  carries them (fields ``opd_student_topk_0 .. K-1``, written by the actor's log-prob pass over prompt + response);
- ``{prefix}_candidate_log_probs`` `(n, K)`: the log-probs at those ids, when ``return_candidates`` is set;
- ``{prefix}_topk_ids`` / ``{prefix}_topk_log_probs`` `(n, k)`: its own top-k, when ``own_topk`` > 0;
- ``opd_sentence_ids``: sentence index per response token (release rule), when ``sentences`` is set. The
  segmentation runs here, on the worker that holds the batch shard.

Every output is a jagged nested tensor with one row per sample and the response's length, the layout veRL's v1
trainer keeps in TransferQueue, so the method can be called with a `KVBatchMeta` (veRL's bridge reads the shard
from TransferQueue and writes the outputs back) or with a `TensorDict` holding nested ``prompts`` / ``responses``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from tensordict import TensorDict
from verl.single_controller.base import Worker
from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register

__all__ = ["ForwardOnlyWorker", "MESH_NAME", "STUDENT_TOPK_FIELD", "SENTENCE_FIELD", "forward_worker_config"]

MESH_NAME = "opd_forward"
STUDENT_TOPK_FIELD = "opd_student_topk_{}"
SENTENCE_FIELD = "opd_sentence_ids"


def forward_worker_config(
    model_path: str,
    output_prefix: str,
    chunk_size: int = 1024,
    micro_batch_size: int = 8,
    margin: str | None = None,
    sentences: bool = False,
    split_newlines: bool = True,
    own_topk: int = 0,
    return_candidates: bool = False,
    dtype: str = "auto",
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """The worker's config (a plain dict, so it travels to Ray actors as is).

    Args:
        model_path: local model directory (weights + tokenizer).
        output_prefix: prefix of the output field names, e.g. ``opd_teacher`` or ``opd_ref``.
        chunk_size: positions per log-softmax chunk (peak extra memory ~ chunk_size x vocab float32).
        micro_batch_size: rows per model forward.
        margin: ``prob`` | ``logprob``: compute release margins when the batch carries the student's top-K ids.
        sentences: also compute sentence ids of each response (release rule).
        split_newlines: sentence segmentation also splits at newlines.
        own_topk: return the model's own top-k ids and log-probs (0: no).
        return_candidates: also return the log-probs at the student's top-K ids `(n, K)`.
        dtype: ``auto`` (bfloat16 on an accelerator, float32 on CPU) | ``float32`` | ``bfloat16`` | ``float16``.
        attn_implementation: passed to ``from_pretrained``; None: ``sdpa``.
    """
    if chunk_size < 1 or micro_batch_size < 1:
        raise ValueError(f"chunk_size and micro_batch_size must be >= 1, got {chunk_size} and {micro_batch_size}")
    if margin not in (None, "prob", "logprob"):
        raise ValueError(f"margin must be None, 'prob' or 'logprob', got {margin!r}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return {
        "model_path": model_path,
        "output_prefix": output_prefix,
        "chunk_size": int(chunk_size),
        "micro_batch_size": int(micro_batch_size),
        "margin": margin,
        "sentences": bool(sentences),
        "split_newlines": bool(split_newlines),
        "own_topk": int(own_topk),
        "return_candidates": bool(return_candidates),
        "dtype": dtype,
        "attn_implementation": attn_implementation,
    }


def _nested(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nested.as_nested_tensor(rows, layout=torch.jagged)


def _rows(value) -> list[torch.Tensor]:
    """Per-sample 1-D tensors from a jagged nested tensor, a padded tensor + nothing, or a list."""
    if isinstance(value, torch.Tensor) and value.is_nested:
        return list(value.unbind())
    if isinstance(value, torch.Tensor):
        return list(value)
    return [torch.as_tensor(v) for v in value]


def _scalar(data: TensorDict, key: str, default):
    from verl.utils import tensordict_utils as tu

    value = tu.get_non_tensor_data(data=data, key=key, default=None) if key in data.keys() else None
    if value is None:
        return default
    if isinstance(value, torch.Tensor):
        return value.reshape(-1)[0].item()
    return value


class ForwardOnlyWorker(Worker):
    """One forward-only model per rank of its worker group (see the module docstring)."""

    def __init__(self, config: dict[str, Any]):
        Worker.__init__(self)
        self.config = dict(config)
        self.model = None
        self.tokenizer = None
        self.device = None

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def init_model(self) -> None:
        """Load the model (sharded with FSDP2 over the group when it has several ranks) and its tokenizer."""
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from verl.utils.device import get_device_name

        device_name = get_device_name()
        on_accel = device_name not in ("cpu",) and torch.cuda.is_available()
        self.device = torch.device(device_name if on_accel else "cpu")
        dtype_name = self.config["dtype"]
        if dtype_name == "auto":
            dtype_name = "bfloat16" if on_accel else "float32"
        dtype = getattr(torch, dtype_name)

        if self.world_size > 1 and not torch.distributed.is_initialized():
            from verl.utils.distributed import initialize_global_process_group_ray

            backend = None if on_accel else "cpu:gloo"
            initialize_global_process_group_ray(timeout_second=None, backend=backend)

        path = self.config["model_path"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation=self.config.get("attn_implementation") or "sdpa"
        )
        model.eval()
        model.requires_grad_(False)
        if self.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from verl.utils.fsdp_utils import apply_fsdp2

            model.to(self.device)
            mesh = init_device_mesh(self.device.type, mesh_shape=(self.world_size,), mesh_dim_names=("fsdp",))
            apply_fsdp2(model, {"mesh": mesh, "reshard_after_forward": True}, {})
        else:
            model.to(self.device)
        self.model = model
        self._register_dispatch_collect_info(mesh_name=MESH_NAME, dp_rank=self.rank, is_collect=True)

    def _micro_batches(self, n_rows: int) -> list[slice]:
        size = self.config["micro_batch_size"]
        slices = [slice(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]
        if self.world_size > 1:
            # every rank must run the same number of forwards (FSDP collectives)
            count = torch.tensor([len(slices)], device=self.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            slices += [slice(0, 0)] * (int(count.item()) - len(slices))
        return slices

    def _candidates(self, data: TensorDict, responses: list[torch.Tensor]) -> list[torch.Tensor] | None:
        from verl.workers.utils.padding import response_from_nested

        names = []
        while STUDENT_TOPK_FIELD.format(len(names)) in data.keys():
            names.append(STUDENT_TOPK_FIELD.format(len(names)))
        if not names:
            return None
        resp_mask = _nested([torch.ones(r.numel(), dtype=torch.int64) for r in responses])
        per_k = [_rows(response_from_nested(data[name], resp_mask)) for name in names]
        return [torch.stack([col[i].long() for col in per_k], dim=-1) for i in range(len(responses))]

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name=MESH_NAME))
    def compute_logprobs(self, data: TensorDict) -> TensorDict:
        """Score a shard of rollouts (see the module docstring for the fields in and out)."""
        from opd_verl.objectives.release import topk_margin
        from opd_verl.workers.logprobs import response_logprobs

        cfg = self.config
        prefix = cfg["output_prefix"]
        if "prompts" not in data.keys():  # an empty shard (TransferQueue splits unevenly): keep FSDP ranks in step
            for _ in self._micro_batches(0):
                pad = torch.tensor([self.tokenizer.pad_token_id or 0])
                response_logprobs(self.model, [pad], [pad], chunk_size=cfg["chunk_size"])
            return TensorDict({}, batch_size=[0])
        prompts = [p.reshape(-1).long() for p in _rows(data["prompts"])]
        responses = [r.reshape(-1).long() for r in _rows(data["responses"])]
        n_rows = len(responses)
        temperature = float(_scalar(data, "temperature", 1.0))
        candidates = self._candidates(data, responses) if (cfg["margin"] or cfg["return_candidates"]) else None

        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        logp_rows, margin_rows, cand_rows, topk_id_rows, topk_lp_rows = [], [], [], [], []
        for sl in self._micro_batches(n_rows):
            if sl.stop == sl.start:  # a padding forward that keeps FSDP ranks in step
                dummy = [torch.tensor([pad_id]), torch.tensor([pad_id])]
                response_logprobs(self.model, dummy[:1], dummy[1:], chunk_size=cfg["chunk_size"])
                continue
            out = response_logprobs(
                self.model,
                [p.to(self.device) for p in prompts[sl]],
                [r.to(self.device) for r in responses[sl]],
                candidates=None if candidates is None else [c.to(self.device) for c in candidates[sl]],
                topk=cfg["own_topk"],
                chunk_size=cfg["chunk_size"],
                temperature=temperature,
                pad_token_id=pad_id,
            )
            out = {k: v.cpu() for k, v in out.items()}
            margins = None
            if candidates is not None and cfg["margin"]:
                margins = topk_margin(out["candidate_log_probs"], cfg["margin"]) * out["response_mask"]
            for j, r in enumerate(responses[sl]):
                n = r.numel()
                logp_rows.append(out["log_probs"][j, :n])
                if margins is not None:
                    margin_rows.append(margins[j, :n])
                if candidates is not None and cfg["return_candidates"]:
                    cand_rows.append(out["candidate_log_probs"][j, :n])
                if cfg["own_topk"]:
                    topk_id_rows.append(out["topk_ids"][j, :n])
                    topk_lp_rows.append(out["topk_log_probs"][j, :n])

        fields = {f"{prefix}_log_probs": _nested(logp_rows)}
        if margin_rows:
            fields[f"{prefix}_margins"] = _nested(margin_rows)
        if cand_rows:
            fields[f"{prefix}_candidate_log_probs"] = _nested(cand_rows)
        if topk_id_rows:
            fields[f"{prefix}_topk_ids"] = _nested(topk_id_rows)
            fields[f"{prefix}_topk_log_probs"] = _nested(topk_lp_rows)
        if cfg["sentences"]:
            fields[SENTENCE_FIELD] = _nested(self._sentence_rows(data, responses))
        return TensorDict(fields, batch_size=[n_rows])

    def _sentence_rows(self, data: TensorDict, responses: list[torch.Tensor]) -> list[torch.Tensor]:
        from opd_verl.objectives.sentences import batch_sentence_ids

        if "response_mask" in data.keys():
            masks = [m.reshape(-1).long() for m in _rows(data["response_mask"])]
        else:
            masks = [torch.ones(r.numel(), dtype=torch.int64) for r in responses]
        rows = []
        for r, m in zip(responses, masks, strict=True):
            if r.numel() == 0:
                rows.append(torch.zeros(0, dtype=torch.int64))
                continue
            ids = batch_sentence_ids(r.unsqueeze(0), m.unsqueeze(0), self.tokenizer, self.config["split_newlines"])
            rows.append(ids[0])
        return rows

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def pid(self) -> int:
        """The worker's process id (tests use it to check where a shard ran)."""
        return os.getpid()
