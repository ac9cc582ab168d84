"""The operator's commands without workers: the live view's layout (rich's own capture), the
chaos follower's decisions, the drain's lines, the recovery samples and the process identity
in Redis, and every bad input as one line and a non-zero exit."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner
from rich.console import Console
from test_inspect import fleet_state

from relier_celery.cli.chaos import final_line, is_loopback
from relier_celery.cli.drain import final_line as drain_final
from relier_celery.cli.drain import task_line
from relier_celery.cli.follow import IN_PLACE, LOST, QUARANTINED, RECOVERED, UNAFFECTED, Tracker
from relier_celery.cli.render import live_view
from relier_celery.core import proc
from relier_celery.core.keys import Keys
from relier_celery.observe.activity import RunningMarker
from relier_celery.observe.snapshot import TaskView, take
from relier_celery.observe.summary import recovery_percentiles
from relier_celery.store.client import Store
from relier_celery.testing import free_port


def _text(renderable: object, width: int = 120) -> str:
    console = Console(record=True, width=width, color_system="truecolor", force_terminal=True)
    console.print(renderable)
    return console.export_text()


# -- the live view ----------------------------------------------------------------------------
def test_the_live_view_shows_tasks_workers_queues_and_the_fleets_figures(store: Store) -> None:
    # Given a fleet with running, reserved and dead workers' tasks, and recovery samples
    fleet_state(store)
    RunningMarker(store, "live", 60, lambda: {"t1": time.time() - 5}, lambda: 7).publish()
    store.add_recovery([(store.now_ms() - 4000, 3)])
    snap = take(store, 60)
    # When it is rendered as the live view
    text = _text(live_view(snap, "inspect", title="relier top", scan_interval=0.5))
    # Then each table and the figures are there, one row per task
    assert "relier top" in text and "tasks in flight" in text and "workers" in text
    rows = [line for line in text.splitlines() if "jobs." in line]
    assert len(rows) == 5
    t1 = next(line for line in rows if " t1 " in line)
    assert "live" in t1 and "jobs.slow" in t1 and "running" in t1 and "celery" in t1
    assert "awaiting resurrection" in text and "dead" in text and "idle" in text
    assert "completed 7" in text and "resurrected 0" in text and "0 lost" in text
    assert "recovery p50 4.0s p95 4.0s (last hour, 3 samples)" in text
    assert "every 0.5s" in text


def test_the_live_view_colours_states_and_keeps_the_footer_on_a_short_screen(store) -> None:
    fleet_state(store)
    snap = take(store, 60)
    console = Console(record=True, width=100, force_terminal=True, color_system="truecolor")
    console.print(live_view(snap, "inspect", height=16))
    styled = console.export_text(styles=True, clear=False)
    assert "\x1b[" in styled  # colour on a terminal
    text = console.export_text()
    lines = text.splitlines()
    assert "more" in text and len(lines) <= 16 and "recovery p50" in lines[-1]  # cut, footer kept


def test_a_task_id_is_shortened_in_the_live_view(store: Store) -> None:
    from test_inspect import hold

    store.renew_lease("w", ttl=60)
    hold(store, "w", "a8f2c1d0-1111-2222-3333-444455556666")
    text = _text(live_view(take(store, 60), "tasks"))
    assert "a8f2c1d0" in text and "a8f2c1d0-1111" not in text


def test_recovery_percentiles_read_only_the_last_hour(store: Store) -> None:
    client = store.client
    now = store.now_ms()
    client.lpush(Keys("rl").recovery, f"{now - 7200_000}:9000", f"{now}:1000", f"{now}:3000")
    rec = recovery_percentiles(take(store, 60))
    assert rec == {"count": 2, "p50": 1.0, "p95": 3.0}


# -- what the worker records ----------------------------------------------------------------
def test_the_running_marker_records_the_process_and_its_completed_count(store: Store) -> None:
    done = {"n": 0}
    marker = RunningMarker(store, "w", 60, dict, lambda: done["n"])
    marker.publish()
    key = Keys("rl").process("w")
    record = store.client.hgetall(key)
    assert record["pid"] == str(os.getpid()) and record["completed"] == "0"
    assert proc.matches(record) and store.client.pttl(key) > 60_000
    done["n"] = 3
    marker.publish()  # the set is the same, the count is not: rewritten
    assert store.client.hget(key, "completed") == "3"


def test_a_recorded_identity_matches_only_the_same_process() -> None:
    me = proc.identity()
    assert proc.matches(me)
    assert not proc.matches({**me, "start": str(int(me["start"]) + 1)})  # a reused pid
    assert not proc.matches({**me, "host": "elsewhere"})
    assert not proc.matches({"pid": "x"})
    assert os.getpid() in proc.children(os.getppid())


# -- the drain's lines ------------------------------------------------------------------------
def test_the_drain_lines_read_like_the_seed() -> None:
    done = json.dumps({"name": "jobs.a", "outcome": "completed", "seconds": 12.43})
    assert task_line("a8f2c1d0-aaaa", done) == "✓ a8f2c1d0 jobs.a completed (12.4s)"
    late = json.dumps({"name": "jobs.b", "outcome": "handed_off", "seconds": 30})
    assert task_line("c9f1a3b2-bbbb", late) == "⚠ c9f1a3b2 jobs.b exceeded timeout — re-queuing"
    assert drain_final({"handed_off": "1", "lost": "0"}) == (
        "✓ Clean exit. 1 task handed off. 0 lost."
    )
    assert drain_final({"handed_off": "2", "lost": "1"}).startswith("✗ Exit. 2 tasks")


# -- the chaos follower -----------------------------------------------------------------------
def _view(task_id: str, worker: str, state: str = "running", res: int = 0) -> TaskView:
    return TaskView(task_id, "jobs.x", worker, state, "celery", 0.0, None, 0.0, 0, res, 0)


def test_the_follower_tells_recovered_quarantined_in_place_unaffected_and_lost() -> None:
    t = Tracker()
    held = [_view(i, "dead") for i in ("moved", "requeued", "dlq", "done", "stuck", "gone")]
    t.add([*held, _view("here", "victim")], "dead", at=100.0)
    t.tasks[-1].worker = "victim"
    alive = {"w2", "victim"}
    # a first look: one task elsewhere, one waiting in its queue, one in the DLQ, one gone
    views = [_view("moved", "w2", "reserved", 1), _view("stuck", "dead", "awaiting resurrection")]
    views.append(_view("here", "victim"))
    t.observe(views, alive, {"requeued"}, {"dlq"}, now=103.5)
    # the second look: the requeued one ran and finished between the looks
    t.observe(views, alive, set(), set(), now=104.0)
    t.observe(views, alive, set(), set(), now=104.5)
    t.expire(alive, now=160.0)
    outcome = {f.task_id: f.outcome for f in t.tasks}
    assert outcome == {
        "moved": RECOVERED,
        "requeued": RECOVERED,
        "dlq": QUARANTINED,
        "done": IN_PLACE,
        "stuck": LOST,
        "gone": IN_PLACE,
        "here": UNAFFECTED,
    }
    assert [f.recovery for f in t.tasks][:2] == [3.5, 4.0]
    s = t.summary()
    assert (s["affected"], s["recovered"], s["quarantined"], s["lost"]) == (4, 2, 1, 1)
    assert final_line(1, s) == (
        "killed 1, tasks affected 4, recovered 2, quarantined 1, lost 1, recovery p50 3.5 s "
        "p99 4.0 s"
    )


def test_absent_once_is_not_gone() -> None:
    # A message moving from its queue to a worker between two reads is absent from both once.
    t = Tracker()
    t.add([_view("a", "dead")], "dead", at=0.0)
    t.observe([], {"w2"}, set(), set(), now=1.0)
    t.observe([_view("a", "w2", "running", 1)], {"w2"}, set(), set(), now=1.1)
    assert t.tasks[0].outcome == RECOVERED


def test_a_task_hit_twice_is_followed_per_hit() -> None:
    t = Tracker()
    t.add([_view("a", "w1")], "w1", at=0.0)
    t.observe([_view("a", "w2", "running", 1)], {"w2"}, set(), set(), now=3.0)
    t.add([_view("a", "w2", "running", 1)], "w2", at=5.0)
    t.observe([_view("a", "w3", "running", 2)], {"w3"}, set(), set(), now=9.0)
    assert [f.recovery for f in t.tasks] == [3.0, 4.0]


@pytest.mark.parametrize(
    ("url", "local"),
    [
        ("redis://127.0.0.1:6379/0", True),
        ("redis://localhost/1", True),
        ("redis://[::1]:6379", True),
        ("unix:///tmp/redis.sock", True),
        ("redis://10.0.0.5:6379/0", False),
        ("redis://redis.internal:6379", False),
        ("sentinel://127.0.0.1:26379;sentinel://127.0.0.2:26379", True),
        ("sentinel://127.0.0.1:26379;sentinel://10.1.1.1:26379", False),
    ],
)
def test_loopback(url: str, local: bool) -> None:
    assert is_loopback(url) is local


# -- bad input: one line, a non-zero exit -----------------------------------------------------
def _app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    (tmp_path / "opapp.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "opapp", raising=False)


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(celery_cli, ["-A", "opapp", "relier", *args])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


RELIER_APP = """
    from celery import Celery
    app = Celery("opapp", broker="{broker}")
    app.conf.imports = ("relier_celery",)
    app.conf.relier_redis_url = "{redis}"
"""


def test_an_app_without_relier(tmp_path, monkeypatch, redis_url) -> None:
    _app(
        tmp_path,
        monkeypatch,
        f"from celery import Celery\napp = Celery('opapp', broker='{redis_url}')\n",
    )
    for args in (["tasks", "inflight"], ["workers"], ["chaos", "worker-kill"], ["worker", "drain"]):
        code, out = _run(*args)
        assert code == 1 and "does not enable relier" in out, out


def test_unreachable_redis(tmp_path, monkeypatch) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    _app(tmp_path, monkeypatch, RELIER_APP.format(broker=url, redis=url))
    for args, words in (
        (["tasks", "inflight"], "relier cannot reach Redis"),
        (["top", "--count", "1"], "relier cannot reach Redis"),
        (["chaos", "worker-kill"], "relier cannot reach Redis"),
        (["worker", "drain"], "cannot reach the broker"),
    ):
        code, out = _run(*args)
        assert code == 1 and words in out and len(out.strip().splitlines()) == 1, out


def test_chaos_refuses_a_remote_redis_and_a_broker_that_is_not_redis(
    tmp_path, monkeypatch, redis_url
) -> None:
    _app(tmp_path, monkeypatch, RELIER_APP.format(broker=redis_url, redis="redis://10.9.8.7:6379"))
    code, out = _run("chaos", "worker-kill")
    assert code == 1 and "not on this machine's loopback" in out and "--allow-remote" in out
    _app(tmp_path, monkeypatch, RELIER_APP.format(broker="memory://", redis=redis_url))
    code, out = _run("chaos", "worker-kill")
    assert code == 1 and "needs a Redis broker" in out


def test_unknown_workers_and_an_empty_fleet(tmp_path, monkeypatch, redis_url, store) -> None:
    _app(tmp_path, monkeypatch, RELIER_APP.format(broker=redis_url, redis=redis_url))
    code, out = _run("chaos", "worker-kill")
    assert code == 1 and "no live relier worker of this host" in out
    fleet_state(store)
    code, out = _run("chaos", "worker-kill", "-d", "nosuch@host")
    assert code == 1 and "no worker 'nosuch@host'" in out
    code, out = _run("workers", "--worker", "nosuch@host")
    assert code == 1 and "no worker 'nosuch@host'" in out
    # a worker of this process, idle: nothing to prove
    RunningMarker(store, "idle", 60, dict).publish()
    code, out = _run("chaos", "worker-kill", "-d", "idle")
    assert code == 0 and out.startswith("nothing to prove"), out


def test_the_seeds_spellings_under_rl(tmp_path: Path, redis_url: str, store: Store) -> None:
    import subprocess

    (tmp_path / "opapp.py").write_text(
        textwrap.dedent(RELIER_APP.format(broker=redis_url, redis=redis_url))
    )
    fleet_state(store)
    rl = str(Path(sys.executable).parent / "rl")
    for args, words in (
        (["dlq", "list"], "the DLQ is empty"),
        (["tasks", "inflight"], "awaiting resurrection"),
        (["workers"], "dead"),
        (["top", "--count", "1"], "relier top at"),
        (["worker", "--help"], "drain"),
        (["chaos", "worker-kill", "--help"], "--allow-remote"),
    ):
        out = subprocess.run(
            [rl, "-A", "opapp", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and words in out.stdout, (args, out.stdout, out.stderr)
