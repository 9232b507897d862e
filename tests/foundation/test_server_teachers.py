"""`opd.teachers.kind=server` becomes veRL's own distillation config, which veRL itself accepts, with the plugin's
`opd_pipeline` loss and its stages for the workers; what the servers cannot serve is refused."""

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


def test_veRL_advantage_step_gets_a_stock_estimator(compose_cfg):
    """veRL's own advantage step passes no log-probs, which the plugin's estimators need (they raise); with
    use_task_rewards=false its result feeds only the policy loss that veRL zeroes."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    cfg = _apply(compose_cfg, "+recipe=exopd", *SERVER, "opd.teachers.n_gpus_per_node=2")
    assert cfg.algorithm.adv_estimator == "grpo"
    get_adv_estimator_fn(cfg.algorithm.adv_estimator)  # registered in veRL


def _micro_batch(weights):
    """veRL's no-padding micro-batch as its distillation loss sees it (nested response fields)."""
    import torch
    from verl.utils import tensordict_utils as tu

    g = torch.Generator().manual_seed(3)
    lens, prompt_lens = [3, 5, 2], [2, 1, 4]
    nested = lambda xs: torch.nested.as_nested_tensor(xs, layout=torch.jagged)  # noqa: E731
    fields = {
        "prompts": nested([torch.full((n,), 7) for n in prompt_lens]),
        "responses": nested([torch.full((n,), 9) for n in lens]),
        "response_mask": nested([torch.ones(n, dtype=torch.long) for n in lens]),
        "old_log_probs": nested([-torch.rand(n, generator=g) * 3 for n in lens]),
        "ref_log_prob": nested([-torch.rand(n, generator=g) * 3 for n in lens]),
        # over prompt + response, as veRL's teacher loop stores them
        "teacher_logprobs": nested([-torch.rand(p + n, 1, generator=g) * 3 for p, n in zip(prompt_lens, lens)]),
    }
    if weights:
        fields["rollout_is_weights"] = nested([torch.rand(n, generator=g) * 2 for n in lens])
    return tu.get_tensordict(fields, non_tensor_dict={"dp_size": 1, "batch_num_tokens": None}), lens


def test_rollout_is_weights_are_folded_into_the_advantages(monkeypatch):
    """veRL 0.9.1 hands the micro-batch's nested rollout_is_weights to its PPO-clip loss, whose aggregation raises;
    the `opd_pipeline` loss applies them to A instead, which gives veRL's weighted PPO-clip loss exactly."""
    import torch
    from omegaconf import OmegaConf as OC
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    from opd_verl.integration.adapters import make_distillation_loss

    stages = {"signal": {"name": "gopd", "lam": 1.25}, "weighting": {"name": "iw", "w_max": 1.5}}
    monkeypatch.setenv(STAGE_PARAMS_ENV, json.dumps(stages))
    loss_fn = make_distillation_loss("opd_pipeline")
    data, lens = _micro_batch(weights=True)
    weights = data["rollout_is_weights"].to_padded_tensor(0.0)
    folded, metrics = loss_fn(None, None, {}, data)
    assert "rollout_is_weights" not in data.keys()  # veRL's wrapper then passes none on
    plain, _ = loss_fn(None, None, {}, _micro_batch(weights=False)[0])
    mask = data["response_mask"].to_padded_tensor(0).bool()
    torch.testing.assert_close(folded, plain * weights)
    assert metrics["opd/rollout_is_weight_mean"] == pytest.approx(float(weights[mask].mean()))

    config = OC.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28, "clip_ratio_c": 3.0})
    config = OC.to_object(config)

    class _Cfg(dict):
        global_batch_info = {}

        def __getattr__(self, key):
            return self[key]

    cfg = _Cfg(config)
    old = data["old_log_probs"].to_padded_tensor(0.0)
    new = old + torch.linspace(-0.5, 0.5, old.numel()).reshape(old.shape)  # ratios inside and outside the clip
    want, _ = compute_policy_loss_vanilla(old, new, -plain, mask, "token-mean", cfg, rollout_is_weights=weights)
    got, _ = compute_policy_loss_vanilla(old, new, -folded, mask, "token-mean", cfg, rollout_is_weights=None)
    torch.testing.assert_close(got, want)


def test_cpu_preset_counts_the_server_pool_once(compose_cfg, tmp_path, monkeypatch):
    """The CPU preset sizes Ray before the kind=server translation; the count must not change after it."""
    from opd_verl.cpu_port.ray_setup import CPURuntimeError, check_cpu_runtime, required_logical_gpus
    from opd_verl.demo.assets import DemoAssets
    from opd_verl.demo.preset import apply_cpu_demo

    for key in ("VERL_PLATFORM", "VERL_USE_EXTERNAL_MODULES", "VERL_FILE_LOGGER_PATH"):
        monkeypatch.delenv(key, raising=False)
    assets = DemoAssets(
        root=str(tmp_path),
        train_file=str(tmp_path / "train.parquet"),
        val_file=str(tmp_path / "val.parquet"),
        student_path=str(tmp_path / "student"),
        teacher_path=str(tmp_path / "teacher"),
    )
    cfg = apply_cpu_demo(compose_cfg("+recipe=exopd", "opd.teachers.kind=server"), assets)
    before = cfg.ray_kwargs.ray_init.num_gpus
    apply_server_teachers(cfg, load_opd_config(cfg))
    assert cfg.distillation.enabled and required_logical_gpus(cfg) == before == 2  # trainer 1 + teacher servers 1
    check_cpu_runtime(cfg)
    cfg.ray_kwargs.ray_init.num_gpus = 1
    with pytest.raises(CPURuntimeError, match=r"\+ray_kwargs.ray_init.num_gpus=2"):  # an override Hydra accepts
        check_cpu_runtime(cfg)
    # a larger count the user gives is kept by the preset
    cfg = compose_cfg("+recipe=exopd", "+ray_kwargs.ray_init.num_gpus=6")
    assert apply_cpu_demo(cfg, assets).ray_kwargs.ray_init.num_gpus == 6
