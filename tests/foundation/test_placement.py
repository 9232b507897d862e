"""Teacher placement: the driver's GPU-fit and data-parallel checks, the pools the trainer builds, offload order."""

from unittest import mock

import pytest

from opd_verl.config import OPDConfigError, load_opd_config
from opd_verl.placement import check_placement, required_gpus

PATHS = ("opd.teachers.models.default.path=/models/teacher",)
NODE_OF_8 = {"SLURM_JOB_NUM_NODES": "1", "SLURM_GPUS_ON_NODE": "8"}


def _cfg(compose_cfg, *overrides):
    return compose_cfg("+recipe=opd", *PATHS, "trainer.nnodes=1", *overrides)


def test_colocated_default_fits_the_node_that_separate_overflows(compose_cfg):
    """The issue's 8-GPU node: the trainer takes all 8 GPUs; a separate teacher pool asks for a 9th."""
    colocated = _cfg(compose_cfg, "trainer.n_gpus_per_node=8")
    assert load_opd_config(colocated).teachers.placement == "colocated"
    assert sum(required_gpus(colocated).values()) == 8
    check_placement(colocated, NODE_OF_8)

    separate = _cfg(compose_cfg, "trainer.n_gpus_per_node=8", "opd.teachers.placement=separate")
    assert sum(required_gpus(separate).values()) == 9
    with pytest.raises(OPDConfigError) as err:
        check_placement(separate, NODE_OF_8)
    msg = str(err.value)
    assert "9 GPUs" in msg and "launch has 8" in msg
    assert "trainer.nnodes x trainer.n_gpus_per_node = 8" in msg and "opd.teachers.nnodes x n_gpus_per_node = 1" in msg
    # the opd recipe's 1024 samples divide by 4 of the 8 GPUs (not 7, 6 or 5): 4 + 4, or colocated
    assert "trainer.n_gpus_per_node=4 with opd.teachers.n_gpus_per_node=4" in msg
    assert "opd.teachers.placement=colocated" in msg
    check_placement(
        _cfg(
            compose_cfg,
            "trainer.n_gpus_per_node=4",
            "opd.teachers.placement=separate",
            "opd.teachers.n_gpus_per_node=4",
        ),
        NODE_OF_8,
    )


def test_six_plus_two_is_refused_before_ray_also_with_dynamic_batches(compose_cfg):
    """6 + 2 fits the node but 1024 samples do not split over 6 actor ranks; with use_dynamic_bsz=true veRL's own
    start-up check is skipped and the run would fail at the first actor update."""
    over = ("trainer.n_gpus_per_node=6", "opd.teachers.placement=separate", "opd.teachers.n_gpus_per_node=2")
    cfg = _cfg(compose_cfg, *over, "actor_rollout_ref.actor.use_dynamic_bsz=true")
    with pytest.raises(OPDConfigError) as err:
        check_placement(cfg, NODE_OF_8)
    msg = str(err.value)
    assert "data.train_batch_size x actor_rollout_ref.rollout.n = 1024 x 1 = 1024" in msg
    assert "data-parallel size 6" in msg and "use_dynamic_bsz=true" in msg
    assert "trainer.n_gpus_per_node=4 with opd.teachers.n_gpus_per_node=4" in msg
    # the same check without a known launch size (e.g. an existing Ray cluster)
    with pytest.raises(OPDConfigError, match="data-parallel size 6"):
        check_placement(cfg, {"RAY_ADDRESS": "http://head:8265"})


def test_ulysses_size_must_divide_the_trainer_gpus(compose_cfg):
    """7 + 1 cannot run Ulysses SP=2 on the actor."""
    cfg = _cfg(
        compose_cfg,
        "trainer.n_gpus_per_node=7",
        "opd.teachers.placement=separate",
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2",
    )
    with pytest.raises(
        OPDConfigError, match=r"actor_rollout_ref.actor.ulysses_sequence_parallel_size=2 does not divide"
    ):
        check_placement(cfg, NODE_OF_8)
    ok = _cfg(compose_cfg, "trainer.n_gpus_per_node=8", "actor_rollout_ref.actor.ulysses_sequence_parallel_size=2")
    check_placement(ok, NODE_OF_8)  # colocated: dp 4 divides 1024


def test_mini_batch_and_reference_group_are_checked(compose_cfg):
    cfg = _cfg(compose_cfg, "trainer.n_gpus_per_node=8", "actor_rollout_ref.actor.ppo_mini_batch_size=12")
    with pytest.raises(OPDConfigError, match=r"actor_rollout_ref.actor.ppo_mini_batch_size .* = 12 samples"):
        check_placement(cfg, NODE_OF_8)
    # exopd turns the reference policy on; its own Ulysses size sets its data-parallel size
    cfg = compose_cfg(
        "+recipe=exopd", *PATHS, "trainer.n_gpus_per_node=8", "actor_rollout_ref.ref.ulysses_sequence_parallel_size=3"
    )
    with pytest.raises(OPDConfigError, match="actor_rollout_ref.ref.ulysses_sequence_parallel_size=3"):
        check_placement(cfg, NODE_OF_8)


def test_cpu_preset_asks_ray_for_the_pools_of_the_placement(compose_cfg):
    from opd_verl.cpu_port.ray_setup import required_logical_gpus

    assert required_logical_gpus(_cfg(compose_cfg, "trainer.n_gpus_per_node=2")) == 2
    separate = ("opd.teachers.placement=separate", "opd.teachers.n_gpus_per_node=3")
    assert required_logical_gpus(_cfg(compose_cfg, "trainer.n_gpus_per_node=2", *separate)) == 5
    # veRL's teacher servers always have their own pool, whatever the placement says
    server = ("opd.teachers.kind=server", "opd.teachers.n_gpus_per_node=2")
    assert required_logical_gpus(_cfg(compose_cfg, "trainer.n_gpus_per_node=2", *server)) == 4


def test_placement_values_are_checked(compose_cfg):
    with pytest.raises(OPDConfigError, match="opd.teachers.placement='shared' is not allowed: .*colocated, separate"):
        load_opd_config(_cfg(compose_cfg, "opd.teachers.placement=shared"))
    with pytest.raises(OPDConfigError, match="opd.teachers.offload='yes'"):
        load_opd_config(_cfg(compose_cfg, "opd.teachers.offload=yes"))


def _trainer(cfg):
    from opd_verl.trainer.opd_trainer import OPDTrainer

    tr = object.__new__(OPDTrainer)
    tr.config = cfg
    tr.opd = load_opd_config(cfg)
    return tr


@pytest.mark.parametrize(
    ("placement", "pool", "spec"),
    [
        ("colocated", "global_pool", {"global_pool": [2]}),
        ("separate", "opd_pool", {"global_pool": [2], "opd_pool": [3]}),
    ],
)
def test_trainer_puts_the_forward_workers_in_the_pool_of_the_placement(compose_cfg, placement, pool, spec):
    from opd_verl.trainer.opd_trainer import ROLE_NAME

    tr = _trainer(
        _cfg(
            compose_cfg,
            "trainer.n_gpus_per_node=2",
            f"opd.teachers.placement={placement}",
            "opd.teachers.n_gpus_per_node=3",
        )
    )
    tr._init_resource_pool_mgr()
    assert tr.resource_pool_manager.mapping[ROLE_NAME] == pool
    assert tr.resource_pool_manager.resource_pool_spec == spec
    # veRL's actor/rollout/ref group and the forward workers share the global pool's bundles when colocated
    assert tr.resource_pool_manager.max_colocate_count >= 2


def test_offload_wraps_the_teacher_phase(compose_cfg):
    """With opd.teachers.offload every forward group is loaded before the teacher phase and offloaded after it,
    also when scoring fails; without it neither is called."""
    events = []
    tr = _trainer(_cfg(compose_cfg, "opd.teachers.offload=true"))
    wgs = {}
    for key in ("teacher0", "reference0"):
        wg = mock.Mock()
        wg.load_params.side_effect = lambda k=key: events.append(("load", k))
        wg.offload_params.side_effect = lambda k=key: events.append(("offload", k))
        wgs[key] = wg
    tr.forward_wgs = wgs
    tr.timing_raw = {}
    tr.use_reference_policy = False
    tr._teacher_refs = [None]
    tr._route = lambda batch: [0]
    tr._compute_teacher_outputs = lambda batch, owners, metrics: events.append(("score", None))
    with mock.patch("transfer_queue.kv_batch_get", side_effect=RuntimeError("stop after the teacher phase")):
        with pytest.raises(RuntimeError, match="stop after"):
            tr._compute_advantage(mock.Mock(), {})
    assert events == [
        ("load", "teacher0"),
        ("load", "reference0"),
        ("score", None),
        ("offload", "teacher0"),
        ("offload", "reference0"),
    ]

    events.clear()

    def fail(batch, owners, metrics):
        raise ValueError("scoring failed")

    tr._compute_teacher_outputs = fail
    with pytest.raises(ValueError, match="scoring failed"):
        tr._compute_advantage(mock.Mock(), {})
    assert events[-2:] == [("offload", "teacher0"), ("offload", "reference0")]

    events.clear()
    tr.opd = load_opd_config(_cfg(compose_cfg, "opd.teachers.offload=false"))
    tr._compute_teacher_outputs = lambda batch, owners, metrics: events.append(("score", None))
    with mock.patch("transfer_queue.kv_batch_get", side_effect=RuntimeError("stop")):
        with pytest.raises(RuntimeError):
            tr._compute_advantage(mock.Mock(), {})
    assert events == [("score", None)]


def test_offload_metrics_from_the_worker_reports():
    """What the teacher phase logs from the workers' CUDA reports (allocated before/after, parameter bytes)."""
    from opd_verl.trainer.opd_trainer import offload_metrics

    gib = 2**30
    reports = [
        {"allocated_before": 3 * gib, "allocated_after": 1 * gib, "param_bytes": 2 * gib},  # freed all 2 GiB
        {"allocated_before": 5 * gib, "allocated_after": 4 * gib, "param_bytes": 2 * gib},  # freed 1 of 2 GiB
        None,  # a CPU rank: nothing measured
    ]
    assert offload_metrics(reports) == {
        "opd/teacher_offload/freed_fraction": 0.5,
        "opd/teacher_offload/params_gib": 4.0,
        "opd/teacher_offload/allocated_after_gib": 4.0,
    }
    assert offload_metrics([None, None]) == {} and offload_metrics([]) == {}


def test_teacher_phase_logs_what_the_offload_freed(compose_cfg):
    """The advantage step collects every forward group's per-rank reports of its offload into the step metrics."""
    gib = 2**30
    tr = _trainer(_cfg(compose_cfg, "opd.teachers.offload=true"))
    reports = {
        "teacher0": [{"allocated_before": 2 * gib, "allocated_after": 0, "param_bytes": 2 * gib}] * 2,
        "reference0": [{"allocated_before": gib, "allocated_after": gib // 4, "param_bytes": gib}] * 2,
    }
    tr.forward_wgs = {k: mock.Mock(**{"offload_params.return_value": v}) for k, v in reports.items()}
    tr.timing_raw, tr.use_reference_policy, tr._teacher_refs = {}, False, [None]
    tr._route = lambda batch: [0]
    tr._compute_teacher_outputs = lambda batch, owners, metrics: None
    metrics = {}
    with mock.patch("transfer_queue.kv_batch_get", side_effect=RuntimeError("stop after the teacher phase")):
        with pytest.raises(RuntimeError, match="stop after"):
            tr._compute_advantage(mock.Mock(), metrics)
    assert metrics["opd/teacher_offload/freed_fraction"] == 0.75  # the reference freed 3/4 of its 1 GiB
    assert metrics["opd/teacher_offload/params_gib"] == 6.0  # 2 ranks x (2 + 1) GiB
    assert metrics["opd/teacher_offload/allocated_after_gib"] == 0.25
    # the offload at start-up (no step yet) logs nothing
    tr._offload_forward_workers()
