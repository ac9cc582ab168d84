"""A broker's redelivery handed to the pool ahead of its receipt (issue 17: recovery on
RabbitMQ no slower than vanilla Celery): the verdict ring a pool process waits on
(verdicts.py), and the receipts sent without waiting, read when Redis answers (speculate.py,
receipt_pipe.py), against a real redis-server."""

from __future__ import annotations

import os
import select
import signal
import socket
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from test_publications import _inflight, _Message, _record

from relier_celery.core.headers import EPOCH_KEY, PUBLICATION_HEADER, SPEC_KEY
from relier_celery.recovery.speculate import Speculation
from relier_celery.recovery.verdicts import VerdictRing, attach_ring, await_verdict
from relier_celery.store.client import Store
from relier_celery.store.presence import Presence
from relier_celery.testing import task_headers

pytestmark = pytest.mark.timeout(30)


class _Hub:
    """The two things speculation asks of kombu's hub: watch a socket, call later."""

    def __init__(self) -> None:
        self.readers: dict[int, Callable[[], None]] = {}
        self.later: list[Callable[[], None]] = []

    def add_reader(self, fd: int, callback: Callable[[], None]) -> None:
        self.readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        self.readers.pop(fd, None)

    def call_later(self, _delay: float, callback: Callable[[], None]) -> None:
        self.later.append(callback)

    def turn(self, timeout: float = 5.0) -> None:
        """One turn of the loop: the watched socket's callback once it is readable."""
        (fd,) = self.readers
        assert select.select([fd], [], [], timeout)[0], "no reply from Redis"
        self.readers[fd]()


def _redelivery(task_id: str) -> _Message:
    message = _Message(task_headers(task_id, task="demo.add", **{PUBLICATION_HEADER: "p1"}))
    message.delivery_info["redelivered"] = True
    return message


def _held_by(store: Store, worker: str, message: _Message) -> None:
    held = _record(message.headers)
    assert store.record(held.delivery_id, worker, held.generation, held.dumps()).recorded


def _speculation(store: Store) -> tuple[Speculation, Any]:
    inflight = _inflight(store)
    speculation = Speculation(inflight, VerdictRing(size=8))
    inflight.speculation = speculation
    speculation.pipe.open()
    return speculation, inflight


def _hand_ahead(speculation: Speculation, message: _Message, hub: _Hub) -> tuple[Any, int]:
    """What the consumer does (consumer_hooks.py), Celery's request made in between."""
    opened = speculation.open(message)
    assert opened is not None
    key, seq = opened
    assert speculation.at_request(key)  # Celery made its request
    speculation.handed(key)
    speculation.attach(hub, {"demo.add"}, list)
    speculation.send([(message, key, seq)])
    return key, seq


# -- the ring ---------------------------------------------------------------------------
def test_a_verdict_is_pending_until_decided_and_a_reused_entry_never_reads_as_run() -> None:
    ring = VerdictRing(size=4)
    first = ring.open()
    assert ring.verdict(first) is None
    ring.decide(first, True)
    assert ring.verdict(first) is True
    # Four more numbers later its entry is someone else's: read as "do not run", never a
    # guess, and a late decision for it changes nothing
    later = [ring.open() for _ in range(4)]
    assert ring.verdict(first) is False
    ring.decide(first, True)
    assert ring.verdict(later[-1]) is None
    ring.decide(later[-1], False)
    assert ring.verdict(later[-1]) is False


def _child_waits(ring: VerdictRing, seq: int | None) -> int:
    """Fork a pool-process stand-in that waits for ``seq`` before its 'body'; its pid."""
    app = SimpleNamespace()
    attach_ring(app, ring)
    task = SimpleNamespace(
        app=app, name="demo.add", request=SimpleNamespace(id="t1", **{SPEC_KEY: seq})
    )
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        await_verdict(task)
        os._exit(7)
    return pid


@pytest.mark.parametrize("run", [True, False], ids=["run", "do-not-run"])
def test_a_pool_process_waits_for_the_verdict_then_runs_or_stops_itself(run: bool) -> None:
    # Given a pool process waiting on a verdict not decided yet
    ring = VerdictRing()
    seq = ring.open()
    pid = _child_waits(ring, seq)
    time.sleep(0.2)
    assert os.waitpid(pid, os.WNOHANG) == (0, 0), "it did not wait"
    # When the main process decides
    ring.decide(seq, run)
    # Then it goes on to the body, or stops itself before it (SIGKILL: Celery reports the
    # process lost, and relier, holding no record, acks the request)
    _, status = os.waitpid(pid, 0)
    if run:
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    else:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_request_not_handed_ahead_does_not_wait() -> None:
    pid = _child_waits(VerdictRing(), None)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7


# -- the receipts -----------------------------------------------------------------------
def test_a_dead_holders_redelivery_is_stamped_for_the_pool_then_runs(store: Store) -> None:
    # Given a delivery held by w0, which is gone (no presence connection)
    speculation, inflight = _speculation(store)
    message = _redelivery("t1")
    _held_by(store, "w0", message)
    hub = _Hub()
    # When w1 hands its redelivery to Celery ahead of the receipt
    key, seq = _hand_ahead(speculation, message, hub)
    request: dict[str, Any] = {}
    assert inflight.to_pool(key, request, 5)
    # Then the pool process would wait on its number, and nothing is held yet
    assert request == {EPOCH_KEY: 5, SPEC_KEY: seq}
    assert speculation.ring.verdict(seq) is None and not inflight.holds(key)
    # And once Redis answered (read on the loop): taken over, held by w1, verdict "run"
    hub.turn()
    assert speculation.ring.verdict(seq) is True
    assert inflight.holds(key) and inflight.speculating == {}
    assert list(store.held("w1")) == ["t1#p1|0|0"] and store.held("w0") == {}
    assert hub.readers == {}  # nothing awaited: the socket is not watched


def test_a_live_holders_redelivery_is_not_run_and_pauses_speculation(store: Store) -> None:
    # Given a delivery held by w0, alive (its presence connection open)
    speculation, inflight = _speculation(store)
    message = _redelivery("t1")
    _held_by(store, "w0", message)
    alive = Presence(store, "w0")
    alive.open()
    try:
        hub = _Hub()
        key, seq = _hand_ahead(speculation, message, hub)
        hub.turn()
    finally:
        alive.close()
    # Then its pool process stops before the body; w0 keeps it; redeliveries take the
    # usual path for a while (a live holder's whole burst would stop pool processes)
    assert speculation.ring.verdict(seq) is False
    assert not inflight.holds(key) and list(store.held("w0")) == ["t1#p1|0|0"]
    assert speculation.paused_until > time.monotonic() + 5


def test_a_verdict_before_celerys_request_keeps_it_from_running(store: Store) -> None:
    # Given a redelivery whose "do not run" came back before Celery made its request
    speculation, inflight = _speculation(store)
    message = _redelivery("t1")
    _held_by(store, "w0", message)
    alive = Presence(store, "w0")
    alive.open()
    try:
        key, seq = speculation.open(message)  # type: ignore[misc]
        speculation.attach(hub := _Hub(), {"demo.add"}, list)
        speculation.send([(message, key, seq)])
        hub.turn()
    finally:
        alive.close()
    # Then the request is refused (acked, not run), and the pool is never asked
    assert not speculation.at_request(key)
    assert not inflight.to_pool(key, {}, 1)
    speculation.handed(key)


def test_a_message_celery_took_without_a_request_leaves_no_record(store: Store) -> None:
    # Given a redelivery Celery acked without a request (revoked, say) before the verdict
    speculation, inflight = _speculation(store)
    message = _redelivery("t1")
    _held_by(store, "w0", message)
    key, seq = speculation.open(message)  # type: ignore[misc]
    speculation.handed(key)  # Celery's handler returned, no request made
    speculation.attach(hub := _Hub(), {"demo.add"}, list)
    speculation.send([(message, key, seq)])
    # When the verdict "run" comes
    hub.turn()
    # Then the record it took over is removed again: nothing runs it, nothing is left
    assert not inflight.holds(key)
    assert store.held("w1") == {} and store.held("w0") == {}


def test_a_receipt_redis_lost_the_script_for_is_sent_again(store: Store) -> None:
    speculation, inflight = _speculation(store)
    message = _redelivery("t1")
    _held_by(store, "w0", message)
    store.call(lambda c: c.script_flush())  # a restarted Redis: scripts gone
    hub = _Hub()
    key, seq = _hand_ahead(speculation, message, hub)
    hub.turn()
    assert speculation.ring.verdict(seq) is True and inflight.holds(key)


def test_a_receipt_whose_reply_was_lost_is_asked_again_and_the_process_waits(
    store: Store,
) -> None:
    # Given a receipt sent, and its connection broken before Redis answered
    speculation, inflight = _speculation(store)
    message = _redelivery("t1")
    _held_by(store, "w0", message)
    hub = _Hub()
    store.call(lambda c: c.execute_command("CLIENT", "PAUSE", 300, "ALL"))
    key, seq = _hand_ahead(speculation, message, hub)
    speculation.pipe._conn._sock.shutdown(socket.SHUT_RDWR)
    hub.turn()
    # Then the verdict waits (Redis may have run it); the receipt is asked again later
    assert speculation.ring.verdict(seq) is None and len(hub.later) == 1
    # And asked again (Redis answering again), it runs
    time.sleep(0.4)
    hub.later.pop()()
    assert speculation.ring.verdict(seq) is True and inflight.holds(key)
    assert list(store.held("w1")) == ["t1#p1|0|0"]


def test_a_pool_process_lost_before_the_verdict_gives_its_message_back(store: Store) -> None:
    # Given a redelivery handed ahead, whose pool process died before the verdict came
    speculation, inflight = _speculation(store)
    message = _redelivery("t1")
    _held_by(store, "w0", message)
    hub = _Hub()
    key, _ = _hand_ahead(speculation, message, hub)
    assert speculation.lost(key)  # the request is rejected with requeue, not acked
    # When the verdict "run" comes after all
    hub.turn()
    # Then the record is forgotten, not finished: the broker's next delivery of it runs
    assert not inflight.holds(key) and store.held("w1") == {}
    assert _inflight(store).receive(_redelivery("t1"), {"demo.add"}) == "run"
    # (a process lost after its verdict is not this: lost() says so)
    assert not speculation.lost(key)


def test_a_stopping_loop_reads_the_awaited_replies_and_asks_again_for_the_parked(
    store: Store,
) -> None:
    speculation, inflight = _speculation(store)
    first, second = _redelivery("t1"), _redelivery("t2")
    _held_by(store, "w0", first)
    _held_by(store, "w0", second)
    hub = _Hub()
    # One receipt whose connection broke (parked, asked again later), one awaited
    store.call(lambda c: c.execute_command("CLIENT", "PAUSE", 300, "ALL"))
    _, parked = _hand_ahead(speculation, first, hub)
    speculation.pipe._conn._sock.shutdown(socket.SHUT_RDWR)
    hub.turn()
    time.sleep(0.4)
    _, awaited = _hand_ahead(speculation, second, hub)
    # When the consumer stops (its loop will read nothing more, its timers may be cleared)
    speculation.flush()
    # Then both have their verdicts: no pool process is left waiting
    assert speculation.ring.verdict(parked) is True
    assert speculation.ring.verdict(awaited) is True
    assert inflight.speculating == {}
