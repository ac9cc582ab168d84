"""Relier's remote-control commands, imported by the worker and by the CLI (Celery's CLI checks
command names against the local registry)."""

from __future__ import annotations

from typing import Any

from celery.worker import state as worker_state
from celery.worker.control import control_command

__all__ = ["relier_drain"]


@control_command(args=[("timeout", float)], signature="[timeout=seconds]")  # type: ignore[untyped-decorator]
def relier_drain(state: Any, timeout: float | None = None) -> dict[str, Any]:
    """Drain this worker (as on SIGTERM) and stop it."""
    runtime = getattr(state.consumer.controller, "relier", None)
    if runtime is None or not runtime.started:
        return {"error": "relier is not running on this worker"}
    runtime.drain.begin("remote relier drain command", timeout)
    worker_state.should_stop = 0  # Celery's warm shutdown, at the next loop turn
    return {
        "ok": "draining",
        "worker": runtime.worker_id,
        "timeout": runtime.config.drain_timeout if timeout is None else timeout,
    }
