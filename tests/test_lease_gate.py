"""The local side of the lease (lease.LeaseClock, lease.gate), the give-up when it was lost
(Inflight.to_pool / give_up) and completion recorded in the pool process (completion.py)."""

from __future__ import annotations

import multiprocessing
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, current_app

from relier_celery.core.config import RelierConfig
from relier_celery.core.headers import EPOCH_KEY, HELD_KEY
from relier_celery.core.record import Generation, TaskRecord
from relier_celery.recovery.completion import record_success
from relier_celery.recovery.inflight import Inflight, Key
from relier_celery.recovery.lease import Lease, LeaseClock, attach_clock, gate
from relier_celery.runtime import Relier, attach
from relier_celery.store.client import Store
from relier_celery.wiring.signals import on_before_task_publish


class _App:
    """Stands for a Celery app (weakly referenced, like one)."""


def _read_in_child(clock: LeaseClock, out: Any) -> None:
    time.sleep(0.2)  # the parent writes meanwhile
    out.put((clock.deadline, clock.epoch))


def test_the_clock_is_shared_with_processes_forked_before_it_changes() -> None:
    clock = LeaseClock(4.0)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_read_in_child, args=(clock, out))
    child.start()
    clock.renewed(100.0)
    clock.lost()
    deadline, epoch = out.get(timeout=5)
    child.join(5)
    assert (deadline, epoch) == (100.0 + 4.0 - clock.margin, 1)


def test_a_renewal_extends_the_local_deadline_by_the_ttl_less_a_margin() -> None:
    clock = LeaseClock(4.0)
    assert not clock.live()  # never renewed: nothing may start
    sent = time.monotonic()
    clock.renewed(sent)
    assert clock.live() and clock.deadline == pytest.approx(sent + 3.5)
    clock.renewed(sent - 10)
    assert not clock.live()


def _task(app: Any, epoch: int | None) -> Any:
    request = SimpleNamespace(id="t1", hostname="w")
    if epoch is not None:
        setattr(request, EPOCH_KEY, epoch)
    return SimpleNamespace(app=app, name="demo.add", request=request)


def test_the_gate_waits_for_a_renewal_before_a_task_starts(captured) -> None:
    app = _App()
    clock = LeaseClock(1.0)
    attach_clock(app, clock)
    threading.Timer(0.3, lambda: clock.renewed(time.monotonic())).start()
    started = time.monotonic()
    gate(_task(app, 0))
    assert time.monotonic() - started >= 0.25
    assert [e.name for e in captured] == ["lease.waited"]


def test_the_gate_lets_a_live_lease_through_at_once_and_ignores_what_relier_does_not_hold(
    captured,
) -> None:
    app = _App()
    clock = LeaseClock(4.0)
    attach_clock(app, clock)
    gate(_task(app, None))  # not stamped (unprotected, eager): no gate, even without a lease
    clock.renewed(time.monotonic())
    gate(_task(app, 0))
    assert captured == []


def test_a_delivery_of_an_earlier_epoch_is_fenced(captured) -> None:
    app = _App()
    clock = LeaseClock(4.0)
    attach_clock(app, clock)
    clock.renewed(time.monotonic())
    clock.lost()
    gate(_task(app, 0))  # in the worker's own process (threads, solo): reported, not killed
    assert [e.name for e in captured] == ["task.fenced"]


def test_a_renewal_that_finds_the_lease_lost_gives_up_before_the_clock_is_live(
    store: Store,
) -> None:
    config = RelierConfig.from_mapping(
        {"relier_lease_ttl": 0.2, "relier_heartbeat_interval": 0.05}, broker_url=store.url
    )
    seen: list[bool] = []
    lease = Lease(config, store, "w1", on_lost=lambda: seen.append(lease.clock.live()))
    lease.renew()
    assert lease.clock.live() and seen == []
    time.sleep(0.3)
    lease.renew()
    assert seen == [False] and lease.clock.live()


def _inflight(store: Store) -> Inflight:
    config = RelierConfig.from_mapping({}, broker_url=store.url)
    conf = SimpleNamespace(accept_content=["json"])
    resurrector = SimpleNamespace(app=SimpleNamespace(conf=conf))
    return Inflight(config, store, "w1", resurrector)  # type: ignore[arg-type]


def _record(task_id: str, field: str | None) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        task_name="demo.add",
        body=b"[]",
        content_type="application/json",
        content_encoding="utf-8",
        headers={"id": task_id, "task": "demo.add"},
        properties={},
        exchange="",
        routing_key="celery",
        worker="w1",
        field_name=field,
    )


def test_a_request_reaches_the_pool_stamped_only_while_its_delivery_is_held(store: Store) -> None:
    inflight = _inflight(store)
    inflight.clock = clock = LeaseClock(4.0)
    key = Key("t1", Generation(), "f7")
    inflight.local[key] = _record("t1", "f7")
    request: dict[str, Any] = {}
    assert inflight.to_pool(key, request, clock.epoch)
    assert request == {EPOCH_KEY: 0, HELD_KEY: ["w1", "f7"]}
    given = inflight.give_up()
    assert [r.task_id for r in given] == ["t1"] and clock.epoch == 1
    assert not inflight.to_pool(key, {}, clock.epoch)


def test_a_success_recorded_in_the_pool_is_dropped_again_in_one_batch(store: Store) -> None:
    inflight = _inflight(store)
    held = store.keys.held("w1")
    store.call(lambda c: c.hset(held, mapping={"f1": "x", "f2": "y"}))
    inflight.local[Key("t1", Generation(), "f1")] = _record("t1", "f1")
    inflight.local[Key("t2", Generation(), "f2")] = _record("t2", "f2")
    inflight.finish(Key("t1", Generation(), "f1"), in_pool=True)
    inflight.finish(Key("t2", Generation(), "f2"), in_pool=True)
    assert inflight.local == {}
    assert store.call(lambda c: c.hlen(held)) == 2  # nothing sent per task
    inflight.flush()
    assert store.call(lambda c: c.hlen(held)) == 0


def test_the_pool_process_drops_the_record_of_a_task_whose_body_succeeded(store: Store) -> None:
    app = _App()
    attach(app, Relier(app, RelierConfig.from_mapping({}, broker_url=store.url), store))
    clock = LeaseClock(4.0)
    attach_clock(app, clock)
    held = store.keys.held("w1")
    store.call(lambda c: c.hset(held, mapping={"f1": "x", "f2": "y"}))
    clock.renewed(time.monotonic())
    task = _task(app, 0)
    setattr(task.request, HELD_KEY, ["w1", "f1"])
    record_success(task)
    assert store.call(lambda c: c.hkeys(held)) == ["f2"]
    # A body that ended after its worker lost the lease drops nothing: it was given up.
    clock.lost()
    setattr(task.request, HELD_KEY, ["w1", "f2"])
    record_success(task)
    assert store.call(lambda c: c.hkeys(held)) == ["f2"]


def test_the_pool_process_completes_a_delivery_kept_apart_from_the_broker(store: Store) -> None:
    # Given a RabbitMQ delivery recorded by worker w1, handed to its pool
    app = _App()
    attach(app, Relier(app, RelierConfig.from_mapping({}, broker_url=store.url), store))
    clock = LeaseClock(4.0)
    attach_clock(app, clock)
    clock.renewed(time.monotonic())
    inflight = _inflight(store)
    record = _record("t1", None)
    assert store.record(record.delivery_id, "w1", record.generation, record.dumps()).recorded
    key = Key.of_record(record)
    inflight.local[key] = record
    request: dict[str, Any] = {}
    assert inflight.to_pool(key, request, clock.epoch)
    # When its body succeeds in the pool process (the main process not told yet)
    task = _task(app, clock.epoch)
    setattr(task.request, HELD_KEY, request[HELD_KEY])
    record_success(task)
    # Then the record is gone, and a redelivery from the broker is a duplicate: the main
    # process killed now would not have it run again
    assert store.call(lambda c: c.hlen(store.keys.held("w1"))) == 0
    assert store.call(lambda c: c.hget(store.keys.owners, "t1")) is None
    again = store.record(record.delivery_id, "w2", record.generation, record.dumps())
    assert not again.recorded and again.reason == "done"
    # And the main process, told of the success, sends nothing then, and nothing at its
    # heartbeat but one check
    inflight.finish(key, in_pool=True)
    inflight.flush()
    assert store.call(lambda c: c.hlen(store.keys.held("w1"))) == 0


def test_a_completion_the_pool_process_could_not_record_is_recorded_by_the_heartbeat(
    store: Store,
) -> None:
    inflight = _inflight(store)
    records = [_record("t1", None), _record("t2", None)]
    for record in records:
        store.record(record.delivery_id, "w1", record.generation, record.dumps())
        inflight.local[Key.of_record(record)] = record
    store.complete("t1", "w1", Generation(), 60.0)  # t1's pool process reached Redis, t2's not
    for record in records:
        inflight.finish(Key.of_record(record), in_pool=True)
    assert store.call(lambda c: c.hkeys(store.keys.held("w1"))) == ["t2|0|0"]
    inflight.flush()
    assert store.call(lambda c: c.hlen(store.keys.held("w1"))) == 0
    assert store.call(lambda c: c.get(store.keys.done("t2"))) == "0|0"


def test_a_message_never_carries_the_pool_stamps_of_the_delivery_it_was_made_from() -> None:
    app = Celery("stamps", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.imports = ("relier_celery",)
    headers = {"task": "demo.add", "id": "t2", EPOCH_KEY: 3, HELD_KEY: ["w0", "f9"]}
    previous = current_app._get_current_object()
    app.set_current()
    try:
        on_before_task_publish(sender="demo.add", headers=headers)
    finally:
        previous.set_current()
    assert EPOCH_KEY not in headers and HELD_KEY not in headers


def test_a_delivery_recorded_without_the_fetch_replaces_a_held_field_it_came_with(
    store: Store,
) -> None:
    inflight = _inflight(store)
    key = Key("t1", Generation())
    inflight.local[key] = _record("t1", None)  # the receipt path (RabbitMQ, kombu's fetch)
    request: dict[str, Any] = {HELD_KEY: ["w0", "f9"]}
    assert inflight.to_pool(key, request, 5)
    assert request == {EPOCH_KEY: 5, HELD_KEY: ["w1", "t1|0|0", "t1", 0, 0]}


def test_a_renewal_after_a_takeover_gives_up_what_was_held(store: Store, captured) -> None:
    # Given a worker's lease, and one of its deliveries taken over by another worker
    lost: list[bool] = []
    config = RelierConfig.from_mapping({"relier_reliable_fetch": False}, broker_url=store.url)
    lease = Lease(config, store, "w0", on_lost=lambda: lost.append(True))
    store.renew_lease("w0", config.lease_ttl)
    lease.renew()
    store.call(lambda c: c.set(store.keys.taken("w0"), "w1", px=30_000))
    # When it renews
    lease.renew()
    # Then it gives up, and says why
    assert lost == [True]
    why = [e.message for e in captured if e.name == "lease.lost"]
    assert why and "took them over" in why[0]
