"""Helpers to test tasks under relier with real parts: a throwaway ``redis-server`` and real
``celery worker`` processes, killed by PID. No fakes.

Used by relier's own test suite; usable in yours::

    with RedisServer() as redis_url, WorkerProcess("myapp", env={"BROKER": redis_url}) as w:
        ...
        w.kill()  # SIGKILL the worker's main process
"""

from __future__ import annotations

from relier_celery.testing.otlp import OtlpReceiver
from relier_celery.testing.redis_server import RedisServer, find_redis_server, free_port, wait_for
from relier_celery.testing.worker import WorkerProcess, task_headers

__all__ = [
    "OtlpReceiver",
    "RedisServer",
    "WorkerProcess",
    "find_redis_server",
    "free_port",
    "task_headers",
    "wait_for",
]
