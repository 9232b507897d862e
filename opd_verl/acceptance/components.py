"""Check 3: the GPU-sensitive components, each against an independent computation, without Ray.

Each check runs on ``device`` ("cuda": bfloat16 with flash-attention where the trainer uses it; "cpu": the same
code with float32 and SDPA, at reduced sizes where noted) and returns its figure; a figure outside its bound raises
:class:`~opd_verl.acceptance.report.CheckFailed`.

- :func:`teacher_logprobs`: the teacher worker's log-probs of response tokens (`opd_verl.workers.logprobs`), on
  rows of mixed length padded, packed (veRL's remove-padding layout: one row, position ids restarting per
  sequence) and packed under a token budget, against log-softmax of the full HF logits of each row alone.
- :func:`logprob_memory`: the memory of scoring one long row (16k tokens at vocabulary 152k on CUDA) within the
  bound of docs/teachers.md (one `[chunk, V]` float32 buffer and one projection of a chunk beyond the backbone).
- :func:`student_topk_hook`: the student top-K hook (the release rule's logits processor) on packed rows against
  `torch.topk` of each row's own logits.
- :func:`opsd_lora_step`: one OPSD LoRA step through the actor loss in veRL's calling convention: finite loss,
  gradients only in the adapter, base weights unchanged by the optimizer step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from opd_verl.acceptance.report import CheckFailed
from opd_verl.demo import task
from opd_verl.opsd.loss import OPSDLossParams
from opd_verl.opsd.teacher import TeacherWeights
from opd_verl.workers.logprobs import backbone_hidden_states, response_logprobs
from opd_verl.workers.opsd_actor import OPSDActorLoss, OPSDSettings
from opd_verl.workers.student_topk import StudentTopKLoss

__all__ = [
    "attn_for",
    "logprob_memory",
    "mixed_rows",
    "opsd_lora_step",
    "packed_inputs",
    "student_topk_hook",
    "teacher_logprobs",
]

# (prompt length, response length) per row: lengths that differ, a 1-token response, a long one
ROW_SHAPES = ((7, 40), (23, 5), (3, 96), (12, 1), (40, 33))
TOPK = 8
CHUNK = 16  # log-prob chunk in the row checks: several chunks per batch, one ending mid-row
BUDGET = 100  # tokens per forward in the budgeted layout: the 5 rows (13 to 99 tokens) need 3 or more forwards


def attn_for(device: str, dtype: torch.dtype) -> str:
    """flash-attention 2 for half precision on CUDA (what the trainer runs), SDPA otherwise (flash-attn has no fp32)."""
    return "flash_attention_2" if device == "cuda" and dtype in (torch.bfloat16, torch.float16) else "sdpa"


def mixed_rows(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompts and responses of :data:`ROW_SHAPES` with byte-token ids (the demo tokenizer's 0..255)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 256, (p,), generator=g) for p, _ in ROW_SHAPES]
    responses = [torch.randint(0, 256, (r,), generator=g) for _, r in ROW_SHAPES]
    return prompts, responses


def packed_inputs(seqs: list[torch.Tensor], device) -> tuple[torch.Tensor, torch.Tensor]:
    """veRL's remove-padding layout: ids `(1, nnz)` and position ids `(1, nnz)` restarting at 0 per sequence.

    transformers separates the sequences from the restarting position ids only when the forward has no attention
    mask and no cache: call the model with ``use_cache=False``, as veRL does.
    """
    ids = torch.cat([s.reshape(-1) for s in seqs]).to(device)[None]
    pos = torch.cat([torch.arange(s.numel()) for s in seqs]).to(device)[None]
    return ids, pos


def _load(path: str, device: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_for(device, dtype))
    return model.to(device).eval()


@torch.no_grad()
def _reference_logprobs(model, prompts, responses, device) -> list[torch.Tensor]:
    """Per row alone (no padding, no packing): float32 log-softmax of the full HF logits at the response tokens."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        ids = torch.cat([p, r]).to(device)[None]
        logits = model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits[p.numel() - 1 : -1], dim=-1)
        out.append(lp.gather(-1, r.to(device)[:, None]).squeeze(-1))
    return out


@torch.no_grad()
def teacher_logprobs(teacher_path: str, device: str) -> str:
    """The teacher worker's log-probs (`response_logprobs`) vs the full-logits reference, in three layouts: rows
    right-padded in one forward, packed in one forward, and packed in forwards of at most `BUDGET` tokens (veRL's
    dynamic-batch grouping, as with ``use_dynamic_bsz``); bfloat16 and float32. Figure: the max errors.

    Bounds: 1e-3 in float32; 0.08 in bfloat16 (the backbone of a padded or packed batch and of a row alone round
    differently in bfloat16; log-probs of this model are about -5.6).
    """
    from transformers import AutoTokenizer

    pad_token_id = AutoTokenizer.from_pretrained(teacher_path).pad_token_id
    prompts, responses = mixed_rows()
    layouts = {"padded": {"packed": False}, "packed": {"packed": True}, f"budget {BUDGET}": {"max_tokens": BUDGET}}
    figures, errors = [], []
    for dtype, bound in ((torch.bfloat16, 0.08), (torch.float32, 1e-3)):
        model = _load(teacher_path, device, dtype)
        ref = torch.cat(_reference_logprobs(model, prompts, responses, device))
        if not torch.isfinite(ref).all():
            raise CheckFailed(f"{dtype}: reference log-probs are not finite")
        errs = {}
        for layout, kwargs in layouts.items():
            out = response_logprobs(
                model,
                [p.to(device) for p in prompts],
                [r.to(device) for r in responses],
                chunk_size=CHUNK,
                pad_token_id=pad_token_id,
                **{"max_tokens": None, **kwargs},
            )
            errs[layout] = float((out["log_probs"][out["response_mask"].bool()] - ref).abs().max())
        name = str(dtype).replace("torch.", "")
        shown = ", ".join(f"{k} {v:.1e}" for k, v in errs.items())
        figures.append(f"{name} ({attn_for(device, dtype)}) max err {shown}")
        if not all(e <= bound for e in errs.values()):
            errors.append(f"{name}: max error {shown} > {bound}")
        del model
    figure = f"{sum(r.numel() for r in responses)} tokens in {len(responses)} rows; " + "; ".join(figures)
    if errors:
        raise CheckFailed("; ".join(errors) + f" ({figure})")
    return figure


def logprob_memory(device: str, length: int, vocab: int, chunk: int, timeout_s: int = 300) -> str:
    """Peak memory of scoring one `length`-token row at vocabulary `vocab`, in a fresh process; figure: GiB.

    The bound (docs/teachers.md): the backbone's own peak (measured on the same row) plus one `[chunk, V]` float32
    buffer, one `[chunk, V]` projection in the model's dtype, and the row's gathered hidden states and outputs.
    """
    cmd = [
        sys.executable,
        "-m",
        "opd_verl.acceptance.components",
        "memory",
        device,
        str(length),
        str(vocab),
        str(chunk),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=dict(os.environ))
    if proc.returncode != 0:
        raise CheckFailed(f"memory probe failed (rc {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    gib = 2**30
    figure = (
        f"L={length} V={vocab} chunk={chunk}: peak {m['total'] / gib:.2f} GiB (backbone {m['backbone'] / gib:.2f}), "
        f"bound {m['bound'] / gib:.2f} GiB; full fp32 logits would be {length * vocab * 4 / gib:.1f} GiB"
    )
    if m["total"] > m["bound"]:
        raise CheckFailed(f"memory above the bound: {figure}")
    return figure


def _rss_rise(fn) -> int:
    """Peak rise of this process's resident memory while `fn` runs (sampled every millisecond), bytes.

    Freed heap is returned to the system first (``malloc_trim``), so the baseline is what is live.
    """
    import ctypes
    import threading
    import time

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - base


def _memory_probe(device: str, length: int, vocab: int, chunk: int) -> dict:
    """Runs in its own process (see :func:`logprob_memory`); bytes above the baseline after the inputs exist."""

    from transformers import Qwen3ForCausalLM

    from opd_verl.acceptance.models import TEACHER, ModelSpec, qwen3_config

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    spec = ModelSpec(TEACHER.hidden_size, 1, TEACHER.num_heads, TEACHER.num_kv_heads, False, 0)
    cfg = qwen3_config(vocab, spec, 1, 0, length + 16)
    cfg._attn_implementation = attn_for(device, dtype)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).to(dtype).to(device).eval()
    prompt = torch.randint(0, vocab, (16,), device=device)
    response = torch.randint(0, vocab, (length - 16,), device=device)
    ids = torch.cat([prompt, response])[None]
    ones = torch.ones_like(ids)
    pos = torch.arange(length, device=device)[None]
    with torch.no_grad():
        response_logprobs(model, [prompt], [response[:8]], chunk_size=chunk)  # warm-up: kernels, allocator

        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            backbone_hidden_states(model, ids, ones, pos)
            backbone = torch.cuda.max_memory_allocated() - base
            torch.cuda.reset_peak_memory_stats()
            response_logprobs(model, [prompt], [response], chunk_size=chunk)
            total = torch.cuda.max_memory_allocated() - base
        else:
            backbone = _rss_rise(lambda: backbone_hidden_states(model, ids, ones, pos))
            total = _rss_rise(lambda: response_logprobs(model, [prompt], [response], chunk_size=chunk))
    elt = torch.finfo(dtype).bits // 8
    n = length - 16
    bound = backbone + chunk * vocab * (4 + elt) + n * cfg.hidden_size * elt * 2 + n * 64 + 64 * 2**20
    return {"backbone": backbone, "total": total, "bound": bound}


def student_topk_hook(student_path: str, device: str, temperature: float = 0.7) -> str:
    """The top-K hook's ids on packed rows vs `torch.topk` of each row's own logits; figure: agreement and gap.

    Near-ties may order differently in bfloat16, so the bound is on values: the reference logits at the hook's ids,
    sorted, must equal the reference top-K values within 1e-4 (float32) / 0.05 (bfloat16, logits / temperature).
    """
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bound = 0.05 if dtype == torch.bfloat16 else 1e-4
    model = _load(student_path, device, dtype)
    prompts, responses = mixed_rows(seed=1)
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    ids, pos = packed_inputs(seqs, device)
    with torch.no_grad():
        logits = (
            model(input_ids=ids, position_ids=pos, use_cache=False).logits / temperature
        )  # (1, nnz, V), as veRL hands it over
        out = StudentTopKLoss(inner=None, k=TOPK)(student_logits=logits, data=None)
        hook_ids = torch.stack([out[f"opd_student_topk_{j}"] for j in range(TOPK)], dim=-1)[0]  # (nnz, K)
        ref = torch.cat([model(input_ids=s.to(device)[None]).logits[0] for s in seqs]).float() / temperature
    ref_vals, ref_ids = torch.topk(ref, TOPK, dim=-1)
    at_hook = ref.gather(-1, hook_ids.long()).sort(dim=-1, descending=True).values
    gap = float((at_hook - ref_vals).abs().max())
    same = float((hook_ids.sort(-1).values == ref_ids.sort(-1).values).all(-1).float().mean())
    figure = (
        f"{hook_ids.shape[0]} packed positions, K={TOPK}, {attn_for(device, dtype)} "
        f"{str(dtype).replace('torch.', '')}: same id set {same:.1%}, max value gap {gap:.1e}"
    )
    if hook_ids.shape != (sum(s.numel() for s in seqs), TOPK) or not gap <= bound:
        raise CheckFailed(f"top-K ids differ from torch.topk beyond {bound}: {figure}")
    return figure


def _opsd_settings():
    from importlib.resources import files

    from omegaconf import OmegaConf

    section = OmegaConf.load(str(files("opd_verl.hydra_configs") / "opd_trainer.yaml")).opd.opsd
    return OPSDSettings(
        problem_key=section.problem_key,
        solution_key=section.solution_key,
        missing_solution="error",
        teacher_template=section.teacher_template,
    )


def opsd_lora_step(student_path: str, device: str) -> str:
    """One OPSD step (full-vocabulary GJSD, frozen teacher = adapter off) on a LoRA student, as veRL's engine calls
    the actor loss: packed logits / rollout temperature -> logits processor -> loss -> backward -> AdamW step.
    Figure: the loss, adapter gradient norm, base weights touched."""
    from types import SimpleNamespace

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from verl.utils import tensordict_utils as tu

    tokenizer = AutoTokenizer.from_pretrained(student_path)
    base = AutoModelForCausalLM.from_pretrained(
        student_path, dtype=torch.float32, attn_implementation=attn_for(device, torch.bfloat16)
    ).to(device)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    teacher = TeacherWeights(model, "frozen")
    params = OPSDLossParams(loss="full", beta=0.0, temperature=1.1, pointwise_clip=0.05, chunk_size=64)
    actor_cfg = SimpleNamespace(loss_agg_mode="token-mean", global_batch_info={}, loss_scale_factor=None)
    loss_fn = OPSDActorLoss(model, teacher, params, tokenizer, _opsd_settings(), actor_cfg)

    problems = task.make_problems(3, 1, 2, seed=3)
    rows = task.make_rows(problems, "train")
    g = torch.Generator().manual_seed(4)
    texts = [tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=False) for r in rows]
    prompts = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    responses = [torch.randint(0, 256, (n,), generator=g) for n in (9, 3, 17)]
    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    nested = lambda xs: torch.nested.as_nested_tensor([x.to(device) for x in xs], layout=torch.jagged)  # noqa: E731
    rollout_t = 1.0
    td = tu.get_tensordict(
        {
            "input_ids": nested(seqs),
            "prompts": nested(prompts),
            "responses": nested(responses),
            "response_mask": nested([torch.ones(r.numel(), dtype=torch.long) for r in responses]),
            "old_log_probs": nested([torch.full((r.numel(),), -5.0) for r in responses]),
            "advantages": nested([torch.zeros(r.numel()) for r in responses]),
            "extra_info": [r["extra_info"] for r in rows],
        },
        non_tensor_dict={"dp_size": 1, "batch_num_tokens": None, "global_batch_size": None, "temperature": rollout_t},
    )
    ids, pos = packed_inputs(seqs, device)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    )
    with autocast:
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float() / rollout_t  # (1, nnz, V)
        outputs = loss_fn(student_logits=logits, data=td)
        cu = td["input_ids"].offsets()
        model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu) for k, v in outputs.items()}
        rolled = torch.cat([torch.roll(s, -1) for s in seqs]).to(device)
        log_probs = torch.log_softmax(logits[0], -1).gather(-1, rolled[:, None]).squeeze(-1)
        model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(log_probs, cu)
        loss, metrics = loss_fn(model_output=model_output, data=td, dp_group=None)
    if not torch.isfinite(loss):
        raise CheckFailed(f"OPSD loss is not finite: {float(loss)}")
    loss.backward()
    adapter = {n: p for n, p in model.named_parameters() if "lora_" in n}
    others = {n: p for n, p in model.named_parameters() if "lora_" not in n}
    with_grad = [n for n, p in others.items() if p.grad is not None and bool(p.grad.abs().sum() > 0)]
    if with_grad or any(p.requires_grad for p in others.values()):
        raise CheckFailed(f"gradients outside the LoRA adapter: {with_grad[:3] or 'base weights require grad'}")
    grads = [p.grad for p in adapter.values() if p.grad is not None]
    grad_norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
    if not grads or not (grad_norm > 0 and torch.isfinite(torch.tensor(grad_norm))):
        raise CheckFailed(f"no finite non-zero adapter gradient (norm {grad_norm})")
    torch.optim.AdamW([p for p in adapter.values()], lr=1e-3).step()
    moved_base = [n for n, p in others.items() if not torch.equal(p.detach(), before[n])]
    moved_adapter = sum(not torch.equal(p.detach(), before[n]) for n, p in adapter.items())
    if moved_base or moved_adapter == 0:
        raise CheckFailed(f"the step changed base weights {moved_base[:3]} / {moved_adapter} adapter tensors")
    return (
        f"loss {float(loss):.4f} (teacher adapter off: {metrics.get('opsd/teacher_adapter_off')}), adapter grad norm "
        f"{grad_norm:.2e} in {len(grads)} tensors, {moved_adapter} adapter tensors stepped, 0 of {len(others)} base "
        "tensors changed"
    )


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "memory":
    print(json.dumps(_memory_probe(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))))
