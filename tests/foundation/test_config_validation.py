"""Every validation rule of the `opd` section: a config that breaks it is refused with a message naming the
field, the value and what is allowed; the recipes' own configs pass."""

import pytest

from opd_verl.config import OPDConfigError, load_opd_config

TEACHER = "opd.teachers.models.default.path=/models/teacher"


def _refused(compose_cfg, *overrides):
    with pytest.raises(OPDConfigError) as info:
        load_opd_config(compose_cfg(*overrides))
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        (("opd.signal.name=gopd", "opd.signal.lam=0"), "opd.signal.lam=0 ", "> 0"),
        (("opd.signal.name=gopd", "opd.signal.lam=-1.5"), "opd.signal.lam=-1.5", "> 0"),
        (("opd.signal.name=gopd", "opd.signal.lam=nan"), "opd.signal.lam=nan", "finite"),
        (("opd.signal.name=gopd", "opd.signal.lam=inf"), "opd.signal.lam=inf", "finite"),
        (("opd.signal.name=opd", "opd.signal.lam=1.25"), "opd.signal.lam=1.25", "gopd"),
        (("opd.weighting.name=iw", "opd.weighting.w_max=0.5"), "opd.weighting.w_max=0.5", ">= 1"),
        (("opd.release.enabled=true", "opd.release.top_k=1"), "opd.release.top_k=1", ">= 2"),
        (("opd.weighting.fraction=0",), "opd.weighting.fraction=0 ", "(0.0, 1.0]"),
        (("opd.weighting.fraction=1.5",), "opd.weighting.fraction=1.5", "(0.0, 1.0]"),
        (("opd.weighting.fraction_end=0",), "opd.weighting.fraction_end=0 ", "(0.0, 1.0]"),
        (("opd.signal.name=grpo",), "opd.signal.name='grpo'", "opd, gopd, opsd"),
        (("opd.weighting.name=linear",), "opd.weighting.name='linear'", "none, iw, prefix_mask"),
        (("opd.reference.kind=teacher",), "opd.reference.kind='teacher'", "student_init, base_model"),
        (("opd.release.margin=entropy",), "opd.release.margin='entropy'", "prob, logprob"),
        (("opd.teachers.kind=http",), "opd.teachers.kind='http'", "local, server"),
        (("opd.teachers.routing_key=uid",), "opd.teachers.routing_key='uid'", "extra_info.FIELD"),
        (("opd.opsd.loss=reverse",), "opd.opsd.loss='reverse'", "full, topk, sampled"),
        (("opd.opsd.teacher=best",), "opd.opsd.teacher='best'", "frozen, current, ema"),
        (("opd.opsd.beta=1.5",), "opd.opsd.beta=1.5", "[0.0, 1.0]"),
        (("opd.opsd.ema_decay=1.5",), "opd.opsd.ema_decay=1.5", "(0.0, 1.0]"),
        (("opd.opsd.temperature=0",), "opd.opsd.temperature=0 ", "> 0"),
        (("opd.release.min_segment=0",), "opd.release.min_segment=0", ">= 1"),
        (("opd.cpu_demo=maybe",), "opd.cpu_demo='maybe'", "auto, true, false"),
        (("opd.opsd.teacher_template='Problem: {problem}'",), "opd.opsd.teacher_template", "{solution}"),
    ],
)
def test_single_field_rules(compose_cfg, overrides, field, allowed):
    message = _refused(compose_cfg, TEACHER, *overrides)
    assert field in message
    assert allowed in message


def test_lam_not_one_needs_a_reference(compose_cfg):
    message = _refused(compose_cfg, TEACHER, "opd.signal.name=gopd", "opd.signal.lam=1.25")
    assert "opd.signal.lam=1.25" in message
    assert "actor_rollout_ref.actor.use_kl_loss=true" in message
    # With veRL's reference policy switched on, the same lam is accepted.
    cfg = compose_cfg(
        TEACHER, "opd.signal.name=gopd", "opd.signal.lam=1.25", "actor_rollout_ref.actor.use_kl_loss=true"
    )
    assert load_opd_config(cfg).needs_reference


def test_per_teacher_lam_is_checked(compose_cfg):
    message = _refused(compose_cfg, TEACHER, "opd.signal.name=gopd", "opd.teachers.models.default.lam=0")
    assert "opd.teachers.models.default.lam=0 " in message


def test_missing_teacher_path(compose_cfg):
    message = _refused(compose_cfg)
    assert "opd.teachers.models.default.path=None" in message
    assert "required" in message


def test_reward_correction_needs_base_model_path(compose_cfg):
    message = _refused(
        compose_cfg, TEACHER, "opd.signal.name=gopd", "opd.signal.lam=1.25", "opd.reference.kind=base_model"
    )
    assert "opd.reference.path=None" in message
    ok = compose_cfg(
        TEACHER,
        "opd.signal.name=gopd",
        "opd.signal.lam=1.25",
        "opd.reference.kind=base_model",
        "opd.reference.path=/models/teacher-base",
    )
    parsed = load_opd_config(ok)
    assert parsed.needs_base_model_reference
    assert parsed.teachers.models[0].reference_path == "/models/teacher-base"


@pytest.mark.parametrize(
    "overrides, needle",
    [
        (("opd.release.enabled=true",), "top-K"),
        (
            (
                "opd.signal.name=gopd",
                "opd.signal.lam=1.25",
                "opd.reference.kind=base_model",
                "opd.reference.path=/m/base",
            ),
            "reward correction",
        ),
    ],
)
def test_server_teacher_cannot_serve_release_or_reward_correction(compose_cfg, overrides, needle):
    message = _refused(compose_cfg, TEACHER, "opd.teachers.kind=server", *overrides)
    assert "opd.teachers.kind='server'" in message
    assert needle in message
    assert "teachers.kind=local" in message


@pytest.mark.parametrize("stage", ["opd.weighting.name=iw", "opd.release.enabled=true", "opd.task_coef=0.5"])
@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_opsd_refuses_weighting_release_and_task_reward(compose_cfg, stage, loss):
    # every OPSD loss is computed inside the actor, the sampled-token one included, so the trainer (which runs
    # the same checks) and the driver refuse the same configs
    message = _refused(compose_cfg, "+recipe=opsd", stage, f"opd.opsd.loss={loss}")
    assert "not an advantage" in message
    assert "opsd.loss=sampled" not in message  # no longer suggested: the trainer refused it


@pytest.mark.parametrize(
    "override, needle",
    [
        ("algorithm.adv_estimator=opd_pipeline", "algorithm.adv_estimator=opsd_in_actor"),
        ("actor_rollout_ref.model.use_fused_kernels=true", "use_fused_kernels"),
        ("actor_rollout_ref.actor.ulysses_sequence_parallel_size=2", "sequence parallelism"),
    ],
)
def test_opsd_actor_needs(compose_cfg, override, needle):
    assert needle in _refused(compose_cfg, "+recipe=opsd", override)


def test_opsd_full_vocab_needs_teacher_in_actor(compose_cfg):
    message = _refused(compose_cfg, "+recipe=opsd", "actor_rollout_ref.model.lora_rank=0")
    assert "opd.opsd.teacher='frozen'" in message
    assert "lora_rank" in message
    load_opd_config(compose_cfg("+recipe=opsd", "actor_rollout_ref.model.lora_rank=0", "opd.opsd.teacher=current"))


def test_anneal_only_for_prefix_modes(compose_cfg):
    message = _refused(compose_cfg, TEACHER, "opd.weighting.name=iw", "opd.weighting.anneal=true")
    assert "opd.weighting.anneal=True" in message
    assert "prefix_mask and prefix_weight" in message


def test_duplicate_routes(compose_cfg):
    message = _refused(
        compose_cfg,
        TEACHER,
        "opd.teachers.models.default.route=math",
        "+opd.teachers.models.code={path: /m/code, route: math, lam: null, reference_path: null}",
    )
    assert "route 'math' used twice" in message


def test_multi_teacher_config_parses(compose_cfg):
    cfg = compose_cfg(
        TEACHER,
        "opd.signal.name=gopd",
        "opd.teachers.routing_key=extra_info.domain",
        "opd.teachers.models.default.route=math",
        "opd.teachers.models.default.lam=1.25",
        "+opd.teachers.models.code={path: /m/code, route: code, lam: 1.0, reference_path: null}",
        "actor_rollout_ref.actor.use_kl_loss=true",
    )
    parsed = load_opd_config(cfg)
    assert parsed.teachers.routing_key == "extra_info.domain"
    assert {(t.name, t.route, t.lam) for t in parsed.teachers.models} == {
        ("default", "math", 1.25),
        ("code", "code", 1.0),
    }


def test_unknown_field_is_refused_by_hydra(compose_cfg):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="lamda"):
        compose_cfg("opd.signal.lamda=2")
