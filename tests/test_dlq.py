"""The DLQ against a real Redis: entries, release (republished to a real Redis broker),
purge, retention, and the ``relier dlq`` commands through click's runner."""

from __future__ import annotations

import base64
import json
import textwrap
import time
from pathlib import Path

import pytest
import redis
from celery import Celery
from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner

from relier_celery.core.keys import Keys
from relier_celery.core.record import Generation, TaskRecord
from relier_celery.recovery import dlq
from relier_celery.store.client import Store


def _record(task_id: str, name: str = "shop.charge", body: bytes | None = None) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        task_name=name,
        body=body or json.dumps([[task_id], {}, {}]).encode(),
        content_type="application/json",
        content_encoding="utf-8",
        headers={
            "id": task_id,
            "task": name,
            "retries": 3,
            "rl_resurrections": 2,
            "rl_crashes": 2,
        },
        properties={"priority": 0},
        exchange="",
        routing_key="celery",
        worker="w1",
    )


def _put(store: Store, task_id: str, reason: str = "exception", **kw) -> str:
    return dlq.quarantine(store, _record(task_id, **kw), reason, "boom\nTraceback...", done_ttl=60)


def test_entries_filter_and_find_by_prefix(store: Store) -> None:
    first = _put(store, "a")
    _put(store, "b", reason="unknown_task", name="shop.other")
    assert [e["task_id"] for e in dlq.entries(store)] == ["a", "b"]
    assert [e["task_id"] for e in dlq.entries(store, reason="unknown_task")] == ["b"]
    assert [e["task_id"] for e in dlq.entries(store, task="shop.charge")] == ["a"]
    assert dlq.find(store, first[:6])["task_id"] == "a"
    with pytest.raises(KeyError, match="no DLQ entry"):
        dlq.find(store, "zzz")


def test_release_republishes_the_original_message_with_counts_reset(
    store: Store, redis_url: str, client: redis.Redis
) -> None:
    # Given an entry whose done record makes any copy of it a duplicate
    entry_id = _put(store, "t-1")
    assert client.exists(Keys("rl").done("t-1"))
    app = Celery("rel", broker=redis_url, set_as_current=False)
    # When it is released
    dlq.release(app, store, dlq.find(store, entry_id))
    # Then the same body is back in its queue, counts reset, approved to rerun, and the
    # entry and the done record are gone
    raw = json.loads(client.lrange("celery", 0, -1)[0])
    assert base64.b64decode(raw["body"]) == json.dumps([["t-1"], {}, {}]).encode()
    headers = raw["headers"]
    assert (headers["retries"], headers["rl_resurrections"], headers["rl_crashes"]) == (0, 0, 0)
    assert headers["rl_rerun_interrupted"] == 1
    assert not client.exists(Keys("rl").done("t-1"))
    assert dlq.entries(store) == []
    # And its delivery is not a duplicate of the quarantined one
    assert store.record("t-1", "w2", Generation(0, 0), "{}").recorded


def test_expire_removes_only_entries_past_retention(store: Store, client: redis.Redis) -> None:
    old, new = _put(store, "old"), _put(store, "new")
    client.zadd(Keys("rl").dlq_index, {old: (time.time() - 100) * 1000})
    assert dlq.expire(store, retention=50) == 1
    assert [e["id"] for e in dlq.entries(store)] == [new]
    assert dlq.expire(store, retention=50) == 0


# -- the CLI ----------------------------------------------------------------------------
@pytest.fixture
def cli(tmp_path: Path, redis_url: str, monkeypatch):
    (tmp_path / "dlqapp.py").write_text(
        textwrap.dedent(f"""
        from celery import Celery
        app = Celery("dlqapp", broker="{redis_url}")
        app.conf.imports = ("relier_celery",)
    """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def run(*args: str, input: str | None = None):
        return CliRunner().invoke(celery_cli, ["-A", "dlqapp", "relier", "dlq", *args], input=input)

    return run


def test_list_and_show(cli, store: Store) -> None:
    assert "the DLQ is empty" in cli("list").output
    entry_id = _put(store, "t-7")
    listed = cli("list")
    assert listed.exit_code == 0 and entry_id in listed.output and "exception" in listed.output
    as_json = json.loads(cli("list", "--json").output)
    assert as_json[0]["task_id"] == "t-7" and "message" not in as_json[0]
    shown = cli("show", entry_id[:8])
    assert shown.exit_code == 0
    assert '"args": ["t-7"]' in shown.output and "Traceback" in shown.output
    assert json.loads(cli("show", entry_id, "--json").output)["payload"]["args"] == ["t-7"]
    missing = cli("show", "nope")
    assert missing.exit_code == 1 and "no DLQ entry 'nope'" in missing.output


def test_release_needs_an_id_or_all(cli, store: Store, client: redis.Redis) -> None:
    usage = cli("release")
    assert usage.exit_code == 2 and "give one entry ID, or --all" in usage.output
    assert cli("release", "--all").exit_code == 1  # nothing to release
    _put(store, "t-1")
    _put(store, "t-2", name="shop.other")
    out = cli("release", "--all", "--task", "shop.other")
    assert out.exit_code == 0 and "1 released" in out.output
    assert [e["task_id"] for e in dlq.entries(store)] == ["t-1"]
    assert client.llen("celery") == 1


def test_purge_asks_first_unless_yes(cli, store: Store, client: redis.Redis) -> None:
    entry_id = _put(store, "t-1")
    declined = cli("purge", entry_id, input="n\n")
    assert declined.exit_code == 1 and "nothing purged" in declined.output
    assert len(dlq.entries(store)) == 1
    assert cli("purge", entry_id, input="y\n").exit_code == 0
    assert dlq.entries(store) == []
    # --older-than keeps recent entries
    old, recent = _put(store, "old"), _put(store, "recent")
    client.hset(
        Keys("rl").dlq,
        old,
        json.dumps({**dlq.find(store, old), "quarantined_at": time.time() - 8 * 86400}),
    )
    out = cli("purge", "--all", "--older-than", "7d", "--yes")
    assert out.exit_code == 0 and "purged 1 of 1 DLQ entry" in out.output
    assert [e["id"] for e in dlq.entries(store)] == [recent]
    bad = cli("purge", "--all", "--older-than", "soon", "--yes")
    assert bad.exit_code == 2 and "not a duration" in bad.output


def test_the_scanner_expires_entries_past_retention(redis_url: str, client: redis.Redis) -> None:
    from relier_celery.recovery.resurrect import Resurrector
    from relier_celery.wiring.install import install

    # Given an app keeping DLQ entries 60 s, and an entry quarantined 100 s ago
    app = Celery("expiry", broker=redis_url, set_as_current=False)
    app.conf.relier_dlq_retention = 60
    relier = install(app)
    old, new = _put(relier.store, "old"), _put(relier.store, "new")
    client.zadd(Keys("rl").dlq_index, {old: (time.time() - 100) * 1000})
    # When a worker's scanner scans
    Resurrector(app, relier.config, relier.store).scan_once()
    # Then the old entry is gone and the new one kept
    assert [e["id"] for e in dlq.entries(relier.store)] == [new]


class _Task:
    acks_late = False
    acks_on_timeout = True
    dlq_on_failure = None


class _Req:
    def __init__(self, **task_attrs: object) -> None:
        self.task = type("T", (_Task,), task_attrs)()


def test_which_failures_go_to_the_dlq() -> None:
    from celery.exceptions import Ignore, Reject, Retry, TaskRevokedError, TimeLimitExceeded

    from relier_celery.core.errors import HardTimeout, IdempotencyInterrupted
    from relier_celery.wiring.request_hooks import dlq_reason

    req = _Req()
    # final failures go, each with its reason
    assert dlq_reason(req, ValueError("x"), True) == "exception"
    assert dlq_reason(req, HardTimeout("x"), True) == "hard_timeout"
    assert dlq_reason(req, TimeLimitExceeded(3), True) == "hard_timeout"
    assert dlq_reason(req, Reject("no", requeue=False), True) == "rejected"
    # what is not final never goes: a retry, an ignore, a revoke, Celery's own requeues
    for exc in (Retry(), Ignore(), TaskRevokedError("t"), Reject("again", requeue=True)):
        assert dlq_reason(req, exc, True) is None, exc
    assert (
        dlq_reason(_Req(acks_late=True, acks_on_timeout=False), TimeLimitExceeded(3), True) is None
    )
    # relier_dlq_on_failure off, and the task option overriding it either way
    assert dlq_reason(req, ValueError("x"), False) is None
    assert dlq_reason(_Req(dlq_on_failure=True), ValueError("x"), False) == "exception"
    assert dlq_reason(_Req(dlq_on_failure=False), ValueError("x"), True) is None
    # an interrupted idempotent run always goes: never repeated unasked
    assert dlq_reason(_Req(dlq_on_failure=False), IdempotencyInterrupted("x"), False) == (
        "idempotency_interrupted"
    )
