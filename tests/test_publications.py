"""A replacement is not a duplicate: what identifies a delivery (``record.delivery_id``), the
publication id every publish of an enabled app gets, and what keeps it (a broker redelivery,
a resurrection, a DLQ release) or renews it (a deliberate re-publication by Celery)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery

from relier_celery import install
from relier_celery.core.config import RelierConfig
from relier_celery.core.headers import FETCH_FIELD, FETCH_QUEUE, PUBLICATION_HEADER
from relier_celery.core.record import Generation, TaskRecord, delivery_id
from relier_celery.recovery.dlq import released_record
from relier_celery.recovery.inflight import Inflight, Key
from relier_celery.store.client import Store
from relier_celery.testing import task_headers
from relier_celery.wiring.signals import on_before_task_publish

# -- what identifies a delivery ---------------------------------------------------------


def test_a_publication_id_names_the_delivery() -> None:
    headers = task_headers("t1", **{PUBLICATION_HEADER: "ab12"})
    assert delivery_id(headers, "t1") == "t1#ab12"


def test_without_a_publication_id_a_replacement_still_differs_by_its_nesting() -> None:
    # A message published by an app without relier carries no rl_pub: Celery's own
    # replaced_task_nesting keeps a replacement apart from the task it replaced.
    assert delivery_id(task_headers("t1"), "t1") == "t1"
    assert delivery_id(task_headers("t1", replaced_task_nesting=0), "t1") == "t1"
    assert delivery_id(task_headers("t1", replaced_task_nesting=2), "t1") == "t1#r2"
    assert delivery_id(None, "t1") == "t1"


def _record(headers: dict[str, Any], field: str | None = None) -> TaskRecord:
    return TaskRecord(
        task_id=str(headers["id"]),
        task_name=str(headers["task"]),
        body=b'[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]',
        content_type="application/json",
        content_encoding="utf-8",
        headers=headers,
        properties={},
        exchange="",
        routing_key="celery",
        worker="w1",
        field_name=field,
    )


def test_a_resurrection_and_a_dlq_release_keep_the_publication() -> None:
    # Given a delivery of one publication
    record = _record(task_headers("t1", **{PUBLICATION_HEADER: "p1"}))
    # When relier republishes it (resurrection, hand-off) or an operator releases it
    again = record.next_generation(crash=True)
    entry = {"message": json.loads(record.dumps())}
    released = released_record(entry)
    # Then it is the same publication: a stale copy of the original is still a duplicate
    assert again.delivery_id == record.delivery_id == released.delivery_id == "t1#p1"
    assert again.generation > record.generation
    assert json.loads(again.envelope())["headers"][PUBLICATION_HEADER] == "p1"


# -- the publication id is stamped on every publish of an enabled app --------------------


def _published(client: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(raw)["headers"] for raw in reversed(client.lrange("celery", 0, -1))]


def test_every_publish_of_an_enabled_app_gets_a_fresh_publication_id(redis_url: str) -> None:
    # Given an app with relier enabled
    app = Celery("pub_app", broker=redis_url)
    app.conf.relier_redis_url = redis_url
    install(app)
    # When it publishes twice under one task id (a re-applied frozen signature, an
    # apply_async(task_id=...) reused) and once with an rl_pub copied from another message
    app.send_task("demo.add", task_id="same")
    app.send_task("demo.add", task_id="same")
    app.send_task("demo.add", task_id="same", headers={PUBLICATION_HEADER: "copied"})
    # Then each publication has its own id, never a copied one
    headers = _published(redis.Redis.from_url(redis_url))
    pubs = [h[PUBLICATION_HEADER] for h in headers]
    assert [h["id"] for h in headers] == ["same"] * 3
    assert len(set(pubs)) == 3 and "copied" not in pubs
    assert all(len(p) == 16 for p in pubs)
    app.close()


def test_the_signal_handler_overwrites_a_copied_publication_id(redis_url: str) -> None:
    app = Celery("pub_app2", broker=redis_url)
    app.conf.relier_redis_url = redis_url
    install(app)
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "from-a-request"})
    on_before_task_publish(sender="demo.add", headers=headers)
    assert headers[PUBLICATION_HEADER] not in ("from-a-request", None)
    app.close()


def test_an_app_without_relier_publishes_no_publication_id(redis_url: str) -> None:
    app = Celery("plain_pub_app", broker=redis_url)
    app.send_task("demo.add", task_id="t1")
    (headers,) = _published(redis.Redis.from_url(redis_url))
    assert PUBLICATION_HEADER not in headers
    app.close()


# -- the receipt path: a new publication runs, a copy of one does not -------------------


def test_a_new_publication_of_a_finished_or_held_task_id_is_recorded(store: Store) -> None:
    first = _record(task_headers("t1", **{PUBLICATION_HEADER: "p1"}))
    replacement = _record(task_headers("t1", replaced_task_nesting=1, **{PUBLICATION_HEADER: "p2"}))
    gen = Generation()
    # Given the first publication held by a worker
    assert store.record(first.delivery_id, "w1", gen, first.dumps()).recorded
    # When its replacement (same task id, same generation) arrives: it is recorded
    assert store.record(replacement.delivery_id, "w1", gen, replacement.dumps()).recorded
    # And a broker copy of the first is still a duplicate, held, then done
    assert store.record(first.delivery_id, "w2", gen, first.dumps()).reason == "held"
    store.complete(first.delivery_id, "w1", gen, 60)
    assert store.record(first.delivery_id, "w2", gen, first.dumps()).reason == "done"
    # And a re-application after completion (a third publication) runs again
    store.complete(replacement.delivery_id, "w1", gen, 60)
    third = _record(task_headers("t1", **{PUBLICATION_HEADER: "p3"}))
    assert store.record(third.delivery_id, "w1", gen, third.dumps()).recorded
    # And a resurrection of a publication is newer than its stale copy
    again = third.next_generation(crash=True)
    assert store.record(again.delivery_id, "w2", again.generation, again.dumps()).recorded
    assert not store.record(third.delivery_id, "w3", gen, third.dumps()).recorded


# -- in memory: two deliveries of one task id in one worker at once ----------------------


class _Message:
    def __init__(self, headers: dict[str, Any], field: str | None = None) -> None:
        self.headers = headers
        self.body = b'[[], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
        self.content_type = "application/json"
        self.content_encoding = "utf-8"
        self.properties: dict[str, Any] = {}
        self.delivery_tag = f"tag-{field}"
        self.delivery_info: dict[str, Any] = {"exchange": "", "routing_key": "celery"}
        if field is not None:
            self.delivery_info.update({FETCH_FIELD: field, FETCH_QUEUE: "celery"})


def _inflight(store: Store) -> Inflight:
    config = RelierConfig.from_mapping({"relier_reliable_fetch": False}, broker_url=store.url)
    app = SimpleNamespace(
        conf=SimpleNamespace(accept_content=["json"]), tasks={"demo.add": SimpleNamespace()}
    )
    resurrector = SimpleNamespace(app=app, max_resurrections=lambda _name: 2)
    return Inflight(config, store, "w1", resurrector)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "pubs", [("p1", "p2"), (None, None)], ids=["with-rl_pub", "published-without-relier"]
)
def test_a_replacement_fetched_while_the_replaced_task_runs_keeps_its_own_record(
    store: Store, pubs: tuple[str | None, str | None]
) -> None:
    # Given a running task and its replacement (same id, same generation) fetched by one worker
    inflight = _inflight(store)
    held = store.keys.held("w1")
    store.call(lambda c: c.hset(held, mapping={"f1": "replaced", "f2": "replacement"}))
    extra = [{} if p is None else {PUBLICATION_HEADER: p} for p in pubs]
    replaced = _Message(task_headers("t1", task="demo.add", **extra[0]), "f1")
    replacement = _Message(task_headers("t1", task="demo.add", **extra[1]), "f2")
    assert inflight.receive(replaced, {"demo.add"}) == "run"
    assert inflight.receive(replacement, {"demo.add"}) == "run"
    assert len(inflight.local) == 2
    # When the replaced task ends (it raises Ignore after publishing the replacement)
    inflight.finish(Inflight.key_of(replaced))  # type: ignore[arg-type]
    # Then only its own record goes: the replacement stays protected
    assert store.call(lambda c: c.hkeys(held)) == ["f2"]
    assert inflight.holds(Inflight.key_of(replacement))
    inflight.finish(Inflight.key_of(replacement))  # type: ignore[arg-type]
    assert store.call(lambda c: c.hlen(held)) == 0


def test_on_the_receipt_path_a_replacement_runs_and_a_redelivery_does_not(store: Store) -> None:
    inflight = _inflight(store)
    replaced = _Message(task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"}))
    replacement = _Message(
        task_headers("t1", task="demo.add", replaced_task_nesting=1, **{PUBLICATION_HEADER: "p2"})
    )
    assert inflight.receive(replaced, {"demo.add"}) == "run"
    assert inflight.receive(replacement, {"demo.add"}) == "run"
    assert inflight.receive(replaced, {"demo.add"}) == "duplicate"  # a broker redelivery
    inflight.finish(Inflight.key_of(replaced))  # type: ignore[arg-type]
    assert inflight.receive(replaced, {"demo.add"}) == "duplicate"
    assert inflight.holds(Inflight.key_of(replacement))


def test_a_revoke_finishes_the_revoked_delivery_only(store: Store) -> None:
    inflight = _inflight(store)
    replaced = _Message(task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"}))
    replacement = _Message(task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p2"}))
    inflight.receive(replaced, {"demo.add"})
    inflight.receive(replacement, {"demo.add"})
    # The revoked request's context carries its message's headers
    inflight.finish_task("t1", dict(replacement.headers))
    assert list(inflight.local) == [Inflight.key_of(replaced)]
    # Without them, every delivery of the id goes
    inflight.finish_task("t1")
    assert inflight.local == {}


def test_the_key_of_a_message_and_of_its_record_agree() -> None:
    message = _Message(task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"}), "f9")
    record = TaskRecord.from_message(message, "w1")
    record.field_name = "f9"
    assert Inflight.key_of(message) == Key.of_record(record) == Key("t1#p1", Generation(), "f9")


def test_a_consumer_restart_hands_back_a_replacement_waiting_under_a_running_tasks_id(
    store: Store,
) -> None:
    # Given the replaced task still running and its replacement reserved, on one worker
    inflight = _inflight(store)
    handed: list[str] = []
    inflight.resurrector.resurrect = lambda record, *_, **__: handed.append(record.delivery_id)  # type: ignore[method-assign]
    replaced = _Message(task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"}))
    replacement = _Message(task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p2"}))
    inflight.receive(replaced, {"demo.add"})
    inflight.receive(replacement, {"demo.add"})
    # When the consumer restarts (Celery forgets what it reserved; the running one goes on)
    count = inflight.recover_after_restart({Inflight.key_of(replaced)})  # type: ignore[arg-type]
    # Then the replacement is handed back, the running task keeps its record
    assert count == 1 and handed == ["t1#p2"]
    assert list(inflight.local) == [Inflight.key_of(replaced)]
