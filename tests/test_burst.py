"""Messages the broker delivered together are received together (issue 17): their receipts
go to Redis in one round trip a step (receipt.py, takeover.answer), and the consumer keeps a
burst while its AMQP socket has more to read (wiring/burst.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from kombu.asynchronous.timer import Timer
from test_publications import _inflight, _Message
from test_takeover import _dying, _held_by, _redelivered

from relier_celery.core.headers import PUBLICATION_HEADER
from relier_celery.store.client import Store
from relier_celery.store.connection import script_text
from relier_celery.store.presence import Presence
from relier_celery.testing import task_headers
from relier_celery.wiring.burst import BURST_MAX, WAIT_AT_MOST, Burst

pytestmark = pytest.mark.timeout(30)

TASKS = {"demo.add"}


@pytest.fixture
def round_trips(store: Store, monkeypatch: pytest.MonkeyPatch) -> Callable[[], list[int]]:
    """From now on, one entry per write to Redis (a round trip): how many script calls it
    carried (0 for another command, a presence check say)."""
    store.client.script_load(script_text("receipt"))
    sent: list[int] = []
    real = redis.connection.AbstractConnection.send_packed_command

    def spy(self: Any, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, bytes | str) else list(command)
        sent.append(sum(bytes(c).count(b"EVALSHA") for c in chunks if not isinstance(c, str)))
        real(self, command, check_health)

    monkeypatch.setattr(redis.connection.AbstractConnection, "send_packed_command", spy)

    def taken() -> list[int]:
        out = list(sent)
        sent.clear()
        return out

    return taken


def _new(task_id: str) -> _Message:
    return _Message(task_headers(task_id, task="demo.add", **{PUBLICATION_HEADER: "p1"}))


def test_a_dead_workers_burst_of_redeliveries_costs_one_round_trip(
    store: Store, round_trips: Callable[[], list[int]]
) -> None:
    # Given four deliveries held by w0, which died, and two new messages, delivered together
    copies = [_redelivered(_held_by(store, "w0", f"t{i}")) for i in range(4)]
    messages = [copies[0], _new("n1"), *copies[1:], _new("n2")]
    round_trips()
    # When w1 receives them
    verdicts = _inflight(store).receive_many(messages, TASKS)
    # Then all six receipts went in one round trip, each decided on its own, in order
    assert round_trips() == [6]
    assert verdicts == ["run"] * 6
    assert store.held("w0") == {}
    assert sorted(store.held("w1")) == sorted(
        f"{t}#p1|0|0" for t in ("t0", "t1", "t2", "t3", "n1", "n2")
    )


def test_a_holder_still_closing_its_sockets_costs_one_more_round_trip_for_the_whole_burst(
    store: Store, round_trips: Callable[[], list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given w0 dying: RabbitMQ redelivered its messages before Redis dropped its presence
    copies = [_redelivered(_held_by(store, "w0", f"t{i}")) for i in range(3)]
    dying = _dying(store, monkeypatch, "w0")
    round_trips()
    try:
        verdicts = _inflight(store).receive_many(copies, TASKS)
    finally:
        dying.close()
    # Then the three takeovers went together again, once w0 was seen gone (the presence
    # checks between carry no script)
    sent = round_trips()
    assert [n for n in sent if n] == [3, 3]
    assert verdicts == ["run"] * 3
    assert store.held("w0") == {} and len(store.held("w1")) == 3


def test_in_a_burst_a_live_holders_redeliveries_stay_duplicates(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two deliveries of w5, alive, and two of w0, dead, redelivered together
    monkeypatch.setattr("relier_celery.store.presence.SETTLE", 0.05)
    alive = Presence(store, "w5")
    alive.open()
    live = [_redelivered(_held_by(store, "w5", f"a{i}")) for i in range(2)]
    dead = [_redelivered(_held_by(store, "w0", f"d{i}")) for i in range(2)]
    try:
        verdicts = _inflight(store).receive_many([live[0], dead[0], live[1], dead[1]], TASKS)
    finally:
        alive.close()
    # Then the dead one's run here, the live one's are not run twice
    assert verdicts == ["duplicate", "run", "duplicate", "run"]
    assert sorted(store.held("w5")) == ["a0#p1|0|0", "a1#p1|0|0"]
    assert sorted(store.held("w1")) == ["d0#p1|0|0", "d1#p1|0|0"]


def test_a_call_redis_refuses_fails_alone(store: Store) -> None:
    # Given a burst whose second message's done key is of the wrong type (a receipt of it
    # raises WRONGTYPE in Redis)
    messages = [_new("n1"), _new("n2"), _new("n3")]
    store.call(lambda c: c.hset(store.keys.done("n2#p1"), "x", "1"))
    verdicts = _inflight(store).receive_many(messages, TASKS)
    # Then that message alone gets the error (the consumer quarantines it); the others run
    assert verdicts[0] == "run" and verdicts[2] == "run"
    assert isinstance(verdicts[1], redis.ResponseError) and "WRONGTYPE" in str(verdicts[1])
    assert sorted(store.held("w1")) == ["n1#p1|0|0", "n3#p1|0|0"]


def test_a_burst_loads_the_script_again_after_a_redis_restart(store: Store) -> None:
    # Given a Redis that forgot relier's scripts (restarted, or SCRIPT FLUSH)
    inflight = _inflight(store)
    assert inflight.receive(_new("n0"), TASKS) == "run"
    store.call(lambda c: c.script_flush())
    # When a burst arrives, it is recorded all the same
    assert inflight.receive_many([_new("n1"), _new("n2")], TASKS) == ["run", "run"]
    assert len(store.held("w1")) == 3


def test_a_burst_with_redis_down_is_parked_whole() -> None:
    # Given relier's Redis unreachable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from relier_celery.core.keys import Keys

    store = Store(f"redis://127.0.0.1:{port}/0", Keys("rl"))
    inflight = _inflight(store)
    # Then every message of the burst is parked (unacked, tried again), none lost or run
    assert inflight.receive_many([_new("n1"), _new("n2")], TASKS) == ["parked", "parked"]


# -- the consumer's burst (wiring/burst.py) ------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, broker = socket.socketpair()
    yield ours, broker
    ours.close()
    broker.close()


def _consumer(sock: socket.socket, timer: Timer, hub: Any = True, read_buffer: Any = b"") -> Any:
    """The parts of Celery's consumer a burst reads: its hub, its timer and py-amqp's socket
    (a real socket: what the broker has sent and kombu has not read)."""
    transport = SimpleNamespace(sock=sock)
    if read_buffer is not None:
        transport._read_buffer = read_buffer
    return SimpleNamespace(
        hub=object() if hub else None,
        timer=timer,
        connection=SimpleNamespace(connection=SimpleNamespace(transport=transport)),
    )


def test_a_burst_waits_while_the_socket_has_more_to_read(sockets: Any) -> None:
    ours, broker = sockets
    timer = Timer()
    burst = Burst(_consumer(ours, timer))

    def flush() -> None:
        pass

    # Nothing more to read: the message is received at once
    assert not burst.keep("m1", flush)
    assert burst.take() == ["m1"]
    # More bytes waiting: it waits, with one timer entry that ends the wait
    broker.sendall(b"frame")
    assert burst.keep("m2", flush) and burst.keep("m3", flush)
    assert len(timer.queue) == 1 and timer.queue[0].eta - time.monotonic() <= WAIT_AT_MOST
    ours.recv(100)  # kombu read them: the last message ends the burst
    assert not burst.keep("m4", flush)
    entry = timer.queue[0].entry
    assert burst.take() == ["m2", "m3", "m4"]
    assert entry.canceled and burst.take() == []


def test_a_burst_holds_at_most_burst_max(sockets: Any) -> None:
    ours, broker = sockets
    burst = Burst(_consumer(ours, Timer()))
    broker.sendall(b"more")
    kept = [burst.keep(n, lambda: None) for n in range(BURST_MAX)]
    assert kept == [True] * (BURST_MAX - 1) + [False]


@pytest.mark.parametrize(
    "consumer",
    [{"hub": False}, {"read_buffer": None}],
    ids=["no-event-loop", "not-py-amqp"],
)
def test_without_an_event_loop_or_py_amqp_each_message_is_received_at_once(
    sockets: Any, consumer: dict[str, Any]
) -> None:
    ours, broker = sockets
    broker.sendall(b"more")
    burst = Burst(_consumer(ours, Timer(), **consumer))
    assert not burst.keep("m1", lambda: None)


def test_bytes_py_amqp_buffered_count_as_more_to_read(sockets: Any) -> None:
    ours, _ = sockets
    burst = Burst(_consumer(ours, Timer(), read_buffer=b"half a frame"))
    assert burst.keep("m1", lambda: None)
