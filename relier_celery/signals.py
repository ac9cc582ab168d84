"""Signal handlers, connected when ``relier_celery`` is imported (``weak=False``).

``worker_init`` fires in every worker (also under ``celery.contrib.testing``) after the loader
imported the app's ``imports`` and before the blueprints are built: that is where relier adds
its bootsteps. ``worker_shutdown`` fires after the pool finished its tasks: that is where the
lease is retired.
"""

from __future__ import annotations

from typing import Any

from celery import signals

__all__ = ["connect"]


def on_worker_init(sender: Any = None, **_: Any) -> None:
    from .bootsteps import RelierConsumer, RelierWorker

    app = sender.app
    app.steps["worker"].add(RelierWorker)
    app.steps["consumer"].add(RelierConsumer)


def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    runtime = getattr(sender, "relier", None)
    if runtime is not None:
        runtime.stop()


def on_task_prerun(task: Any = None, **_: Any) -> None:
    from .timeouts import begin

    if task is not None:
        begin(task)


def on_task_postrun(**_: Any) -> None:
    from .timeouts import end

    end()


def on_worker_process_init(**_: Any) -> None:
    from .timeouts import install_drain_hook_signal

    install_drain_hook_signal()


def on_worker_shutting_down(sig: Any = None, how: Any = None, **_: Any) -> None:
    """Any shutdown signal (SIGTERM, SIGINT, SIGQUIT, warm or cold) starts relier's drain."""
    from .bootsteps import WorkerRuntime

    runtime = WorkerRuntime.current
    if runtime is not None and runtime.started:
        runtime.drain.begin(f"{sig} ({how} shutdown)")


def on_task_revoked(request: Any = None, **_: Any) -> None:
    from .bootsteps import WorkerRuntime

    runtime = WorkerRuntime.current
    task_id = getattr(request, "id", None)
    if runtime is not None and task_id:
        runtime.inflight.finish_task(str(task_id))


def on_before_task_publish(sender: Any = None, headers: Any = None, **_: Any) -> None:
    """Stamp every task message with its task's schema version (an explicit header wins)."""
    from celery import current_app

    from .envelope import SCHEMA_HEADER, schema_version

    if isinstance(headers, dict) and SCHEMA_HEADER not in headers and "task" in headers:
        task = current_app.tasks.get(sender) if isinstance(sender, str) else None
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
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
    signals.task_revoked.connect(on_task_revoked, weak=False)
    signals.worker_shutting_down.connect(on_worker_shutting_down, weak=False)
    signals.worker_process_init.connect(on_worker_process_init, weak=False)
    signals.task_prerun.connect(on_task_prerun, weak=False)
    signals.task_postrun.connect(on_task_postrun, weak=False)
    signals.before_task_publish.connect(on_before_task_publish, weak=False)
