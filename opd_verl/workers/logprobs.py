"""Log-probs from last hidden states, computed over chunks of positions (DESIGN.md "Teacher log-probs at scale").

A model's logits for one long response are `[L, V]`; in float32 at L=16k and V=152k that is ~9.7 GB. The functions
here project `chunk_size` positions at a time through the output embedding, take the float32 log-softmax of that
chunk only, gather what is asked for and drop the chunk, so the extra memory is O(chunk_size x V) whatever L is.

Per chunk the logits go into one reused float32 buffer; a log-prob is the gathered logit minus the row's
logsumexp, so the full log-softmax of the chunk is never written either.

What can be gathered per position (all float32 log-probs):

- the log-prob of a given label id (the token the student sampled): `[N]`;
- the log-probs at given candidate ids (e.g. the student's top-K): `[N, K]`;
- the model's own top-k ids `[N, k]` (int64) and their log-probs `[N, k]`.

`response_logprobs` runs a causal LM backbone on right-padded (prompt, response) rows and returns the same
quantities for the response tokens only, `[B, T]` padded with 0 (ids with 0 too) past each response.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["backbone_hidden_states", "chunked_logprobs", "output_projection", "response_logprobs"]


def chunked_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    topk: int = 0,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    bias: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Gather log-probs from hidden states through an output projection, chunk by chunk.

    Args:
        hidden: `(N, H)` last hidden states (any float dtype; the projection runs in that dtype, the
            log-softmax in float32).
        weight: `(V, H)` output embedding (``lm_head.weight``).
        labels: `(N,)` int ids whose log-prob is returned as ``log_probs``; optional.
        candidates: `(N, K)` int ids whose log-probs are returned as ``candidate_log_probs``; optional.
        topk: if > 0, also return the model's own ``topk_ids`` `(N, topk)` and ``topk_log_probs`` `(N, topk)`.
        chunk_size: positions per chunk (peak extra memory ~ chunk_size x V float32).
        temperature: logits are divided by it before the log-softmax (veRL's convention for log-probs).
        bias: `(V,)` output bias, if the model has one.

    Returns:
        dict with the requested entries, float32 log-probs (int64 ids), on ``hidden``'s device.
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be (N, H), got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must be (V, H={hidden.shape[1]}), got shape {tuple(weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not (temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, vocab = hidden.shape[0], weight.shape[0]
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"labels must be ({n},), got {tuple(labels.shape)}")
    if candidates is not None and (candidates.dim() != 2 or candidates.shape[0] != n):
        raise ValueError(f"candidates must be ({n}, K), got {tuple(candidates.shape)}")
    if topk < 0 or topk > vocab:
        raise ValueError(f"topk must be in [0, {vocab}], got {topk}")

    device = hidden.device
    out: dict[str, torch.Tensor] = {}
    if labels is not None:
        out["log_probs"] = torch.empty(n, dtype=torch.float32, device=device)
    if candidates is not None:
        out["candidate_log_probs"] = torch.empty(candidates.shape, dtype=torch.float32, device=device)
    if topk > 0:
        out["topk_ids"] = torch.empty((n, topk), dtype=torch.int64, device=device)
        out["topk_log_probs"] = torch.empty((n, topk), dtype=torch.float32, device=device)

    # one float32 logits buffer reused by every chunk; log-probs are gathered logits minus the row's logsumexp,
    # so no second [chunk, V] tensor (the log-softmax) is ever written
    buf = torch.empty((min(chunk_size, n), vocab), dtype=torch.float32, device=device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        logits = buf[: end - start]
        if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
            torch.mm(hidden[start:end], weight.t(), out=logits)
            if bias is not None:
                logits.add_(bias.float())
        else:
            logits.copy_(torch.nn.functional.linear(hidden[start:end], weight, bias))
        if temperature != 1.0:
            logits.div_(temperature)
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (m, 1)
        if labels is not None:
            picked = logits.gather(-1, labels[start:end].long().unsqueeze(-1))
            out["log_probs"][start:end] = (picked - lse).squeeze(-1)
        if candidates is not None:
            out["candidate_log_probs"][start:end] = logits.gather(-1, candidates[start:end].long()) - lse
        if topk > 0:
            values, ids = torch.topk(logits, topk, dim=-1)
            out["topk_ids"][start:end] = ids
            out["topk_log_probs"][start:end] = values - lse
    return out


def output_projection(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The `(V, H)` output embedding weight (and bias) of a Hugging Face causal LM, gathered if sharded (DTensor)."""
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (get_output_embeddings() is None)")
    weight, bias = head.weight, getattr(head, "bias", None)
    if hasattr(weight, "full_tensor"):
        weight = weight.full_tensor()
    if bias is not None and hasattr(bias, "full_tensor"):
        bias = bias.full_tensor()
    return weight, bias


def _check_plain_head(model: torch.nn.Module) -> None:
    cfg = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        value = getattr(cfg, attr, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"{type(model).__name__} applies config.{attr}={value} to its logits; log-probs from hidden states "
                "would differ from its own, so this model is not supported by the forward-only worker"
            )


def backbone_hidden_states(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """`(B, S, H)` last hidden states of a causal LM (after its final norm), without computing `(B, S, V)` logits.

    The model's own forward runs (so FSDP2 unshards and reshards its root parameters as usual) with
    ``logits_to_keep=1``; the backbone's output is captured with a forward hook on ``model.base_model``.
    """
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

    handle = model.base_model.register_forward_hook(hook)
    try:
        model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            logits_to_keep=1,
        )
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one backbone output from {type(model).__name__}, got {len(captured)}")
    return captured[0]


@torch.no_grad()
def response_logprobs(
    model: torch.nn.Module,
    prompts: Sequence[torch.Tensor],
    responses: Sequence[torch.Tensor],
    candidates: Sequence[torch.Tensor] | None = None,
    topk: int = 0,
    chunk_size: int = 1024,
    temperature: float = 1.0,
    pad_token_id: int = 0,
) -> dict[str, torch.Tensor]:
    """Per-response-token log-probs of a causal LM for a batch of (prompt, response) pairs.

    The model runs once on the right-padded rows (no full logits); only response positions are projected.

    Args:
        model: a Hugging Face causal LM (``get_output_embeddings()`` and ``base_model``).
        prompts: B 1-D int tensors (prompt ids, no padding).
        responses: B 1-D int tensors (response ids, no padding; may be empty).
        candidates: B tensors `(len(response_b), K)` of candidate ids per response token; optional.
        topk: own top-k to return (0: none).
        chunk_size: positions per log-softmax chunk.
        temperature: logits divisor.
        pad_token_id: id used for padding the backbone input (masked out by the attention mask).

    Returns:
        ``log_probs`` `(B, T)` of the response tokens (T = longest response), ``response_mask`` `(B, T)` int64;
        ``candidate_log_probs`` `(B, T, K)` if candidates are given; ``topk_ids`` `(B, T, k)` int64 and
        ``topk_log_probs`` `(B, T, k)` if topk > 0. Every entry is 0 past a response's end.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts and {len(responses)} responses")
    if candidates is not None and len(candidates) != len(responses):
        raise ValueError(f"got {len(candidates)} candidate tensors for {len(responses)} responses")
    _check_plain_head(model)
    device = next(model.parameters()).device
    bsz = len(prompts)
    resp_lens = [int(r.numel()) for r in responses]
    t_max = max(resp_lens, default=0)
    seq_lens = [int(p.numel()) + n for p, n in zip(prompts, resp_lens, strict=True)]
    width = max(seq_lens, default=0)

    input_ids = torch.full((bsz, width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((bsz, width), dtype=torch.long, device=device)
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        row = torch.cat([p.reshape(-1).long(), r.reshape(-1).long()]).to(device)
        input_ids[i, : row.numel()] = row
        attention_mask[i, : row.numel()] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)

    out: dict[str, torch.Tensor] = {
        "log_probs": torch.zeros((bsz, t_max), dtype=torch.float32, device=device),
        "response_mask": torch.zeros((bsz, t_max), dtype=torch.int64, device=device),
    }
    k_cand = None
    if candidates is not None:
        k_cand = max((int(c.shape[-1]) for c in candidates if c.dim() == 2), default=0)
        out["candidate_log_probs"] = torch.zeros((bsz, t_max, k_cand), dtype=torch.float32, device=device)
    if topk > 0:
        out["topk_ids"] = torch.zeros((bsz, t_max, topk), dtype=torch.int64, device=device)
        out["topk_log_probs"] = torch.zeros((bsz, t_max, topk), dtype=torch.float32, device=device)
    if t_max == 0:
        return out

    hidden = backbone_hidden_states(model, input_ids, attention_mask, position_ids)  # (B, S, H)
    weight, bias = output_projection(model)

    # positions predicting response token j of row i: prompt_len + j - 1
    rows, cols, dst = [], [], []
    for i, (p, n) in enumerate(zip(prompts, resp_lens, strict=True)):
        start = int(p.numel()) - 1
        if n and start < 0:
            raise ValueError(f"row {i}: a response needs a non-empty prompt (no position predicts its first token)")
        rows += [i] * n
        cols += list(range(start, start + n))
        dst += list(range(n))
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.tensor(cols, dtype=torch.long, device=device)
    dst_t = torch.tensor(dst, dtype=torch.long, device=device)
    flat_hidden = hidden[rows_t, cols_t]  # (nnz, H)
    del hidden
    labels = torch.cat([r.reshape(-1).long() for r in responses]).to(device)
    cand_flat = None
    if candidates is not None:
        cand_flat = torch.cat([c.reshape(n, -1).long() for c, n in zip(candidates, resp_lens, strict=True)]).to(device)
        if cand_flat.shape[-1] != k_cand:
            raise ValueError("every candidates tensor must have the same K")
    got = chunked_logprobs(
        flat_hidden,
        weight.to(flat_hidden.dtype),
        labels=labels,
        candidates=cand_flat,
        topk=topk,
        chunk_size=chunk_size,
        temperature=temperature,
        bias=None if bias is None else bias.to(flat_hidden.dtype),
    )
    out["log_probs"][rows_t, dst_t] = got["log_probs"]
    out["response_mask"][rows_t, dst_t] = 1
    if candidates is not None:
        out["candidate_log_probs"][rows_t, dst_t] = got["candidate_log_probs"]
    if topk > 0:
        out["topk_ids"][rows_t, dst_t] = got["topk_ids"]
        out["topk_log_probs"][rows_t, dst_t] = got["topk_log_probs"]
    return out
