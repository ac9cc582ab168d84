"""Signal handlers, connected when ``relier_celery`` is imported (``weak=False``).

Celery's signals are global: every handler here first asks
:func:`~relier_celery.wiring.install.enabled` about the app concerned and returns at once for
an app that did not enable relier, so importing the package (Celery's CLI does, in every
process) changes no other app's worker or publisher.

``worker_init`` fires in every worker (also under ``celery.contrib.testing``) after the loader
imported the app's ``imports`` and before the blueprints are built: that is where relier decides
whether the app enabled it and adds its bootsteps. ``worker_shutdown`` fires after the pool
finished its tasks: that is where the lease is retired.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import signals

from relier_celery import runtime
from relier_celery.wiring.install import decide, enabled

__all__ = ["connect"]


def _worker_of(app: Any) -> Any:
    """The started worker's state (bootsteps.WorkerRuntime) of ``app`` in this process, or
    None (a pool process, a publisher)."""
    relier = runtime.of(app)
    return None if relier is None else relier.worker


def _current_app() -> Any:
    """The app Celery made current (the worker's own, in a worker and its pool processes): for
    the signals whose sender is a hostname or a task name."""
    from celery import current_app

    return current_app._get_current_object()


def on_worker_init(sender: Any = None, **_: Any) -> None:
    app = sender.app
    # Decided afresh: the loader has just imported the app's ``imports``, so this is final.
    if not decide(app):
        return
    from relier_celery.wiring.bootsteps import RelierConsumer, RelierWorker

    app.steps["worker"].add(RelierWorker)
    app.steps["consumer"].add(RelierConsumer)


def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    if not enabled(getattr(sender, "app", None)):
        return
    worker = getattr(sender, "relier", None)
    if worker is not None:
        worker.stop()


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Once the worker is ready (its pool processes forked): its heap in 2 MB pages, so that
    it dies faster when killed, and again after its pool's processes changed (huge_pages.py)."""
    app = getattr(sender, "app", None)
    if not enabled(app):
        return
    worker = _worker_of(app)
    if worker is None or not worker.config.huge_pages:
        return
    from relier_celery.wiring import huge_pages

    heap = huge_pages.HugeHeap()
    done = heap.refresh()
    worker.huge_heap = heap  # its heartbeat collapses again after the pool changed
    logging.getLogger("relier_celery").info(
        "relier: %.0f MiB of this worker's heap in 2 MB pages (relier_huge_pages)", done / 2**20
    )


def on_task_prerun(task: Any = None, **_: Any) -> None:
    if task is None or not enabled(task.app):
        return
    from relier_celery.features.timeouts import begin
    from relier_celery.recovery.lease import gate

    gate(task)  # only under a live lease, only what this lease received
    begin(task)


def on_task_success(sender: Any = None, **_: Any) -> None:
    if sender is None or not enabled(getattr(sender, "app", None)):
        return
    from relier_celery.recovery.completion import record_success

    record_success(sender)


def on_task_postrun(task: Any = None, **_: Any) -> None:
    if task is None or not enabled(task.app):
        return
    from relier_celery.features.timeouts import end

    end()


def on_worker_process_init(**_: Any) -> None:
    if not enabled(_current_app()):
        return
    from relier_celery.features.timeouts import install_drain_hook_signal

    install_drain_hook_signal()


def on_worker_shutting_down(sig: Any = None, how: Any = None, **_: Any) -> None:
    """Any shutdown signal (SIGTERM, SIGINT, SIGQUIT, warm or cold) starts relier's drain."""
    if not enabled(_current_app()):
        return
    worker = _worker_of(_current_app())
    if worker is not None and worker.started:
        worker.drain.begin(f"{sig} ({how} shutdown)")


def on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if not enabled(app if app is not None else _current_app()):
        return
    worker = _worker_of(app if app is not None else _current_app())
    task_id = getattr(request, "id", None)
    if worker is not None and task_id:
        # The request's context carries its message's headers: which delivery was revoked.
        headers = getattr(request, "__dict__", None)
        worker.inflight.finish_task(str(task_id), headers if isinstance(headers, dict) else None)


def on_before_task_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
    """Stamp every task message with a fresh publication id (``rl_pub``, see
    ``record.delivery_id``) and its task's schema version (an explicit header wins).

    The signal names neither the app nor the producer, only the task: the app is the current
    one, as Celery's own ``current_app`` lookups assume."""
    if not isinstance(headers, dict) or "task" not in headers:
        return
    app = _current_app()
    if not enabled(app):
        return
    from relier_celery.core.headers import EPOCH_KEY, HELD_KEY, PUBLICATION_HEADER, SCHEMA_HEADER
    from relier_celery.core.record import new_publication_id
    from relier_celery.recovery.schema import schema_version

    # Always a fresh one, even over a value a caller copied from a request's headers: this
    # publication is a new one (a replacement, a re-applied frozen signature), while a broker
    # redelivery or a relier republish never passes here and keeps the value it had.
    headers[PUBLICATION_HEADER] = new_publication_id()
    # A retry copies its request's custom headers, these included: they belong to the worker
    # that ran that delivery, never to a new message.
    headers.pop(EPOCH_KEY, None)
    headers.pop(HELD_KEY, None)
    if SCHEMA_HEADER not in headers:
        task = app.tasks.get(sender) if isinstance(sender, str) else None
        if task is not None:
            headers[SCHEMA_HEADER] = schema_version(task)


_connected = False


def connect() -> None:
    """Connect relier's handlers once per process."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_ready.connect(on_worker_ready, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
    signals.task_revoked.connect(on_task_revoked, weak=False)
    signals.worker_shutting_down.connect(on_worker_shutting_down, weak=False)
    signals.worker_process_init.connect(on_worker_process_init, weak=False)
    signals.task_prerun.connect(on_task_prerun, weak=False)
    signals.task_postrun.connect(on_task_postrun, weak=False)
    signals.task_success.connect(on_task_success, weak=False)
    signals.before_task_publish.connect(on_before_task_publish, weak=False)
