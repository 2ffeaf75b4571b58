"""Connecting to Ray, and Ray's errors brought back as ours."""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any

import ray
import ray.data

from ...errors import LogitguardError

__all__ = ["RayErrors", "init_ray"]


def init_ray(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to Ray unless this process already is.

    `address` (default: the ``RAY_ADDRESS`` environment variable) names a running cluster: ``ray://head:10001``
    (Ray Client), ``auto`` or ``head:6379`` (on a cluster node). Without one, a local Ray starts with
    `num_cpus` (default: every CPU) and no dashboard. `quiet`: no progress bars, worker output or INFO logs
    (tests, logs); usage statistics are off unless the environment says otherwise. When this process is
    already connected, nothing changes.
    """
    if ray.is_initialized():
        return  # connected by the caller (or an earlier call): their settings stand
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    level = logging.WARNING if quiet else logging.INFO
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=not quiet, logging_level=level)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=not quiet, logging_level=level)
    with warnings.catch_warnings():  # Ray Data's own defaults set fields it deprecates (2.60)
        warnings.simplefilter("ignore", DeprecationWarning)
        context = ray.data.DataContext.get_current()
    context.enable_progress_bars = not quiet
    context.print_on_execution_start = not quiet
    logging.getLogger("ray.data").setLevel(level)


def _unwrap(exc: BaseException) -> BaseException:
    """The `LogitguardError` (or `OSError`) a Ray task raised, from under Ray's wrappers; else `exc`."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        current = todo.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (LogitguardError, OSError)) and not isinstance(current, ray.exceptions.RayError):
            return current
        todo += [getattr(current, "cause", None), current.__cause__, current.__context__]
    return exc


class RayErrors:
    """Re-raise an error of ours raised inside Ray (a bad table, a schema the guard refuses) as itself, without
    Ray's wrapper and its remote traceback."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is None:
            return False
        inner = _unwrap(exc)
        if inner is not exc:
            raise inner.with_traceback(None) from None
        return False

