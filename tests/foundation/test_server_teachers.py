"""`opd.teachers.kind=server` becomes veRL's own distillation config, which veRL itself accepts, with the plugin's
pipeline loss and its stage parameters for the workers; what the servers cannot serve is refused."""

import json

import pytest
from omegaconf import OmegaConf
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import DistillationConfig

from opd_verl.config import OPDConfigError, load_opd_config
from opd_verl.integration.adapters import STAGE_PARAMS_ENV
from opd_verl.integration.server_teachers import apply_server_teachers
from opd_verl.objectives import StageParams

SERVER = ("opd.teachers.kind=server", "opd.teachers.models.default.path=/models/teacher")


def _apply(compose_cfg, *overrides):
    cfg = compose_cfg(*overrides)
    return apply_server_teachers(cfg, load_opd_config(cfg))


def test_exopd_on_servers_single_teacher(compose_cfg):
    cfg = _apply(compose_cfg, "+recipe=exopd", *SERVER, "opd.weighting.name=iw", "opd.teachers.n_gpus_per_node=4")
    dist = cfg.distillation
    assert dist.enabled and dist.teacher_key == "data_source"
    assert dist.distillation_loss.loss_mode == "opd_pipeline"
    assert dist.distillation_loss.use_policy_gradient and not dist.distillation_loss.use_task_rewards
    assert dist.teacher_models.teacher_model.model_path == "/models/teacher"
    env = cfg.ray_kwargs.ray_init.runtime_env.env_vars[STAGE_PARAMS_ENV]
    params = StageParams.from_config(json.loads(env))
    assert (params.signal.name, params.signal.lam, params.weighting.name) == ("gopd", 1.25, "iw")
    # veRL's own config class resolves the teacher pool: one teacher takes all 4 GPUs (tensor parallel 2 -> 2).
    resolved = omega_conf_to_dataclass(dist)  # as veRL's trainer builds it
    assert isinstance(resolved, DistillationConfig)
    (teacher,) = resolved.teacher_models.values()
    assert teacher.model_path == "/models/teacher"
    assert teacher.world_size == 4


def test_two_routed_teachers_split_the_pool(compose_cfg):
    cfg = _apply(
        compose_cfg,
        "+recipe=opd",
        *SERVER,
        "opd.teachers.models.default.route=math",
        "+opd.teachers.models.code={path: /models/code, route: code, lam: null, reference_path: null}",
        "opd.teachers.n_gpus_per_node=8",
    )
    resolved = omega_conf_to_dataclass(cfg.distillation)
    assert {k: (t.model_path, t.world_size) for k, t in resolved.teacher_models.items()} == {
        "math": ("/models/teacher", 4),
        "code": ("/models/code", 4),
    }


def test_uneven_pool_is_refused(compose_cfg):
    with pytest.raises(OPDConfigError, match="opd.teachers.n_gpus_per_node=3"):
        _apply(compose_cfg, "+recipe=opd", *SERVER, "opd.teachers.n_gpus_per_node=3")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (("opd.teachers.routing_key=extra_info.domain",), "opd.teachers.routing_key='extra_info.domain'"),
        (("opd.task_coef=0.5",), "opd.task_coef=0.5"),
        (("opd.weighting.name=prefix_mask", "opd.weighting.anneal=true"), "opd.weighting.anneal=True"),
        (
            (
                "opd.teachers.models.default.route=math",
                "+opd.teachers.models.code={path: /m/code, route: null, lam: null, reference_path: null}",
            ),
            "opd.teachers.models.code.route=None",
        ),
    ],
)
def test_what_servers_cannot_serve_is_refused(compose_cfg, overrides, field):
    with pytest.raises(OPDConfigError) as info:
        load_opd_config(compose_cfg("+recipe=opd", *SERVER, *overrides))
    assert field in str(info.value)
    assert "teacher servers" in str(info.value) or "plugin trainer" in str(info.value)


def test_per_teacher_lam_is_refused_on_servers(compose_cfg):
    with pytest.raises(OPDConfigError, match="one lam for all teachers"):
        load_opd_config(
            compose_cfg(
                "+recipe=exopd",
                *SERVER,
                "opd.teachers.models.default.route=math",
                "+opd.teachers.models.code={path: /m/code, route: code, lam: 1.0, reference_path: null}",
            )
        )


def test_stage_json_round_trips_the_section(compose_cfg):
    cfg = _apply(compose_cfg, "+recipe=iw_opd", *SERVER, "opd.teachers.n_gpus_per_node=2")
    section = OmegaConf.to_container(cfg.opd, resolve=True)
    sent = json.loads(cfg.ray_kwargs.ray_init.runtime_env.env_vars[STAGE_PARAMS_ENV])
    assert sent == {k: section[k] for k in ("signal", "weighting", "release", "task_coef")}
