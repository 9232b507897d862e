"""OPSD inside veRL's actor: a worker loss function in veRL's dual convention, and the actor worker that installs it.

veRL 0.9.1's FSDP engine calls the worker loss function twice per micro-batch when the micro-batch carries the
flag ``distillation_use_topk``: first as a logits processor, ``fn(student_logits=(1, nnz, V), data=micro_batch)``
right after the student forward (logits divided by the rollout temperature, packed over the micro-batch), and
returns per-token tensors that veRL stores in ``model_output``; then as the loss,
``fn(model_output=..., data=..., dp_group=...)``. :class:`OPSDActorLoss` runs the privileged teacher forward on
the same module in the first call (``no_grad``, teacher weights from :class:`opd_verl.opsd.TeacherWeights`), so
teacher logits never leave the actor process, and returns the per-token divergence with its graph; the second
call aggregates it with veRL's ``agg_loss`` (``loss_agg_mode``, global token normalisation).

:class:`OPSDActorRolloutRefWorker` is veRL's ``ActorRolloutRefWorker`` plus: the OPSD loss installed by
``configure_opsd`` (the trainer's parsed ``opd.opsd`` settings, sent after ``init_model``), the
``distillation_use_topk`` flag on actor updates, the EMA update after every optimizer step, and the EMA state in
actor checkpoints. Teacher prompts are built in the worker from each sample's dataset fields (``extra_info``,
``reward_model``, ...) that veRL's agent loop stores with every trajectory.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch

from opd_verl.opsd.inputs import has_value, lookup_field, privileged_prompt_ids
from opd_verl.opsd.loss import (
    OPSDLossParams,
    opsd_metrics,
    opsd_response_divergences,
    sampled_token_advantages,
    teacher_response_logits,
)
from opd_verl.opsd.teacher import TeacherWeights

__all__ = ["OPSDActorLoss", "OPSDSettings", "make_opsd_worker_class"]

_ROW_FIELDS = ("extra_info", "reward_model", "data_source")
# teacher tokens per forward when the actor config gives no `ppo_max_token_len_per_gpu`
DEFAULT_TEACHER_MAX_TOKENS = 16384


def loss_metric(loss: torch.Tensor, data, actor_config):
    """The micro-batch loss as a veRL ``Metric`` aggregated over micro-batches as veRL's ``ppo_loss`` does.

    A loss normalised by the global mini-batch (``dp_size > 1``, ``batch_num_tokens``, ``global_batch_size`` or
    ``loss_scale_factor`` set) is each micro-batch's share of the mini-batch loss: summed. Otherwise each
    micro-batch's loss is a mean of its own: averaged.
    """
    from verl.utils.metric import AggregationType, Metric

    global_norm = (
        data["dp_size"] > 1
        or data["batch_num_tokens"] is not None
        or data["global_batch_size"] is not None
        or actor_config.loss_scale_factor is not None
    )
    return Metric(value=loss.detach(), aggregation=AggregationType.SUM if global_norm else AggregationType.MEAN)


class OPSDSettings(dict):
    """The ``opd.opsd`` section as a plain dict, plus ``chat_template_kwargs`` (veRL's data setting)."""


def _lengths(t: torch.Tensor, name: str) -> torch.Tensor:
    if not getattr(t, "is_nested", False):
        raise ValueError(f"OPSD expects veRL's no-padding micro-batches (nested {name}), got a padded tensor")
    return t.offsets().diff()


def _rows(data, n: int) -> list[dict]:
    """Per-sample dataset fields stored with the trajectory (non-tensor entries of the micro-batch)."""
    rows = [{} for _ in range(n)]
    for key in _ROW_FIELDS:
        if key not in data.keys():
            continue
        values = data.get(key)
        values = values.tolist() if hasattr(values, "tolist") else list(values)
        for i in range(n):
            rows[i][key] = values[i]
    return rows


class OPSDActorLoss:
    """Worker loss function (``actor_rollout_wg.set_loss_fn``-compatible) for OPSD in logits mode.

    Args:
        module: the actor's model (what veRL's engine calls; FSDP-wrapped or plain).
        teacher: teacher weights on that module.
        params: loss settings.
        tokenizer: the model's tokenizer (teacher prompts are tokenised in the worker).
        settings: the ``opd.opsd`` section (templates, field paths, missing-solution policy).
        actor_config: veRL's actor config (``loss_agg_mode``, ``global_batch_info``, policy loss for ``sampled``).
    """

    def __init__(self, module, teacher: TeacherWeights, params: OPSDLossParams, tokenizer, settings, actor_config):
        self.module = module
        self.teacher = teacher
        self.params = params
        self.tokenizer = tokenizer
        self.settings = settings
        self.actor_config = actor_config
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def teacher_prompts(self, rows: list[dict]) -> tuple[list[list[int] | None], list[bool]]:
        """Privileged prompt ids per sample (None without a solution under ``missing_solution=skip``)."""
        prompts, ctx = [], []
        for i, row in enumerate(rows):
            problem = lookup_field(row, self.settings["problem_key"])
            solution = lookup_field(row, self.settings["solution_key"])
            if not has_value(problem) or not has_value(solution):
                if self.settings.get("missing_solution", "error") != "skip" or not has_value(problem):
                    raise ValueError(
                        f"OPSD: sample {i} of the micro-batch lacks {self.settings['problem_key']!r} or "
                        f"{self.settings['solution_key']!r} (the load-time check should have caught it)"
                    )
                prompts.append(None)
                ctx.append(False)
                continue
            prompts.append(
                privileged_prompt_ids(
                    self.tokenizer,
                    self.settings["teacher_template"],
                    problem,
                    solution,
                    self.settings.get("chat_template_kwargs"),
                )
            )
            ctx.append(True)
        return prompts, ctx

    def _teacher_group(
        self,
        rows,
        prompts,
        responses,
        resp_lens,
        logits,
        resp_starts,
        temperature,
        divergence,
        clipped,
        teacher_lp,
        context,
    ) -> None:
        """One teacher forward over the samples ``rows``; writes their per-token outputs into the `(nnz,)` buffers."""
        width = max(int(resp_lens[i]) for i in rows)
        resp = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long, device=logits.device)
        mask = torch.zeros_like(resp)
        for k, i in enumerate(rows):
            resp[k, : int(resp_lens[i])] = responses[i].to(logits.device)
            mask[k, : int(resp_lens[i])] = 1
        was_training = self.module.training
        with torch.no_grad(), self.teacher.weights():
            t_logits = teacher_response_logits(self.module, [prompts[i] for i in rows], resp, mask, self.pad_token_id)
        self.module.train(was_training)
        s_rows, t_rows, spans = [], [], []
        for k, i in enumerate(rows):
            r = int(resp_lens[i])
            begin = int(resp_starts[i]) - 1  # the logit that predicts the first response token
            s_rows.append(logits[begin : begin + r])
            t_rows.append(t_logits[k, :r])
            spans.append((begin, r))
            t_scaled = t_logits[k, :r].float() / temperature
            # row t of veRL's packed outputs belongs to the token at t + 1 (the token it predicts)
            picked = t_scaled.gather(-1, resp[k, :r, None]).squeeze(-1)
            teacher_lp[begin : begin + r] = picked - torch.logsumexp(t_scaled, dim=-1)
            del t_scaled
            context[begin : begin + r] = 1.0
        if self.params.loss != "sampled":
            divs, clips = opsd_response_divergences(s_rows, t_rows, self.params, logits_temperature=temperature)
            for (begin, r), d, c in zip(spans, divs, clips, strict=True):
                divergence.index_put_((torch.arange(begin, begin + r, device=d.device),), d)
                clipped[begin : begin + r] = c.float()

    def logits_outputs(self, student_logits: torch.Tensor, data) -> dict[str, torch.Tensor]:
        """Logits-processor call: per-token OPSD tensors `(1, nnz)` over the packed micro-batch."""
        from verl.utils import tensordict_utils as tu

        logits = student_logits.squeeze(0)  # (nnz, V)
        nnz = logits.shape[0]
        seq_lens = _lengths(data["input_ids"], "input_ids")
        resp_lens = _lengths(data["responses"], "responses")
        prompt_lens = seq_lens - resp_lens
        starts = torch.cat([seq_lens.new_zeros(1), seq_lens.cumsum(0)[:-1]])
        if int(seq_lens.sum()) != nnz:
            raise ValueError(
                f"OPSD: packed student logits have {nnz} rows but the micro-batch has {int(seq_lens.sum())} tokens "
                "(sequence parallelism is not supported by the OPSD loss)"
            )
        temperature = tu.get_non_tensor_data(data=data, key="temperature", default=1.0)
        temperature = float(temperature.flatten()[0]) if torch.is_tensor(temperature) else float(temperature)
        n = seq_lens.shape[0]
        prompts, ctx = self.teacher_prompts(_rows(data, n))
        responses = list(data["responses"].unbind())

        divergence = torch.zeros(nnz, dtype=torch.float32, device=logits.device)
        clipped = torch.zeros(nnz, dtype=torch.float32, device=logits.device)
        teacher_lp = torch.zeros(nnz, dtype=torch.float32, device=logits.device)
        context = torch.zeros(nnz, dtype=torch.float32, device=logits.device)
        chosen = [i for i in range(n) if ctx[i] and int(resp_lens[i]) > 0]
        if chosen:
            from opd_verl.workers.logprobs import micro_batches

            # the teacher forward has its own token budget (the actor's per-GPU token budget, as veRL gives the
            # student's forward); each group's teacher logits are consumed (log-probs, divergences) before the next
            # group runs: `topk`/`sampled` keep none of them, `full` keeps the groups' `(g, R_g, V)` logits for
            # the divergence's recompute backward (no other `(r, V)` intermediates)
            budget = int(getattr(self.actor_config, "ppo_max_token_len_per_gpu", 0) or DEFAULT_TEACHER_MAX_TOKENS)
            lens = [len(prompts[i]) + int(resp_lens[i]) for i in chosen]
            for group in micro_batches(lens, max_tokens=budget):
                rows = [chosen[j] for j in group]
                self._teacher_group(
                    rows,
                    prompts,
                    responses,
                    resp_lens,
                    logits,
                    starts + prompt_lens,
                    temperature,
                    divergence,
                    clipped,
                    teacher_lp,
                    context,
                )
        return {
            "opsd_divergence": divergence.unsqueeze(0),
            "opsd_clipped": clipped.unsqueeze(0),
            "opsd_teacher_log_probs": teacher_lp.unsqueeze(0),
            "opsd_context": context.unsqueeze(0),
        }

    def final_loss(self, model_output: dict, data, dp_group=None):
        """Loss call: token-mean (veRL's ``loss_agg_mode``) of the divergence, or the PG loss for ``sampled``."""
        from verl.trainer.ppo.core_algos import agg_loss
        from verl.workers.utils.losses import ppo_loss
        from verl.workers.utils.padding import no_padding_2_padding

        for key in ("opsd_divergence", "opsd_context"):
            if key not in model_output:
                raise ValueError(
                    f"OPSD: model_output lacks {key}; the actor update must set the micro-batch flag "
                    "distillation_use_topk so that veRL calls the loss as a logits processor first"
                )
        response_mask = data["response_mask"]
        resp_mask = (response_mask.to_padded_tensor(0) if response_mask.is_nested else response_mask).bool()
        ctx = no_padding_2_padding(model_output["opsd_context"], data).bool() & resp_mask
        t_lp = no_padding_2_padding(model_output["opsd_teacher_log_probs"], data)
        s_lp = no_padding_2_padding(model_output["log_probs"], data) if "log_probs" in model_output else None
        n_samples = int(ctx.shape[0])
        n_ctx = int(ctx.any(dim=1).sum())
        metrics: dict[str, Any] = {}
        if self.params.loss == "sampled":
            old = data["old_log_probs"]
            old = old.to_padded_tensor(0.0) if old.is_nested else old
            adv = sampled_token_advantages(t_lp, old, ctx)
            lens = _lengths(response_mask, "response_mask")
            values = torch.cat([adv[i, : int(len_i)] for i, len_i in enumerate(lens)])
            data = data.copy()
            # min/max seqlen cached so that to_padded_tensor pads to the longest response, as veRL's own fields do
            data["advantages"] = torch.nested.nested_tensor_from_jagged(
                values, response_mask.offsets(), min_seqlen=int(lens.min()), max_seqlen=int(lens.max())
            )
            loss, metrics = ppo_loss(self.actor_config, model_output, data, dp_group)
            m = opsd_metrics(None, None, t_lp[ctx], old[ctx], ctx[ctx], n_ctx, n_samples)
        else:
            div = no_padding_2_padding(model_output["opsd_divergence"], data)
            clipped = no_padding_2_padding(model_output["opsd_clipped"], data).bool()
            cfg = self.actor_config
            cfg.global_batch_info["dp_size"] = data["dp_size"]
            cfg.global_batch_info["batch_num_tokens"] = data["batch_num_tokens"]
            cfg.global_batch_info["global_batch_size"] = data["global_batch_size"]
            cfg.global_batch_info["loss_scale_factor"] = cfg.loss_scale_factor
            loss = agg_loss(loss_mat=div, loss_mask=ctx, loss_agg_mode=cfg.loss_agg_mode, **cfg.global_batch_info)
            student = s_lp[ctx] if s_lp is not None else t_lp[ctx]
            m = opsd_metrics(div[ctx], clipped[ctx], t_lp[ctx], student, ctx[ctx], n_ctx, n_samples)
        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError("OPSD loss is not finite")
        m["opsd/loss"] = loss_metric(loss, data, self.actor_config)
        # 1.0 when the teacher is the base model with the LoRA adapter disabled (frozen teacher under LoRA)
        m["opsd/teacher_adapter_off"] = float(self.teacher.adapter_toggle)
        metrics.update(m)
        return loss, metrics

    def __call__(self, model_output=None, data=None, dp_group=None, student_logits=None, data_format="thd"):
        if student_logits is not None:
            return self.logits_outputs(student_logits, data)
        return self.final_loss(model_output, data, dp_group)


def make_opsd_worker_class():
    """veRL's ``ActorRolloutRefWorker`` with the OPSD loss (built lazily so importing this module needs no Ray)."""
    from verl.single_controller.base.decorator import Dispatch, make_nd_compute_dataproto_dispatch_fn, register
    from verl.utils import tensordict_utils as tu
    from verl.workers.engine_workers import ActorRolloutRefWorker

    class OPSDActorRolloutRefWorker(ActorRolloutRefWorker):
        """Actor worker whose update computes the OPSD loss with the privileged teacher in the same process."""

        opsd_loss: OPSDActorLoss | None = None

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def init_model(self):
            super().init_model()

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def configure_opsd(self, settings: dict):
            """Install (or replace) the OPSD loss with the ``opd.opsd`` settings (+ ``chat_template_kwargs``)."""
            self._install_opsd(OPSDSettings(settings))

        def _install_opsd(self, settings: OPSDSettings):
            from verl.utils.config import omega_conf_to_dataclass

            engine = self.actor.engine
            module = engine.module
            teacher = TeacherWeights(module, settings["teacher"], settings["ema_decay"])
            actor_config = omega_conf_to_dataclass(self.config.actor)
            actor_config.model_config = omega_conf_to_dataclass(self.config.model)
            tokenizer = actor_config.model_config.tokenizer
            params = OPSDLossParams.from_config(SimpleNamespace(**settings))
            self.opsd_loss = OPSDActorLoss(module, teacher, params, tokenizer, settings, actor_config)
            self.actor.set_loss_fn(self.opsd_loss)
            if teacher.mode == "ema":
                engine.optimizer.register_step_post_hook(lambda *_: teacher.update())

        @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
        def update_actor(self, data):
            if self.opsd_loss is None:
                raise RuntimeError("OPSD worker: configure_opsd was not called (the trainer calls it after init_model)")
            tu.assign_non_tensor_data(data, "distillation_use_topk", True)
            output = self.actor.train_mini_batch(data=data)
            return output.cpu() if output is not None else None

        def _ema_path(self, local_path: str) -> str:
            return os.path.join(local_path, f"opsd_teacher_rank{torch.distributed.get_rank()}.pt")

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def save_checkpoint(self, local_path, hdfs_path=None, global_step=0, max_ckpt_to_keep=None):
            self.actor.save_checkpoint(local_path, hdfs_path, global_step, max_ckpt_to_keep)
            if self.opsd_loss is not None and self.opsd_loss.teacher.shadow:
                os.makedirs(local_path, exist_ok=True)
                torch.save(self.opsd_loss.teacher.state_dict(), self._ema_path(local_path))

        @register(dispatch_mode=Dispatch.ONE_TO_ALL)
        def load_checkpoint(self, local_path, hdfs_path=None, del_local_after_load=False):
            teacher_path = self._ema_path(local_path) if local_path else None
            state = None
            if self.opsd_loss is not None and self.opsd_loss.teacher.shadow and teacher_path:
                if not os.path.exists(teacher_path):
                    raise FileNotFoundError(f"OPSD teacher state {teacher_path} is missing from the checkpoint")
                state = torch.load(teacher_path, weights_only=True)
            self.actor.load_checkpoint(local_path, hdfs_path, del_local_after_load)
            if state is not None:
                self.opsd_loss.teacher.load_state_dict(state)

    return OPSDActorRolloutRefWorker
