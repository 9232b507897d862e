"""Benchmark the objectives library; prints ratios measured in one run.

1. Advantage pipeline (``compose_advantages``: ExOPD + IW + release with its metrics, margins and sentence ids
   given) on a `[rows, cols]` float32 batch, time divided by one ``torch.cumsum`` over a tensor of the same size
   (target <= 8x); also the public stage functions called one after another.
2. Chunked generalized JSD (forward + backward) on `[positions, vocab]` logits: time ratio to the unchunked
   computation (target <= 1.3x), and ratio of the memory needed beyond the inputs (target <= 0.25x), each variant
   measured in its own subprocess as the rise of the peak RSS (``ru_maxrss``; ``VmHWM`` on Linux) after the inputs
   exist.
3. Sentence segmentation (decode + Punkt + token mapping): tokens per second in one process (target >= 200k/s).

Usage: python scripts/bench_objectives.py [--rows 256 --cols 16384 --positions 4096 --vocab 32768 ...]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time

import torch

from opd_verl.objectives import (
    StageParams,
    apply_release,
    batch_sentence_ids,
    compose_advantages,
    discrepancy,
    generalized_jsd,
    gopd_advantages,
    iw_opd_advantages,
)
from opd_verl.objectives.release import ReleasePlan, apply_plan_rows
from opd_verl.objectives.weighting import iw_weights_rows


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _pipeline_batch(rows: int, cols: int, sentences: int, seed: int = 0, padding: float | None = None):
    """Log-probs, float mask, row-sorted sentence ids and margins; ``padding`` (e.g. -inf) fills the student's
    log-probs at masked positions, None keeps finite values there as a veRL rollout has."""
    g = torch.Generator().manual_seed(seed)
    student = -torch.rand(rows, cols, generator=g) * 3
    teacher = -torch.rand(rows, cols, generator=g) * 3
    ref = -torch.rand(rows, cols, generator=g) * 3
    lengths = torch.randint(cols // 4, cols + 1, (rows,), generator=g)
    mask = (torch.arange(cols)[None, :] < lengths[:, None]).float()
    if padding is not None:
        student = student.masked_fill(mask == 0, padding)
    # ~`sentences` sentences per row: sentence id = floor(position * sentences / length)
    sids = (torch.arange(cols)[None, :] * sentences // lengths[:, None]).clamp_max(sentences - 1)
    margins = torch.rand(rows, cols, generator=g)
    late = torch.arange(cols)[None, :] > (lengths[:, None] * 0.6)
    margins = torch.where(late, margins * 0.2, margins)
    return student, teacher, ref, mask, sids, margins


def _bench_pipeline_case(args, params: StageParams, padding: float | None):
    student, teacher, ref, mask, sids, margins = _pipeline_batch(args.rows, args.cols, args.sentences, 0, padding)

    def composed():
        return compose_advantages(
            student, teacher, mask, params=params, ref_logprobs=ref, sentence_ids=sids, margins=margins
        )

    def stages():
        adv = gopd_advantages(student, teacher, mask, 1.25, ref)
        adv = iw_opd_advantages(adv, mask, 1.5, discrepancy(student, teacher, mask))
        return apply_release(adv, mask, sids, margins)

    def cumsum():
        return torch.cumsum(teacher, dim=-1)

    t_cumsum = _median_time(cumsum, args.repeats)
    t_composed = _median_time(composed, args.repeats)
    t_stages = _median_time(stages, args.repeats)
    print(
        f"    compose_advantages (ExOPD + IW + release, with metrics): {t_composed * 1e3:7.1f} ms, "
        f"cumsum {t_cumsum * 1e3:5.1f} ms, ratio {t_composed / t_cumsum:5.2f}x (target <= 8x)"
    )
    print(
        f"    the stage functions one after another:                  {t_stages * 1e3:7.1f} ms, "
        f"ratio {t_stages / t_cumsum:5.2f}x"
    )
    if padding is None:
        _bench_floors(args, (student, teacher, ref, mask, sids, margins), t_cumsum)
    return composed()[1]


def _bare_chain(student, teacher, ref, mask, release_index, scale, lam: float, w_max: float, rows: int):
    """The fewest eager tensor operations that produce ExOPD + IW advantages with a release plan already known
    (``release_index``, ``scale`` per row): no validation, no metrics, no sentence statistics; ``rows`` rows at a
    time so the intermediates stay in cache."""
    batch, length = teacher.shape
    out = torch.empty(batch, length)
    disc, absd, weights, signal, factor = (torch.empty(rows, length) for _ in range(5))
    for start in range(0, batch, rows):
        n = min(rows, batch - start)
        rs = slice(start, start + n)
        d = torch.sub(teacher[rs], student[rs], out=disc[:n]).mul_(mask[rs])
        h = iw_weights_rows(weights[:n], torch.abs(d, out=absd[:n]), w_max)
        x = torch.sub(teacher[rs], ref[rs], out=signal[:n]).mul_(mask[rs])
        sig = torch.add(d, x, alpha=lam - 1.0, out=x)
        o = torch.addcmul(sig, sig, h, out=out[rs])
        plan = ReleasePlan(release_index[rs], None, None, None, None, None, scale[rs])
        apply_plan_rows(o, plan, factor[:n])
    return out


def _bench_floors(args, batch, t_cumsum: float) -> None:
    """What no implementation of the pipeline on this machine can beat, as ratios to the same cumsum."""
    student, teacher, ref, mask, sids, margins = batch

    def read_write_once():
        for x in (student, teacher, ref, mask, sids, margins):
            x.sum()
        return torch.empty_like(teacher).zero_()

    release_index = torch.randint(args.cols // 8, args.cols, (args.rows,))
    scale = 1.0 + torch.rand(args.rows)
    t_memory = _median_time(read_write_once, args.repeats)
    chains = {
        rows: _median_time(
            lambda rows=rows: _bare_chain(student, teacher, ref, mask, release_index, scale, 1.25, 1.5, rows),
            args.repeats,
        )
        for rows in (1, 2, 4, 8, 16, 32)
    }
    rows, t_chain = min(chains.items(), key=lambda item: item[1])
    print(
        f"    floor: read each input once, write the result once:     {t_memory * 1e3:7.1f} ms, "
        f"ratio {t_memory / t_cumsum:5.2f}x"
    )
    print(
        f"    floor: bare eager chain, release plan given, no checks: {t_chain * 1e3:7.1f} ms, "
        f"ratio {t_chain / t_cumsum:5.2f}x ({rows} rows at a time, the best of 1-32)"
    )


def bench_pipeline(args) -> None:
    params = StageParams(
        signal={"name": "gopd", "lam": 1.25}, weighting={"name": "iw", "w_max": 1.5}, release={"enabled": True}
    )
    print(f"[pipeline] batch [{args.rows}, {args.cols}] float32, ~{args.sentences} sentences/row, median times,")
    print("  ratios to one torch.cumsum over the same tensor")
    print("  finite log-probs at padding (as a veRL rollout has):")
    metrics = _bench_pipeline_case(args, params, None)
    print("  -inf at padding:")
    _bench_pipeline_case(args, params, float("-inf"))
    print(
        f"  release accept rate {metrics['opd/release/accept_rate']:.2f}, "
        f"kept fraction {metrics['opd/release/kept_fraction']:.2f}"
    )


def _gjsd_inputs(positions: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(positions, vocab, generator=g) * 2
    teacher = torch.randn(positions, vocab, generator=g) * 2
    return student, teacher


def _gjsd_step(student, teacher, chunk_size, beta, clip):
    leaf = student.requires_grad_(True)
    loss = generalized_jsd(leaf, teacher, beta=beta, temperature=1.1, pointwise_clip=clip, chunk_size=chunk_size)
    loss.mean().backward()
    grad = leaf.grad
    leaf.grad = None
    return grad


def _peak_rss_kib() -> int:
    """Peak resident set size of this process in KiB.

    Linux's ``ru_maxrss`` survives ``fork`` + ``exec`` (a child starts with its parent's peak), so read this
    process's own high-water mark ``VmHWM`` where /proc exists, and fall back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def gjsd_memory_child(args) -> None:
    student, teacher = _gjsd_inputs(args.positions, args.vocab)
    base = _peak_rss_kib()
    chunk = None if args.memory_variant == "unchunked" else args.chunk_size
    _gjsd_step(student, teacher, chunk, args.beta, args.clip)
    peak = _peak_rss_kib()
    print(json.dumps({"rise_kib": peak - base, "inputs_kib": 2 * student.numel() * 4 // 1024}))


def _time_gjsd(args) -> tuple[float, float]:
    student, teacher = _gjsd_inputs(args.positions, args.vocab)
    t_full = _median_time(lambda: _gjsd_step(student, teacher, None, args.beta, args.clip), args.gjsd_repeats)
    t_chunk = _median_time(
        lambda: _gjsd_step(student, teacher, args.chunk_size, args.beta, args.clip), args.gjsd_repeats
    )
    return t_full, t_chunk


def bench_gjsd(args) -> None:
    rises = {}
    for variant in ("unchunked", "chunked"):
        cmd = [sys.executable, __file__, "--memory-variant", variant, *_forward_args(args)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rises[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    t_full, t_chunk = _time_gjsd(args)
    gib = 1024**2
    inputs = rises["chunked"]["inputs_kib"] / gib
    print(
        f"[gjsd] logits [{args.positions}, {args.vocab}] float32 (inputs {inputs:.2f} GiB), beta {args.beta}, "
        f"clip {args.clip}, chunk {args.chunk_size}, forward + backward"
    )
    print(f"  unchunked: {t_full * 1e3:9.1f} ms, memory beyond inputs {rises['unchunked']['rise_kib'] / gib:6.2f} GiB")
    print(f"  chunked:   {t_chunk * 1e3:9.1f} ms, memory beyond inputs {rises['chunked']['rise_kib'] / gib:6.2f} GiB")
    print(f"  time ratio chunked/unchunked {t_chunk / t_full:5.2f}x (target <= 1.3x)")
    mem_ratio = rises["chunked"]["rise_kib"] / max(rises["unchunked"]["rise_kib"], 1)
    print(f"  memory ratio chunked/unchunked {mem_ratio:5.3f}x (target <= 0.25x; both include the [L, V] gradient)")


_WORDS = (
    "we compute the sum of the first terms and then divide by two so the value is positive "
    "let x denote the number of ways to choose the subset and note that each element appears once "
    "therefore the answer follows from the previous step by induction on n wait let me check this again "
    "the equation has two roots and only one of them satisfies the constraint"
).split()


def _realistic_text(rng: random.Random, n_sentences: int) -> str:
    parts = []
    for i in range(n_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 24))]
        if rng.random() < 0.3:
            words.insert(rng.randint(0, len(words)), f"{rng.randint(1, 999)}.{rng.randint(0, 99)}")
        if rng.random() < 0.2:
            words.insert(rng.randint(0, len(words)), f"$x^{rng.randint(2, 9)} + {rng.randint(1, 50)} = y$")
        sentence = " ".join(words)
        sentence = sentence[0].upper() + sentence[1:] + rng.choice([".", ".", ".", "?", "!", ":"])
        parts.append(sentence)
        parts.append("\n\n" if i % 7 == 6 else ("\n" if i % 5 == 4 else " "))
    return "".join(parts)


def bench_sentences(args) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [_realistic_text(rng, 40) for _ in range(200)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=args.seg_vocab, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
        ),
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    rows = []
    while len(rows) < args.seg_rows:
        ids = hf.encode(_realistic_text(rng, 400), add_special_tokens=False)[: args.seg_len]
        if len(ids) == args.seg_len:
            rows.append(ids)
    responses = torch.tensor(rows)
    mask = torch.ones_like(responses)
    n_tokens = responses.numel()
    chars = sum(len(hf.decode(r)) for r in rows[:8]) / (8 * args.seg_len)
    start = time.perf_counter()
    batch_sentence_ids(responses, mask, hf)  # cold: per-token decode cache empty
    cold = time.perf_counter() - start
    warm = _median_time(lambda: batch_sentence_ids(responses, mask, hf), 3)
    sids = batch_sentence_ids(responses, mask, hf)
    per_row = (sids[:, -1] + 1).double().mean()
    print(
        f"[sentences] {args.seg_rows} rows x {args.seg_len} tokens ({chars:.2f} chars/token, "
        f"{float(per_row):.0f} sentences/row), byte-level BPE vocab {args.seg_vocab}"
    )
    print(f"  warm cache: {n_tokens / warm / 1e3:8.0f}k tokens/s (target >= 200k tokens/s)")
    print(f"  cold cache: {n_tokens / cold / 1e3:8.0f}k tokens/s (first call decodes each distinct id once)")


def _forward_args(args) -> list[str]:
    out = ["--positions", str(args.positions), "--vocab", str(args.vocab), "--chunk-size", str(args.chunk_size)]
    out += ["--beta", str(args.beta), "--threads", str(args.threads)]
    if args.clip is not None:
        out += ["--clip", str(args.clip)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--cols", type=int, default=16384)
    parser.add_argument("--sentences", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--clip", type=float, default=None)
    parser.add_argument("--gjsd-repeats", type=int, default=3)
    parser.add_argument("--seg-rows", type=int, default=64)
    parser.add_argument("--seg-len", type=int, default=4096)
    parser.add_argument("--seg-vocab", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["pipeline", "gjsd", "sentences"])
    parser.add_argument("--memory-variant", choices=["chunked", "unchunked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.memory_variant:
        gjsd_memory_child(args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if "pipeline" not in args.skip:
        bench_pipeline(args)
    if "gjsd" not in args.skip:
        bench_gjsd(args)
    if "sentences" not in args.skip:
        bench_sentences(args)


if __name__ == "__main__":
    main()
