"""Benchmark: OPSD privileged teacher (teacher forward + full-vocabulary divergence) per micro-batch, before and after.

A random Qwen2-style model (default hidden 512, 8 layers, vocab 32k, float32) is student and teacher (``current``
weights). One micro-batch of B samples (student prompt P tokens, privileged teacher prompt P + C tokens, responses
uniform over [L/16, L]) goes through the OPSD actor loss's logits-processor call (``OPSDActorLoss.logits_outputs``:
teacher forwards, teacher log-probs, per-token generalized JSD with its clip flags) and the backward of the
divergence into the student logits (a leaf made from one student forward, so the student's own forward is not timed):

- ``before``: the loss as of revision 0bbc6b9, reimplemented here from the library's functions: the divergence chunk
  size doubled as the teacher's batch size (``teacher_response_logits(max_tokens=chunk_size)``: with a 512-token
  chunk and responses longer than 512, one sample per forward), the teacher logits of the whole micro-batch
  concatenated into `(B, R, V)`, and the clip flags from a second full-vocabulary pass without the clip;
- ``after@N``: today's ``OPSDActorLoss`` with a teacher token budget of N (the actor's
  ``ppo_max_token_len_per_gpu``): samples grouped by veRL's dynamic-batch helper, each group's logits consumed
  before the next forward, flags from the divergence's own pass;
- ``rev:REV`` (with ``--baseline-rev REV``): the loss of git revision REV itself, imported from a temporary
  ``git worktree`` (checks that ``before`` is what that code did).

Each variant runs in its own subprocess (same seed, model and batch) and is called twice; the second call is
measured. Time = wall time of the call and backward;
memory = peak RSS (``VmHWM``, reset just before the call through ``/proc/self/clear_refs``; ``ru_maxrss`` where that
is unavailable) minus the RSS just before the call, i.e. what the call adds on top of model, batch and student
logits (glibc's mmap threshold is fixed at 1 MiB in the variants' processes, so freed buffers leave the RSS).
Loss = mean per-token divergence. Differences and ratios are to the first row (``rev:REV`` when given, else
``before``), same run. ``before`` uses today's divergence function, so it shares that function's improvements.

    python scripts/bench_opsd_teacher.py                        # B=8, L=1024
    python scripts/bench_opsd_teacher.py --quick                # CI size
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_teacher_scoring import random_qwen2, run_in_subprocess  # noqa: E402

QUICK = {"hidden": 64, "layers": 2, "vocab": 1024, "length": 96, "samples": 4, "prompt": 8, "context": 8,
         "chunk_size": 32, "budgets": "256,1024"}  # fmt: skip


# a fixed mmap threshold turns off glibc's dynamic one, so freed large buffers leave the RSS at once and the peak
# RSS follows what the variant really holds (not what earlier, freed allocations left in the heap)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "1048576"}


def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_kib("VmHWM") is not None
    except OSError:
        return False


def build_case(args):
    """Model, veRL-layout micro-batch, privileged prompt ids and the `(nnz, V)` student logits / rollout T."""
    import torch

    max_positions = args.length + args.prompt + args.context + 8
    model = random_qwen2(args.hidden, args.layers, args.vocab, max_positions, args.seed, args.init_std)
    g = torch.Generator().manual_seed(args.seed + 1)
    lens = torch.randint(max(1, args.length // 16), args.length + 1, (args.samples,), generator=g).tolist()
    prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=g) for _ in lens]
    teacher_prompts = [torch.randint(0, args.vocab, (args.prompt + args.context,), generator=g).tolist() for _ in lens]
    responses = [torch.randint(0, args.vocab, (n,), generator=g) for n in lens]
    data, student_logits = micro_batch(model, prompts, responses, args.rollout_temperature)
    return model, data, teacher_prompts, student_logits, lens


def micro_batch(model, prompts, responses, rollout_temperature):
    """veRL's no-padding micro-batch layout and the `(nnz, V)` student logits divided by the rollout temperature."""
    import torch
    from verl.utils import tensordict_utils as tu

    seqs = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    data = tu.get_tensordict(
        {
            "input_ids": nested(seqs),
            "responses": nested(responses),
            "response_mask": nested([torch.ones(len(r), dtype=torch.long) for r in responses]),
        },
        non_tensor_dict={"temperature": rollout_temperature},
    )
    with torch.no_grad():
        student_logits = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs]) / rollout_temperature
    return data, student_logits


def before_logits_outputs(loss_fn, student_logits, data, teacher_prompts):
    """The OPSD logits-processor call as of revision 0bbc6b9 (``loss=full``), from today's library functions.

    Every sample here has a privileged context. Teacher forwards of ``max(1, chunk_size // R)`` samples
    (``R``: the micro-batch's longest response), all teacher logits concatenated to `(B, R, V)`; teacher log-probs
    from a full log-softmax of every sample first, then per-sample divergences chunked over positions, with the clip
    flags from a second full-vocabulary pass without the clip (that order, as the revision's code has it: computing
    each sample's divergence right after its log-probs peaks ~0.7 GiB higher at the default size).

    Returns:
        dict of `(1, nnz)` tensors: ``opsd_divergence`` (with its graph), ``opsd_clipped``, ``opsd_teacher_log_probs``.
    """
    import torch
    from verl.utils import tensordict_utils as tu

    from opd_verl.objectives import generalized_jsd
    from opd_verl.opsd.loss import teacher_response_logits

    params = loss_fn.params
    logits = student_logits.squeeze(0)
    nnz = logits.shape[0]
    seq_lens = data["input_ids"].offsets().diff()
    resp_lens = data["responses"].offsets().diff()
    starts = torch.cat([seq_lens.new_zeros(1), seq_lens.cumsum(0)[:-1]])
    temperature = float(tu.get_non_tensor_data(data=data, key="temperature", default=1.0))
    responses = list(data["responses"].unbind())
    n = len(responses)
    divergence = torch.zeros(nnz, dtype=torch.float32)
    clipped = torch.zeros(nnz, dtype=torch.float32)
    teacher_lp = torch.zeros(nnz, dtype=torch.float32)
    width = int(resp_lens.max())
    resp = torch.full((n, width), loss_fn.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(resp)
    for i in range(n):
        resp[i, : int(resp_lens[i])] = responses[i]
        mask[i, : int(resp_lens[i])] = 1
    with torch.no_grad(), loss_fn.teacher.weights():
        t_logits = teacher_response_logits(
            loss_fn.module, teacher_prompts, resp, mask, loss_fn.pad_token_id, max_tokens=params.chunk_size
        )
    s_all, t_all, spans = [], [], []
    for i in range(n):
        r = int(resp_lens[i])
        begin = int(starts[i] + seq_lens[i] - resp_lens[i]) - 1
        s_all.append(logits[begin : begin + r])
        t_all.append(t_logits[i, :r])
        spans.append((begin, r))
        t_lp = torch.log_softmax(t_logits[i, :r].float() / temperature, dim=-1)
        teacher_lp[begin : begin + r] = t_lp.gather(-1, resp[i, :r, None]).squeeze(-1)
    divs, clips = [], []
    temp = params.temperature / temperature
    for s_rows, t_rows in zip(s_all, t_all):
        t_scaled = t_rows.detach().float() / temperature if temperature != 1.0 else t_rows.detach()
        div = generalized_jsd(s_rows, t_scaled, params.beta, temp, params.pointwise_clip, params.chunk_size)
        with torch.no_grad():
            unclipped = generalized_jsd(s_rows, t_scaled, params.beta, temp, None, params.chunk_size)
            flags = (unclipped - div.detach()) > 1e-6 * unclipped.abs().clamp(min=1.0)
        divs.append(div)
        clips.append(flags)
    for (begin, r), d, c in zip(spans, divs, clips):
        divergence = divergence.index_put((torch.arange(begin, begin + r),), d)
        clipped[begin : begin + r] = c.float()
    return {
        "opsd_divergence": divergence.unsqueeze(0),
        "opsd_clipped": clipped.unsqueeze(0),
        "opsd_teacher_log_probs": teacher_lp.unsqueeze(0),
    }


def run_variant(args, variant: str, reset_peak: bool = True) -> tuple[dict, dict]:
    """One variant on the benchmark case: (figures, `(nnz,)` output tensors).

    ``reset_peak=False`` leaves the process's peak-RSS mark alone (in-process callers such as tests); the memory
    figure is then the rise of ``ru_maxrss``.
    """
    if variant.startswith("rev:"):
        sys.path.insert(0, args.baseline_path)  # the revision's opd_verl package shadows the installed one
    import torch

    from opd_verl.opsd.loss import OPSDLossParams
    from opd_verl.opsd.teacher import TeacherWeights

    if variant.startswith("rev:"):
        from opd_verl.integration.opsd_loss import OPSDActorLoss
    else:
        from opd_verl.workers.opsd_actor import OPSDActorLoss

    if args.threads:
        torch.set_num_threads(args.threads)
    model, data, teacher_prompts, student_logits, lens = build_case(args)
    params = OPSDLossParams(
        loss="full", beta=args.beta, temperature=1.1, pointwise_clip=args.clip, chunk_size=args.chunk_size
    )
    budget = int(variant.split("@")[1]) if variant.startswith("after@") else None
    actor_config = SimpleNamespace(ppo_max_token_len_per_gpu=budget)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=0)
    loss_fn = OPSDActorLoss(model, TeacherWeights(model, "current"), params, tokenizer, {}, actor_config)

    loss_fn.teacher_prompts = lambda rows: (teacher_prompts, [True] * len(rows))

    def call(leaf):
        if variant == "before":
            out = before_logits_outputs(loss_fn, leaf, data, teacher_prompts)
        else:
            out = loss_fn(student_logits=leaf, data=data)
        out["opsd_divergence"].sum().backward()
        return out

    call(student_logits.clone().unsqueeze(0).requires_grad_(True))  # warm-up: the measured call is the second
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    leaf = student_logits.unsqueeze(0).requires_grad_(True)
    exact_peak = reset_peak and _reset_peak()
    base_kib = _proc_kib("VmRSS") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = call(leaf)
    seconds = time.perf_counter() - t0
    peak_kib = _proc_kib("VmHWM") if exact_peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tensors = {k: out[k].detach().squeeze(0) for k in ("opsd_divergence", "opsd_clipped", "opsd_teacher_log_probs")}
    tensors["grad"] = leaf.grad.squeeze(0)
    tokens = sum(lens)
    figures = {
        "variant": variant,
        "seconds": seconds,
        "per_sample_ms": 1000 * seconds / len(lens),
        "peak_rise_gib": (peak_kib - base_kib) / 2**20,
        "teacher_forwards": len(forwards),
        "loss": float(tensors["opsd_divergence"].sum()) / tokens,
        "clip_rate": float(tensors["opsd_clipped"].sum()) / tokens,
    }
    return figures, tensors


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="B: samples in the micro-batch")
    parser.add_argument("--length", type=int, default=1024, help="L: response lengths uniform over [L/16, L]")
    parser.add_argument("--prompt", type=int, default=64, help="student prompt tokens per sample")
    parser.add_argument("--context", type=int, default=128, help="privileged tokens the teacher prompt adds")
    parser.add_argument("--budgets", type=str, default="16384,4096", help="teacher token budgets of 'after'")
    parser.add_argument("--chunk-size", type=int, default=512, help="opd.opsd.chunk_size (positions per chunk)")
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument("--clip", type=float, default=0.05, help="opd.opsd.pointwise_clip")
    parser.add_argument("--rollout-temperature", type=float, default=1.0)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-std", type=float, default=0.2, help="weight init std (large enough for nonzero divergences and clips)"
    )
    parser.add_argument("--baseline-rev", default=None, help="also run the OPSD loss of this git revision itself")
    parser.add_argument("--quick", action="store_true", help="CI size: " + json.dumps(QUICK))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-path", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()

    if args.worker:
        import torch

        figures, tensors = run_variant(args, args.worker)
        torch.save(tensors, args.out)
        print(json.dumps(figures))
        return

    import torch

    variants = ["before"] + [f"after@{int(b)}" for b in args.budgets.split(",") if b]
    print(
        f"model: Qwen2-style hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32; micro-batch of "
        f"{args.samples} samples, prompt {args.prompt} (+{args.context} privileged), responses uniform over "
        f"[{max(1, args.length // 16)}, {args.length}], chunk {args.chunk_size}, beta {args.beta}, clip {args.clip}"
    )
    print(
        f"{'variant':>14} {'fwds':>5} {'ms/sample':>10} {'time x':>7} {'peak GiB':>9} {'mem x':>6} "
        f"{'loss':>10} {'|dloss|':>9} {'max|ddiv|':>10} {'max|dgrad|':>10} {'clip':>6} {'flags!=':>7}"
    )
    ref = None
    with tempfile.TemporaryDirectory() as tmp:
        argv = list(sys.argv[1:])
        if args.baseline_rev:
            path = os.path.join(tmp, "baseline")
            subprocess.run(
                ["git", "worktree", "add", "--detach", path, args.baseline_rev], check=True, capture_output=True
            )
            variants.insert(0, f"rev:{args.baseline_rev}")  # the revision's own code is the reference then
            argv += ["--baseline-path", path]
        try:
            for variant in variants:
                out = os.path.join(tmp, f"{variant.replace(':', '_')}.pt")
                res = run_in_subprocess(__file__, argv, variant, out, env=MALLOC_ENV)
                tensors = torch.load(out)
                ref = ref or (res, tensors)
                base, base_t = ref
                print(
                    f"{variant:>14} {res['teacher_forwards']:>5} {res['per_sample_ms']:>10.1f} "
                    f"{res['seconds'] / base['seconds']:>7.2f} {res['peak_rise_gib']:>9.3f} "
                    f"{res['peak_rise_gib'] / max(base['peak_rise_gib'], 1e-9):>6.2f} {res['loss']:>10.6f} "
                    f"{abs(res['loss'] - base['loss']):>9.2e} "
                    f"{float((tensors['opsd_divergence'] - base_t['opsd_divergence']).abs().max()):>10.2e} "
                    f"{float((tensors['grad'] - base_t['grad']).abs().max()):>10.2e} {res['clip_rate']:>6.3f} "
                    f"{int((tensors['opsd_clipped'] != base_t['opsd_clipped']).sum()):>7}"
                )
        finally:
            if args.baseline_rev:
                subprocess.run(["git", "worktree", "remove", "--force", path], check=False, capture_output=True)


if __name__ == "__main__":
    main()
