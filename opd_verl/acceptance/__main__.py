"""`python -m opd_verl.acceptance [--dry-run] [--cpu-components] [--only NAMES] [--override KEY=VALUE ...]`.

See `opd_verl/acceptance/__init__.py` for the checks and docs/cluster.md for how to read the table.
Exit status: 0 when no check failed (checks not run are listed as such), 1 when any failed (named on the last
line), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys
import tempfile
import time

from opd_verl.acceptance.report import CheckFailed, Report

COMPONENTS = ("teacher_logprobs", "logprob_memory", "student_topk_hook", "opsd_lora_step")
RUNS = ("exopd_iw_release", "opsd", "opsd_resume", "two_gpu_sp_sharded", "two_gpu_server_teachers")
# judged on the output of a run above: the colocated teachers' offload frees their device memory (CUDA only)
FROM_RUNS = {"teacher_offload": "exopd_iw_release"}
CHECKS = ("environment", "models", *COMPONENTS, *RUNS, *FROM_RUNS)
RUN_NEEDS = {"opsd_resume": "opsd"}  # a resume needs the checkpoints of the run before it
# memory check sizes: one 16k-token row at Qwen's vocabulary on CUDA; on CPU a size its RSS can show
MEMORY_SIZES = {"cuda": (16384, 151936, 1024), "cpu": (4096, 32768, 256)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="gpu_acceptance",
        description="Offline GPU acceptance run of opd_verl: every GPU-only path, each with a measured figure.",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="no CUDA: build the models, compose and validate every trainer run's config, print the table",
    )
    parser.add_argument(
        "--cpu-components",
        action="store_true",
        help="with --dry-run: also run the component checks (log-probs, memory, top-K hook, OPSD step) on CPU",
    )
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated checks to run (environment and models always run); one of: {', '.join(CHECKS)}",
    )
    parser.add_argument(
        "--work-dir", default=None, help="models, data, logs, metrics and checkpoints [a new dir under $TMPDIR]"
    )
    parser.add_argument("--run-timeout", type=int, default=420, help="seconds each trainer run may take [420]")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra override added to every trainer run (repeatable; replaces the script's value of that key)",
    )
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in only if n not in CHECKS]
    if unknown:
        parser.error(f"--only: unknown check(s) {', '.join(unknown)}; allowed: {', '.join(CHECKS)}")
    if args.cpu_components and not args.dry_run:
        parser.error("--cpu-components needs --dry-run (without it the component checks run on the GPU)")
    bad = [o for o in args.override if "=" not in o]
    if bad:
        parser.error(f"--override needs KEY=VALUE, got {', '.join(bad)}")
    if args.run_timeout < 1:
        parser.error(f"--run-timeout must be >= 1, got {args.run_timeout}")
    args.only = set(only) | {"environment", "models"} if only else set(CHECKS)
    return args


def environment(dry_run: bool) -> str:
    """Check 1: CUDA visible (not in a dry run); the stack imports; versions."""
    import torch

    versions = [f"torch {torch.__version__}"]
    for name in ("transformers", "verl", "vllm", "flash_attn", "opd_verl"):
        try:
            module = importlib.import_module(name)
        except ImportError as err:
            if dry_run and name in ("vllm", "flash_attn"):
                versions.append(f"{name} absent")
                continue
            raise CheckFailed(f"cannot import {name}: {err}") from err
        versions.append(f"{name} {getattr(module, '__version__', '?')}")
    if dry_run:
        return ", ".join(versions) + "; CUDA not required (--dry-run)"
    if not torch.cuda.is_available():
        raise CheckFailed("torch sees no CUDA device")
    devices = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    return ", ".join(versions) + f"; CUDA {torch.version.cuda}, {devices}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    work = os.path.abspath(args.work_dir or tempfile.mkdtemp(prefix="opd_acceptance_"))
    report = Report()
    print(f"gpu_acceptance: work dir {work}{' (dry run)' if args.dry_run else ''}", flush=True)
    want = args.only.__contains__

    report.run("environment", lambda: environment(args.dry_run))
    if not args.dry_run and not report.passed("environment"):
        for name in CHECKS[1:]:
            if want(name):
                report.skip(name, "needs a working GPU environment")
        return finish(report, work, started)

    from opd_verl.acceptance import models

    assets = {}

    def build() -> str:
        assets["a"] = a = models.build_assets(os.path.join(work, "assets"))
        student = models.check_saved_model(a.student, models.STUDENT)
        teacher = models.check_saved_model(a.teacher, models.TEACHER)
        return (
            f"Qwen3 student {student / 1e6:.2f}M params (tied), teacher {teacher / 1e6:.2f}M (untied), "
            f"one tokenizer; data in {os.path.dirname(a.train_file)}"
        )

    report.run("models", build)
    if "a" not in assets:
        for name in CHECKS[2:]:
            if want(name):
                report.skip(name, "needs the models")
        return finish(report, work, started)
    a = assets["a"]

    device = "cpu" if args.dry_run else "cuda"
    if args.dry_run and not args.cpu_components:
        for name in COMPONENTS:
            if want(name):
                report.skip(name, "--dry-run (--cpu-components runs it on CPU)")
    else:
        from opd_verl.acceptance import components

        length, vocab, chunk = MEMORY_SIZES[device]
        checks = {
            "teacher_logprobs": lambda: components.teacher_logprobs(a.teacher, device),
            "logprob_memory": lambda: components.logprob_memory(device, length, vocab, chunk),
            "student_topk_hook": lambda: components.student_topk_hook(a.student, device),
            "opsd_lora_step": lambda: components.opsd_lora_step(a.student, device),
        }
        for name, check in checks.items():
            if want(name):
                report.run(name, check)

    from opd_verl.acceptance import runs

    n_gpus = 0
    if not args.dry_run:
        import torch

        n_gpus = torch.cuda.device_count()
    for run in runs.plan(a, work, args.override):
        if not want(run.name):
            continue
        print(f"{run.name}: {shlex.join(runs.command(run, work))}", flush=True)
        if args.dry_run:
            report.run(run.name, lambda run=run: runs.validate(run, work))
        elif run.gpus > n_gpus:
            report.skip(run.name, f"needs {run.gpus} GPUs, this machine has {n_gpus}")
        elif RUN_NEEDS.get(run.name) and not report.passed(RUN_NEEDS[run.name]):
            report.skip(run.name, f"needs a passed {RUN_NEEDS[run.name]} run")
        else:
            report.run(run.name, lambda run=run: runs.execute(run, work, args.run_timeout))
    by_name = {run.name: run for run in runs.plan(a, work, args.override)}
    for name, source in FROM_RUNS.items():
        if not want(name):
            continue
        if args.dry_run:
            report.skip(name, "needs a GPU: on CPU the teacher's parameters already live in host memory")
        elif not report.passed(source):
            report.skip(name, f"needs a passed {source} run (teachers colocated, offload on)")
        else:
            path = by_name[source].metrics_file(work)
            report.run(name, lambda path=path: runs.judge_offload(runs.read_metrics(path)))
    return finish(report, work, started)


def finish(report: Report, work: str, started: float) -> int:
    table = report.table()
    print("\n" + table)
    print(f"\nwall time {time.perf_counter() - started:.0f} s; logs and the table (summary.md) in {work}")
    try:
        with open(os.path.join(work, "summary.md"), "w") as f:
            f.write(table + "\n")
    except OSError as err:
        print(f"gpu_acceptance: could not write summary.md: {err}")
    if report.failed:
        print(f"gpu_acceptance: FAILED: {', '.join(report.failed)}")
        return 1
    print("gpu_acceptance: no check failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
