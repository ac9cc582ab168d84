"""A fetched message that reaches the worker after its lease was lost is not run there.

Two windows of a frozen worker (SIGSTOP past its lease), found by reading the loop-driven
heartbeat's failure (docs/rabbitmq-recovery.md): Redis took a message into the held hash, the worker
froze before its loop read the fetch's reply, a scanner resurrected the message elsewhere, and
on the thaw the renewal gave everything up before the loop read the reply (the receipt); or the
renewal gave it up between the receipt and Celery's request for it. Either way the copy must
not run here: the one the scanner put back runs elsewhere.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from test_publications import _inflight, _Message

from relier_celery.core.headers import FETCH_EPOCH
from relier_celery.recovery.lease import LeaseClock
from relier_celery.store.client import Store
from relier_celery.testing import task_headers
from relier_celery.wiring.consumer_hooks import wrap_consumer


def _fetched(field: str, epoch: int) -> _Message:
    message = _Message(task_headers(f"t-{field}", task="demo.add"), field)
    message.delivery_info[FETCH_EPOCH] = epoch
    return message


def test_a_fetch_sent_before_the_lease_was_lost_is_given_back_not_run(store: Store) -> None:
    inflight = _inflight(store)
    inflight.clock = clock = LeaseClock(3.0)
    held = store.keys.held("w1")
    store.call(lambda c: c.hset(held, mapping={"f1": "m1", "f2": "m2"}))
    # Given a fetch sent under the lease's first epoch
    before = _fetched("f1", clock.epoch)
    # When the lease is lost (everything held given up) before its reply is read
    inflight.give_up()
    # Then the message is given back, not recorded as this worker's, not run
    assert inflight.receive(before, {"demo.add"}) == "given_back"
    assert not inflight.holds(inflight.key_of(before))
    # And a fetch sent under the new epoch runs as usual
    after = _fetched("f2", clock.epoch)
    assert inflight.receive(after, {"demo.add"}) == "run"
    assert inflight.holds(inflight.key_of(after))


def test_a_worker_without_a_clock_and_a_message_without_a_stamp_run(store: Store) -> None:
    inflight = _inflight(store)
    store.call(lambda c: c.hset(store.keys.held("w1"), mapping={"f1": "m1", "f2": "m2"}))
    assert inflight.receive(_fetched("f1", 7), {"demo.add"}) == "run"
    inflight.clock = LeaseClock(3.0)
    unstamped = _Message(task_headers("t-f2", task="demo.add"), "f2")
    assert inflight.receive(unstamped, {"demo.add"}) == "run"


class _Acked:
    def __init__(self, message: _Message) -> None:
        self.message = message
        self.acked = False

    def ack_log_error(self, *_: Any) -> None:
        self.acked = True


def test_a_fetched_message_given_up_before_its_request_does_not_reach_the_pool(
    store: Store,
) -> None:
    inflight = _inflight(store)
    inflight.clock = clock = LeaseClock(3.0)
    store.call(lambda c: c.hset(store.keys.held("w1"), "f1", "m1"))
    passed: list[Any] = []
    consumer = SimpleNamespace(
        create_task_handler=lambda *a, **k: None,
        on_task_request=passed.append,
        on_invalid_task=None,
        on_decode_error=None,
        on_unknown_message=None,
        connection_errors=(),
        restart_count=0,
    )
    wrap_consumer(consumer, inflight, clock)
    # Given a fetched message received under the lease (its verdict: run)
    message = _fetched("f1", clock.epoch)
    assert inflight.receive(message, {"demo.add"}) == "run"
    # When the lease is lost before Celery makes its request
    inflight.give_up()
    acked = _Acked(message)
    message.ack_log_error = acked.ack_log_error  # type: ignore[attr-defined]
    request = SimpleNamespace(
        message=message, name="demo.add", id="t-f1", request_dict={"id": "t-f1"}
    )
    consumer.on_task_request(request)
    # Then Celery's handler never sees it (no pool process runs it) and it is acked locally
    assert passed == []
    assert acked.acked
