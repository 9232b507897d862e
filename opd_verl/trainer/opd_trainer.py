"""The plugin trainer for OPD and its variants: veRL's synchronous v1 trainer plus forward-only teacher workers.

Registered as ``opd_sync`` (`opd_verl.trainer.base.PluginTrainer`). Each step it routes samples to teachers
(``opd.teachers.routing_key``), has each teacher (and a reward-correction base model) score them where the data lives,
and computes the advantages with one `compose_advantages` call, per-row lam included; with the release rule the
actor's own old-log-prob forward also yields the student's top-K ids. Teachers and references must share the
student's tokenizer, checked in the driver (`opd_verl.model_check`).

The teachers' worker group runs in veRL's ``global_pool`` beside actor, rollout and ref
(``opd.teachers.placement=colocated``: a second worker group on the same placement-group bundles, each worker taking
``1 / max_colocate_count`` of a GPU, sharded with FSDP2 over all the pool's ranks) or in a pool of its own
(``separate``: ``opd.teachers.nnodes`` x ``n_gpus_per_node``). With ``opd.teachers.offload`` their parameters stay
in CPU memory outside the teacher phase.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

import numpy as np
import ray
import torch
from omegaconf import DictConfig, open_dict
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1.trainer_base import register_trainer

from opd_verl.config import OPDConfigError
from opd_verl.trainer.base import PluginTrainer
from opd_verl.trainer.routing import assign_teachers, routing_values
from opd_verl.workers.forward_worker import SENTENCE_FIELD, STUDENT_TOPK_FIELD
from opd_verl.workers.student_topk import StudentTopKLoss

__all__ = [
    "OPD_TRAINER_NAME",
    "OPDTrainer",
    "OPDTaskRunner",
    "TEACHER_PREFIX",
    "forward_settings",
    "offload_metrics",
    "REF_PREFIX",
]

OPD_TRAINER_NAME = "opd_sync"
POOL_NAME = "opd_pool"  # the teachers' own pool (opd.teachers.placement=separate)
GLOBAL_POOL = "global_pool"  # veRL's pool of actor, rollout and ref (placement=colocated)
ROLE_NAME = "opd_forward"
TEACHER_PREFIX = "opd_teacher"
REF_PREFIX = "opd_ref"


def without_fields(meta, prefix: str):
    """``meta`` (a TransferQueue ``KVBatchMeta``) without the fields whose names start with ``prefix``, so a later
    worker call on it does not fetch them (veRL's workers fetch exactly ``meta.fields``)."""
    if meta.fields is not None:
        meta.fields = [f for f in meta.fields if not f.startswith(prefix)]
    return meta


def _as_list(value) -> list:
    if value is None:
        return None
    if hasattr(value, "tolist"):
        return list(value.tolist())
    return list(value)


def _padded(value: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor | None:
    if value is None:
        return None
    return value.to_padded_tensor(fill) if getattr(value, "is_nested", False) else value


def forward_settings(actor_rollout_ref: DictConfig) -> dict[str, Any]:
    """How the forward-only workers batch their forwards, from veRL's ``actor_rollout_ref`` section: as veRL's
    reference worker does (packing from ``model.use_remove_padding``, token budget or rows per forward from the
    ``ref.log_prob_*`` fields). Keyword arguments of `forward_worker_config`."""
    arr = actor_rollout_ref
    return {
        "micro_batch_size": int(arr.ref.get("log_prob_micro_batch_size_per_gpu") or 8),
        "use_remove_padding": bool(arr.model.get("use_remove_padding", True)),
        "use_dynamic_bsz": bool(arr.ref.get("log_prob_use_dynamic_bsz", False)),
        "max_token_len": int(arr.ref.get("log_prob_max_token_len_per_gpu") or 16384),
    }


def offload_metrics(stats: list[dict[str, int]]) -> dict[str, float]:
    """Metrics of one offload of the forward workers from each worker process's report (`ForwardOnlyWorker.
    offload_params` on CUDA: ``allocated_before``, ``allocated_after``, ``param_bytes``); empty without reports.

    - ``opd/teacher_offload/freed_fraction``: the smallest, over processes, device memory freed by the offload
      divided by the bytes of that process's parameter shard (about 1 when the parameters left the device);
    - ``opd/teacher_offload/params_gib``: parameter bytes of all shards offloaded, GiB;
    - ``opd/teacher_offload/allocated_after_gib``: the largest device memory a worker process still holds, GiB.
    """
    stats = [s for s in stats if s and s.get("param_bytes", 0) > 0]
    if not stats:
        return {}
    gib = float(2**30)
    return {
        "opd/teacher_offload/freed_fraction": min(
            (s["allocated_before"] - s["allocated_after"]) / s["param_bytes"] for s in stats
        ),
        "opd/teacher_offload/params_gib": sum(s["param_bytes"] for s in stats) / gib,
        "opd/teacher_offload/allocated_after_gib": max(s["allocated_after"] for s in stats) / gib,
    }


class OPDTaskRunnerBase(TaskRunnerV1.__ray_actor_class__):
    """veRL's v1 task runner that selects the plugin trainer ``trainer_name`` for ``trainer.v1.trainer_mode=sync``
    (the trainer puts ``sync`` back, see `OPDTrainer`).

    Pass the Ray actor class `OPDTaskRunner` to ``verl.trainer.main_ppo.run_ppo(config, task_runner_class=...)``.
    """

    trainer_name = OPD_TRAINER_NAME

    def run(self, config: DictConfig):
        import opd_verl.integration.plugin  # noqa: F401  (estimators registered in this actor)

        if config.trainer.v1.trainer_mode == "sync":
            with open_dict(config):
                config.trainer.v1.trainer_mode = self.trainer_name
        return super().run(config)


OPDTaskRunner = ray.remote(OPDTaskRunnerBase)


@register_trainer(OPD_TRAINER_NAME)
class OPDTrainer(PluginTrainer):
    """veRL's synchronous trainer with the plugin's teacher/reference workers (see the module docstring)."""

    trainer_name = OPD_TRAINER_NAME

    def __init__(self, config: DictConfig):
        self.forward_wgs: dict[str, Any] = {}
        self._teacher_refs: list[str | None] = []
        self._scored_temperatures: dict[str, float] = {}
        super().__init__(config)

    # ------------------------------------------------------------------ configuration
    @property
    def uses_local_teachers(self) -> bool:
        return self.opd.teachers.kind == "local"

    @property
    def collects_student_topk(self) -> bool:
        return self.opd.release.enabled and self.uses_local_teachers

    def _check_supported(self) -> None:
        cfg = self.config
        if self.collects_student_topk:
            rc = cfg.algorithm.get("rollout_correction", None)
            if rc is not None and rc.get("bypass_mode", False):
                raise OPDConfigError(
                    "opd.release.enabled=true needs the actor's own log-prob pass (it yields the student's top-K ids);"
                    " algorithm.rollout_correction.bypass_mode=true skips it: set it to false"
                )
            if cfg.actor_rollout_ref.model.get("use_fused_kernels", False):
                raise OPDConfigError(
                    "opd.release.enabled=true takes the student's top-K ids from the logits, which "
                    "actor_rollout_ref.model.use_fused_kernels=true never materialises: set it to false"
                )
            if cfg.get("distillation") is not None and cfg.distillation.get("enabled", False):
                raise OPDConfigError(
                    "opd.release.enabled=true replaces the actor's loss function; distillation.enabled=true (veRL's "
                    "teacher servers) also does: use opd.teachers.kind=local with distillation.enabled=false"
                )

    # ------------------------------------------------------------------ setup
    def _init_resource_pool_mgr(self):
        super()._init_resource_pool_mgr()
        if not self.uses_local_teachers:
            return
        pool = GLOBAL_POOL
        if self.opd.teachers.placement == "separate":
            pool = POOL_NAME
            spec = self.resource_pool_manager.resource_pool_spec
            spec[POOL_NAME] = [self.opd.teachers.n_gpus_per_node] * self.opd.teachers.nnodes
        self.mapping[ROLE_NAME] = pool
        self.resource_pool_manager.mapping[ROLE_NAME] = pool

    def _setup(self):
        super()._setup()
        if self.uses_local_teachers:
            self._init_forward_workers()
        if self.collects_student_topk:
            self._install_student_topk_loss()

    def _forward_worker_configs(self) -> dict[str, dict]:
        from opd_verl.model_check import reference_paths
        from opd_verl.workers.forward_worker import forward_worker_config

        teachers, release = self.opd.teachers, self.opd.release
        forwards = forward_settings(self.config.actor_rollout_ref)
        configs = {}
        self._teacher_refs = []
        ref_keys: dict[str, str] = {}
        for i, (t, ref) in enumerate(zip(teachers.models, reference_paths(self.opd), strict=True)):
            configs[f"teacher{i}"] = forward_worker_config(
                t.path,
                TEACHER_PREFIX,
                chunk_size=teachers.logprob_chunk_size,
                margin=release.margin if release.enabled else None,
                sentences=release.enabled,
                split_newlines=release.split_newlines,
                **forwards,
            )
            if ref and ref not in ref_keys:
                ref_keys[ref] = f"reference{len(ref_keys)}"
                configs[ref_keys[ref]] = forward_worker_config(
                    ref, REF_PREFIX, chunk_size=teachers.logprob_chunk_size, **forwards
                )
            self._teacher_refs.append(ref_keys.get(ref) if ref else None)
        return configs

    def _init_forward_workers(self) -> None:
        import ray
        from verl.single_controller.ray import RayClassWithInitArgs, RayWorkerGroup, create_colocated_worker_cls

        from opd_verl.workers.forward_worker import ForwardOnlyWorker

        configs = self._forward_worker_configs()
        class_dict = {
            key: RayClassWithInitArgs(cls=ray.remote(ForwardOnlyWorker), config=cfg) for key, cfg in configs.items()
        }
        pool = self.resource_pool_manager.get_resource_pool(ROLE_NAME)
        wg = RayWorkerGroup(
            resource_pool=pool,
            ray_cls_with_init=create_colocated_worker_cls(class_dict=class_dict),
            device_name=self.config.trainer.device,
        )
        self.forward_wgs = wg.spawn(prefix_set=class_dict.keys())
        landed = {key: self.forward_wgs[key].init_model()[0] for key in class_dict}
        if self.opd.teachers.offload:
            self._offload_forward_workers()
        pool_name = self.resource_pool_manager.mapping[ROLE_NAME]
        for key, info in landed.items():
            how = f"FSDP2-sharded over {info['backend']}" if info["sharded"] else "one unsharded copy"
            print(
                f"opd_verl: forward workers {key}: {info['world_size']} rank(s) in {pool_name} "
                f"({self.opd.teachers.placement}), {how}, offload {'on' if self.opd.teachers.offload else 'off'}",
                flush=True,
            )

    def _load_forward_workers(self) -> None:
        """``opd.teachers.offload``: teacher/reference parameters back on the device before the teacher phase."""
        for wg in self.forward_wgs.values():
            wg.load_params()

    def _offload_forward_workers(self, metrics: dict | None = None) -> None:
        """``opd.teachers.offload``: teacher/reference parameters to CPU memory after the teacher phase; with
        ``metrics``, what the offload freed on the device (`offload_metrics`; nothing on a CPU run)."""
        stats = []
        for wg in self.forward_wgs.values():
            stats += [s for s in (wg.offload_params() or []) if s]
        if metrics is not None:
            metrics.update(offload_metrics(stats))

    def _install_student_topk_loss(self) -> None:
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.utils.losses import ppo_loss

        actor_config = omega_conf_to_dataclass(self.config.actor_rollout_ref.actor)
        self.actor_rollout_wg.set_loss_fn(
            StudentTopKLoss(partial(ppo_loss, config=actor_config), self.opd.release.top_k)
        )

    # ------------------------------------------------------------------ step
    def _compute_old_log_prob(self, batch, metrics: dict):
        if not self.collects_student_topk:
            return super()._compute_old_log_prob(batch, metrics)
        wg = self.actor_rollout_wg
        original = wg.compute_log_prob
        flags = {"compute_loss": True, "distillation_use_topk": True, "opd_collect_student_topk": True}

        def with_topk(b):
            b.extra_info.update(flags)
            try:
                return original(b)
            finally:
                for key in flags:
                    b.extra_info.pop(key, None)

        wg.compute_log_prob = with_topk
        try:
            return super()._compute_old_log_prob(batch, metrics)
        finally:
            wg.compute_log_prob = original

    def _route(self, batch) -> list[int]:
        import transfer_queue as tq

        key = self.opd.teachers.routing_key
        field = "data_source" if key == "data_source" else "extra_info"
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=[field])
        raw = _as_list(data[field])
        values = routing_values(key, raw if field == "data_source" else None, raw if field == "extra_info" else None)
        padding = [bool(tag.get("is_padding", False)) for tag in batch.tags]
        routes = [t.route for t in self.opd.teachers.models]
        real = [v for v, p in zip(values, padding, strict=True) if not p]
        owners_real = iter(assign_teachers(real, routes, key))
        return [0 if p else next(owners_real) for p in padding]

    def _compute_teacher_outputs(self, batch, owners: list[int], metrics: dict) -> None:
        """Score the batch with each sample's teacher (and reference) and store the results in TransferQueue.

        Writes per response token ``opd_teacher_log_probs`` (and, with the release rule, ``opd_teacher_margins``,
        ``opd_teacher_topk_mass`` and ``opd_sentence_ids``) for every sample, and ``opd_ref_log_probs`` for samples
        whose teacher has a reward-correction base model. Override to change what the teacher sees (OPSD's
        privileged prompt).
        """
        from transfer_queue import KVBatchMeta

        fields = ["prompts", "responses", "response_mask"]
        if self.collects_student_topk:
            fields += [STUDENT_TOPK_FIELD.format(j) for j in range(self.opd.release.top_k)]
        extra = {"temperature": self.config.actor_rollout_ref.rollout.temperature, "global_step": self.global_steps}
        t0 = time.perf_counter()
        for i in range(len(self.opd.teachers.models)):
            idx = [n for n, o in enumerate(owners) if o == i]
            if not idx:
                continue
            keys = [batch.keys[n] for n in idx]
            tags = [batch.tags[n] for n in idx]
            meta = KVBatchMeta(keys=keys, tags=tags, partition_id=batch.partition_id, fields=fields, extra_info=extra)
            self.forward_wgs[f"teacher{i}"].compute_logprobs(meta)
            self._scored_temperatures[self.opd.teachers.models[i].name] = float(extra["temperature"])
            ref_key = self._teacher_refs[i] if self._teacher_refs else None
            if ref_key:
                ref_meta = KVBatchMeta(
                    keys=keys, tags=tags, partition_id=batch.partition_id, fields=fields[:3], extra_info=extra
                )
                self.forward_wgs[ref_key].compute_logprobs(ref_meta)
        metrics["opd/teacher_time_s"] = time.perf_counter() - t0
        self.opd_state["teacher_calls"] += 1

    def _compute_advantage(self, batch, metrics: dict):
        """veRL's advantage step with the teacher/reference tensors handed to the registered estimator."""
        import transfer_queue as tq
        from tensordict import TensorDict
        from verl.protocol import DataProto
        from verl.trainer.ppo.ray_trainer import apply_kl_penalty
        from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
        from verl.utils.debug import marked_timer
        from verl.workers.utils.padding import response_to_nested

        if not self.uses_local_teachers:
            # teachers.kind=server: veRL's teacher servers and distillation loss carry the signal
            return super()._compute_advantage(batch, metrics)

        owners = self._route(batch)
        with marked_timer("opd_teacher", self.timing_raw, color="purple"):
            if self.opd.teachers.offload:
                self._load_forward_workers()
            try:
                self._compute_teacher_outputs(batch, owners, metrics)
            finally:
                if self.opd.teachers.offload:
                    self._offload_forward_workers(metrics)

        have_ref = self.use_reference_policy
        have_base_ref = any(self._teacher_refs)
        fields = [
            "uid",
            "response_mask",
            "rm_scores",
            "rollout_log_probs",
            "old_log_probs",
            f"{TEACHER_PREFIX}_log_probs",
        ]
        if have_ref:
            fields.append("ref_log_prob")
        if self.opd.release.enabled:
            fields += [f"{TEACHER_PREFIX}_margins", f"{TEACHER_PREFIX}_topk_mass", SENTENCE_FIELD]
        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=fields)
        base_ref = None
        if have_base_ref:
            ref_idx = [n for n, o in enumerate(owners) if self._teacher_refs[o]]
            base_ref = (
                ref_idx,
                tq.kv_batch_get(
                    keys=[batch.keys[n] for n in ref_idx],
                    partition_id=batch.partition_id,
                    select_fields=[f"{REF_PREFIX}_log_probs"],
                ),
            )

        response_mask_nested = data["response_mask"]
        data = DataProto(batch=data.to_padded_tensor())
        data.batch["token_level_scores"] = data.batch["rm_scores"]
        data.non_tensor_batch["uid"] = np.array(data.batch.pop("uid").tolist(), dtype=object)
        if self.config.algorithm.use_kl_in_reward:
            data, kl_metrics = apply_kl_penalty(
                data, kl_ctrl=self.kl_ctrl_in_reward, kl_penalty=self.config.algorithm.kl_penalty
            )
            metrics.update(kl_metrics)
        else:
            data.batch["token_level_rewards"] = data.batch["token_level_scores"]

        rc_config = self.config.algorithm.get("rollout_correction", None)
        bypass = rc_config and rc_config.get("bypass_mode", False)
        rollout_correction = rc_config is not None and "rollout_log_probs" in data.batch and not bypass
        if rollout_correction:
            data, is_metrics = compute_rollout_correction_and_add_to_batch(data, rc_config)
            metrics.update(is_metrics)

        advantages, returns = self._opd_advantages(data, owners, base_ref, metrics)
        data.batch["advantages"] = advantages
        data.batch["returns"] = returns
        self.opd_state["advantage_step"] = int(self.global_steps)

        out_fields = ["advantages", "returns"]
        if self.config.algorithm.use_kl_in_reward:
            out_fields.append("token_level_rewards")
        if rollout_correction:
            out_fields.append("response_mask")
            if "rollout_is_weights" in data.batch:
                out_fields.append("rollout_is_weights")
        output = {f: response_to_nested(data.batch[f], response_mask_nested) for f in out_fields}
        output = TensorDict(output, batch_size=len(batch))
        meta = tq.kv_batch_put(keys=batch.keys, partition_id=batch.partition_id, fields=output)
        # the student's top-K ids served the teacher phase only: the actor update does not fetch them
        return without_fields(meta, STUDENT_TOPK_FIELD.format(""))

    def _opd_advantages(self, data, owners: list[int], base_ref, metrics: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """`(B, T)` advantages (also the returns) from one :func:`~opd_verl.objectives.compose_advantages` call;
        its metrics are added to ``metrics``.

        Each teacher's ``lam`` reaches the signal as the per-row ``lam`` of the samples it scored.

        Args:
            data: veRL `DataProto` with padded ``response_mask``, ``token_level_rewards``, ``old_log_probs``,
                ``opd_teacher_log_probs`` (and ``ref_log_prob``, ``opd_teacher_margins``, ``opd_sentence_ids``
                where used) and the ``uid`` of each sample.
            owners: teacher index per sample.
            base_ref: ``(sample indices, TensorDict with opd_ref_log_probs)`` for reward-correction samples, or None.
        """
        from opd_verl.objectives import compose_advantages

        params = self.opd.stage_params
        inputs, nonfinite = self._objective_inputs(data, owners, base_ref), None
        task = None
        if params.task_coef != 0.0:
            from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage

            task, _ = compute_grpo_outcome_advantage(
                data.batch["token_level_rewards"], inputs["response_mask"], data.non_tensor_batch["uid"]
            )

        def run(inputs):
            return compose_advantages(
                inputs["student"],
                inputs["teacher"],
                inputs["response_mask"],
                params=params,
                ref_logprobs=inputs["ref"],
                sentence_ids=inputs["sentence_ids"],
                margins=inputs["margins"],
                task_advantages=task,
                lam=inputs["lam"],
                step=self.global_steps,
                total_steps=self.total_training_steps,
            )

        try:
            advantages, adv_metrics = run(inputs)
        except ValueError as exc:  # NaN/inf at valid tokens: the rows are taken out (opd.health), else re-raised
            inputs, nonfinite = self.health.sanitize(inputs, exc)
            advantages, adv_metrics = run(inputs)
        metrics.update(adv_metrics)
        temperatures = dict(self._scored_temperatures)
        self.health.check(self.global_steps, inputs, advantages, owners, nonfinite, adv_metrics, temperatures, metrics)
        mask = inputs["response_mask"].bool()
        teacher = inputs["teacher"][mask]
        metrics["opd/teacher_log_prob"] = float(teacher.mean()) if teacher.numel() else 0.0  # over response tokens
        return advantages, advantages

    def _objective_inputs(self, data, owners: list[int], base_ref) -> dict[str, torch.Tensor | None]:
        """`(B, T)` inputs of the objectives from the padded batch; lam per sample `(B,)`."""
        b = data.batch
        response_mask = b["response_mask"].float()
        t = response_mask.shape[1]

        def to_response_length(x: torch.Tensor | None) -> torch.Tensor | None:
            if x is None:
                return None
            x = _padded(x)
            if x.shape[1] < t:
                x = torch.nn.functional.pad(x, (0, t - x.shape[1]))
            return x[:, :t]

        student = to_response_length(b["old_log_probs"]).float()
        teacher = to_response_length(b[f"{TEACHER_PREFIX}_log_probs"]).float()
        lams = torch.tensor([self.opd.teachers.models[o].lam for o in owners], dtype=torch.float32)
        ref = None
        if self.opd.signal.name == "gopd":
            # rows with lam == 1 ignore the reference; give them the teacher's values so nothing undefined remains
            has_ref = "ref_log_prob" in b.keys()
            ref = to_response_length(b["ref_log_prob"]).float().clone() if has_ref else teacher.clone()
            if base_ref is not None:
                idx, got = base_ref
                rows = to_response_length(_padded(got[f"{REF_PREFIX}_log_probs"]))
                for j, n in enumerate(idx):
                    ref[n] = rows[j] if rows.shape[1] == t else to_response_length(rows[j : j + 1])[0]
        sentence_ids = margins = topk_mass = None
        if self.opd.release.enabled:
            sentence_ids = to_response_length(b[SENTENCE_FIELD]).long()
            margins = to_response_length(b[f"{TEACHER_PREFIX}_margins"]).float()
            if f"{TEACHER_PREFIX}_topk_mass" in b.keys():
                topk_mass = to_response_length(b[f"{TEACHER_PREFIX}_topk_mass"]).float()
        return {
            "response_mask": response_mask,
            "student": student,
            "teacher": teacher,
            "ref": ref,
            "lam": lams if self.opd.signal.name == "gopd" else None,
            "sentence_ids": sentence_ids,
            "margins": margins,
            "topk_mass": topk_mass,  # health diagnostics only
        }
