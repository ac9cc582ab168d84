"""The operator's commands against real workers of chaos_app, run as a user runs them (`rl`):
chaos kills real workers and every task they held recovers; `worker drain` prints a line per
task; `tasks inflight` and `workers` show the fleet; the live view in a real terminal (tmux)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from fleet import HERE, done, send_work, wait_all_done

from relier_celery.testing import wait_for

RL = str(Path(sys.executable).parent / "rl")


def _env(redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "RELIER_TEST_REDIS": redis_url,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }


def rl(redis_url: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RL, "-A", "chaos_app", *args],
        cwd=HERE,
        env=_env(redis_url),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.timeout(120)
def test_chaos_kills_real_workers_and_every_task_they_held_recovers(fleet, publisher, r) -> None:
    # Given three workers with 24 tasks of 1.5 s running and prefetched
    for _ in range(3):
        fleet.start(concurrency=2)
    send_work(publisher, range(24), seconds=1.5)
    wait_for(lambda: r.get("test:started:0"), 20, what="work to start")
    # When chaos SIGKILLs two of them, 3 s apart
    started = time.monotonic()
    out = rl(fleet.redis_url, "chaos", "worker-kill", "--count", "2", "--every", "3", timeout=90)
    # Then it reports 0 lost and a recovery time for every affected task, within a minute
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - started < 60
    assert "Traceback" not in out.stderr
    final = out.stdout.strip().splitlines()[-1]
    assert final.startswith("killed 2, tasks affected ") and "quarantined 0, lost 0" in final
    affected = int(final.split("tasks affected ")[1].split(",")[0])
    assert affected > 0 and f"recovered {affected}," in final
    assert "recovery p50 " in final and "p99 " in final
    recovered = [line for line in out.stdout.splitlines() if " recovered in " in line]
    assert len(recovered) == affected
    assert out.stdout.count("SIGKILL pid") == 2
    # And every task really ran to the end on the surviving worker
    wait_all_done(r, set(range(24)), 60, fleet)


@pytest.mark.timeout(120)
def test_chaos_kills_a_pool_process_and_reports_json(fleet, publisher, r) -> None:
    # Given one worker with one pool process running a 3 s task, two more queued
    fleet.start(concurrency=1, RELIER_TEST_PREFETCH="1")
    send_work(publisher, range(3), seconds=3.0)
    wait_for(lambda: r.get("test:started:0"), 20, what="the first task to start")
    time.sleep(1.0)  # the running set is published with the heartbeat
    # When chaos kills its pool process
    out = rl(fleet.redis_url, "chaos", "worker-kill", "--mode", "child", "--json", timeout=90)
    # Then the task it ran is resurrected at once, and nothing is lost
    assert out.returncode == 0, out.stdout + out.stderr
    doc = json.loads(out.stdout)
    assert doc["killed"] == 1 and doc["lost"] == 0 and doc["affected"] == 1, doc
    hit = [t for t in doc["tasks"] if t["outcome"] == "recovered"]
    assert len(hit) == 1 and hit[0]["recovery_seconds"] < 5, doc
    wait_all_done(r, {0, 1, 2}, 60, fleet)


@pytest.mark.timeout(60)
def test_chaos_on_an_idle_fleet_has_nothing_to_prove(fleet) -> None:
    fleet.start(concurrency=1)
    out = rl(fleet.redis_url, "chaos", "worker-kill")
    assert out.returncode == 0 and out.stdout.startswith("nothing to prove"), out.stderr
    assert all(w.proc is not None and w.proc.poll() is None for w in fleet.workers)


@pytest.mark.timeout(90)
def test_worker_drain_prints_a_line_per_task(fleet, publisher, r) -> None:
    # Given a worker running a 3 s task and a 30 s one (the short one must still be running
    # when the drain starts, after the rl process's own start-up, and end inside its window)
    conf = json.dumps({"relier_drain_timeout": 6})
    worker = fleet.start(concurrency=2, RELIER_TEST_PREFETCH="1", RELIER_TEST_CONF=conf)
    short_id = publisher.send_task("chaos.work", args=(0, 3.0)).id
    long_id = publisher.send_task("chaos.work", args=(1, 30.0)).id
    wait_for(lambda: r.get("test:started:0") and r.get("test:started:1"), 20, what="both")
    # When it is drained with a 6 s window
    name = worker.hostname.replace("%h", socket.gethostname())
    out = rl(fleet.redis_url, "worker", "drain", "-d", name, "--timeout", "6")
    # Then a line per task as it ends, then the accounting line
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0] == f"{name}: draining (running tasks get 6.0 s)"
    assert any(
        line.startswith(f"✓ {short_id[:8]} chaos.work completed (") and line.endswith("s)")
        for line in lines
    ), lines
    assert f"⚠ {long_id[:8]} chaos.work exceeded timeout — re-queuing" in lines
    assert lines[-1] == "✓ Clean exit. 1 task handed off. 0 lost."
    # And the handed-off task runs again elsewhere
    fleet.start(concurrency=1)
    wait_all_done(r, {0}, 30, fleet)
    wait_for(lambda: int(r.get("test:started:1") or 0) == 2, 30, what="the hand-off to run")


@pytest.mark.timeout(90)
def test_tasks_inflight_and_workers_show_the_fleet(fleet, publisher, r) -> None:
    worker = fleet.start(concurrency=1)
    task_id = publisher.send_task("chaos.work", args=(0, 20.0)).id
    wait_for(lambda: r.get("test:started:0"), 20, what="the task to start")

    def running() -> str:
        out = rl(fleet.redis_url, "tasks", "inflight")
        assert out.returncode == 0, out.stderr
        return out.stdout if "running" in out.stdout else ""

    text = wait_for(running, 15, interval=0.3, what="the task running")
    assert task_id in text and "chaos.work" in text and "celery" in text
    host = worker.hostname.replace("%h", socket.gethostname())
    workers = rl(fleet.redis_url, "workers")
    assert workers.returncode == 0 and host in workers.stdout and "alive" in workers.stdout
    data = json.loads(rl(fleet.redis_url, "tasks", "inflight", "--json").stdout)
    assert set(data) == {"at", "tasks"} and data["tasks"][0]["task_id"] == task_id
    same = json.loads(rl(fleet.redis_url, "tasks", "--json").stdout)
    assert set(same["tasks"][0]) == set(data["tasks"][0])
    # An unknown worker name is one line and a non-zero exit
    bad = rl(fleet.redis_url, "worker", "drain", "-d", "nosuch@nowhere")
    assert bad.returncode == 1 and "no worker named nosuch@nowhere answered" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.timeout(90)
def test_the_live_view_in_a_real_terminal(fleet, publisher, r) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux): no real terminal to test")
    fleet.start(concurrency=1)
    publisher.send_task("chaos.work", args=(0, 30.0))
    wait_for(lambda: r.get("test:started:0"), 20, what="the task to start")
    session = f"rl-live-{uuid.uuid4().hex[:8]}"
    env = _env(fleet.redis_url)
    command = " ".join(
        [f"{k}={v!r}" for k, v in env.items() if k in ("RELIER_TEST_REDIS", "PYTHONPATH")]
        + [RL, "-A", "chaos_app", "tasks", "inflight", "--watch", "--interval", "0.5"]
    )
    tmux = ["tmux", "-L", session]  # a server of its own: never the user's sessions
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", session, "-x", "150", "-y", "40", "-c", str(HERE)],
        check=True,
        env=env,
    )
    try:
        subprocess.run([*tmux, "send-keys", "-t", session, command, "Enter"], check=True)

        def screen() -> str:
            shown = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
            ).stdout
            return shown if "chaos.work" in shown and "running" in shown else ""

        shown = wait_for(screen, 30, interval=0.3, what="the live view with a running task")
        assert "relier tasks inflight at" in shown and "tasks in flight" in shown
        assert "WORKER" in shown and "STATE" in shown and "workers" in shown
        assert "recovery p50" in shown and "completed" in shown
        # Ctrl-C leaves the full screen and the shell prompt comes back without a traceback
        subprocess.run([*tmux, "send-keys", "-t", session, "C-c"], check=True)
        time.sleep(1.0)
        after = subprocess.run(
            [*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True
        ).stdout
        assert "Traceback" not in after and "tasks in flight" not in after
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    assert 0 not in done(r)  # the view changed nothing
