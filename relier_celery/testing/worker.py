"""Real ``celery worker`` processes for tests, killed by PID, and the headers of a task message
as Celery publishes it."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from relier_celery.testing.redis_server import free_port, wait_for

__all__ = ["WorkerProcess", "task_headers"]


class WorkerProcess:
    """A real ``celery -A <app> worker`` subprocess, in its own process group."""

    def __init__(
        self,
        app: str,
        *,
        pool: str = "prefork",
        concurrency: int = 2,
        hostname: str | None = None,
        extra: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        log_path: str | None = None,
        python: str | None = None,
    ) -> None:
        """``python``: the interpreter to run Celery with (default: this one), e.g. another
        virtualenv's, to compare with a worker where relier is not installed."""
        self.app = app
        self.pool = pool
        self.concurrency = concurrency
        self.hostname = hostname or f"w{free_port()}@%h"
        self.extra = list(extra)
        self.env = {**os.environ, **(env or {})}
        self.cwd = cwd
        self.log_path = log_path or tempfile.mkstemp(prefix="relier-worker-", suffix=".log")[1]
        self.python = python or sys.executable
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "celery",
                    "-A",
                    self.app,
                    "worker",
                    "--pool",
                    self.pool,
                    "--concurrency",
                    str(self.concurrency),
                    "--hostname",
                    self.hostname,
                    "--loglevel",
                    "INFO",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                    *self.extra,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> WorkerProcess:
        """Wait until the worker logs that it is ready (it consumes from then on)."""

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            return " ready." in self.log()

        wait_for(ready, timeout, interval=0.1, what=f"worker {self.hostname} to be ready")
        return self

    def children(self) -> list[int]:
        """PIDs of the worker's pool processes (prefork)."""
        try:
            out = subprocess.run(
                ["pgrep", "-P", str(self.pid)], capture_output=True, text=True, check=False
            ).stdout
        except FileNotFoundError:
            return []
        return [int(p) for p in out.split()]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the main process only (its pool children die with it on SIGKILL)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.pid, sig)
            if sig == signal.SIGKILL:
                _wait_exit(self.proc, 10)
                self._kill_group()

    def _kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def stop(self, timeout: float = 20) -> int | None:
        """SIGTERM (warm shutdown), then SIGKILL the whole group if it does not exit."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._kill_group()
        return self.proc.returncode

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def task_headers(
    task_id: str | None = None, task: str = "tasks.add", **extra: Any
) -> dict[str, Any]:
    """Protocol 2 task message headers as Celery's publisher writes them (``extra`` replaces or
    adds fields), for tests that publish or record messages by hand."""
    task_id = task_id or str(uuid.uuid4())
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "test@relier",
        "ignore_result": None,
        "stamped_headers": None,
        "stamps": {},
        **extra,
    }


def _wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for ``proc`` to exit, woken the moment it does (a pidfd on Linux): Popen.wait with
    a timeout polls at 0.5, 1, 2, 4, 8 ... ms, so "reaped" would be late by up to half of
    what it measured (benchmarks/bench_rabbitmq.py times from it)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+, or gone already
        proc.wait(timeout)
        return
    try:
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)
    proc.wait(timeout)
