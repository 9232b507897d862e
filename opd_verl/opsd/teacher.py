"""OPSD teacher weights: frozen (initial policy), current (live policy) or ema (moving average of the policy).

One model is both student and teacher. :class:`TeacherWeights` gives a context manager under which the model's
forward uses the teacher's weights, and restores the student's weights afterwards:

- ``current``: the live weights (nothing is swapped; the caller runs the forward under ``no_grad``).
- ``frozen``: with LoRA (a peft model), the base model with the adapter disabled, so no second copy exists;
  without LoRA, a snapshot of the trainable parameters taken at construction (one extra copy of them).
- ``ema``: an exponential moving average of the trainable parameters (with LoRA: the adapter weights only),
  ``ema <- decay * ema + (1 - decay) * theta`` at every :meth:`TeacherWeights.update` (after each optimizer step).

Shadow copies are float32 and have the parameters' own type (a DTensor shard stays a DTensor shard), so they
work on FSDP-sharded parameters rank by rank. :meth:`state_dict` / :meth:`load_state_dict` carry the EMA state
through checkpoints (per rank when sharded).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["TEACHER_MODES", "TeacherWeights", "is_peft_model"]

TEACHER_MODES = ("frozen", "current", "ema")


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a peft model with at least one adapter (so `disable_adapter()` gives the base model)."""
    return callable(getattr(model, "disable_adapter", None)) and bool(getattr(model, "peft_config", None))


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _reshard_fsdp(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of `model` back on its sharded parameters (no-op for other modules).

    FSDP2 keeps a module's all-gathered parameters after its forward when it does not reshard after forward (the
    root module under torch's default: final norm, embeddings and a tied lm_head; every module with
    ``reshard_after_forward=False``); until then the module's parameters are those unsharded copies, so the shadow
    values must go into the shards with no module unsharded, and the teacher's unsharded copies must not outlive
    the teacher forward (the student's backward would all-gather nothing and use them).
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class TeacherWeights:
    """Teacher weights for OPSD on a model that is also the student.

    Args:
        model: the policy (a plain module, a peft model, or an FSDP-wrapped one).
        mode: ``frozen`` | ``current`` | ``ema``.
        ema_decay: EMA decay in (0, 1) (used by ``ema``).
        use_adapter_toggle: for ``frozen``, disable the LoRA adapter instead of keeping a snapshot; None = when the
            model is a peft model.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        mode: str,
        ema_decay: float = 0.999,
        use_adapter_toggle: bool | None = None,
    ):
        if mode not in TEACHER_MODES:
            raise ValueError(f"opd.opsd.teacher={mode!r} is not allowed: allowed values are {', '.join(TEACHER_MODES)}")
        if not isinstance(ema_decay, (int, float)) or not 0.0 < float(ema_decay) < 1.0:
            raise ValueError(f"opd.opsd.ema_decay={ema_decay!r} is not allowed: it must be in (0, 1)")
        self.model = model
        self.mode = mode
        self.decay = float(ema_decay)
        self.num_updates = 0
        self.adapter_toggle = mode == "frozen" and (
            is_peft_model(model) if use_adapter_toggle is None else use_adapter_toggle
        )
        if self.adapter_toggle and not is_peft_model(model):
            raise ValueError("use_adapter_toggle=True needs a peft model with a LoRA adapter")
        self.shadow: dict[str, torch.Tensor] = {}
        if mode == "ema" or (mode == "frozen" and not self.adapter_toggle):
            with torch.no_grad():
                self.shadow = {n: p.detach().float().clone() for n, p in self._tracked()}
            if not self.shadow:
                raise ValueError(f"opd.opsd.teacher={mode}: the model has no trainable parameters to follow")

    def _tracked(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        """The parameters the teacher keeps its own values of: the trainable ones (LoRA: the adapter weights)."""
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                yield name, param

    @property
    def extra_parameters(self) -> int:
        """Number of values held besides the model (the shadow copy), for cost reports."""
        return sum(_local(t).numel() for t in self.shadow.values())

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step from the live parameters (call after each optimizer step). No-op unless ``ema``."""
        if self.mode != "ema":
            return
        for name, param in self._tracked():
            self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    @contextlib.contextmanager
    def weights(self):
        """Context under which the model computes with the teacher's weights (the caller adds ``no_grad``)."""
        if self.mode == "current":
            yield
            return
        if self.adapter_toggle:
            with self.model.disable_adapter():
                yield
            return
        _reshard_fsdp(self.model)
        params = dict(self._tracked())
        backup = {}
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                param = params[name]
                if hasattr(param, "to_local"):
                    # FSDP2 shard: the all-gather reads the shard's storage, so write into it (restored below).
                    backup[name] = param.detach().clone()
                    param.copy_(shadow)
                else:
                    # Plain tensor: exchange the storage, so tensors that a pending backward saved stay untouched.
                    backup[name] = param.data
                    param.data = shadow.to(param.dtype)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, saved in backup.items():
                    if hasattr(params[name], "to_local"):
                        params[name].copy_(saved)
                    else:
                        params[name].data = saved
            _reshard_fsdp(self.model)

    def state_dict(self) -> dict:
        """Mode, decay, update count and the shadow values (local shards when sharded)."""
        return {
            "mode": self.mode,
            "decay": self.decay,
            "num_updates": self.num_updates,
            "shadow": {n: _local(t).detach().cpu().clone() for n, t in self.shadow.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`; the mode and parameter names/shapes must match."""
        if state.get("mode") != self.mode:
            raise ValueError(
                f"OPSD teacher checkpoint was saved with opd.opsd.teacher={state.get('mode')!r}, "
                f"but this run uses {self.mode!r}"
            )
        saved = state["shadow"]
        if set(saved) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(saved))[:3]
            extra = sorted(set(saved) - set(self.shadow))[:3]
            raise ValueError(f"OPSD teacher checkpoint does not match the model: missing {missing}, unexpected {extra}")
        for name, value in saved.items():
            local = _local(self.shadow[name])
            if tuple(local.shape) != tuple(value.shape):
                raise ValueError(
                    f"OPSD teacher checkpoint: {name} has shape {tuple(value.shape)}, expected {tuple(local.shape)}"
                )
            local.copy_(value.to(local.device, local.dtype))
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
