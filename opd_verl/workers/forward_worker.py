"""Forward-only model worker: a teacher (or a reward-correction reference) scoring the student's rollouts.

A Ray worker of veRL's single controller (`verl.single_controller.base.Worker`), built into a `RayWorkerGroup` on
the plugin's own resource pool. It loads one causal LM from a path the way veRL's FSDP engine does when the group
has more than one rank (rank 0 reads the weights, the other ranks build the model on the meta device, veRL's
`apply_fsdp2` shards it and `fsdp2_load_full_state_dict` broadcasts rank 0's weights into the shards), keeps no
optimizer, and for a batch of (prompt, response) rows returns per response
token, computed from the last hidden states in chunks of positions (`opd_verl.workers.logprobs`):

- ``{prefix}_log_probs``: log-prob of the sampled id;
- ``{prefix}_margins``: the release rule's top-1 minus top-2 margin over the student's top-K ids, when the batch
  carries them (fields ``opd_student_topk_0 .. K-1``, written by the actor's log-prob pass over prompt + response);
- ``{prefix}_topk_mass``: with the margins, the model's probability mass on those ids (the health diagnostics'
  student/teacher top-K overlap, `opd_verl.health.topk_overlap_mass`);
- ``opd_sentence_ids``: sentence index per response token (release rule), when ``sentences`` is set. The
  segmentation runs here, on the worker that holds the batch shard.

Forwards follow the actor's settings like veRL's reference worker: ``use_remove_padding`` packs the rows of a
forward without padding, ``use_dynamic_bsz`` groups rows into forwards by a token budget (``max_token_len``, veRL's
``log_prob_max_token_len_per_gpu``) with veRL's dynamic-batch helper, otherwise ``micro_batch_size`` rows per
forward. Every rank runs the same number of forwards (FSDP collectives), padding with one-token forwards.

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
# Test-only fault injection (the health alarms' end-to-end test): a teacher worker whose environment sets this to N
# zeroes its output-embedding weights when it scores step N or later (the batch meta carries ``global_step``),
# as a teacher whose weights were lost after an offload/wake cycle would score.
ZERO_TEACHER_FROM_STEP_ENV = "OPD_VERL_TEST_ZERO_TEACHER_FROM_STEP"


def forward_worker_config(
    model_path: str,
    output_prefix: str,
    chunk_size: int = 1024,
    micro_batch_size: int = 8,
    use_remove_padding: bool = True,
    use_dynamic_bsz: bool = True,
    max_token_len: int = 16384,
    margin: str | None = None,
    sentences: bool = False,
    split_newlines: bool = True,
    dtype: str = "auto",
    attn_implementation: str | None = None,
) -> dict[str, Any]:
    """The worker's config (a plain dict, so it travels to Ray actors as is).

    Args:
        model_path: local model directory (weights + tokenizer).
        output_prefix: prefix of the output field names, e.g. ``opd_teacher`` or ``opd_ref``.
        chunk_size: positions per log-softmax chunk (peak extra memory ~ chunk_size x vocab float32).
        micro_batch_size: rows per model forward when ``use_dynamic_bsz`` is off.
        use_remove_padding: pack the rows of a forward without padding (the actor's ``use_remove_padding``).
        use_dynamic_bsz: group rows into forwards of at most ``max_token_len`` tokens (the reference's
            ``log_prob_use_dynamic_bsz``).
        max_token_len: token budget per forward and rank (the reference's ``log_prob_max_token_len_per_gpu``).
        margin: ``prob`` | ``logprob``: compute release margins when the batch carries the student's top-K ids.
        sentences: also compute sentence ids of each response (release rule).
        split_newlines: sentence segmentation also splits at newlines.
        dtype: ``auto`` (bfloat16 on an accelerator, float32 on CPU) | ``float32`` | ``bfloat16`` | ``float16``.
        attn_implementation: passed to ``from_pretrained``; None: ``sdpa``.
    """
    if chunk_size < 1 or micro_batch_size < 1 or max_token_len < 1:
        raise ValueError(
            f"chunk_size, micro_batch_size and max_token_len must be >= 1, got {chunk_size}, {micro_batch_size} "
            f"and {max_token_len}"
        )
    if margin not in (None, "prob", "logprob"):
        raise ValueError(f"margin must be None, 'prob' or 'logprob', got {margin!r}")
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return {
        "model_path": model_path,
        "output_prefix": output_prefix,
        "chunk_size": int(chunk_size),
        "micro_batch_size": int(micro_batch_size),
        "use_remove_padding": bool(use_remove_padding),
        "use_dynamic_bsz": bool(use_dynamic_bsz),
        "max_token_len": int(max_token_len),
        "margin": margin,
        "sentences": bool(sentences),
        "split_newlines": bool(split_newlines),
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


def _local(param: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter; a plain tensor as is."""
    return param.to_local() if hasattr(param, "to_local") else param


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
    def init_model(self) -> dict[str, Any]:
        """Load the model (sharded with FSDP2 over the group when it has several ranks) and its tokenizer.

        Returns where it landed: ``world_size``, ``sharded`` (FSDP2) and the collective ``backend`` (None with one
        rank), for the trainer's start-up line.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
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
        attn = self.config.get("attn_implementation") or "sdpa"
        if self.world_size > 1:
            from torch.distributed.device_mesh import init_device_mesh
            from verl.utils.fsdp_utils import apply_fsdp2, fsdp2_load_full_state_dict, get_init_weight_context_manager

            mesh = init_device_mesh(self.device.type, mesh_shape=(self.world_size,), mesh_dim_names=("fsdp",))
            # as veRL's FSDP engine: weights read on rank 0 only, meta tensors elsewhere (unless tied embeddings)
            hf_config = AutoConfig.from_pretrained(path)
            init_context = get_init_weight_context_manager(
                use_meta_tensor=not getattr(hf_config, "tie_word_embeddings", False), mesh=mesh
            )
            with init_context():
                model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
            model.requires_grad_(False)
            full_state = model.state_dict()
            apply_fsdp2(model, {"mesh": mesh, "reshard_after_forward": True}, {})
            fsdp2_load_full_state_dict(model, full_state, mesh, None)
            del full_state
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn)
            model.to(self.device)
        model.eval()
        model.requires_grad_(False)
        self.model = model
        self._register_dispatch_collect_info(mesh_name=MESH_NAME, dp_rank=self.rank, is_collect=True)
        sharded = self.world_size > 1
        backend = torch.distributed.get_backend() if sharded else None
        return {"world_size": self.world_size, "sharded": sharded, "backend": backend}

    def _forward_groups(self, seq_lens: list[int]) -> list[list[int]]:
        """Row indices of each forward; every rank gets the same count (empty lists pad the short ones)."""
        from opd_verl.workers.logprobs import micro_batches

        cfg = self.config
        if cfg["use_dynamic_bsz"]:
            groups = micro_batches(seq_lens, max_tokens=cfg["max_token_len"])
        else:
            groups = micro_batches(seq_lens, rows_per_batch=cfg["micro_batch_size"])
        if self.world_size > 1:
            # every rank must run the same number of forwards (FSDP collectives)
            count = torch.tensor([len(groups)], device=self.device)
            torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
            groups += [[] for _ in range(int(count.item()) - len(groups))]
        return groups

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
        from opd_verl.health import topk_overlap_mass
        from opd_verl.objectives.release import topk_margin
        from opd_verl.workers.logprobs import response_logprobs

        cfg = self.config
        prefix = cfg["output_prefix"]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        if "prompts" in data.keys():
            prompts = [p.reshape(-1).long() for p in _rows(data["prompts"])]
            responses = [r.reshape(-1).long() for r in _rows(data["responses"])]
        else:  # an empty shard (TransferQueue splits unevenly): only keep FSDP ranks in step
            prompts, responses = [], []
        n_rows = len(responses)
        temperature = float(_scalar(data, "temperature", 1.0)) if n_rows else 1.0
        self._inject_fault(data)
        candidates = self._candidates(data, responses) if n_rows and cfg["margin"] else None

        scored = [i for i in range(n_rows) if responses[i].numel()]  # an empty response needs no forward
        per_row: dict[str, list[torch.Tensor | None]] = {}
        for group in self._forward_groups([prompts[i].numel() + responses[i].numel() for i in scored]):
            rows = [scored[j] for j in group]
            if not rows:  # a padding forward that keeps FSDP ranks in step
                pad = [torch.tensor([pad_id], device=self.device)]
                response_logprobs(self.model, pad, pad, chunk_size=cfg["chunk_size"], max_tokens=None)
                continue
            out = response_logprobs(
                self.model,
                [prompts[i].to(self.device) for i in rows],
                [responses[i].to(self.device) for i in rows],
                candidates=None if candidates is None else [candidates[i].to(self.device) for i in rows],
                chunk_size=cfg["chunk_size"],
                temperature=temperature,
                pad_token_id=pad_id,
                max_tokens=None,  # the group is one forward
                packed=cfg["use_remove_padding"],
            )
            out = {k: v.cpu() for k, v in out.items()}
            if candidates is not None:
                out["margins"] = topk_margin(out["candidate_log_probs"], cfg["margin"]) * out["response_mask"]
                out["topk_mass"] = topk_overlap_mass(out["candidate_log_probs"]) * out["response_mask"]
            for j, i in enumerate(rows):
                for key, value in out.items():
                    per_row.setdefault(key, [None] * n_rows)[i] = value[j, : responses[i].numel()]

        def column(key: str, like: tuple[int, ...], dtype) -> torch.Tensor:
            got = per_row.get(key, [None] * n_rows)
            return _nested([g if g is not None else torch.zeros((0, *like), dtype=dtype) for g in got])

        if not n_rows:
            return TensorDict({}, batch_size=[0])
        fields = {f"{prefix}_log_probs": column("log_probs", (), torch.float32)}
        if candidates is not None:
            fields[f"{prefix}_margins"] = column("margins", (), torch.float32)
            fields[f"{prefix}_topk_mass"] = column("topk_mass", (), torch.float32)
        if cfg["sentences"]:
            fields[SENTENCE_FIELD] = _nested(self._sentence_rows(data, responses))
        return TensorDict(fields, batch_size=[n_rows])

    def _inject_fault(self, data: TensorDict) -> None:
        start = os.environ.get(ZERO_TEACHER_FROM_STEP_ENV)
        step = _scalar(data, "global_step", None)
        if start and step is not None and int(step) >= int(start) and self.config["output_prefix"] == "opd_teacher":
            with torch.no_grad():
                self.model.get_output_embeddings().weight.zero_()

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
    def offload_params(self) -> dict[str, int] | None:
        """Move this rank's parameters (its FSDP2 shard) to CPU memory and free the device cache (veRL's helper).

        Returns, on CUDA, this process's ``torch.cuda.memory_allocated`` before and after (``allocated_before``,
        ``allocated_after``) and the bytes of its parameter shard (``param_bytes``), so the trainer can log what
        the offload freed; None on a CPU run, where the parameters already live in host memory.
        """
        from verl.utils.fsdp_utils import offload_fsdp_model_to_cpu

        if self.device.type == "cpu":
            return None
        measured = self.device.type == "cuda"
        if measured:
            before = torch.cuda.memory_allocated(self.device)
            param_bytes = sum(_local(p).numel() * p.element_size() for p in self.model.parameters())
        offload_fsdp_model_to_cpu(self.model)
        if not measured:
            return None
        torch.cuda.synchronize(self.device)  # the device-to-host copies are asynchronous
        after = torch.cuda.memory_allocated(self.device)
        return {"allocated_before": int(before), "allocated_after": int(after), "param_bytes": int(param_bytes)}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def load_params(self) -> None:
        """Bring the parameters back to this rank's device after `offload_params` (veRL's helper)."""
        from verl.utils.fsdp_utils import load_fsdp_model_to_gpu

        if self.device.type != "cpu":
            load_fsdp_model_to_gpu(self.model)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def pid(self) -> int:
        """The worker's process id (tests use it to check where a shard ran)."""
        return os.getpid()
