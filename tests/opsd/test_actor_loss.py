"""The OPSD worker loss in veRL's dual convention (logits processor, then loss), on a veRL-layout micro-batch."""

import copy
from types import SimpleNamespace

import pytest
import torch

from opd_verl.objectives import generalized_jsd
from opd_verl.opsd.inputs import privileged_prompt_ids
from opd_verl.opsd.loss import OPSDLossParams
from opd_verl.opsd.teacher import TeacherWeights
from opd_verl.workers.opsd_actor import OPSDActorLoss, OPSDSettings

pytest.importorskip("verl")
from verl.utils import tensordict_utils as tu  # noqa: E402

SETTINGS = OPSDSettings(
    problem_key="extra_info.problem",
    solution_key="reward_model.ground_truth",
    missing_solution="skip",
    teacher_template="Problem: {problem}\nReference: {solution}\nSolve \\boxed{}.",
)
ROWS = [
    ({"problem": "1+1"}, {"ground_truth": "2"}),
    ({"problem": "3*3"}, {"ground_truth": None}),  # no solution: skipped from the loss
    ({"problem": "7-2?"}, {"ground_truth": "5 because 7-2=5"}),
]
STUDENT_PROMPTS = [[257, 10, 49, 43, 49], [257, 10, 51, 42, 51, 10, 10], [257, 52, 53]]
RESPONSES = [[60, 61, 62, 258], [70, 71], [80, 81, 82, 83, 84, 258]]
ROLLOUT_T = 0.8


def _micro_batch(rows=(0, 1, 2), batch_num_tokens=None):
    prompts, responses = [STUDENT_PROMPTS[i] for i in rows], [RESPONSES[i] for i in rows]
    seqs = [torch.tensor(p + r) for p, r in zip(prompts, responses)]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    td = tu.get_tensordict(
        {
            "input_ids": nested(seqs),
            "prompts": nested([torch.tensor(p) for p in prompts]),
            "responses": nested([torch.tensor(r) for r in responses]),
            "response_mask": nested([torch.ones(len(r), dtype=torch.long) for r in responses]),
            "old_log_probs": nested([torch.full((len(r),), -2.0) for r in responses]),
            "advantages": nested([torch.zeros(len(r)) for r in responses]),
            "extra_info": [ROWS[i][0] for i in rows],
            "reward_model": [ROWS[i][1] for i in rows],
        },
        non_tensor_dict={
            "dp_size": 1,
            "batch_num_tokens": batch_num_tokens,
            "global_batch_size": None,
            "temperature": ROLLOUT_T,
        },
    )
    return td, seqs


def _actor_config(loss_agg_mode="token-mean", token_budget=None):
    return SimpleNamespace(
        loss_agg_mode=loss_agg_mode,
        global_batch_info={},
        loss_scale_factor=None,
        ppo_max_token_len_per_gpu=token_budget,
    )


def _engine_calls(loss_fn, model, td, seqs):
    """What veRL's FSDP engine does: packed logits / rollout T -> logits processor -> nested -> loss."""
    logits = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs]) / ROLLOUT_T
    cu = td["input_ids"].offsets()
    outputs = loss_fn(student_logits=logits.unsqueeze(0), data=td)
    model_output = {k: torch.nested.nested_tensor_from_jagged(v.squeeze(0), cu) for k, v in outputs.items()}
    rolled = torch.cat([torch.roll(s, -1) for s in seqs])
    log_probs = torch.log_softmax(logits.float(), -1).gather(-1, rolled[:, None]).squeeze(-1)
    model_output["log_probs"] = torch.nested.nested_tensor_from_jagged(log_probs, cu)
    return loss_fn(model_output=model_output, data=td, dp_group=None)


@pytest.mark.parametrize(
    ("mode", "token_budget"), [("frozen", None), ("current", None), ("ema", None), ("frozen", 1), ("ema", 10_000)]
)
def test_actor_loss_equals_direct_computation(tokenizer, tiny_model, mode, token_budget):
    """token_budget: the teacher's tokens per forward (1: one sample per forward; None: all in one forward)."""
    model = tiny_model(seed=1)
    init = copy.deepcopy(model)
    teacher = TeacherWeights(model, mode, ema_decay=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    teacher.update()
    params = OPSDLossParams(loss="full", beta=0.1, temperature=1.1, pointwise_clip=0.05, chunk_size=3)
    loss_fn = OPSDActorLoss(model, teacher, params, tokenizer, SETTINGS, _actor_config(token_budget=token_budget))
    forwards = []
    handle = model.register_forward_pre_hook(lambda *_: forwards.append(1))
    td, seqs = _micro_batch()
    try:
        loss, metrics = _engine_calls(loss_fn, model, td, seqs)
    finally:
        handle.remove()
    # 3 student forwards (one per sequence), then one teacher forward per group of the 2 samples with a solution
    assert len(forwards) == 3 + (2 if token_budget == 1 else 1)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for p, p0 in zip(ref.parameters(), init.parameters()):
            if mode == "frozen":
                p.copy_(p0)
            elif mode == "ema":
                p.copy_(0.5 * p0 + 0.5 * p)
    per_token = []
    for i in (0, 2):  # row 1 has no solution
        (extra, rm), prompt, resp = ROWS[i], STUDENT_PROMPTS[i], RESPONSES[i]
        t_prompt = privileged_prompt_ids(tokenizer, SETTINGS["teacher_template"], extra["problem"], rm["ground_truth"])
        s_logits = model(input_ids=torch.tensor([prompt + resp])).logits[0, len(prompt) - 1 : -1]
        with torch.no_grad():
            t_logits = ref(input_ids=torch.tensor([t_prompt + resp])).logits[0, len(t_prompt) - 1 : -1]
        per_token.append(generalized_jsd(s_logits, t_logits, beta=0.1, temperature=1.1, pointwise_clip=0.05))
    direct = torch.cat(per_token).mean()
    direct.backward()
    torch.testing.assert_close(loss, direct, rtol=1e-4, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-6)
    assert metrics["opsd/context_fraction"] == pytest.approx(2 / 3)
    assert metrics["opsd/divergence_mean"] == pytest.approx(float(direct.detach()), rel=1e-4)
    assert 0.0 <= metrics["opsd/clip_rate"] <= 1.0


def test_actor_loss_sampled_variant_uses_pg_loss(tokenizer, tiny_model, monkeypatch):
    model = tiny_model(seed=2)
    teacher = TeacherWeights(model, "current")
    params = OPSDLossParams(loss="sampled")
    config = _actor_config()
    td, seqs = _micro_batch()
    captured = {}

    import verl.workers.utils.losses as losses

    def fake_ppo_loss(cfg, model_output, data, dp_group=None):
        captured["adv"] = data["advantages"].to_padded_tensor(0.0)
        return torch.tensor(0.0), {}

    monkeypatch.setattr(losses, "ppo_loss", fake_ppo_loss)
    loss_fn = OPSDActorLoss(model, teacher, params, tokenizer, SETTINGS, config)
    _, metrics = _engine_calls(loss_fn, model, td, seqs)
    adv = captured["adv"]
    # padded to the longest response, like veRL's own nested fields (ppo_loss multiplies it with (B, R) log-probs)
    assert adv.shape == (len(RESPONSES), max(len(r) for r in RESPONSES))
    # advantage = teacher log-prob (privileged prompt, rollout temperature) - old_log_probs; 0 for the skipped row
    extra, rm = ROWS[0]
    t_prompt = privileged_prompt_ids(tokenizer, SETTINGS["teacher_template"], extra["problem"], rm["ground_truth"])
    with torch.no_grad():
        t_logits = model(input_ids=torch.tensor([t_prompt + RESPONSES[0]])).logits[0, len(t_prompt) - 1 : -1]
    t_lp = torch.log_softmax(t_logits / ROLLOUT_T, -1).gather(-1, torch.tensor(RESPONSES[0])[:, None]).squeeze(-1)
    torch.testing.assert_close(adv[0, : len(RESPONSES[0])], t_lp + 2.0, rtol=1e-4, atol=1e-5)
    assert torch.equal(adv[1], torch.zeros_like(adv[1]))
    assert "opsd/sampled_gap_mean" in metrics and metrics["opsd/context_fraction"] == pytest.approx(2 / 3)


class _PPOConfig(SimpleNamespace):
    """The actor-config fields veRL's ppo_loss and vanilla policy loss read."""

    def get(self, key, default=None):
        return getattr(self, key, default)


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_logged_loss_is_the_mini_batch_loss_over_micro_batches(tokenizer, tiny_model, loss):
    """veRL normalises each micro-batch's loss by the mini-batch's token count and sums the micro-batch losses
    (gradient accumulation); the logged opsd/loss, aggregated over micro-batches as veRL's worker does, is the
    loss of the whole mini-batch, not that divided by the micro-batch count."""
    from verl.utils.metric import Metric

    model = tiny_model(seed=3)
    teacher = TeacherWeights(model, "current")
    params = OPSDLossParams(loss=loss, beta=0.1, temperature=1.1, pointwise_clip=0.05)
    tokens = sum(len(r) for r in RESPONSES)
    config = _PPOConfig(
        **vars(_actor_config()),
        policy_loss={"loss_mode": "vanilla"},
        clip_ratio=0.2,
        clip_ratio_low=None,
        clip_ratio_high=None,
        use_kl_loss=False,
    )
    loss_fn = OPSDActorLoss(model, teacher, params, tokenizer, SETTINGS, config)
    whole, _ = _engine_calls(loss_fn, model, *_micro_batch(batch_num_tokens=tokens))
    logged, losses = None, []
    for rows in ((0, 1), (2,)):
        part, metrics = _engine_calls(loss_fn, model, *_micro_batch(rows, batch_num_tokens=tokens))
        losses.append(float(part.detach()))
        metric = metrics["opsd/loss"]
        assert isinstance(metric, Metric)
        logged = metric if logged is None else (logged.extend(metric) or logged)
    assert sum(losses) == pytest.approx(float(whole.detach()), rel=1e-4)  # gradient accumulation
    assert logged.aggregate() == pytest.approx(float(whole.detach()), rel=1e-4)
    # without the mini-batch normalisation each micro-batch loss is its own mean: averaged, as veRL does
    _, metrics = _engine_calls(loss_fn, model, *_micro_batch())
    assert metrics["opsd/loss"].aggregation.value == "mean"
