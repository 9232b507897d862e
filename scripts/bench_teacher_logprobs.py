"""Benchmark: teacher log-probs from last hidden states, chunked vs materialising the full log-softmax.

For last hidden states `[N, H]` and an output embedding `[V, H]`, both variants return the log-prob of a sampled
id `[N]` and the log-probs at K candidate ids `[N, K]` (the release rule's student top-K):

- ``full``: logits `[N, V]` and their float32 log-softmax at once, then gather;
- ``chunked``: ``opd_verl.workers.logprobs.chunked_logprobs`` (chunks of positions, O(chunk x V) extra memory).

Each variant runs in its own subprocess. Memory = rise of ``ru_maxrss`` after the inputs exist; time = wall
time of the gather (after a small warm-up call). Ratios are chunked / full from the same run. Finally the
chunked variant runs alone at a larger N, where the full one would not fit in memory.

    python scripts/bench_teacher_logprobs.py                      # N=8192, V=32768 and 151936, then N=16384
    python scripts/bench_teacher_logprobs.py --n 1024 --vocabs 32768 --big-n 0   # quick
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def run_variant(variant: str, n: int, hidden: int, vocab: int, k: int, chunk_size: int, seed: int) -> dict:
    import torch

    from opd_verl.workers.logprobs import chunked_logprobs

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g) / hidden**0.5
    w = torch.randn(vocab, hidden, generator=g)
    labels = torch.randint(0, vocab, (n,), generator=g)
    cands = torch.randint(0, vocab, (n, k), generator=g)

    def full(hs, lab, cand):
        logp = torch.log_softmax((hs @ w.T).float(), dim=-1)
        return logp.gather(-1, lab[:, None]).squeeze(-1), logp.gather(-1, cand)

    def chunked(hs, lab, cand):
        out = chunked_logprobs(hs, w, labels=lab, candidates=cand, chunk_size=chunk_size)
        return out["log_probs"], out["candidate_log_probs"]

    fn = full if variant == "full" else chunked
    fn(h[:8], labels[:8], cands[:8])  # warm-up (kernels, allocator)
    base = _rss_gib()
    t0 = time.perf_counter()
    lp, cp = fn(h, labels, cands)
    seconds = time.perf_counter() - t0
    rise = _rss_gib() - base
    checksum = float(lp.double().sum() + cp.double().sum())
    return {"variant": variant, "n": n, "vocab": vocab, "seconds": seconds, "rss_rise_gib": rise, "checksum": checksum}


def _subprocess(variant: str, args, n: int, vocab: int) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--n",
        str(n),
        "--hidden",
        str(args.hidden),
        "--vocabs",
        str(vocab),
        "--k",
        str(args.k),
        "--chunk-size",
        str(args.chunk_size),
        "--threads",
        str(args.threads),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} at N={n}, V={vocab} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192, help="positions (tokens)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H")
    parser.add_argument("--vocabs", type=str, default="32768,151936", help="comma-separated vocab sizes V")
    parser.add_argument("--k", type=int, default=8, help="candidate ids per position")
    parser.add_argument("--chunk-size", type=int, default=512, help="positions per chunk (chunked variant)")
    parser.add_argument("--big-n", type=int, default=16384, help="N for the chunked-only run (0: skip)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    parser.add_argument("--worker", choices=["full", "chunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    vocabs = [int(v) for v in args.vocabs.split(",") if v]

    if args.worker:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(json.dumps(run_variant(args.worker, args.n, args.hidden, vocabs[0], args.k, args.chunk_size, 0)))
        return

    print(f"H={args.hidden} K={args.k} chunk={args.chunk_size}; memory = ru_maxrss rise after inputs exist")
    print(f"{'N':>6} {'V':>7} {'full s':>8} {'chunk s':>8} {'time x':>7} {'full GiB':>9} {'chunk GiB':>9} {'mem x':>6}")
    for vocab in vocabs:
        full = _subprocess("full", args, args.n, vocab)
        chunk = _subprocess("chunked", args, args.n, vocab)
        if abs(full["checksum"] - chunk["checksum"]) > 1e-3 * max(1.0, abs(full["checksum"])):
            raise SystemExit(f"results differ: full {full['checksum']} vs chunked {chunk['checksum']}")
        t_ratio = chunk["seconds"] / full["seconds"]
        m_ratio = chunk["rss_rise_gib"] / max(full["rss_rise_gib"], 1e-9)
        print(
            f"{args.n:>6} {vocab:>7} {full['seconds']:>8.2f} {chunk['seconds']:>8.2f} {t_ratio:>7.2f} "
            f"{full['rss_rise_gib']:>9.2f} {chunk['rss_rise_gib']:>9.2f} {m_ratio:>6.3f}"
        )
    if args.big_n:
        vocab = max(vocabs)
        chunk = _subprocess("chunked", args, args.big_n, vocab)
        full_estimate = 2 * args.big_n * vocab * 4 / 2**30
        print(
            f"chunked alone: N={args.big_n} V={vocab}: {chunk['seconds']:.2f} s, rise {chunk['rss_rise_gib']:.2f} GiB "
            f"(full log-softmax would need ~{full_estimate:.1f} GiB for logits + log-probs)"
        )


if __name__ == "__main__":
    main()
