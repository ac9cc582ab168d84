"""``rl cluster up`` without workers: its options, where its Redis comes from, the worker
command line, the supervisor's restart bookkeeping (with stand-in processes), the header of
the live view, the final line, and each bad input as one line and a non-zero exit."""

from __future__ import annotations

import signal
import socket
import sys
import textwrap
from pathlib import Path

import click
import pytest
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner
from rich.console import Console

from relier_celery.cli.cluster import embedded_address, otel_requested, parse_queues, worker_argv
from relier_celery.cli.clusterdown import final_line
from relier_celery.cli.clusterview import ClusterInfo, header
from relier_celery.cli.supervise import (
    CRASH_LOOP,
    MIN_UPTIME,
    Child,
    CrashLoop,
    Supervisor,
    describe_exit,
)
from relier_celery.testing import free_port


# -- options and where Redis comes from -------------------------------------------------------
def test_queues_are_read_as_celery_reads_them() -> None:
    assert parse_queues(None) == ()
    assert parse_queues("a") == ("a",)
    assert parse_queues("a, b") == ("a", "b")
    with pytest.raises(click.BadParameter):
        parse_queues("a,,b")


def test_the_exporter_is_asked_for_by_any_otel_variable_unless_the_sdk_is_disabled() -> None:
    assert not otel_requested({"PATH": "/bin"})
    assert otel_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert otel_requested({"OTEL_SERVICE_NAME": "shop", "OTEL_SDK_DISABLED": "false"})
    assert not otel_requested({"OTEL_SERVICE_NAME": "shop", "OTEL_SDK_DISABLED": "true"})


@pytest.mark.parametrize(
    ("broker", "free", "expected"),
    [
        ("redis://127.0.0.1:6390/2", True, ("redis://127.0.0.1:6390/2", 6390)),
        ("redis://localhost/0", True, ("redis://localhost/0", 6379)),
        ("redis://127.0.0.1:6390/2", False, ("", 0)),  # taken: a Redis of the user's
        ("redis://:secret@127.0.0.1:6390/0", True, ("", 0)),  # the embedded one has no password
        ("redis://10.1.2.3:6379/0", True, ("", 0)),
        ("amqp://guest@localhost//", True, ("", 0)),
        (None, True, ("", 0)),
    ],
)
def test_the_embedded_redis_takes_the_apps_own_address_when_it_can(broker, free, expected) -> None:
    assert embedded_address(broker, lambda port: free) == expected


def test_a_worker_runs_this_interpreters_celery_with_relier_settings_after_the_options() -> None:
    argv = worker_argv("shop", "w1@host", 3, ("a", "b"), ["relier_otel_enabled=(bool)true"])
    assert argv[:6] == [sys.executable, "-m", "celery", "-A", "shop", "worker"]
    assert argv[argv.index("--hostname") + 1] == "w1@host"
    assert argv[argv.index("--concurrency") + 1] == "3"
    assert argv[argv.index("-Q") + 1] == "a,b"
    assert argv[-2:] == ["--", "relier_otel_enabled=(bool)true"]
    assert "--" not in worker_argv("shop", "w1@host", 1, (), [])


# -- the supervisor ---------------------------------------------------------------------------
class FakeProc:
    """A child process stand-in: pid, poll, send_signal, wait."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        if sig == signal.SIGKILL:
            self.returncode = -signal.SIGKILL

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _supervisor(n: int = 2) -> tuple[Supervisor, list[FakeProc], list[int], Clock]:
    started: list[FakeProc] = []
    groups: list[int] = []
    clock = Clock()

    def spawn(argv: list[str], log: str) -> FakeProc:
        started.append(FakeProc(1000 + len(started)))
        return started[-1]

    children = [Child(f"w{i}@h", ["celery"], f"/tmp/w{i}.log") for i in range(1, n + 1)]
    return (
        Supervisor(children, spawn, clock=clock, kill_group=groups.append),
        started,
        groups,
        clock,
    )


def test_a_worker_that_dies_is_restarted_under_its_name_and_counted() -> None:
    # Given two running workers
    sup, procs, groups, clock = _supervisor()
    sup.start()
    clock.now += 30
    assert sup.check() == [] and [c.pid for c in sup.children] == [1000, 1001]
    # When the first is SIGKILLed
    procs[0].returncode = -signal.SIGKILL
    lines = sup.check()
    # Then its pool's group is stopped, it runs again as a new process, and it is counted
    first = sup.children[0]
    assert groups == [1000]
    assert first.pid == 1002 and first.restarts == 1 and first.last_exit == -signal.SIGKILL
    assert first.worker_id is None  # a new process registers a new lease
    assert lines == [
        "↻ w1@h (pid 1000) exited (SIGKILL) after 30.0s: restarted as pid 1002 (restart 1)"
    ]
    assert sup.restarts == 1 and sup.check() == []


def test_a_worker_that_keeps_dying_at_start_stops_the_cluster() -> None:
    sup, procs, _, clock = _supervisor(1)
    sup.start()
    for _ in range(CRASH_LOOP - 1):
        clock.now += MIN_UPTIME / 2
        procs[-1].returncode = 1
        assert len(sup.check()) == 1
    clock.now += MIN_UPTIME / 2
    procs[-1].returncode = 1
    with pytest.raises(CrashLoop, match=f"w1@h exited {CRASH_LOOP} times within"):
        sup.check()


def test_a_long_life_resets_the_count_of_quick_exits() -> None:
    sup, procs, _, clock = _supervisor(1)
    sup.start()
    for _ in range(CRASH_LOOP * 2):
        clock.now += MIN_UPTIME + 1
        procs[-1].returncode = -signal.SIGKILL
        assert len(sup.check()) == 1
    assert sup.children[0].restarts == CRASH_LOOP * 2


def test_stopping_workers_are_reaped_not_restarted_and_stragglers_are_killed() -> None:
    sup, procs, groups, _ = _supervisor()
    sup.start()
    sup.stopping = True
    sup.signal_all(signal.SIGTERM)
    assert [p.signals for p in procs] == [[signal.SIGTERM], [signal.SIGTERM]]
    procs[0].returncode = 0
    assert sup.check() == [] and len(procs) == 2 and groups == [1000]
    assert sup.kill_left() == [sup.children[1]]
    assert procs[1].signals[-1] == signal.SIGKILL and groups == [1000, 1001]
    assert sup.alive() == []


def test_exit_statuses_in_words() -> None:
    assert describe_exit(-9) == "SIGKILL"
    assert describe_exit(0) == "exit 0"
    assert describe_exit(2) == "exit 2"
    assert describe_exit(None) == "running"


# -- what it shows ----------------------------------------------------------------------------
def test_the_header_lists_each_supervised_process_with_its_restarts(tmp_path: Path) -> None:
    sup, procs, _, clock = _supervisor()
    sup.start()
    clock.now += 12
    procs[1].returncode = -signal.SIGKILL
    info = ClusterInfo("shop", None, "redis://127.0.0.1:6390/0", True, False, "", (), 1.0, tmp_path)
    info.events += sup.check()
    console = Console(record=True, width=140, force_terminal=True)
    console.print(*header(sup, info, None))
    text = console.export_text()
    assert "embedded redis-server" in text and "OpenTelemetry exporter off" in text
    assert "restarted 1" in text and "resurrector" in text
    w2 = next(line for line in text.splitlines() if line.startswith(" w2@h"))
    assert " 1002 " in w2 and " 1 " in w2 and "starting" in w2
    assert "restarted as pid 1002 (restart 1)" in text
    assert "CELERY_BROKER_URL=redis://127.0.0.1:6390/0" in info.describe(sup, 42)


def test_the_final_line_sums_the_drains() -> None:
    assert final_line(2, 2, 3, 1, 4, 0, 1) == (
        "✓ cluster down: 2 workers drained, 3 tasks completed, 1 handed off, 4 returned, "
        "0 lost (1 restart)"
    )
    assert final_line(1, 1, 1, 0, 0, 0, 0).startswith("✓ cluster down: 1 worker drained, 1 task")
    assert final_line(2, 1, 0, 0, 0, 0, 2).startswith("✗ cluster down: 1 of 2 workers drained")
    assert final_line(2, 2, 0, 0, 0, 1, 0).startswith("✗ ")


# -- bad input: one line, a non-zero exit -----------------------------------------------------
def _app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    (tmp_path / "clusterapp.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "clusterapp", raising=False)


def _up(tmp_path: Path, *args: str) -> tuple[int, str]:
    argv = ["-A", "clusterapp", "relier", "cluster", "up", "--logs", str(tmp_path / "logs"), *args]
    result = CliRunner().invoke(celery_cli, argv)
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def test_an_app_without_relier(tmp_path, monkeypatch, redis_url) -> None:
    _app(
        tmp_path, monkeypatch, f"from celery import Celery\napp = Celery('c', broker='{redis_url}')"
    )
    code, out = _up(tmp_path, "--embedded")
    assert code == 1 and "does not enable relier" in out and len(out.strip().splitlines()) == 1


def test_a_redis_that_cannot_be_reached(tmp_path, monkeypatch) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    _app(
        tmp_path,
        monkeypatch,
        f"from celery import Celery\napp = Celery('c', broker='{url}')\n"
        "app.conf.imports = ('relier_celery',)\n",
    )
    code, out = _up(tmp_path)
    assert code == 1 and "relier cannot reach Redis" in out and "--embedded" in out, out
    assert len(out.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists()  # nothing was started


def test_a_broker_that_is_not_redis(tmp_path, monkeypatch) -> None:
    _app(
        tmp_path,
        monkeypatch,
        "from celery import Celery\napp = Celery('c', broker='amqp://guest@127.0.0.1:1//')\n"
        "app.conf.imports = ('relier_celery',)\n",
    )
    code, out = _up(tmp_path)
    assert code == 1 and "the broker is not Redis" in out and len(out.strip().splitlines()) == 1


def test_bad_options(tmp_path, monkeypatch, redis_url) -> None:
    _app(
        tmp_path,
        monkeypatch,
        f"from celery import Celery\napp = Celery('c', broker='{redis_url}')\n"
        "app.conf.imports = ('relier_celery',)\n",
    )
    for args in (["-Q", "a,,b"], ["--workers", "0"], ["--concurrency", "0"], ["--interval", "0"]):
        code, out = _up(tmp_path, *args)
        assert code == 2 and "Error" in out, (args, out)


def test_the_port_helper_sees_a_taken_port() -> None:
    from relier_celery.cli.cluster import _port_free

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert not _port_free(s.getsockname()[1])
