"""Per-sample teacher routing (docs/objectives.md section 2, multi-teacher): by ``data_source`` or ``extra_info.FIELD``.

Each teacher of ``opd.teachers.models`` serves one routing-key value (``route``); at most one teacher has
``route: null`` and serves every sample no other teacher claims.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["RoutingError", "assign_teachers", "routing_values"]


class RoutingError(ValueError):
    """A sample's routing-key value is served by no teacher."""


def routing_values(routing_key: str, data_sources: Sequence[Any] | None, extra_infos: Sequence[Any] | None) -> list:
    """The routing-key value of every sample.

    Args:
        routing_key: ``data_source`` or ``extra_info.FIELD``.
        data_sources: the samples' ``data_source`` values (needed for ``data_source``).
        extra_infos: the samples' ``extra_info`` dicts (needed for ``extra_info.FIELD``).

    Returns:
        list of values (``str`` or None where the field is missing).
    """
    if routing_key == "data_source":
        if data_sources is None:
            raise RoutingError("opd.teachers.routing_key=data_source but the batch has no data_source field")
        return [None if v is None else str(v) for v in data_sources]
    if not routing_key.startswith("extra_info.") or len(routing_key) <= len("extra_info."):
        raise RoutingError(f"opd.teachers.routing_key={routing_key!r}: use data_source or extra_info.FIELD")
    if extra_infos is None:
        raise RoutingError(f"opd.teachers.routing_key={routing_key} but the batch has no extra_info field")
    field = routing_key[len("extra_info.") :]
    out = []
    for info in extra_infos:
        value = info.get(field) if isinstance(info, dict) else None
        out.append(None if value is None else str(value))
    return out


def assign_teachers(values: Sequence[Any], routes: Sequence[str | None], routing_key: str = "data_source") -> list[int]:
    """Index of the teacher serving each sample.

    Args:
        values: each sample's routing-key value (see :func:`routing_values`).
        routes: each teacher's ``route`` (None = fallback), in ``opd.teachers.models`` order.
        routing_key: for the error message.

    Raises:
        RoutingError: naming the first sample whose value no teacher serves, and the routes that exist.
    """
    by_route = {r: i for i, r in enumerate(routes) if r is not None}
    fallback = next((i for i, r in enumerate(routes) if r is None), None)
    out = []
    for n, value in enumerate(values):
        idx = by_route.get(value, fallback)
        if idx is None:
            raise RoutingError(
                f"sample {n} has {routing_key}={value!r}, which no teacher serves (routes: {sorted(by_route)}); "
                "add a teacher with that route or one with route: null as the fallback"
            )
        out.append(idx)
    return out
