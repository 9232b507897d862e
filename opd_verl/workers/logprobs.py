"""Log-probs from last hidden states, computed over chunks of positions (DESIGN.md "Teacher log-probs at scale").

A model's logits for one long response are `[L, V]`; in float32 at L=16k and V=152k that is ~9.7 GB. The functions
here project `chunk_size` positions at a time through the output embedding, take the float32 log-softmax of that
chunk only, gather what is asked for and drop the chunk, so the extra memory is O(chunk_size x V) whatever L is.

Per chunk the logits go into one reused float32 buffer; a log-prob is the gathered logit minus the row's
logsumexp, so the full log-softmax of the chunk is never written either. With a bf16/fp16 model the output
projection accumulates in float32 and its result stays float32 (never rounded to bf16 before the log-softmax).

What can be gathered per position (all float32 log-probs):

- the log-prob of a given label id (the token the student sampled): `[N]`;
- the log-probs at given candidate ids (e.g. the student's top-K): `[N, K]`;
- the model's own top-k ids `[N, k]` (int64) and their log-probs `[N, k]`.

`response_logprobs` runs a causal LM backbone on (prompt, response) rows and returns the same quantities for the
response tokens only, `[B, T]` padded with 0 (ids with 0 too) past each response. By default the rows of a forward
are packed into one sequence without padding (position ids restart at every row, so attention stays inside each
row: flash-attention varlen on GPU, the packed-sequence mask transformers builds from the position ids with sdpa
or eager attention), and rows are grouped into forwards by a token budget with veRL's dynamic-batch helper
(`verl.utils.seqlen_balancing.rearrange_micro_batches`), so memory follows the budget, not the longest row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "backbone_hidden_states",
    "chunked_logprobs",
    "micro_batches",
    "output_projection",
    "response_logprobs",
]

# tokens per forward when none is given: veRL's default `log_prob_max_token_len_per_gpu`
DEFAULT_MAX_TOKENS = 16384
# vocabulary rows upcast at a time when a low-precision projection must accumulate in float32 on CPU
_VOCAB_BLOCK = 8192


def _mm_out_dtype(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """``out = hidden @ weight.T`` with float32 accumulation and output; False where torch has no such kernel."""
    try:
        torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
    except (RuntimeError, TypeError, NotImplementedError):  # torch < 2.8, or no kernel for this dtype/device
        return False
    return True


def _project_into(out: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """``out (m, V) float32 = hidden (m, H) @ weight (V, H).T + bias``, accumulated and stored in float32.

    A float32 model is one matmul into ``out``. A low-precision model on CUDA uses the matmul's float32 output
    (``out_dtype``: bf16 inputs, float32 accumulation and result, no upcast weight copy); elsewhere the weight is
    upcast in blocks of ``_VOCAB_BLOCK`` rows, so the extra memory stays O(block x H).
    """
    if hidden.dtype == torch.float32 and weight.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=out)
    elif hidden.is_cuda and _mm_out_dtype(hidden, weight, out):
        pass
    else:
        h32 = hidden.float()
        for v0 in range(0, weight.shape[0], _VOCAB_BLOCK):
            w32 = weight[v0 : v0 + _VOCAB_BLOCK].float()
            out[:, v0 : v0 + w32.shape[0]] = h32 @ w32.t()
    if bias is not None:
        out.add_(bias.float())


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
        hidden: `(N, H)` last hidden states (any float dtype; the projection accumulates in float32 and the
            log-softmax is float32).
        weight: `(V, H)` output embedding (``lm_head.weight``), same dtype as ``hidden``.
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
        _project_into(logits, hidden[start:end], weight, bias)
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
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """`(B, S, H)` last hidden states of a causal LM (after its final norm), without computing `(B, S, V)` logits.

    The model's own forward runs (so FSDP2 unshards and reshards its root parameters as usual) with
    ``logits_to_keep=1``; the backbone's output is captured with a forward hook on ``model.base_model``.
    ``attention_mask=None`` with position ids that restart is a packed batch (attention stays inside each run of
    increasing positions).
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


def micro_batches(
    seq_lens: Sequence[int], max_tokens: int | None = None, rows_per_batch: int | None = None
) -> list[list[int]]:
    """Row indices of each forward.

    Args:
        seq_lens: tokens of each row (prompt + response).
        max_tokens: token budget per forward: veRL's dynamic batching (``rearrange_micro_batches``: the fewest
            forwards within the budget, rows balanced between them by length and attention work). A row longer
            than the budget gets a forward of its own.
        rows_per_batch: without a budget, this many consecutive rows per forward; neither: one forward.

    Returns:
        A list of index lists that together cover ``range(len(seq_lens))`` once.
    """
    n = len(seq_lens)
    if n == 0:
        return []
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        from tensordict import TensorDict
        from verl.utils.seqlen_balancing import rearrange_micro_batches

        lens = [int(s) for s in seq_lens]
        ids = torch.nested.as_nested_tensor([torch.zeros(s, dtype=torch.int8) for s in lens], layout=torch.jagged)
        _, idx = rearrange_micro_batches(TensorDict({"input_ids": ids}, batch_size=[n]), max(max_tokens, max(lens)))
        return [list(map(int, part)) for part in idx if len(part)]
    size = n if rows_per_batch is None else int(rows_per_batch)
    if size < 1:
        raise ValueError(f"rows_per_batch must be >= 1, got {rows_per_batch}")
    return [list(range(s, min(s + size, n))) for s in range(0, n, size)]


def _forward_rows(
    model: torch.nn.Module, rows: list[torch.Tensor], packed: bool, pad_token_id: int, device
) -> tuple[torch.Tensor, list[int]]:
    """One forward over ``rows``: `(S_total, H)` hidden states and the offset of each row's first token in it."""
    lens = [int(r.numel()) for r in rows]
    if packed:
        input_ids = torch.cat(rows).to(device).unsqueeze(0)
        position_ids = torch.cat([torch.arange(n, device=device) for n in lens]).unsqueeze(0)
        hidden = backbone_hidden_states(model, input_ids, None, position_ids)[0]
        offsets = torch.tensor([0] + lens[:-1]).cumsum(0).tolist()
        return hidden, offsets
    width = max(lens)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        input_ids[i, : row.numel()] = row.to(device)
        attention_mask[i, : row.numel()] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    hidden = backbone_hidden_states(model, input_ids, attention_mask, position_ids)
    return hidden.reshape(-1, hidden.shape[-1]), [i * width for i in range(len(rows))]


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
    max_tokens: int | None = DEFAULT_MAX_TOKENS,
    rows_per_batch: int | None = None,
    packed: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-response-token log-probs of a causal LM for a batch of (prompt, response) pairs.

    Rows with an empty response need no forward; the others run in forwards of at most ``max_tokens`` tokens
    (see :func:`micro_batches`), packed without padding by default. Only response positions are projected.

    Args:
        model: a Hugging Face causal LM (``get_output_embeddings()`` and ``base_model``).
        prompts: B 1-D int tensors (prompt ids, no padding).
        responses: B 1-D int tensors (response ids, no padding; may be empty).
        candidates: B tensors `(len(response_b), K)` of candidate ids per response token; optional.
        topk: own top-k to return (0: none).
        chunk_size: positions per log-softmax chunk.
        temperature: logits divisor.
        pad_token_id: id used for padding the backbone input when ``packed`` is False (masked out).
        max_tokens: token budget per forward (prompt + response tokens; padding counts too when not packed);
            None: no budget (``rows_per_batch`` rows per forward, or all rows at once).
        rows_per_batch: rows per forward when ``max_tokens`` is None.
        packed: concatenate the rows of a forward without padding (position ids restart per row); False: right-pad
            them to the longest with an attention mask.

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
    for i, (p, n) in enumerate(zip(prompts, resp_lens, strict=True)):
        if n and p.numel() == 0:
            raise ValueError(f"row {i}: a response needs a non-empty prompt (no position predicts its first token)")

    out: dict[str, torch.Tensor] = {
        "log_probs": torch.zeros((bsz, t_max), dtype=torch.float32, device=device),
        "response_mask": torch.zeros((bsz, t_max), dtype=torch.int64, device=device),
    }
    cand_rows = None
    if candidates is not None:
        shaped = [c for c, n in zip(candidates, resp_lens, strict=True) if n]
        k_set = {int(c.shape[-1]) if c.dim() == 2 else -1 for c in shaped}
        if len(k_set) > 1 or -1 in k_set:
            raise ValueError(f"candidates must be (len(response), K) with one K for every row, got K in {k_set}")
        k_cand = k_set.pop() if k_set else max((int(c.shape[-1]) for c in candidates if c.dim() == 2), default=0)
        cand_rows = [c.reshape(n, k_cand).long() for c, n in zip(candidates, resp_lens, strict=True)]
        out["candidate_log_probs"] = torch.zeros((bsz, t_max, k_cand), dtype=torch.float32, device=device)
    if topk > 0:
        out["topk_ids"] = torch.zeros((bsz, t_max, topk), dtype=torch.int64, device=device)
        out["topk_log_probs"] = torch.zeros((bsz, t_max, topk), dtype=torch.float32, device=device)
    scored = [i for i in range(bsz) if resp_lens[i]]
    if not scored:
        return out

    weight, bias = output_projection(model)
    seqs = {i: torch.cat([prompts[i].reshape(-1).long(), responses[i].reshape(-1).long()]) for i in scored}
    budget = max_tokens
    if budget is not None and not packed:  # a padded forward holds rows x longest tokens; bound that by the budget
        budget = None
        rows_per_batch = max(1, max_tokens // max(s.numel() for s in seqs.values()))
    groups = micro_batches([seqs[i].numel() for i in scored], budget, rows_per_batch)
    for group in groups:
        rows = [scored[j] for j in group]
        hidden, offsets = _forward_rows(model, [seqs[i] for i in rows], packed, pad_token_id, device)
        # the position predicting response token j of a row: its offset + prompt length - 1 + j
        pos = torch.cat(
            [torch.arange(resp_lens[i], device=device) + (o + prompts[i].numel() - 1) for i, o in zip(rows, offsets)]
        )
        row_t = torch.cat([torch.full((resp_lens[i],), i, device=device) for i in rows])
        col_t = torch.cat([torch.arange(resp_lens[i], device=device) for i in rows])
        got = chunked_logprobs(
            hidden[pos],
            weight.to(hidden.dtype),
            labels=torch.cat([responses[i].reshape(-1).long() for i in rows]).to(device),
            candidates=None if cand_rows is None else torch.cat([cand_rows[i] for i in rows]).to(device),
            topk=topk,
            chunk_size=chunk_size,
            temperature=temperature,
            bias=None if bias is None else bias.to(hidden.dtype),
        )
        del hidden
        out["log_probs"][row_t, col_t] = got["log_probs"]
        out["response_mask"][row_t, col_t] = 1
        if cand_rows is not None:
            out["candidate_log_probs"][row_t, col_t] = got["candidate_log_probs"]
        if topk > 0:
            out["topk_ids"][row_t, col_t] = got["topk_ids"]
            out["topk_log_probs"][row_t, col_t] = got["topk_log_probs"]
    return out
