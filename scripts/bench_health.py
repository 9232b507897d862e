"""Benchmark the teacher-health checks against the advantage step's tensor work; prints ratios from one run.

On a `[rows, cols]` float32 batch (ExOPD + IW + release, two teachers), times

- the advantage step's tensor work in the plugin trainer's hand-over: one ``compose_advantages`` with all stages
  and its metrics;
- the health work added to a healthy step: ``HealthMonitor.check`` (alarms, per-teacher figures, per-position
  profiles, the top-K overlap mass; non-finite inputs are found by the estimator's own checks, and only then does
  ``HealthMonitor.sanitize`` run);

and prints health / ``compose_advantages``. The trainer also logs
``opd/health/time_s`` each step, to set against veRL's ``timing_s/adv`` (which includes the teacher forwards).

Usage: python scripts/bench_health.py [--rows 256 --cols 16384 --threads 1 --repeats 5]
"""

from __future__ import annotations

import argparse
import os

import torch
from bench_objectives import _median_time  # this folder: first on sys.path when run as a script
from omegaconf import OmegaConf

import opd_verl
from opd_verl.config import parse_opd_section
from opd_verl.objectives import StageParams, compose_advantages
from opd_verl.trainer.health_monitor import HealthMonitor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=16384)
    ap.add_argument("--sentences", type=int, default=40, help="sentences per row")
    ap.add_argument("--sample-tokens", type=int, default=None, help="opd.health.sample_tokens (default: the config's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    b, t = args.rows, args.cols
    student = -torch.rand(b, t, generator=g) * 3
    teacher = -torch.rand(b, t, generator=g) * 3
    ref = -torch.rand(b, t, generator=g) * 3
    lengths = torch.randint(t // 4, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()
    sentence_ids = (torch.arange(t)[None, :] * args.sentences // t).expand(b, t).contiguous()
    margins = torch.rand(b, t, generator=g)
    owners = [i % 2 for i in range(b)]
    lam = torch.tensor([1.25 if o == 0 else 1.0 for o in owners])

    section = {
        "signal": {"name": "gopd", "lam": 1.25},
        "weighting": {"name": "iw", "w_max": 1.5},
        "release": {"enabled": True},
        "teachers": {"models": {"a": {"path": "/a", "route": "a"}, "b": {"path": "/b", "route": None}}},
    }
    base = OmegaConf.load(os.path.join(os.path.dirname(opd_verl.__file__), "hydra_configs", "opd_trainer.yaml")).opd
    base.teachers.models = {}
    if args.sample_tokens is not None:
        section["health"] = {"sample_tokens": args.sample_tokens}
    full = OmegaConf.to_container(OmegaConf.merge(base, section), resolve=True)
    opd = parse_opd_section(full)
    params = StageParams.from_config(full)
    topk_mass = torch.rand(b, t, generator=g)  # the teacher's mass on the student's top-K ids (release rule)
    tensors = {"response_mask": mask, "student": student, "teacher": teacher, "ref": ref, "lam": lam}
    tensors["topk_mass"] = topk_mass
    monitor = HealthMonitor(opd.health, opd, 1.0, "/tmp")
    monitor._vocab_sizes = [151936, 151936]

    def compose():
        return compose_advantages(
            student,
            teacher,
            mask,
            params=params,
            ref_logprobs=ref,
            sentence_ids=sentence_ids,
            margins=margins,
            lam=lam,
        )

    adv, adv_metrics = compose()

    def health():
        monitor.check(1, tensors, adv, owners, None, adv_metrics, {"a": 1.0, "b": 1.0}, {})

    t_compose = _median_time(compose, args.repeats)
    t_health = _median_time(health, args.repeats)
    print(
        f"batch [{b}, {t}] float32, {args.threads} thread(s), median of {args.repeats}, "
        f"sample_tokens {opd.health.sample_tokens}"
    )
    print(f"  compose_advantages (ExOPD + IW + release):     {t_compose * 1e3:9.1f} ms")
    print(f"  health (check):                                {t_health * 1e3:9.1f} ms")
    print(f"  health / compose_advantages: {t_health / t_compose:.4f}")


if __name__ == "__main__":
    main()
