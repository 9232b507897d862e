"""Supervised fine-tuning of the demo models on the addition task (plain torch, CPU; ~30 s for the teacher).

Both models see the same chat-formatted prompts the trainer will use and learn the row's target response
(`extra_info.solution`: the sum, or the worked solution) plus `<|im_end|>`
(loss on response tokens only). The result is saved over the initial weights in place. Training runs a fixed
number of steps by default (`max_seconds=None`): a wall-clock cut-off would make the cached models depend on how
busy the machine was while they were built.
"""

from __future__ import annotations

import time

import torch

from opd_verl.demo import task


def _encode(tokenizer, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids `[N, L]` (right-padded) and a loss mask `[N, L]` that is 1 on response tokens."""
    seqs, masks = [], []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
        answer = row["extra_info"]["solution"] + tokenizer.eos_token
        p_ids = tokenizer.encode(prompt, add_special_tokens=False)
        a_ids = tokenizer.encode(answer, add_special_tokens=False)
        seqs.append(p_ids + a_ids)
        masks.append([0] * len(p_ids) + [1] * len(a_ids))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, mask


def response_nll(model, ids: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean negative log-likelihood of the masked tokens (cross-entropy with `label_smoothing`). ids, mask: `[N, L]`.
    Returns a scalar."""
    logits = model(input_ids=ids).logits[:, :-1].float()
    target, weight = ids[:, 1:], mask[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none", label_smoothing=label_smoothing
    )
    return (nll * weight.reshape(-1)).sum() / weight.sum().clamp_min(1.0)


@torch.no_grad()
def greedy_accuracy(model, tokenizer, rows: list[dict], max_new_tokens: int | None = None) -> float:
    """Fraction of rows whose greedy answer is exactly right (task reward of the greedy policy).

    `max_new_tokens` defaults to the longest target response plus 2."""
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(r["extra_info"]["solution"], add_special_tokens=False)) for r in rows)
        max_new_tokens += 2
    from opd_verl.cpu_port.hf_rollout import sample_batch

    prompts = [
        tokenizer.encode(
            tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False),
            add_special_tokens=False,
        )
        for row in rows
    ]
    correct = 0
    for start in range(0, len(rows), 64):  # left-padded greedy generation, 64 rows a call
        out = sample_batch(
            model,
            prompts[start : start + 64],
            max_new_tokens,
            temperature=0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, (ids, _) in zip(rows[start : start + 64], out):
            text = tokenizer.decode(ids, skip_special_tokens=False)
            correct += task.compute_score(row["data_source"], text, row["reward_model"]["ground_truth"])
    return correct / max(len(rows), 1)


def train_teacher(
    model_dir: str,
    train_file: str,
    steps: int = 1000,
    batch_size: int = 64,
    lr: float = 3e-3,
    max_seconds: float | None = None,
    seed: int = 0,
    label_smoothing: float = 0.0,
    log=print,
) -> dict:
    """Train the model in `model_dir` on `train_file`'s answers and save it back. Returns loss/accuracy/time stats."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    rows = pd.read_parquet(train_file).to_dict("records")
    ids, mask = _encode(tokenizer, rows)
    held_out = rows[-64:]
    ids, mask = ids[:-64], mask[:-64]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    start, loss_value, step = time.time(), float("nan"), 0
    model.train()
    for step in range(1, steps + 1):
        idx = torch.randint(0, ids.shape[0], (batch_size,))
        loss = response_nll(model, ids[idx], mask[idx], label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if step % 250 == 0:
            log(f"opd_verl: SFT step {step}/{steps} loss {loss_value:.3f} ({time.time() - start:.0f}s)")
        if max_seconds is not None and time.time() - start > max_seconds:
            break
    model.eval()
    stats = {
        "steps": step,
        "final_loss": loss_value,
        "seconds": time.time() - start,
        "held_out_accuracy": greedy_accuracy(model, tokenizer, held_out),
    }
    log(
        f"opd_verl: SFT done: {stats['steps']} steps, loss {stats['final_loss']:.3f}, "
        f"held-out greedy accuracy {stats['held_out_accuracy']:.2f}, {stats['seconds']:.0f}s"
    )
    model.save_pretrained(model_dir)
    return stats


def evaluate_teacher(model_dir: str, val_file: str) -> float:
    """Greedy accuracy of the model in `model_dir` on every row of `val_file` (the demo's held-out problems)."""
    import pandas as pd
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    return greedy_accuracy(model, tokenizer, pd.read_parquet(val_file).to_dict("records"))
