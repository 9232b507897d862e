"""Benchmark: teacher scoring of a batch, packed rows in token-budgeted forwards vs padded rows of fixed count.

A random Qwen2-style model (default hidden 512, 8 layers, vocab 32k, float32) scores R rows whose response lengths
are uniform over [L/16, L] (prompts of P tokens) with ``opd_verl.workers.logprobs.response_logprobs``:

- ``padded``: rows right-padded to the longest of each forward, ``--rows`` rows per forward (the worker before
  packing: ``use_remove_padding=false, use_dynamic_bsz=false``);
- ``packed@B``: rows packed without padding into forwards of at most B tokens, grouped by veRL's dynamic-batch
  helper (the default: ``use_remove_padding=true, use_dynamic_bsz=true``), for each budget in ``--budgets``.

Each variant runs in its own subprocess (same seed, same model, same batch). Time = wall time of the scoring call;
memory = rise of ``ru_maxrss`` over the process's size once the model and batch exist; log-prob difference = max
absolute difference to the padded variant's log-probs. Ratios are packed / padded from the same run.

    python scripts/bench_teacher_scoring.py                       # L=4096 (slow on a small CPU)
    python scripts/bench_teacher_scoring.py --length 1024 --budgets 2048,8192
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


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def random_qwen2(hidden: int, layers: int, vocab: int, max_positions: int, seed: int, init_std: float = 0.02):
    """A random Qwen2-style causal LM (float32, sdpa, eval mode): heads of 64, a KV head per 256, MLP 2.75x."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75),
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 64),
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        initializer_range=init_std,
    )
    cfg._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(cfg).eval()


def run_in_subprocess(script: str, argv: list[str], variant: str, out_path: str, env: dict | None = None) -> dict:
    """Run ``script argv --worker variant --out out_path`` (``env`` added to the environment) and return the JSON
    its last output line holds."""
    proc = subprocess.run(
        [sys.executable, script, *argv, "--worker", variant, "--out", out_path],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_variant(args, variant: str, out_path: str) -> dict:
    import torch

    from opd_verl.workers.logprobs import response_logprobs

    model = random_qwen2(args.hidden, args.layers, args.vocab, args.length + args.prompt + 8, args.seed)
    g = torch.Generator().manual_seed(args.seed + 1)
    lens = torch.randint(max(1, args.length // 16), args.length + 1, (args.rows_total,), generator=g).tolist()
    prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=g) for _ in lens]
    responses = [torch.randint(0, args.vocab, (n,), generator=g) for n in lens]
    if variant == "padded":
        kw = {"packed": False, "max_tokens": None, "rows_per_batch": args.rows}
    else:
        kw = {"packed": True, "max_tokens": int(variant.split("@")[1])}
    response_logprobs(model, prompts[:2], [r[:8] for r in responses[:2]], **kw)  # warm-up
    base = _rss_gib()
    t0 = time.perf_counter()
    out = response_logprobs(model, prompts, responses, chunk_size=args.chunk_size, **kw)
    seconds = time.perf_counter() - t0
    torch.save(out["log_probs"], out_path)
    return {"variant": variant, "seconds": seconds, "rss_rise_gib": _rss_gib() - base, "tokens": sum(lens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=4096, help="L: response lengths uniform over [L/16, L]")
    parser.add_argument("--rows-total", type=int, default=64, help="rows in the batch")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--rows", type=int, default=8, help="rows per forward of the padded variant")
    parser.add_argument("--budgets", type=str, default="8192,32768", help="comma-separated token budgets")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=1024, help="positions per log-softmax chunk")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args, args.worker, args.out)))
        return

    import torch

    variants = ["padded"] + [f"packed@{int(b)}" for b in args.budgets.split(",") if b]
    print(
        f"model: Qwen2-style hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32; "
        f"{args.rows_total} rows, prompt {args.prompt}, responses uniform over [{args.length // 16}, {args.length}]"
    )
    print(f"{'variant':>14} {'s':>8} {'time x':>7} {'GiB':>6} {'mem x':>6} {'max |dlogp|':>12}")
    results, ref = {}, None
    with tempfile.TemporaryDirectory() as tmp:
        for variant in variants:
            path = os.path.join(tmp, f"{variant}.pt")
            res = run_in_subprocess(__file__, sys.argv[1:], variant, path)
            logp = torch.load(path)
            ref = logp if ref is None else ref
            res["max_diff"] = float((logp - ref).abs().max())
            results[variant] = res
            base = results["padded"]
            print(
                f"{variant:>14} {res['seconds']:>8.2f} {res['seconds'] / base['seconds']:>7.2f} "
                f"{res['rss_rise_gib']:>6.2f} {res['rss_rise_gib'] / max(base['rss_rise_gib'], 1e-9):>6.2f} "
                f"{res['max_diff']:>12.2e}"
            )


if __name__ == "__main__":
    main()
