"""The worker processes ``rl cluster up`` supervises: real ``celery worker`` subprocesses, each
in a session of its own, so a Ctrl-C in the terminal reaches only the supervisor, which decides
what each worker gets (SIGTERM: a drain).

A worker that exits while the cluster runs is restarted under the same name and counted; one
that exits within ``MIN_UPTIME`` of its start ``CRASH_LOOP`` times in a row stops the cluster
(a worker that cannot start is not retried forever). A worker is known by the pid of the child
this module started, never looked up by name; its orphaned pool processes are stopped through
its own process group right after it is reaped.

The supervisor's own SIGINT and SIGTERM are counted, not raised (:class:`Signals`), so a
Ctrl-C never lands in the middle of a Redis call: the first stops the view and starts the
drains, each further one hurries them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = [
    "CRASH_LOOP",
    "MIN_UPTIME",
    "Child",
    "CrashLoop",
    "Signals",
    "Supervisor",
    "describe_exit",
    "spawn",
]

# A worker that exits sooner than this after its start did not really start (bad code, a
# missing module): after CRASH_LOOP such exits in a row the cluster gives up.
MIN_UPTIME = 5.0
CRASH_LOOP = 3
# Seconds a worker SIGKILLed at the very end gets to be reaped.
REAP_WAIT = 5.0


class CrashLoop(RuntimeError):
    """A worker keeps exiting right after it starts."""


def describe_exit(code: int | None) -> str:
    """A process's exit status in words: ``SIGKILL``, ``exit 1``."""
    if code is None:
        return "running"
    if code < 0:
        try:
            return signal.Signals(-code).name
        except ValueError:
            return f"signal {-code}"
    return f"exit {code}"


@dataclass
class Child:
    """One supervised worker: its name (Celery hostname), command line, log and history."""

    name: str
    argv: list[str]
    log_path: str
    proc: Any = None  # subprocess.Popen[bytes] or a test double with pid / poll / send_signal
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0
    last_exit: int | None = None
    worker_id: str | None = None  # its lease id in relier's registry, once registered
    reaped: bool = False

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else int(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


Spawn = Callable[[list[str], str], Any]


def spawn(env: Mapping[str, str], cwd: str | None = None) -> Spawn:
    """Start a command in a session of its own, its output appended to its log file."""

    def start(argv: list[str], log_path: str) -> subprocess.Popen[bytes]:
        with open(log_path, "ab") as log:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env),
                cwd=cwd,
                start_new_session=True,
            )

    return start


def _kill_group(pid: int) -> None:
    # The group of a child started in its own session has the child's pid as its id; it
    # outlives the child only while its pool processes do.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


class Supervisor:
    """Start, watch, restart and stop a set of children (by their pids)."""

    def __init__(
        self,
        children: list[Child],
        start: Spawn,
        *,
        clock: Callable[[], float] = time.monotonic,
        kill_group: Callable[[int], None] = _kill_group,
    ) -> None:
        self.children = children
        self._spawn = start
        self._clock = clock
        self._kill_group = kill_group
        self.stopping = False

    @property
    def restarts(self) -> int:
        return sum(c.restarts for c in self.children)

    def start(self) -> None:
        for child in self.children:
            self._start(child)

    def _start(self, child: Child) -> None:
        child.proc = self._spawn(child.argv, child.log_path)
        child.started_at = self._clock()
        child.worker_id = None
        child.reaped = False

    def uptime(self, child: Child) -> float:
        return max(self._clock() - child.started_at, 0.0)

    def check(self) -> list[str]:
        """Reap children that exited; unless stopping, restart each one (a line per restart).
        Raise :class:`CrashLoop` when one keeps exiting right after its start."""
        lines = []
        for child in self.children:
            if child.proc is None or child.reaped or child.proc.poll() is None:
                continue
            child.reaped = True
            code = child.proc.returncode
            child.last_exit = code
            self._kill_group(child.proc.pid)
            if self.stopping:
                continue
            uptime = self.uptime(child)
            child.quick_exits = child.quick_exits + 1 if uptime < MIN_UPTIME else 0
            if child.quick_exits >= CRASH_LOOP:
                raise CrashLoop(
                    f"{child.name} exited {child.quick_exits} times within {MIN_UPTIME:g} s of "
                    f"starting (last: {describe_exit(code)}): see its log {child.log_path}"
                )
            child.restarts += 1
            old = child.pid
            self._start(child)
            lines.append(
                f"↻ {child.name} (pid {old}) exited ({describe_exit(code)}) after {uptime:.1f}s: "
                f"restarted as pid {child.pid} (restart {child.restarts})"
            )
        return lines

    def alive(self) -> list[Child]:
        return [c for c in self.children if c.alive()]

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to every child still running (its main process only)."""
        for child in self.alive():
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(sig)

    def kill_left(self) -> list[Child]:
        """SIGKILL what still runs, with its pool; return those children."""
        left = self.alive()
        for child in left:
            with contextlib.suppress(ProcessLookupError):
                child.proc.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.proc.wait(REAP_WAIT)
        self.stopping = True
        self.check()
        return left


class Signals:
    """SIGINT and SIGTERM counted instead of raised, while in use."""

    def __init__(self) -> None:
        self.count = 0
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1

    def __enter__(self) -> Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def sleep(self, seconds: float) -> None:
        """Sleep, waking early on a signal."""
        seen, end = self.count, time.monotonic() + seconds
        while self.count == seen and time.monotonic() < end:
            time.sleep(min(0.05, max(end - time.monotonic(), 0.0)))
