"""``rl cluster up`` as a user runs it: a real subprocess starting real workers of chaos_app on
its embedded Redis; tasks are served, a worker SIGKILLed by its pid (from relier's registry)
is restarted and counted, SIGINT drains every worker (a second one hurries the drain) and the
command exits 0 with its final line. An app without relier is one line and a non-zero exit."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from celery import Celery
from fleet import HERE, done, send_work

from relier_celery.core import proc
from relier_celery.core.errors import StoreUnavailable
from relier_celery.core.keys import Keys
from relier_celery.observe.snapshot import take
from relier_celery.store.client import Store
from relier_celery.testing import free_port, wait_for

pytestmark = pytest.mark.slow

RL = str(Path(sys.executable).parent / "rl")


def _env(broker: str, results: str) -> dict[str, str]:
    return {
        **os.environ,
        "RELIER_TEST_REDIS": broker,  # chaos_app's broker: where --embedded starts its Redis
        "RELIER_TEST_RESULTS": results,  # where tasks record their runs; outlives the cluster
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }


def _live_workers(store: Store) -> dict[str, dict[str, str]]:
    """Worker name -> its recorded process, for live workers whose pid is that process."""
    try:
        snap = take(store, 3.0)
    except StoreUnavailable:  # the embedded Redis is not up yet
        return {}
    alive = {w.worker for w in snap.workers if w.status in ("alive", "idle")}
    return {
        w.split("/", 1)[0]: rec
        for w, rec in snap.processes.items()
        if w in alive and proc.matches(rec)
    }


@pytest.mark.timeout(120)
def test_cluster_up_serves_restarts_a_killed_worker_and_drains_on_sigint(
    tmp_path: Path, redis_url: str, r: redis.Redis
) -> None:
    # Given `rl cluster up --embedded` with two workers, for an app naming a free loopback port
    broker = f"redis://127.0.0.1:{free_port()}/0"
    out_path = tmp_path / "out.txt"
    argv = [RL, "-A", "chaos_app", "cluster", "up", "--workers", "2", "--embedded"]
    argv += ["--interval", "0.5", "--logs", str(tmp_path / "logs")]
    with open(out_path, "wb") as out:
        cluster = subprocess.Popen(
            argv,
            cwd=HERE,
            env=_env(broker, redis_url),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    store = Store(broker, Keys("rl"))
    host = socket.gethostname()
    names = {f"w1@{host}", f"w2@{host}"}
    seen: list[dict[str, str]] = []  # every worker process recorded, to check and clean up
    try:
        wait_for(lambda: set(_live_workers(store)) == names, 60, 0.2, "two live workers")
        text = out_path.read_text()
        assert f"embedded redis-server at {broker}" in text, text
        assert "OpenTelemetry exporter off" in text
        # When tasks are sent, they are served
        publisher = Celery("publisher", broker=broker)
        send_work(publisher, range(6), seconds=0.1)
        wait_for(lambda: done(r) >= set(range(6)), 30, what="six tasks done")
        # When one worker is SIGKILLed by the pid relier recorded for it (still that process)
        first = _live_workers(store)
        seen.extend(first.values())
        victim = first[f"w1@{host}"]
        assert proc.matches(victim)
        os.kill(int(victim["pid"]), signal.SIGKILL)

        # Then it runs again under its name, as a new process, and the restart is counted
        def restarted() -> bool:
            now = _live_workers(store)
            seen.extend(now.values())
            return set(now) == names and now[f"w1@{host}"]["pid"] != victim["pid"]

        wait_for(restarted, 40, 0.2, "w1 restarted")
        wait_for(lambda: "(restart 1)" in out_path.read_text(), 10, what="the restart line")
        assert f"↻ w1@{host} (pid {victim['pid']}) exited (SIGKILL)" in out_path.read_text()
        # When a short and a long task run and the cluster gets SIGINT (Ctrl-C)
        short_id = send_work(publisher, range(10, 11), seconds=1.5)[0]
        long_id = send_work(publisher, range(11, 12), seconds=60.0)[0]
        wait_for(lambda: r.get("test:started:10") and r.get("test:started:11"), 20, what="start")
        cluster.send_signal(signal.SIGINT)
        # Then the short one completes in the drain; a second SIGINT hurries the long one off
        wait_for(
            lambda: f"{short_id[:8]} chaos.work completed" in out_path.read_text(),
            20,
            what="the short task's drain line",
        )
        cluster.send_signal(signal.SIGINT)
        code = cluster.wait(30)
        # And every worker drained, and it exits 0 with one final line
        text = out_path.read_text()
        assert code == 0, text[-3000:]
        assert "Traceback" not in text and "hurrying" in text
        assert f": {long_id[:8]} chaos.work exceeded timeout — re-queuing" in text, text[-2000:]
        last = text.strip().splitlines()[-1]
        assert last == (
            "✓ cluster down: 2 workers drained, 1 task completed, 1 handed off, 0 returned, "
            "0 lost (1 restart)"
        ), last
        assert f"✓ w1@{host}: Clean exit." in text and f"✓ w2@{host}: Clean exit." in text
        assert 10 in done(r) and int(r.get("test:runs:10") or 0) == 1
        assert 11 not in done(r)  # handed off: back in its queue (the embedded Redis's)
        # And nothing it started is left: the workers and the embedded Redis are gone
        assert not any(proc.matches(rec) for rec in seen)
        with pytest.raises(redis.ConnectionError):
            redis.Redis.from_url(broker, socket_connect_timeout=1).ping()
    finally:
        if cluster.poll() is None:
            cluster.send_signal(signal.SIGTERM)  # drains, then stops what it started
            try:
                cluster.wait(60)
            except subprocess.TimeoutExpired:
                cluster.kill()
                cluster.wait()
        for rec in seen:  # only the cluster's workers, while their pid is still that process
            if proc.matches(rec):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(int(rec["pid"]), signal.SIGKILL)


@pytest.mark.timeout(60)
def test_cluster_up_for_an_app_without_relier_is_one_line(redis_url: str) -> None:
    out = subprocess.run(
        [RL, "-A", "vanilla_app", "cluster", "up", "--embedded"],
        cwd=HERE,
        env=_env(redis_url, redis_url),
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not enable relier" in lines[0], out.stderr
