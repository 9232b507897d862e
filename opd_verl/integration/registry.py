"""Register opd_verl's names in veRL 0.9.1's own registries (idempotent, checked).

``register()`` adds:

- ``ADV_ESTIMATOR_REGISTRY`` (``algorithm.adv_estimator``): ``opd_pipeline``, the configured ``opd:`` stages, for
  a veRL fork's own advantage step. It needs the teacher/student (and reference) log-probs passed as extra keyword
  tensors by the trainer that calls it; see :mod:`opd_verl.integration.adapters`. (The plugin's own trainer calls
  ``compose_advantages`` directly.)
- ``DISTILLATION_LOSS_REGISTRY`` (``distillation.distillation_loss.loss_mode``): ``opd_pipeline`` in
  estimator mode (per-token losses ``-A`` from the micro-batch's ``old_log_probs``, ``teacher_logprobs``,
  ``ref_log_prob``), and ``opsd_gjsd`` in top-k mode (per-token top-k generalized JSD from the loss function
  built by :func:`opd_verl.integration.adapters.make_opsd_gjsd_loss_fn`).

veRL's loader (``verl/__init__.py``) imports every ``verl.plugins`` entry point's module at ``import verl``
(unless ``VERL_USE_EXTERNAL_PLUGINS=none``) and logs failures only at DEBUG level, so ``register()`` checks the
registries afterwards and raises ``RuntimeError`` when a name is missing or bound to someone else's function.
"""

from __future__ import annotations

from opd_verl.integration.adapters import (
    ESTIMATOR_NAMES,
    make_adv_estimator,
    make_distillation_loss,
    opsd_gjsd_distillation_loss,
)

__all__ = ["REGISTERED_NAMES", "register", "is_registered"]

REGISTERED_NAMES: dict[str, list[str]] = {
    "adv_estimator": list(ESTIMATOR_NAMES),
    "distillation_loss": [*ESTIMATOR_NAMES, "opsd_gjsd"],
}

_ADV_FNS = {name: make_adv_estimator(name) for name in ESTIMATOR_NAMES}
_DISTILL_FNS = {name: make_distillation_loss(name) for name in ESTIMATOR_NAMES}
_DISTILL_FNS["opsd_gjsd"] = opsd_gjsd_distillation_loss
_OWN_MARK = "_opd_verl_registered"
for _fn in (*_ADV_FNS.values(), *_DISTILL_FNS.values()):
    setattr(_fn, _OWN_MARK, True)


def _ours(fn) -> bool:
    return getattr(fn, _OWN_MARK, False)


def _registries():
    from verl.trainer.distillation import losses as distill
    from verl.trainer.ppo import core_algos

    return core_algos, distill


def is_registered() -> bool:
    """True when every name of ``REGISTERED_NAMES`` is bound to opd_verl's function in veRL's registries."""
    core_algos, distill = _registries()
    adv_ok = all(_ours(core_algos.ADV_ESTIMATOR_REGISTRY.get(n)) for n in REGISTERED_NAMES["adv_estimator"])
    dist_ok = all(_ours(distill.DISTILLATION_LOSS_REGISTRY.get(n)) for n in REGISTERED_NAMES["distillation_loss"])
    return adv_ok and dist_ok


def register() -> dict[str, list[str]]:
    """Register every name (idempotent) and check the registries; returns ``REGISTERED_NAMES``.

    Raises:
        RuntimeError: a name is taken by another function, or is absent after registration.
    """
    core_algos, distill = _registries()
    for name, fn in _ADV_FNS.items():
        present = core_algos.ADV_ESTIMATOR_REGISTRY.get(name)
        if present is None:
            core_algos.register_adv_est(name)(fn)
        elif not _ours(present):
            raise RuntimeError(f"veRL adv estimator {name!r} is already registered to {present!r}")
    for name, fn in _DISTILL_FNS.items():
        present = distill.DISTILLATION_LOSS_REGISTRY.get(name)
        if present is None:
            topk = name == "opsd_gjsd"
            settings = distill.DistillationLossSettings(names=[name], use_topk=topk, use_estimator=not topk)
            distill.register_distillation_loss(settings)(fn)
        elif not _ours(present):
            raise RuntimeError(f"veRL distillation loss {name!r} is already registered to {present!r}")
    missing = [
        f"adv_estimator:{n}"
        for n in REGISTERED_NAMES["adv_estimator"]
        if not _ours(core_algos.ADV_ESTIMATOR_REGISTRY.get(n))
    ] + [
        f"distillation_loss:{n}"
        for n in REGISTERED_NAMES["distillation_loss"]
        if not _ours(distill.DISTILLATION_LOSS_REGISTRY.get(n))
    ]
    if missing:
        raise RuntimeError(f"opd_verl names missing from veRL's registries after registration: {missing}")
    for name in REGISTERED_NAMES["distillation_loss"]:
        settings = distill.get_distillation_loss_settings(name)
        if settings.use_topk != (name == "opsd_gjsd"):
            raise RuntimeError(f"veRL distillation loss {name!r} registered with unexpected settings {settings}")
    return {kind: list(names) for kind, names in REGISTERED_NAMES.items()}
