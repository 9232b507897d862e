"""The trainer's hand-over from batch to estimator gives the advantages of the pure functions on the same tensors."""

import os

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from tensordict import TensorDict

import opd_verl
from opd_verl.config import parse_opd_section
from opd_verl.trainer.health_monitor import HealthMonitor

B, T = 6, 24
VOCAB = 1000


def _cfg(adv_estimator, opd_overrides):
    base = OmegaConf.load(os.path.join(os.path.dirname(opd_verl.__file__), "hydra_configs", "opd_trainer.yaml"))
    opd = OmegaConf.merge(base.opd, OmegaConf.create(opd_overrides))
    cfg = OmegaConf.create({"algorithm": {"adv_estimator": adv_estimator}, "opd": opd})
    return cfg


def _trainer(cfg, step=1, total=2):
    import opd_verl.integration.plugin  # noqa: F401
    from opd_verl.trainer.opd_trainer import OPDTrainer

    tr = object.__new__(OPDTrainer)  # the hand-over needs only config and step counters
    tr.config = cfg
    tr.opd = parse_opd_section(OmegaConf.to_container(cfg.opd, resolve=True))
    tr.global_steps, tr.total_training_steps = step, total
    tr.health = HealthMonitor(tr.opd.health, tr.opd, 1.0, "/nonexistent")
    tr.health._vocab_sizes = [VOCAB] * len(tr.opd.teachers.models)  # no model files here
    tr._scored_temperatures = {}
    return tr


def _batch(seed=0):
    from verl.protocol import DataProto

    g = torch.Generator().manual_seed(seed)
    lens = torch.tensor([24, 20, 3, 17, 24, 9])
    mask = (torch.arange(T)[None] < lens[:, None]).long()
    mask[1, 5:8] = 0  # a tool-output hole inside a response
    student = -torch.rand(B, T, generator=g) * 3
    teacher = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    margins = torch.rand(B, T, generator=g)
    margins[:, T // 2 :] *= 0.1  # teachability falls: the rule has something to find
    sentence_ids = (torch.arange(T)[None].expand(B, T) // 3).clone()
    data = DataProto(
        batch=TensorDict(
            {
                "response_mask": mask,
                "token_level_rewards": torch.zeros(B, T),
                "old_log_probs": student,
                "opd_teacher_log_probs": teacher,
                "ref_log_prob": ref,
                "opd_teacher_margins": margins,
                "opd_sentence_ids": sentence_ids,
            },
            batch_size=[B],
        ),
        non_tensor_batch={"uid": np.array([f"u{i // 2}" for i in range(B)], dtype=object)},
    )
    return data, mask, student, teacher, ref, margins, sentence_ids


TWO_TEACHERS = {
    "math": {"path": "/m", "route": "math", "lam": 1.25, "reference_path": None},
    "code": {"path": "/c", "route": None, "lam": 1.0, "reference_path": None},
}


def test_exopd_iw_release_handover_equals_pure_functions():
    from opd_verl.objectives import apply_release, discrepancy, gopd_advantages, iw_opd_weights

    cfg = _cfg(
        "opd_pipeline",
        {
            "signal": {"name": "gopd", "lam": 1.25},
            "weighting": {"name": "iw", "w_max": 1.5},
            "release": {"enabled": True},
            "teachers": {"models": {"default": None, **TWO_TEACHERS}},
        },
    )
    tr = _trainer(cfg)
    data, mask, s, t, ref, margins, sids = _batch()
    owners = [0, 1, 0, 0, 1, 1]
    metrics = {}
    adv, _ = tr._opd_advantages(data, owners, None, metrics)

    lam = torch.tensor([1.25 if o == 0 else 1.0 for o in owners])
    signal = gopd_advantages(s, t, mask, lam, ref)
    weights = iw_opd_weights(discrepancy(s, t, mask), mask, 1.5)
    expected, _ = apply_release(weights * signal, mask, sids, margins, 2, 2.0, 0.0)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)
    assert not torch.equal(adv, weights * signal)  # the release rule acted on some row
    for key in (
        "opd/discrepancy",
        "opd/discrepancy_decile/0",
        "opd/weight_mean",
        "opd/weight_min",
        "opd/release/accept_rate",
        "opd/release/kept_fraction",
        "opd/stage/signal/adv_mean",
        "opd/stage/weighting/adv_std",
        "opd/stage/final/adv_mean",
    ):
        assert key in metrics and np.isfinite(metrics[key]), key
    sig_mean = float(signal[mask.bool()].mean())
    assert metrics["opd/stage/signal/adv_mean"] == pytest.approx(sig_mean, abs=1e-6)


def test_reward_correction_rows_use_their_base_model():
    from opd_verl.objectives import gopd_advantages

    teachers = {
        "math": {"path": "/m", "route": "math", "lam": 1.5, "reference_path": "/m_base"},
        "code": {"path": "/c", "route": None, "lam": 1.25, "reference_path": None},
    }
    cfg = _cfg(
        "opd_pipeline",
        {
            "signal": {"name": "gopd", "lam": 1.25},
            "reference": {"kind": "student_init", "path": None},
            "teachers": {"models": {"default": None, **teachers}},
        },
    )
    tr = _trainer(cfg)
    data, mask, s, t, ref, _, _ = _batch(seed=1)
    owners = [0, 1, 1, 0, 0, 1]
    base_rows = [n for n, o in enumerate(owners) if o == 0]
    g = torch.Generator().manual_seed(9)
    base = -torch.rand(len(base_rows), T, generator=g) * 3
    base_td = TensorDict(
        {
            "opd_ref_log_probs": torch.nested.as_nested_tensor(
                [base[j] for j in range(len(base_rows))], layout=torch.jagged
            )
        },
        batch_size=[len(base_rows)],
    )
    adv, _ = tr._opd_advantages(data, owners, (base_rows, base_td), {})
    expected_ref = ref.clone()
    expected_ref[base_rows] = base
    lam = torch.tensor([1.5 if o == 0 else 1.25 for o in owners])
    torch.testing.assert_close(adv, gopd_advantages(s, t, mask, lam, expected_ref), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ["opd", "iw_opd", "prefix_release"])
def test_each_stage_alone_matches_its_function(name):
    from opd_verl.objectives import apply_release, discrepancy, iw_opd_weights, opd_advantages

    overrides = {"release": {"enabled": name == "prefix_release"}, "teachers": {"models": {"default": {"path": "/t"}}}}
    if name == "iw_opd":
        overrides["weighting"] = {"name": "iw"}
    cfg = _cfg("opd_pipeline", overrides)
    tr = _trainer(cfg)
    data, mask, s, t, _, margins, sids = _batch(seed=2)
    adv, _ = tr._opd_advantages(data, [0] * B, None, {})
    signal = opd_advantages(s, t, mask)
    if name == "opd":
        expected = signal
    elif name == "iw_opd":
        expected = iw_opd_weights(discrepancy(s, t, mask), mask, 1.5) * signal
    else:
        expected, _ = apply_release(signal, mask, sids, margins, 2, 2.0, 0.0)
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)


def test_student_topk_loss_emits_k_id_fields_and_delegates():
    from opd_verl.workers.student_topk import StudentTopKLoss

    calls = []
    loss = StudentTopKLoss(lambda **kw: calls.append(kw) or (torch.tensor(2.0), {"m": 1}), 3)
    logits = torch.randn(1, 7, 11)
    out = loss(student_logits=logits, data=None)
    assert sorted(out) == [f"opd_student_topk_{j}" for j in range(3)]
    for j in range(3):
        # veRL all-gathers each field over the Ulysses SP group: NCCL takes contiguous tensors only
        assert out[f"opd_student_topk_{j}"].shape == (1, 7) and out[f"opd_student_topk_{j}"].is_contiguous()
        assert out[f"opd_student_topk_{j}"].squeeze(0).is_contiguous()  # what veRL gathers
        assert out[f"opd_student_topk_{j}"].dtype == torch.int32
    ids = torch.stack([out[f"opd_student_topk_{j}"] for j in range(3)], dim=-1)
    assert torch.equal(ids.long(), torch.topk(logits, 3, dim=-1).indices)
    td = TensorDict({}, batch_size=[])
    value, metrics = loss(model_output={"log_probs": torch.zeros(2)}, data=td, dp_group=None)
    assert value.item() == 2.0 and calls


def test_student_topk_fields_are_left_out_of_the_actor_update():
    """veRL's workers fetch exactly ``meta.fields``; after the teacher phase the top-K ids are not among them."""
    from transfer_queue.metadata import KVBatchMeta

    from opd_verl.trainer.opd_trainer import without_fields
    from opd_verl.workers.forward_worker import STUDENT_TOPK_FIELD

    stored = ["responses", "old_log_probs", "advantages"] + [STUDENT_TOPK_FIELD.format(j) for j in range(4)]
    meta = KVBatchMeta(keys=["a", "b"], tags=[{}, {}], partition_id="train", fields=list(stored))
    assert without_fields(meta, STUDENT_TOPK_FIELD.format("")).fields == ["responses", "old_log_probs", "advantages"]


def test_nan_teacher_row_is_zeroed_counted_and_the_step_goes_on():
    """Default ``opd.health``: a row with a NaN teacher log-prob gets advantage 0, the others are unchanged."""
    from opd_verl.objectives import discrepancy, gopd_advantages, iw_opd_weights

    cfg = _cfg(
        "opd_pipeline",
        {
            "signal": {"name": "gopd", "lam": 1.25},
            "weighting": {"name": "iw", "w_max": 1.5},
            "teachers": {"models": {"default": None, **TWO_TEACHERS}},
        },
    )
    tr = _trainer(cfg)
    data, mask, s, t, ref, _, _ = _batch(seed=4)
    data.batch["opd_teacher_log_probs"][3, 2] = float("nan")
    owners = [0, 1, 0, 0, 1, 1]
    metrics = {}
    adv, _ = tr._opd_advantages(data, owners, None, metrics)
    assert torch.isfinite(adv).all() and adv[3].abs().sum() == 0
    keep = [0, 1, 2, 4, 5]
    lam = torch.tensor([1.25 if owners[n] == 0 else 1.0 for n in keep])
    m, sk, tk, rk = mask[keep], s[keep], t[keep], ref[keep]
    expected = iw_opd_weights(discrepancy(sk, tk, m), m, 1.5) * gopd_advantages(sk, tk, m, lam, rk)
    torch.testing.assert_close(adv[keep], expected, atol=1e-6, rtol=0)
    assert metrics["opd/health/nonfinite_rows"] == 1.0
    assert metrics["opd/health/nonfinite_tokens/teacher"] == 1.0
    assert metrics["opd/teacher/math/nonfinite_rows"] == 1.0 and metrics["opd/teacher/code/nonfinite_rows"] == 0.0
    assert metrics["opd/health/alarm/nonfinite"] == 1.0 and tr.health.stop_message is None


def test_stop_alarm_message_names_the_alarm_the_teacher_and_the_figure():
    cfg = _cfg(
        "opd",
        {
            "teachers": {"models": {"default": None, **{k: {**v, "lam": None} for k, v in TWO_TEACHERS.items()}}},
            "health": {"collapse": {"action": "stop"}},
        },
    )
    tr = _trainer(cfg, step=2)
    data, mask, *_ = _batch(seed=5)
    collapsed = torch.full((B, T), -float(np.log(VOCAB)))
    owners = [0, 1, 0, 1, 0, 1]
    data.batch["opd_teacher_log_probs"][[1, 3, 5]] = collapsed[[1, 3, 5]]  # teacher "code" lost its weights
    metrics = {}
    tr._opd_advantages(data, owners, None, metrics)
    msg = tr.health.stop_message
    assert msg is not None and msg.startswith("step 2: ")
    assert "'collapse'" in msg and "teacher 'code'" in msg and "figure 1," in msg
    assert metrics["opd/teacher/code/collapse_fraction"] == 1.0 and metrics["opd/teacher/math/collapse_fraction"] == 0
    assert metrics["opd/health/alarm/collapse"] == 1.0
