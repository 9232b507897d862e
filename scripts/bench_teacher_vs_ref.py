"""Benchmark: the plugin's teacher scoring vs veRL's own reference worker, same model, same batch, one Ray set-up.

Both worker groups are built the way the trainers build them, in one Ray session with veRL's CPU port (logical
GPUs, gloo, TransferQueue; `opd_verl.cpu_port`), on veRL's ``global_pool`` (a `RayResourcePool` of
``--gpus`` logical GPUs):

- ``ref``: veRL 0.9.1's ``ActorRolloutRefWorker`` with ``role="ref"``, what its v1 trainer builds for
  ``Role.RefPolicy`` (``verl/trainer/ppo/v1/trainer_base.py``), called as its ``_compute_ref_log_prob`` does:
  ``compute_ref_log_prob(meta)``, then the trainer's own write-back of ``ref_log_prob`` (read ``log_probs`` over
  prompt + response from TransferQueue, keep the response part, put it back);
- ``teacher``: the plugin's ``ForwardOnlyWorker`` (``opd_verl.workers.forward_worker``) with the config
  ``OPDTrainer`` derives from the same ``actor_rollout_ref`` section (``forward_settings``), called as
  ``_compute_teacher_outputs`` does: ``compute_logprobs(meta)``, which writes ``opd_teacher_log_probs`` per
  response token.

Same random Qwen2-style model saved locally (default hidden 512, 8 layers, vocab 32k, float32), same rows (prompts of
P tokens, responses uniform over [L/16, L]) put once into TransferQueue as veRL's agent loop stores rollouts, same
``use_remove_padding`` / ``log_prob_use_dynamic_bsz`` / ``log_prob_max_token_len_per_gpu`` /
``log_prob_micro_batch_size_per_gpu``. After one warm-up call each, ``--repeats`` calls alternate between the two;
times are the driver's wall time of each call (median printed, ratio teacher / ref from the same run). Then one
more call of each under the torch profiler inside the workers: self CPU time by kind of op (matmuls, attention,
log-softmax / logsumexp / gather, copies / packing / unpadding, elementwise) and the rest of the call's wall time
(TransferQueue transfer, Python, dispatch). The two outputs are compared (max |teacher - ref| over response
tokens). Absolute times on a shared CPU are noisy; the ratio is the figure.

    python scripts/bench_teacher_vs_ref.py                  # 32 rows, L = 512
    python scripts/bench_teacher_vs_ref.py --quick          # tiny model, a few seconds of scoring
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

PROMPT_FIELDS = ("prompts", "responses", "response_mask", "loss_mask", "input_ids", "position_ids")
TEACHER_FIELDS = ["prompts", "responses", "response_mask"]  # what OPDTrainer._compute_teacher_outputs sends

KINDS = (
    ("Python in veRL's micro-batch loop", ("micro_batch",)),  # self time of its record_function ranges
    ("tensor-subclass dispatch", ("PythonSubclass",)),  # nested tensors / DTensor __torch_dispatch__ in Python
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm")),
    ("attention", ("scaled_dot_product", "flash_attention", "aten::_efficient_attention")),
    ("log-softmax/logsumexp/gather", ("softmax", "logsumexp", "aten::gather", "aten::max", "aten::topk")),
    (
        "copy/pack/unpad/index",
        (
            "copy",
            "aten::cat",
            "aten::index",
            "aten::clone",
            "aten::to",
            "aten::roll",
            "nested",
            "aten::pad",
            "aten::contiguous",
            "aten::stack",
            "aten::full",
            "aten::zeros",
            "aten::empty",
            "aten::fill",
        ),
    ),
)


def kind_of(op: str) -> str:
    for kind, needles in KINDS:
        if any(n in op for n in needles):
            return kind
    return "elementwise/other ops"


def profiled(base):
    """``base`` worker class plus two ONE_TO_ALL methods that run the torch profiler around later calls."""
    from verl.single_controller.base.decorator import Dispatch, register

    class Profiled(base):
        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def bench_profile_start(self) -> int:
            import torch

            self._bench_prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self._bench_prof.start()
            return torch.get_num_threads()

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def bench_profile_stop(self) -> list[tuple[str, float, int]]:
            """(op, self CPU seconds, calls) of every op seen since `bench_profile_start`."""
            self._bench_prof.stop()
            events = self._bench_prof.key_averages()
            return [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in events]

    Profiled.__name__ = Profiled.__qualname__ = f"Profiled{base.__name__}"
    return Profiled


def build_model(args, root: str) -> str:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from opd_verl.demo.tiny import build_tokenizer

    path = os.path.join(root, "model")
    cfg = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 2.75),
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        max_position_embeddings=args.length + args.prompt + 8,
        tie_word_embeddings=False,
        pad_token_id=256,
        eos_token_id=258,
    )
    torch.manual_seed(args.seed)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    build_tokenizer(path)
    return path


def trainer_config(args, model_path: str):
    """veRL's composed ``ppo_trainer`` defaults with the model, the CPU engine settings of the CPU preset and the
    log-prob batching under test."""
    from omegaconf import OmegaConf, open_dict

    from opd_verl.demo.preset import _verl_defaults

    cfg = _verl_defaults()
    budget = args.budget or (args.length + args.prompt)
    with open_dict(cfg):
        sets = {
            "actor_rollout_ref.model.path": model_path,
            "actor_rollout_ref.model.use_remove_padding": not args.padded,
            "actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
            "actor_rollout_ref.model.use_fused_kernels": False,
            "actor_rollout_ref.model.enable_gradient_checkpointing": False,
            "actor_rollout_ref.actor.ppo_mini_batch_size": args.rows,
            "actor_rollout_ref.actor.use_dynamic_bsz": not args.rows_per_forward,
            "actor_rollout_ref.rollout.log_prob_use_dynamic_bsz": not args.rows_per_forward,
            "actor_rollout_ref.ref.log_prob_use_dynamic_bsz": not args.rows_per_forward,
            "actor_rollout_ref.ref.log_prob_max_token_len_per_gpu": budget,
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu": args.rows_per_forward or args.rows,
            "actor_rollout_ref.ref.strategy": "fsdp2",
            "actor_rollout_ref.ref.use_torch_compile": False,
            "actor_rollout_ref.ref.fsdp_config.use_torch_compile": False,
            "actor_rollout_ref.ref.fsdp_config.param_offload": False,
            "actor_rollout_ref.ref.fsdp_config.dtype": "float32",
            "actor_rollout_ref.ref.fsdp_config.model_dtype": "fp32",
            # veRL's FSDP engine computes in bf16 unless told otherwise (param_dtype default); the teacher worker
            # computes in the model's float32: both in float32
            "actor_rollout_ref.ref.fsdp_config.mixed_precision": {
                "param_dtype": "fp32",
                "reduce_dtype": "fp32",
                "buffer_dtype": "fp32",
            },
            "actor_rollout_ref.actor.strategy": "fsdp2",
            "trainer.device": "cpu",
        }
        for key, value in sets.items():
            OmegaConf.update(cfg, key, value, merge=False, force_add=True)
    return cfg


def rows(args):
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    lens = torch.randint(max(1, args.length // 16), args.length + 1, (args.rows,), generator=g).tolist()
    prompts = [torch.randint(0, args.vocab, (args.prompt,), generator=g) for _ in lens]
    responses = [torch.randint(0, args.vocab, (n,), generator=g) for n in lens]
    return prompts, responses


def put_rollouts(prompts, responses):
    """The rows as veRL's agent loop (TransferQueue variant) stores rollouts: nested fields per sample."""
    import torch
    import transfer_queue as tq
    from tensordict import TensorDict

    def nested(xs):
        return torch.nested.as_nested_tensor(list(xs), layout=torch.jagged)

    full = [torch.cat([p, r]) for p, r in zip(prompts, responses, strict=True)]
    masks = [torch.ones(r.numel(), dtype=torch.int64) for r in responses]
    fields = {
        "prompts": nested(prompts),
        "responses": nested(responses),
        "response_mask": nested(masks),
        "loss_mask": nested(masks),
        "input_ids": nested(full),
        "position_ids": nested([torch.arange(f.numel()) for f in full]),
    }
    keys = [f"row{i}" for i in range(len(prompts))]
    tags = [
        {"status": "success", "prompt_len": p.numel(), "response_len": r.numel()} for p, r in zip(prompts, responses)
    ]
    tq.kv_batch_put(keys=keys, partition_id="train", fields=TensorDict(fields, batch_size=len(keys)), tags=tags)
    return keys, tags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="rows in the batch")
    parser.add_argument("--length", type=int, default=512, help="L: response lengths uniform over [L/16, L]")
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens per row")
    parser.add_argument("--budget", type=int, default=0, help="log_prob_max_token_len_per_gpu (0: L + P)")
    parser.add_argument("--rows-per-forward", type=int, default=0, help="no dynamic batches: this many rows a forward")
    parser.add_argument("--padded", action="store_true", help="use_remove_padding=false")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--gpus", type=int, default=1, help="logical GPUs (ranks) of the pool")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each worker")
    parser.add_argument("--top", type=int, default=8, help="top ops by self CPU time to print per worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes (hidden 64, 2 layers, vocab 4096, 8 rows, L 64)"
    )
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.rows, args.length, args.prompt = 64, 2, 4096, 8, 64, 16
        args.repeats = min(args.repeats, 2)

    import ray
    import transfer_queue as tq
    from omegaconf import OmegaConf
    from transfer_queue import KVBatchMeta
    from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup
    from verl.single_controller.ray.base import create_colocated_worker_cls
    from verl.workers.engine_workers import ActorRolloutRefWorker
    from verl.workers.utils.padding import response_from_nested

    from opd_verl.cpu_port.activate import activate_in_environment, cpu_environment
    from opd_verl.cpu_port.ray_setup import LOGICAL_CPUS
    from opd_verl.trainer.opd_trainer import TEACHER_PREFIX, forward_settings
    from opd_verl.workers.forward_worker import ForwardOnlyWorker, forward_worker_config

    activate_in_environment()
    tmp = tempfile.TemporaryDirectory(prefix="bench_teacher_vs_ref_")
    model_path = build_model(args, tmp.name)
    cfg = trainer_config(args, model_path)
    prompts, responses = rows(args)
    n_tokens = sum(p.numel() + r.numel() for p, r in zip(prompts, responses))
    print(
        f"model: Qwen2-style hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, float32, sdpa; "
        f"{args.rows} rows, prompt {args.prompt}, responses uniform over [{max(1, args.length // 16)}, {args.length}] "
        f"({n_tokens} tokens); {args.gpus} logical GPU(s); use_remove_padding={not args.padded}, "
        + (
            f"rows per forward {args.rows_per_forward}"
            if args.rows_per_forward
            else f"dynamic bsz, budget {cfg.actor_rollout_ref.ref.log_prob_max_token_len_per_gpu} tokens"
        ),
        flush=True,
    )

    ray.init(
        num_cpus=LOGICAL_CPUS,
        num_gpus=args.gpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": cpu_environment(os.environ.get("VERL_USE_EXTERNAL_MODULES"))},
    )
    tq_conf = OmegaConf.create(OmegaConf.to_container(cfg.transfer_queue, resolve=True))
    tq_conf.backend.SimpleStorage.num_data_storage_units = 1
    tq.init(tq_conf)
    try:
        # veRL's global pool (trainer_base: ResourcePoolManager, max_colocate_count 3); each group is its own
        # set of processes on the same bundles, as the ref group and a colocated teacher group are in training
        pool = RayResourcePool(
            process_on_nodes=[args.gpus], use_gpu=True, max_colocate_count=3, name_prefix="global_pool"
        )
        ref_cls = RayClassWithInitArgs(
            cls=ray.remote(profiled(ActorRolloutRefWorker)), config=cfg.actor_rollout_ref, role="ref"
        )
        teacher_config = forward_worker_config(
            model_path, TEACHER_PREFIX, chunk_size=1024, **forward_settings(cfg.actor_rollout_ref)
        )
        teacher_cls = RayClassWithInitArgs(cls=ray.remote(profiled(ForwardOnlyWorker)), config=teacher_config)
        groups = {}
        for name, cls in (("ref", ref_cls), ("teacher0", teacher_cls)):
            wg = RayWorkerGroup(
                resource_pool=pool, ray_cls_with_init=create_colocated_worker_cls({name: cls}), device_name="cpu"
            )
            groups[name] = wg.spawn(prefix_set=[name])[name]
            groups[name].init_model()
        ref_wg, teacher_wg = groups["ref"], groups["teacher0"]

        keys, tags = put_rollouts(prompts, responses)
        extra = {"temperature": 1.0}

        def call_ref():
            meta = KVBatchMeta(
                keys=keys,
                tags=tags,
                partition_id="train",
                fields=list(PROMPT_FIELDS),
                extra_info={**extra, "calculate_entropy": False, "compute_loss": False},
            )
            ref_wg.compute_ref_log_prob(meta)
            # the trainer's write-back (trainer_base._compute_ref_log_prob step 2)
            data = tq.kv_batch_get(keys=keys, partition_id="train", select_fields=["log_probs", "response_mask"])
            data["ref_log_prob"] = response_from_nested(data.pop("log_probs"), data["response_mask"])
            tq.kv_batch_put(keys=keys, partition_id="train", fields=data.select("ref_log_prob"))

        def call_teacher():
            meta = KVBatchMeta(keys=keys, tags=tags, partition_id="train", fields=TEACHER_FIELDS, extra_info=extra)
            teacher_wg.compute_logprobs(meta)

        calls = {"ref": call_ref, "teacher": call_teacher}
        wgs = {"ref": ref_wg, "teacher": teacher_wg}
        for fn in calls.values():  # warm-up
            fn()
        times = {name: [] for name in calls}
        for i in range(args.repeats):
            for name in ("ref", "teacher") if i % 2 == 0 else ("teacher", "ref"):
                t0 = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - t0)

        got = tq.kv_batch_get(
            keys=keys, partition_id="train", select_fields=["ref_log_prob", f"{TEACHER_PREFIX}_log_probs"]
        )
        pairs = list(zip(got[f"{TEACHER_PREFIX}_log_probs"].unbind(), got["ref_log_prob"].unbind(), strict=True))
        diff = max(float((t - r).abs().max()) for t, r in pairs)

        profiles, threads = {}, {}
        for name, fn in calls.items():
            threads[name] = wgs[name].bench_profile_start()[0]
            t0 = time.perf_counter()
            fn()
            wall = time.perf_counter() - t0
            profiles[name] = (wall, wgs[name].bench_profile_stop()[0])
    finally:
        tq.close()
        ray.shutdown()
        tmp.cleanup()

    med = {name: statistics.median(ts) for name, ts in times.items()}
    print(f"{'worker':>8} {'median s':>9}  all s")
    for name, ts in times.items():
        print(f"{name:>8} {med[name]:>9.3f}  " + " ".join(f"{t:.3f}" for t in ts))
    print(f"ratio teacher / ref: {med['teacher'] / med['ref']:.2f}x (target <= 1.1x)")
    print(f"max |teacher - ref| log-prob over response tokens: {diff:.2e}")
    for name, (wall, ops) in profiles.items():
        by_kind: dict[str, float] = {}
        for op, secs, _ in ops:
            by_kind[kind_of(op)] = by_kind.get(kind_of(op), 0.0) + secs
        profiled_s = sum(by_kind.values())
        print(f"\n{name}: one profiled call {wall:.3f} s (rank 0, {threads[name]} torch threads)")
        for kind, secs in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {kind:<30} {secs:>8.3f} s {100 * secs / wall:>5.1f}%")
        rest = max(0.0, wall - profiled_s)
        print(f"  {'rest (TQ transfer, Python)':<30} {rest:>8.3f} s {100 * rest / wall:>5.1f}%")
        print(
            "  top ops by self CPU time: "
            + ", ".join(
                f"{op} {secs:.3f} s ({calls}x)" for op, secs, calls in sorted(ops, key=lambda o: -o[1])[: args.top]
            )
        )


if __name__ == "__main__":
    main()
