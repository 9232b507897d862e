"""The plugin's `opd` config section: typed view and validation.

`load_opd_config(cfg)` reads the composed Hydra config (veRL's `ppo_trainer` plus `opd`), checks every rule
below and returns frozen dataclasses; the stage sections (signal, weighting, release) are the objectives' own
parameter classes (`opd_verl.objectives.compose`), which validate their fields. It runs in the driver before Ray
or any worker starts, so a bad value costs nothing. Every error names the field, the value and what is allowed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opd_verl.health import HealthConfig, parse_health
from opd_verl.objectives import ReleaseParams, SignalParams, StageParams, WeightingParams
from opd_verl.objectives.checks import check_number

REFERENCE_KINDS = ("student_init", "base_model")
TEACHER_KINDS = ("local", "server")
PLACEMENTS = ("colocated", "separate")
OPSD_LOSSES = ("full", "topk", "sampled")
OPSD_TEACHERS = ("frozen", "current", "ema")
MISSING_SOLUTION = ("error", "skip")
CPU_DEMO = ("auto", "true", "false")
OPSD_ESTIMATOR = "opsd_in_actor"  # OPSD's advantage estimator (zeros: the loss is computed inside the actor)
BAD_ROW_POLICIES = ("error", "skip")


class OPDConfigError(ValueError):
    """A value of the `opd` section (or a veRL field it depends on) is not allowed."""


@dataclass(frozen=True)
class ReferenceConfig:
    kind: str = "student_init"
    path: str | None = None


@dataclass(frozen=True)
class TeacherModelConfig:
    name: str
    path: str | None
    route: str | None
    lam: float
    reference_path: str | None


@dataclass(frozen=True)
class TeachersConfig:
    routing_key: str = "data_source"
    kind: str = "local"
    placement: str = "colocated"
    offload: bool = False
    nnodes: int = 1
    n_gpus_per_node: int = 1
    logprob_chunk_size: int = 1024
    models: tuple[TeacherModelConfig, ...] = ()


@dataclass(frozen=True)
class OPSDConfig:
    loss: str = "full"
    teacher: str = "frozen"
    ema_decay: float = 0.999
    beta: float = 0.0
    temperature: float = 1.1
    pointwise_clip: float | None = 0.05
    topk: int = 50
    chunk_size: int = 512
    problem_key: str = "extra_info.problem"
    solution_key: str = "extra_info.solution"
    missing_solution: str = "error"
    student_template: str = ""
    teacher_template: str = ""
    teacher_chat_template_kwargs: dict | None = None


@dataclass(frozen=True)
class DataConfig:
    on_bad_row: str = "error"


@dataclass(frozen=True)
class OPDConfig:
    cpu_demo: str = "auto"
    signal: SignalParams = field(default_factory=SignalParams)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    weighting: WeightingParams = field(default_factory=WeightingParams)
    release: ReleaseParams = field(default_factory=ReleaseParams)
    task_coef: float = 0.0
    teachers: TeachersConfig = field(default_factory=TeachersConfig)
    opsd: OPSDConfig = field(default_factory=OPSDConfig)
    data: DataConfig = field(default_factory=DataConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    @property
    def stage_params(self) -> StageParams:
        """What `compose_advantages` computes for this config (signal opd or gopd; OPSD has no stages)."""
        return StageParams(self.signal, self.weighting, self.release, self.task_coef)

    @property
    def needs_reference(self) -> bool:
        """True when some teacher's signal uses reference log-probs (G-OPD with lam != 1)."""
        return self.signal.name == "gopd" and any(t.lam != 1.0 for t in self.teachers.models)

    @property
    def needs_base_model_reference(self) -> bool:
        """True when a third model (reward correction) must be loaded for some teacher."""
        return self.needs_reference and any(t.reference_path for t in self.teachers.models if t.lam != 1.0)


def _fail(field_name: str, value: Any, allowed: str) -> None:
    raise OPDConfigError(f"opd.{field_name}={value!r} is not allowed: {allowed}.")


def _choice(section: dict, key: str, prefix: str, allowed: tuple[str, ...]) -> str:
    value = section.get(key)
    if isinstance(value, bool):
        value = str(value).lower()
    if value not in allowed:
        _fail(f"{prefix}{key}", value, f"allowed values are {', '.join(allowed)}")
    return value


def _number(section: dict, key: str, prefix: str, *, low=None, high=None, low_open=False, integer=False) -> float:
    value = section.get(key)
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        _fail(f"{prefix}{key}", value, f"it must be {kind}")
    if not math.isfinite(value):
        _fail(f"{prefix}{key}", value, "it must be finite")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"> {low}" if low_open else f">= {low}"
        rng = f"{bound}" if high is None else f"in {'(' if low_open else '['}{low}, {high}]"
        _fail(f"{prefix}{key}", value, f"it must be {rng}")
    if high is not None and value > high:
        _fail(f"{prefix}{key}", value, f"it must be in {'(' if low_open else '['}{low}, {high}]")
    return int(value) if integer else float(value)


def _flag(section: dict, key: str, prefix: str) -> bool:
    value = section.get(key)
    if not isinstance(value, bool):
        _fail(f"{prefix}{key}", value, "it must be true or false")
    return value


def _optional_str(section: dict, key: str, prefix: str) -> str | None:
    value = section.get(key)
    if value is None or isinstance(value, str):
        return value or None
    _fail(f"{prefix}{key}", value, "it must be a string or null")
    return None


def _typed(cls, raw: dict, key: str):
    """``opd.<key>`` as the objectives' parameter class ``cls``, which validates it; its ValueError (naming the
    ``opd.*`` field) becomes an OPDConfigError."""
    section = raw.get(key) or {}
    if not isinstance(section, dict):
        _fail(key, section, "it must be a mapping")
    with _as_config_error():
        return cls(**section)


@contextlib.contextmanager
def _as_config_error():
    try:
        yield
    except OPDConfigError:
        raise
    except ValueError as err:
        raise OPDConfigError(str(err)) from err


def _parse_teachers(raw: dict, signal: SignalParams, reference: ReferenceConfig) -> TeachersConfig:
    p = "teachers."
    routing_key = raw.get("routing_key")
    if not isinstance(routing_key, str) or not (
        routing_key == "data_source" or (routing_key.startswith("extra_info.") and len(routing_key) > 11)
    ):
        _fail(f"{p}routing_key", routing_key, "use data_source or extra_info.FIELD")
    models_raw = raw.get("models") or {}
    if not isinstance(models_raw, dict):
        _fail(f"{p}models", models_raw, "it must be a mapping name -> {path, route, lam, reference_path}")
    models = []
    for name, entry in models_raw.items():
        if entry is None:  # `~opd.teachers.models.NAME` style removal
            continue
        mp = f"{p}models.{name}."
        lam = signal.lam if entry.get("lam") is None else _number(entry, "lam", mp, low=0.0, low_open=True)
        if signal.name != "gopd" and lam != 1.0:
            _fail(f"{mp}lam", lam, f"lam applies to signal.name=gopd only (got signal.name={signal.name})")
        route = entry.get("route")
        models.append(
            TeacherModelConfig(
                name=str(name),
                path=_optional_str(entry, "path", mp),
                route=None if route is None else str(route),
                lam=lam,
                reference_path=_optional_str(entry, "reference_path", mp) or reference.path,
            )
        )
    routes = [m.route for m in models]
    if len(set(routes)) != len(routes):
        dup = next(r for r in routes if routes.count(r) > 1)
        _fail(f"{p}models", f"route {dup!r} used twice", "each teacher serves a distinct route (one null fallback)")
    return TeachersConfig(
        routing_key=routing_key,
        kind=_choice(raw, "kind", p, TEACHER_KINDS),
        placement=_choice(raw, "placement", p, PLACEMENTS),
        offload=_flag(raw, "offload", p),
        nnodes=_number(raw, "nnodes", p, low=1, integer=True),
        n_gpus_per_node=_number(raw, "n_gpus_per_node", p, low=1, integer=True),
        logprob_chunk_size=_number(raw, "logprob_chunk_size", p, low=1, integer=True),
        models=tuple(models),
    )


def _parse_opsd(raw: dict) -> OPSDConfig:
    p = "opsd."
    clip = raw.get("pointwise_clip")
    pointwise_clip = None if clip is None else _number(raw, "pointwise_clip", p, low=0.0, low_open=True)
    for key in ("student_template", "teacher_template", "problem_key", "solution_key"):
        if not isinstance(raw.get(key), str) or not raw.get(key):
            _fail(f"{p}{key}", raw.get(key), "it must be a non-empty string")
    if "{problem}" not in raw["student_template"]:
        _fail(f"{p}student_template", raw["student_template"], "it must contain the placeholder {problem}")
    for placeholder in ("{problem}", "{solution}"):
        if placeholder not in raw["teacher_template"]:
            _fail(f"{p}teacher_template", raw["teacher_template"], f"it must contain the placeholder {placeholder}")
    teacher_kwargs = raw.get("teacher_chat_template_kwargs")
    if teacher_kwargs is not None and not isinstance(teacher_kwargs, dict):
        _fail(
            f"{p}teacher_chat_template_kwargs",
            teacher_kwargs,
            "it must be a mapping (e.g. {enable_thinking: true}) or null",
        )
    return OPSDConfig(
        loss=_choice(raw, "loss", p, OPSD_LOSSES),
        teacher=_choice(raw, "teacher", p, OPSD_TEACHERS),
        ema_decay=_number(raw, "ema_decay", p, low=0.0, high=1.0, low_open=True),
        beta=_number(raw, "beta", p, low=0.0, high=1.0),
        temperature=_number(raw, "temperature", p, low=0.0, low_open=True),
        pointwise_clip=pointwise_clip,
        topk=_number(raw, "topk", p, low=1, integer=True),
        chunk_size=_number(raw, "chunk_size", p, low=1, integer=True),
        problem_key=raw["problem_key"],
        solution_key=raw["solution_key"],
        missing_solution=_choice(raw, "missing_solution", p, MISSING_SOLUTION),
        student_template=raw["student_template"],
        teacher_template=raw["teacher_template"],
        teacher_chat_template_kwargs=None if teacher_kwargs is None else dict(teacher_kwargs),
    )


def _task_coef(value: Any) -> float:
    with _as_config_error():
        return check_number("opd.task_coef", value)


def _veRL_has_reference_policy(cfg: DictConfig) -> bool:
    """Whether veRL will compute `ref_log_prob` (student-init reference) for this config."""
    from verl.trainer.ppo.utils import need_reference_policy

    return bool(need_reference_policy(cfg))


def _cross_checks(opd: OPDConfig, cfg: DictConfig | None) -> None:
    signal, teachers = opd.signal, opd.teachers
    if signal.name == "opsd":
        # every OPSD loss, the sampled-token one included, is computed inside the actor: no advantage stage applies
        for stage, value, off in (
            ("weighting.name", opd.weighting.name, "none"),
            ("release.enabled", opd.release.enabled, False),
            ("task_coef", opd.task_coef, 0.0),
        ):
            if value != off:
                raise OPDConfigError(
                    f"opd.{stage}={value!r} is not available with opd.signal.name=opsd: the OPSD loss "
                    f"({opd.opsd.loss}) is not an advantage computed by the trainer but a loss computed inside the "
                    f"actor, so it cannot be weighted, released or mixed with a task reward; use opd.{stage}={off}."
                )
        if cfg is not None:
            _check_opsd_actor(opd, cfg)
            lora_rank = OmegaConf.select(cfg, "actor_rollout_ref.model.lora_rank", default=0) or 0
            if opd.opsd.loss == "full" and opd.opsd.teacher != "current" and lora_rank <= 0:
                _fail(
                    "opsd.teacher",
                    opd.opsd.teacher,
                    "the full-vocabulary loss with full fine-tuning (actor_rollout_ref.model.lora_rank=0) supports "
                    "only the live policy as teacher; use opsd.teacher=current, LoRA (actor_rollout_ref.model."
                    "lora_rank>0: the adapter off is the frozen teacher), or opsd.loss=topk|sampled (a float32 copy "
                    "of the model in each actor worker)",
                )
        return

    if not teachers.models:
        _fail("teachers.models", "{}", f"signal.name={signal.name} needs at least one teacher")
    for t in teachers.models:
        if not t.path:
            _fail(f"teachers.models.{t.name}.path", t.path, "a teacher model path (local directory) is required")
    if teachers.kind == "server":
        _check_server_teachers(opd)
        if opd.release.enabled:
            _fail(
                "teachers.kind",
                "server",
                "the release rule needs the teacher's log-probs at the student's top-K ids, which veRL's "
                "vLLM/SGLang teacher servers do not return; use teachers.kind=local",
            )
        if opd.needs_base_model_reference:
            _fail(
                "teachers.kind",
                "server",
                "reward correction needs a third model (the teacher's base) scored by the plugin's forward-only "
                "worker; use teachers.kind=local",
            )
    if opd.reference.kind == "base_model" and opd.needs_reference:
        missing = [t.name for t in teachers.models if t.lam != 1.0 and not t.reference_path]
        if missing:
            _fail(
                "reference.path",
                opd.reference.path,
                f"reference.kind=base_model needs a model path (set opd.reference.path or "
                f"opd.teachers.models.{missing[0]}.reference_path)",
            )
    if opd.needs_reference and cfg is not None:
        student_init_users = [t.name for t in teachers.models if t.lam != 1.0 and not t.reference_path]
        if student_init_users and not _veRL_has_reference_policy(cfg):
            lam = next(t.lam for t in teachers.models if t.name == student_init_users[0])
            _fail(
                "signal.lam",
                lam,
                "lam != 1 needs reference log-probs, and veRL computes the student-init reference only when "
                "actor_rollout_ref.actor.use_kl_loss=true (set actor_rollout_ref.actor.kl_loss_coef=0 to keep the "
                "loss unchanged) or algorithm.use_kl_in_reward=true; or give a base model with "
                "opd.reference.kind=base_model opd.reference.path=PATH; or use lam=1",
            )


def _check_opsd_actor(opd: OPDConfig, cfg: DictConfig) -> None:
    """What OPSD's actor worker needs from veRL's settings."""
    estimator = OmegaConf.select(cfg, "algorithm.adv_estimator", default=None)
    if estimator != OPSD_ESTIMATOR:
        raise OPDConfigError(
            f"algorithm.adv_estimator={estimator!r} is not allowed with opd.signal.name=opsd: the loss is computed "
            f"inside the actor, so the advantages are zeros; set algorithm.adv_estimator={OPSD_ESTIMATOR}"
        )
    if OmegaConf.select(cfg, "actor_rollout_ref.model.use_fused_kernels", default=False):
        raise OPDConfigError(
            "opd.signal.name=opsd needs the student's logits, which actor_rollout_ref.model.use_fused_kernels=true "
            "never materialises: set it to false"
        )
    sp = OmegaConf.select(cfg, "actor_rollout_ref.actor.ulysses_sequence_parallel_size", default=1) or 1
    if int(sp) > 1:
        raise OPDConfigError(
            "opd.signal.name=opsd does not support sequence parallelism: set "
            "actor_rollout_ref.actor.ulysses_sequence_parallel_size=1"
        )


def _check_server_teachers(opd: OPDConfig) -> None:
    """What veRL's teacher servers (sampled-token log-probs, routed by a top-level sample field) can serve."""
    teachers = opd.teachers
    why = "veRL's teacher servers"
    if teachers.routing_key != "data_source":
        _fail("teachers.routing_key", teachers.routing_key, f"{why} route by data_source only; use teachers.kind=local")
    if len({t.lam for t in teachers.models}) > 1:
        lams = {t.name: t.lam for t in teachers.models}
        _fail(
            "teachers.models",
            f"lam per teacher {lams}",
            f"{why} take one lam for all teachers; use teachers.kind=local",
        )
    if len(teachers.models) > 1 and any(t.route is None for t in teachers.models):
        name = next(t.name for t in teachers.models if t.route is None)
        _fail(f"teachers.models.{name}.route", None, f"{why} need a route for every teacher when there are several")
    if opd.task_coef != 0.0:
        _fail("task_coef", opd.task_coef, "mixing task advantages needs the plugin trainer; use teachers.kind=local")
    if opd.weighting.anneal:
        _fail("weighting.anneal", True, f"annealing needs the training step, which {why} loss does not see")


def parse_cpu_demo(value: Any) -> str:
    """`opd.cpu_demo` as auto | true | false (YAML booleans allowed); OPDConfigError naming the field otherwise."""
    return _choice({"cpu_demo": value}, "cpu_demo", "", CPU_DEMO)


def _known_keys(cls) -> dict[str, Any]:
    """Field name -> nested schema of a config dataclass: a dataclass, ``("mapping", cls)`` for a name -> entry
    mapping (a tuple of dataclasses keyed by their ``name``), or None for a plain value."""
    hints = typing.get_type_hints(cls)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint)
        if dataclasses.is_dataclass(hint) and getattr(hint, "parses_own_keys", False):
            out[f.name] = None  # its parser checks its keys itself (opd.health)
        elif dataclasses.is_dataclass(hint):
            out[f.name] = hint
        elif typing.get_origin(hint) is tuple and args and dataclasses.is_dataclass(args[0]):
            out[f.name] = ("mapping", args[0])
        else:
            out[f.name] = None
    return out


def unknown_keys(raw: Any, cls: type | None = None, prefix: str = "opd.", skip: tuple[str, ...] = ()) -> list[str]:
    """Messages for every key of a raw config dict that the dataclass schema `cls` (default `OPDConfig`) lacks.

    Each message names the full key (e.g. ``opd.signal.lamm``) and the closest known key (difflib) or, with none
    close, the known keys. Entries of a name -> entry mapping (``opd.teachers.models.NAME``) are checked against
    the entry's fields except ``name``.
    """
    cls = OPDConfig if cls is None else cls
    if not isinstance(raw, dict):
        return []
    known = {k: v for k, v in _known_keys(cls).items() if k not in skip}
    out = []
    for key, value in raw.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"did you mean {prefix}{close[0]}?" if close else f"known keys: {', '.join(known)}"
            out.append(f"{prefix}{key} is not a known key ({hint})")
        elif isinstance(known[key], tuple) and isinstance(value, dict):  # name -> entry mapping
            for name, entry in value.items():
                out += unknown_keys(entry, known[key][1], f"{prefix}{key}.{name}.", skip=("name",))
        elif known[key] is not None:
            out += unknown_keys(value, known[key], f"{prefix}{key}.")
    return out


def parse_opd_section(raw: dict, cfg: DictConfig | None = None) -> OPDConfig:
    """Validate a plain-dict `opd` section; `cfg` (the whole config) enables the checks against veRL fields."""
    if not isinstance(raw, dict):
        raise OPDConfigError("the `opd` config section is missing; compose from opd_verl's opd_trainer config")
    unknown = unknown_keys(raw)
    if unknown:
        raise OPDConfigError("; ".join(unknown) + ". Keys added with `+` must exist in the opd section's schema.")
    cpu_demo = parse_cpu_demo(raw.get("cpu_demo"))
    signal = _typed(SignalParams, raw, "signal")
    ref_raw = raw.get("reference") or {}
    reference = ReferenceConfig(
        kind=_choice(ref_raw, "kind", "reference.", REFERENCE_KINDS),
        path=_optional_str(ref_raw, "path", "reference."),
    )
    if reference.kind == "student_init" and reference.path:
        _fail("reference.path", reference.path, "a path is used only with reference.kind=base_model")
    opd = OPDConfig(
        cpu_demo=cpu_demo,
        signal=signal,
        reference=reference,
        weighting=_typed(WeightingParams, raw, "weighting"),
        release=_typed(ReleaseParams, raw, "release"),
        task_coef=_task_coef(raw.get("task_coef")),
        teachers=_parse_teachers(raw.get("teachers") or {}, signal, reference),
        opsd=_parse_opsd(raw.get("opsd") or {}),
        data=DataConfig(on_bad_row=_choice(raw.get("data") or {}, "on_bad_row", "data.", BAD_ROW_POLICIES)),
        health=parse_health(raw.get("health"), OPDConfigError),
    )
    _cross_checks(opd, cfg)
    return opd


def load_opd_config(cfg: DictConfig) -> OPDConfig:
    """Validate the `opd` section of a composed config (and the veRL fields it relies on)."""
    raw = OmegaConf.to_container(cfg.get("opd"), resolve=True) if cfg.get("opd") is not None else None
    return parse_opd_section(raw, cfg)
