"""opd_verl names in veRL 0.9.1's registries: presence, idempotence, and numbers through veRL's own paths."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("verl")

from tensordict import TensorDict  # noqa: E402
from verl.trainer.distillation import losses as distill  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402

from opd_verl.integration import adapters  # noqa: E402
from opd_verl.integration.registry import REGISTERED_NAMES, is_registered, register  # noqa: E402
from opd_verl.objectives import (  # noqa: E402
    StageParams,
    apply_release,
    gopd_advantages,
    iw_opd_advantages,
    opd_advantages,
    topk_generalized_jsd,
)


@pytest.fixture(autouse=True)
def _registered_and_reset(monkeypatch):
    register()
    monkeypatch.delenv(adapters.STAGE_PARAMS_ENV, raising=False)


def _stages_for_workers(monkeypatch, stages: dict) -> None:
    """The stages as `opd.teachers.kind=server` hands them to the workers (their environment)."""
    monkeypatch.setenv(adapters.STAGE_PARAMS_ENV, json.dumps(stages))


def _batch(seed=0, b=3, r=10):
    g = torch.Generator().manual_seed(seed)
    s = -torch.rand(b, r, generator=g) * 2
    t = -torch.rand(b, r, generator=g) * 2
    ref = -torch.rand(b, r, generator=g) * 2
    lens = torch.tensor([r, r - 3, 4])[:b]
    mask = (torch.arange(r)[None, :] < lens[:, None]).long()
    mask[0, 2] = 0  # a zero inside the response
    sids = torch.div(torch.arange(r), 2, rounding_mode="floor").repeat(b, 1)
    margins = torch.rand(b, r, generator=g)
    margins[:, r // 2 :] *= 0.05
    return s, t, ref, mask, sids, margins


def test_names_present_and_idempotent():
    assert REGISTERED_NAMES["adv_estimator"] == ["opd_pipeline"]
    assert REGISTERED_NAMES["distillation_loss"] == ["opd_pipeline", "opsd_gjsd"]
    first = register()
    second = register()
    assert first == second == REGISTERED_NAMES
    assert is_registered()
    for name in REGISTERED_NAMES["adv_estimator"]:
        assert core_algos.get_adv_estimator_fn(name) is core_algos.ADV_ESTIMATOR_REGISTRY[name]
    for name in REGISTERED_NAMES["distillation_loss"]:
        settings = distill.get_distillation_loss_settings(name)
        assert settings.use_topk == (name == "opsd_gjsd") and settings.use_estimator == (name != "opsd_gjsd")


def test_foreign_binding_raises():
    saved = core_algos.ADV_ESTIMATOR_REGISTRY.pop("opd_pipeline")
    try:
        core_algos.ADV_ESTIMATOR_REGISTRY["opd_pipeline"] = lambda **kw: None
        assert not is_registered()
        with pytest.raises(RuntimeError, match="opd_pipeline"):
            register()
    finally:
        core_algos.ADV_ESTIMATOR_REGISTRY["opd_pipeline"] = saved
    assert is_registered()


def test_stock_compute_advantage_refuses_clearly():
    from verl.protocol import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    s, t, ref, mask, *_ = _batch()
    data = DataProto.from_dict(
        tensors={"token_level_rewards": torch.zeros_like(s), "response_mask": mask},
        non_tensors={"uid": np.array(["a", "a", "b"], dtype=object)},
    )
    with pytest.raises(ValueError, match="teacher_logprobs"):
        compute_advantage(data, adv_estimator="opd_pipeline", config=SimpleNamespace(get=lambda k, d=None: d))


RELEASE = {"enabled": True, "min_segment": 2, "penalty": 0.5}
STAGES = {
    "opd": {},
    "gopd": {"signal": {"name": "gopd", "lam": 1.5}},
    "iw_opd": {"weighting": {"name": "iw", "w_max": 1.8}},
    "prefix_release": {"release": RELEASE},
    "exopd_iw_release": {
        "signal": {"name": "gopd", "lam": 1.5},
        "weighting": {"name": "iw", "w_max": 1.8},
        "release": RELEASE,
    },
}


@pytest.mark.parametrize("name", list(STAGES))
def test_adv_estimator_equals_pure_functions(name):
    s, t, ref, mask, sids, margins = _batch(1)
    fn = core_algos.get_adv_estimator_fn("opd_pipeline")
    metrics = {}
    adv, ret = fn(
        params=StageParams(**STAGES[name]),
        token_level_rewards=torch.zeros_like(s),
        response_mask=mask,
        config=None,
        index=np.array(["a", "a", "b"], dtype=object),
        student_logprobs=s,
        teacher_logprobs=t,
        ref_logprobs=ref,
        sentence_ids=sids,
        margins=margins,
        metrics=metrics,
    )
    expected = {
        "opd": lambda: opd_advantages(s, t, mask),
        "gopd": lambda: gopd_advantages(s, t, mask, 1.5, ref),
        "iw_opd": lambda: iw_opd_advantages(opd_advantages(s, t, mask), mask, 1.8),
        "prefix_release": lambda: apply_release(opd_advantages(s, t, mask), mask, sids, margins, 2, 0.5)[0],
        "exopd_iw_release": lambda: apply_release(
            iw_opd_advantages(gopd_advantages(s, t, mask, 1.5, ref), mask, 1.8, opd_advantages(s, t, mask)),
            mask,
            sids,
            margins,
            2,
            0.5,
        )[0],
    }[name]()
    torch.testing.assert_close(adv, expected)
    assert ret is adv
    assert "opd/discrepancy" in metrics


def test_env_params(monkeypatch):
    s, t, ref, mask, *_ = _batch(2)
    fn = core_algos.get_adv_estimator_fn("opd_pipeline")
    monkeypatch.setenv(adapters.STAGE_PARAMS_ENV, json.dumps({"signal": {"name": "gopd", "lam": 2.0}}))
    adv, _ = fn(torch.zeros_like(s), mask, student_logprobs=s, teacher_logprobs=t, ref_logprobs=ref)
    torch.testing.assert_close(adv, gopd_advantages(s, t, mask, 2.0, ref))


def test_task_coef_adds_verl_grpo_advantage(monkeypatch):
    s, t, ref, mask, *_ = _batch(3)
    _stages_for_workers(monkeypatch, {"task_coef": 0.5})
    rewards = torch.zeros_like(s)
    rewards[0, 5], rewards[1, 3], rewards[2, 2] = 1.0, 0.0, 1.0
    index = np.array(["a", "a", "b"], dtype=object)
    fn = core_algos.get_adv_estimator_fn("opd_pipeline")
    adv, _ = fn(rewards, mask, index=index, student_logprobs=s, teacher_logprobs=t)
    grpo, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    torch.testing.assert_close(adv, opd_advantages(s, t, mask) + 0.5 * grpo * mask)


def _packed_batch(s, t, ref, mask, prompt_lens):
    """veRL micro-batch: padded prompts/responses, attention mask, teacher log-probs in the packed layout."""
    b, r = s.shape
    p = int(max(prompt_lens))
    resp_lens = mask.shape[1] - torch.flip(mask, [1]).argmax(1)
    resp_lens = torch.where(mask.any(1), resp_lens, torch.zeros_like(resp_lens))
    attn = torch.zeros(b, p + r, dtype=torch.long)
    flat_teacher, flat_student = [], []
    for i in range(b):
        attn[i, p - prompt_lens[i] : p] = 1
        attn[i, p : p + resp_lens[i]] = 1
        seq_len = prompt_lens[i] + int(resp_lens[i])
        teach = torch.zeros(seq_len)
        stud = torch.zeros(seq_len)
        # the value for response token j sits at packed position prompt_len - 1 + j
        teach[prompt_lens[i] - 1 : prompt_lens[i] - 1 + resp_lens[i]] = t[i, : resp_lens[i]]
        stud[prompt_lens[i] - 1 : prompt_lens[i] - 1 + resp_lens[i]] = s[i, : resp_lens[i]]
        flat_teacher.append(teach)
        flat_student.append(stud)
    teacher_flat = torch.cat(flat_teacher)[:, None]
    data = TensorDict(
        {
            "prompts": torch.ones(b, p, dtype=torch.long),
            "responses": torch.ones(b, r, dtype=torch.long),
            "attention_mask": attn,
            "response_mask": mask,
            "old_log_probs": s,
            "ref_log_prob": ref,
            "teacher_logprobs": teacher_flat,
        },
        batch_size=[],
    )
    return data, torch.cat(flat_student)


DISTILL_STAGES = {
    "opd": {},
    "gopd": {"signal": {"name": "gopd", "lam": 1.25}},
    "iw_opd": {"weighting": {"name": "iw"}},
    "gopd_iw": {"signal": {"name": "gopd", "lam": 1.25}, "weighting": {"name": "iw"}},
}


@pytest.mark.parametrize("stages", list(DISTILL_STAGES))
def test_distillation_loss_path_equals_pure_pg_loss(stages, monkeypatch):
    from verl.workers.config import ActorConfig, DistillationLossConfig

    name = "opd_pipeline"
    s, t, ref, mask, sids, margins = _batch(4)
    stage = StageParams(**DISTILL_STAGES[stages])
    _stages_for_workers(monkeypatch, DISTILL_STAGES[stages])
    data, student_flat = _packed_batch(s, t, ref, mask, [3, 5, 2])
    n_tokens = int(mask.sum())
    data["dp_size"] = 1
    data["batch_num_tokens"] = n_tokens
    data["global_batch_size"] = s.shape[0]
    loss_cfg = DistillationLossConfig(loss_mode=name, use_policy_gradient=True, loss_max_clamp=None)
    actor_cfg = ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1)
    log_probs = student_flat.clone().requires_grad_(True)
    loss, _ = distill.distillation_loss(
        actor_cfg, SimpleNamespace(distillation_loss=loss_cfg), {"log_probs": log_probs}, data
    )
    loss.backward()

    lam = stage.signal.lam
    pure = gopd_advantages(s, t, mask, lam, ref)
    if stage.weighting.name == "iw":
        pure = iw_opd_advantages(pure, mask, stage.weighting.w_max, opd_advantages(s, t, mask))
    # veRL's vanilla PPO-clip on the pure advantages, same aggregation settings
    log_prob_padded = s.clone().requires_grad_(True)
    pg = core_algos.get_policy_loss_fn("vanilla")
    loss_cfg2 = DistillationLossConfig(loss_mode=name, use_policy_gradient=True, loss_max_clamp=None)
    for k, v in {**actor_cfg.global_batch_info}.items():
        loss_cfg2.global_batch_info[k] = v
    ref_loss, _ = pg(
        old_log_prob=s,
        log_prob=log_prob_padded,
        advantages=pure,
        response_mask=mask,
        loss_agg_mode=actor_cfg.loss_agg_mode,
        config=loss_cfg2,
        rollout_is_weights=None,
    )
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss)
    # gradient w.r.t. each response token's log-prob: equals -A / n_tokens (token-mean, ratio 1)
    packed_grad = log_probs.grad
    assert math.isfinite(float(loss))
    torch.testing.assert_close(packed_grad.sum(), log_prob_padded.grad.sum(), rtol=1e-5, atol=1e-6)


def test_distillation_release_reads_stored_fields(monkeypatch):
    s, t, ref, mask, sids, margins = _batch(5)
    data, _ = _packed_batch(s, t, ref, mask, [2, 2, 2])
    data["opd_sentence_ids"] = sids
    data["opd_margins"] = margins
    _stages_for_workers(monkeypatch, {"release": {"enabled": True}})
    fn = distill.get_distillation_loss_fn("opd_pipeline")
    losses, _ = fn(None, None, {}, data)
    expected, _ = apply_release(opd_advantages(s, t, mask), mask, sids, margins)
    torch.testing.assert_close(losses, -expected)


def test_opsd_gjsd_logits_processor_and_registered_loss():
    g = torch.Generator().manual_seed(6)
    prompt_lens, resp_lens, vocab, k = [2, 3], [4, 2], 11, 3
    seq_lens = [p + r for p, r in zip(prompt_lens, resp_lens, strict=True)]
    nnz = sum(seq_lens)
    student_logits = torch.randn(1, nnz, vocab, generator=g)
    teacher_logits = torch.randn(nnz, vocab, generator=g)
    top = torch.log_softmax(teacher_logits, -1).topk(k, -1)
    offsets = torch.tensor([0, *np.cumsum(seq_lens).tolist()])
    nested_lp = torch.nested.nested_tensor_from_jagged(top.values, offsets)
    nested_ids = torch.nested.nested_tensor_from_jagged(top.indices, offsets)
    data = {"teacher_logprobs": nested_lp, "teacher_ids": nested_ids}
    out = adapters.opsd_gjsd_logits_processor(student_logits, data, beta=0.5, temperature=1.1, pointwise_clip=0.05)
    expected = topk_generalized_jsd(
        student_logits[0], teacher_logits, k=k, beta=0.5, temperature=1.1, pointwise_clip=0.05
    )
    torch.testing.assert_close(out["distillation_losses"][0], expected)

    # final mode: veRL's unpacking gives the response-layout per-token losses
    p, r = max(prompt_lens), max(resp_lens)
    attn = torch.zeros(2, p + r, dtype=torch.long)
    mask = torch.zeros(2, r, dtype=torch.long)
    for i in range(2):
        attn[i, p - prompt_lens[i] : p] = 1
        attn[i, p : p + resp_lens[i]] = 1
        mask[i, : resp_lens[i]] = 1
    batch = TensorDict(
        {
            "prompts": torch.ones(2, p, dtype=torch.long),
            "responses": torch.ones(2, r, dtype=torch.long),
            "attention_mask": attn,
            "response_mask": mask,
        },
        batch_size=[2],
    )
    losses, metrics = distill.get_distillation_loss_fn("opsd_gjsd")(
        None, None, {"distillation_losses": out["distillation_losses"][0]}, batch
    )
    for i in range(2):
        start = int(offsets[i]) + prompt_lens[i] - 1
        torch.testing.assert_close(losses[i, : resp_lens[i]], expected[start : start + resp_lens[i]])
    assert metrics["opsd/gjsd"] == pytest.approx(float(losses[mask.bool()].mean()), rel=1e-6)
