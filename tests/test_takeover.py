"""A broker's redelivery whose holder is gone is taken over, not dropped (issue 17): the
receipt side (receipt.py), receipt.lua's takeover mode, and the cache of gone workers
(presence.py) that a Redis Cluster needs."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from test_publications import _inflight, _Message, _record

from relier_celery.core.headers import CRASHES_HEADER, PUBLICATION_HEADER
from relier_celery.core.record import Generation, TaskRecord
from relier_celery.store import presence as presence_module
from relier_celery.store.client import Store
from relier_celery.store.connection import script_text
from relier_celery.store.presence import Presence, PresenceCache
from relier_celery.testing import task_headers

pytestmark = pytest.mark.timeout(30)


def _redelivered(headers: dict[str, Any]) -> _Message:
    message = _Message(headers)
    message.delivery_info["redelivered"] = True
    return message


def _held_by(store: Store, worker: str, task_id: str, crashes: int = 0) -> dict[str, Any]:
    """Record a delivery of ``task_id`` under ``worker`` (its record counting ``crashes``);
    return the headers of the broker's copy (published with no crash)."""
    headers = task_headers(task_id, task="demo.add", **{PUBLICATION_HEADER: "p1"})
    held = _record({**headers, CRASHES_HEADER: crashes} if crashes else headers)
    assert store.record(held.delivery_id, worker, held.generation, held.dumps()).recorded
    return headers


def _commands(store: Store) -> Callable[[], list[str]]:
    """What the store sends Redis from now on, one entry per command (a round trip each). The
    scripts are loaded first: the first call of one Redis has not seen adds a SCRIPT LOAD."""
    client = store.client
    client.script_load(script_text("receipt"))
    real = client.execute_command
    sent: list[str] = []

    def spy(*args: Any, **options: Any) -> Any:
        sent.append(str(args[0]))
        return real(*args, **options)

    client.execute_command = spy  # type: ignore[method-assign]

    def taken() -> list[str]:
        out = list(sent)
        sent.clear()
        return out

    return taken


def test_a_redelivery_whose_holder_is_gone_runs_now(store: Store, captured) -> None:
    # Given a delivery held by w0, a worker with no presence connection (it died)
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    record = _record(headers)
    assert store.record(record.delivery_id, "w0", record.generation, record.dumps()).recorded
    inflight = _inflight(store)
    # When the broker redelivers it to w1
    verdict = inflight.receive(_redelivered(headers), {"demo.add"})
    # Then w1 takes it over: it runs, w1 holds it, w0 no longer does
    assert verdict == "run"
    assert store.call(lambda c: c.hget(store.keys.owners, "t1#p1")) == "w1|0|0"
    assert store.held("w0") == {}
    assert list(store.held("w1")) == ["t1#p1|0|0"]
    assert [e.attributes["holder"] for e in captured if e.name == "task.taken_over"] == ["w0"]
    # And a second redelivery of it is a duplicate of w1's own, as before
    assert inflight.receive(_redelivered(headers), {"demo.add"}) == "duplicate"


def test_a_takeover_counts_as_a_crash_of_the_holder(store: Store) -> None:
    # Given a delivery held by w0 (gone) after one crash already (a takeover before it)
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    held = _record({**headers, CRASHES_HEADER: 1})
    store.record(held.delivery_id, "w0", held.generation, held.dumps())
    # When the broker redelivers its own copy (published with no crash) to w1
    message = _redelivered(headers)
    assert _inflight(store).receive(message, {"demo.add"}) == "run"
    # Then w0's death is counted: w1's record and the task's context say two crashes
    (raw,) = store.held("w1").values()
    assert TaskRecord.loads(raw).crashes == 2
    assert message.headers[CRASHES_HEADER] == 2


def test_a_poison_pill_taken_over_past_max_resurrections_goes_to_the_dlq(store: Store) -> None:
    # Given a delivery whose holders died with it twice already (max_resurrections=2), held
    # by w0, which died with it a third time
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    held = _record({**headers, CRASHES_HEADER: 2})
    store.record(held.delivery_id, "w0", held.generation, held.dumps())
    # When the broker redelivers it to w1
    verdict = _inflight(store).receive(_redelivered(headers), {"demo.add"})
    # Then it does not run again: it is in the DLQ, as the scanner would have put it
    assert verdict == "quarantined"
    (entry,) = [json.loads(v) for v in store.dlq_entries().values()]
    assert entry["reason"] == "max_resurrections" and entry["crashes"] == 2
    assert "worker w0 was lost holding this task after 2 earlier crash(es)" in entry["error"]
    assert store.held("w0") == {} and store.held("w1") == {}


def test_a_redelivery_whose_holder_is_present_is_a_duplicate(store: Store) -> None:
    # Given a delivery held by w0, whose presence connection is open (it lives)
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    record = _record(headers)
    store.record(record.delivery_id, "w0", record.generation, record.dumps())
    alive = Presence(store, "w0")
    alive.open()
    try:
        # When the broker redelivers it (w0's channel closed, w0 still runs the task)
        verdict = _inflight(store).receive(_redelivered(headers), {"demo.add"})
    finally:
        alive.close()
    # Then it is dropped: a live holder never loses a task to a redelivery
    assert verdict == "duplicate"
    assert list(store.held("w0")) == ["t1#p1|0|0"]


def test_a_copy_that_the_broker_did_not_redeliver_is_never_taken_over(store: Store) -> None:
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    record = _record(headers)
    store.record(record.delivery_id, "w0", record.generation, record.dumps())
    assert _inflight(store).receive(_Message(headers), {"demo.add"}) == "duplicate"
    assert list(store.held("w0")) == ["t1#p1|0|0"]


def test_a_scanner_resurrecting_the_holder_wins_over_a_takeover(store: Store) -> None:
    # Given a dead holder whose records a scanner has claimed (it is republishing them)
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    record = _record(headers)
    store.record(record.delivery_id, "w0", record.generation, record.dumps())
    store.call(lambda c: c.set(store.keys.claim("w0"), "scanner"))
    # When the broker's copy arrives meanwhile
    verdict = _inflight(store).receive(_redelivered(headers), {"demo.add"})
    # Then it is a duplicate: only the scanner's resurrected copy will run
    assert verdict == "duplicate"
    assert list(store.held("w0")) == ["t1#p1|0|0"]


def test_a_holder_that_only_looked_gone_is_fenced_on_its_next_renewal(store: Store) -> None:
    # Given w0, alive but cut off from Redis and the broker, whose delivery w1 took over
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    record = _record(headers)
    store.renew_lease("w0", ttl=30)
    store.record(record.delivery_id, "w0", record.generation, record.dumps())
    assert store.take_over("t1#p1", "w0", "w1", record.generation, record.dumps(), 0, 30).recorded
    # When w0 reaches Redis again and renews its lease
    prev, _ = store.renew_lease("w0", ttl=30)
    # Then the renewal tells it the lease was lost (it stops what it still runs), once
    assert prev == -2
    assert store.renew_lease("w0", ttl=30)[0] > 0


# -- receipt.lua, takeover mode ------------------------------------------------------------


def test_take_over_moves_only_what_the_named_holder_holds(store: Store) -> None:
    headers = _held_by(store, "w0", "t1")
    record, gen = _record(headers), Generation()
    # Named another holder: a duplicate, nothing moves
    receipt = store.take_over("t1#p1", "w9", "w1", gen, record.dumps(), 0, 30)
    assert (receipt.recorded, receipt.reason, receipt.detail) == (False, "held", "w0|0|0")
    assert list(store.held("w0")) == ["t1#p1|0|0"]
    # Named its holder: taken
    assert store.take_over("t1#p1", "w0", "w1", gen, record.dumps(), 0, 30).reason == "taken"
    assert store.held("w0") == {} and list(store.held("w1")) == ["t1#p1|0|0"]
    # Taken already: w1 holds it, a second taker is refused
    assert store.take_over("t1#p1", "w0", "w2", gen, record.dumps(), 0, 30).reason == "held"


def test_take_over_checks_the_crash_count_in_the_holders_record(store: Store) -> None:
    # Given a delivery whose holder's record counts one crash (it had taken it over itself)
    headers = _held_by(store, "w0", "t1", crashes=1)
    record, gen = _record(headers), Generation()
    # When the receiver guesses none (the broker's copy counts none): nothing changes
    receipt = store.take_over("t1#p1", "w0", "w1", gen, record.dumps(), 0, 30)
    assert (receipt.reason, receipt.detail) == ("crashes", "1")
    assert list(store.held("w0")) == ["t1#p1|0|0"] and store.held("w1") == {}
    # And with the count the script gave back, it is taken
    assert store.take_over("t1#p1", "w0", "w1", gen, record.dumps(), 1, 30).recorded


def test_take_over_leaves_what_nobody_holds_and_refuses_what_finished(store: Store) -> None:
    record, gen = (
        _record(task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})),
        Generation(),
    )
    assert store.take_over("t1#p1", "w0", "w1", gen, record.dumps(), 0, 30).reason == "free"
    assert store.held("w1") == {}  # the receiver records it itself (receipt.lua)
    _held_by(store, "w0", "t1")
    store.complete("t1#p1", "w0", gen, 60)
    assert store.take_over("t1#p1", "w0", "w1", gen, record.dumps(), 0, 30).reason == "done"


def test_take_over_leaves_a_record_it_cannot_read_to_the_scanner(store: Store) -> None:
    store.record("t1#p1", "w0", Generation(), "not json")
    receipt = store.take_over("t1#p1", "w0", "w1", Generation(), "{}", 0, 30)
    assert receipt.reason == "held" and store.held("w0") == {"t1#p1|0|0": "not json"}


# -- a dead worker's burst of redeliveries ---------------------------------------------


def test_each_redelivery_of_a_dead_worker_costs_one_round_trip(store: Store, captured) -> None:
    # Given three deliveries held by w0, which died (its third taken over once already)
    copies = [_held_by(store, "w0", f"t{i}", crashes=1 if i == 3 else 0) for i in (1, 2, 3)]
    inflight = _inflight(store)
    sent = _commands(store)
    # When the broker redelivers them to w1, one after another
    first = inflight.receive(_redelivered(copies[0]), {"demo.add"})
    # Then each is taken over in one round trip, the first too: the script sees that w0's
    # presence channel has no subscriber
    assert first == "run" and sent() == ["EVALSHA"]
    assert inflight.receive(_redelivered(copies[1]), {"demo.add"}) == "run"
    assert sent() == ["EVALSHA"]
    # (two when the guessed crash count was wrong: the script gives the right one)
    message = _redelivered(copies[2])
    assert inflight.receive(message, {"demo.add"}) == "run"
    assert sent() == ["EVALSHA", "EVALSHA"]
    assert message.headers[CRASHES_HEADER] == 2
    assert store.held("w0") == {}
    assert sorted(store.held("w1")) == ["t1#p1|0|0", "t2#p1|0|0", "t3#p1|0|0"]
    assert {
        TaskRecord.loads(raw).task_id: TaskRecord.loads(raw).crashes
        for raw in store.held("w1").values()
    } == {"t1": 1, "t2": 1, "t3": 2}
    assert [e.attributes["holder"] for e in captured if e.name == "task.taken_over"] == ["w0"] * 3


def test_a_worker_known_gone_takes_nothing_from_another_holder(store: Store) -> None:
    # Given w0 seen gone (one of its redeliveries taken over just now)
    inflight = _inflight(store)
    assert inflight.receive(_redelivered(_held_by(store, "w0", "t1")), {"demo.add"}) == "run"
    # When a redelivery held by w5, alive, arrives: w5 keeps it
    alive = Presence(store, "w5")
    alive.open()
    try:
        verdict = inflight.receive(_redelivered(_held_by(store, "w5", "t2")), {"demo.add"})
    finally:
        alive.close()
    assert verdict == "duplicate" and list(store.held("w5")) == ["t2#p1|0|0"]
    # And one held by nobody is recorded as it came, its crash count untouched
    fresh = task_headers("t3", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    assert inflight.receive(_redelivered(fresh), {"demo.add"}) == "run"
    assert TaskRecord.loads(store.held("w1")["t3#p1|0|0"]).crashes == 0
    assert CRASHES_HEADER not in fresh
    # And one held by w6, gone too, is taken from w6
    assert inflight.receive(_redelivered(_held_by(store, "w6", "t4")), {"demo.add"}) == "run"
    assert store.held("w6") == {} and "t4#p1|0|0" in store.held("w1")


def test_a_gone_worker_is_remembered_briefly_and_a_present_one_never(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(presence_module, "ABSENT_FOR", 0.2)
    cache = PresenceCache(store)
    alive = Presence(store, "w5")
    alive.open()
    try:
        assert cache.present("w5") and cache.recently_gone("w1") is None
    finally:
        alive.close()
    assert not cache.present("w0")
    assert cache.recently_gone("w1") == "w0"
    assert cache.recently_gone("w0") is None  # never the receiver itself
    # A worker seen gone just now is the guess, ahead of one seen before
    assert not cache.present("w9") and cache.recently_gone("w1") == "w9"
    time.sleep(0.25)
    assert cache.recently_gone("w1") is None


def test_take_over_refuses_a_holder_whose_presence_connection_is_open(store: Store) -> None:
    # Given w0, alive, guessed gone by a receiver (its cache is stale, say)
    store.record("t1#p1", "w0", Generation(), '{"headers": {}}')
    alive = Presence(store, "w0")
    alive.open()
    try:
        receipt = store.take_over("t1#p1", "w0", "w1", Generation(), "{}", 0, 30)
    finally:
        alive.close()
    # Then the script, which sees w0's subscription, moves nothing
    assert receipt.reason == "held" and list(store.held("w0")) == ["t1#p1|0|0"]
    assert store.held("w1") == {}


def test_a_holder_still_closing_its_sockets_is_asked_again_and_taken_over(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given w0 dying: RabbitMQ redelivered its message before Redis dropped its presence
    headers = _held_by(store, "w0", "t1")
    dying = _dying(store, monkeypatch, "w0")
    try:
        # When the redelivery arrives at w1
        verdict = _inflight(store).receive(_redelivered(headers), {"demo.add"})
    finally:
        dying.close()
    # Then w1 asked again a moment later, found it gone, and took it over
    assert verdict == "run"
    assert store.held("w0") == {} and list(store.held("w1")) == ["t1#p1|0|0"]


def _dying(store: Store, monkeypatch: pytest.MonkeyPatch, worker: str) -> Presence:
    """``worker``'s presence connection, open until the receiver first waits to ask again
    (its process finishes closing its sockets meanwhile)."""
    dying = Presence(store, worker)
    dying.open()
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        dying.close()
        real_sleep(seconds)

    monkeypatch.setattr("relier_celery.store.presence.time.sleep", sleep)
    return dying


# -- a receipt whose reply was lost ---------------------------------------------------------


def _reply_lost_once(store: Store, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The next call of ``store.<name>`` runs in Redis, then its reply is lost."""
    from relier_celery.core.errors import StoreUnavailable

    real = getattr(store, name)

    def once(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(store, name, real)
        real(*args, **kwargs)
        raise StoreUnavailable("relier cannot reach Redis: Connection reset by peer")

    monkeypatch.setattr(store, name, once)


@pytest.mark.parametrize("redelivered", [False, True], ids=["receipt", "takeover"])
def test_a_receipt_whose_reply_was_lost_runs_on_its_retry(
    store: Store, monkeypatch: pytest.MonkeyPatch, redelivered: bool
) -> None:
    # Given a message whose receipt was written in Redis but whose reply never came back
    # (parked: it stays unacked and is tried again)
    if redelivered:
        headers = _held_by(store, "w0", "t1")  # w0 is gone: w1 takes it over
        message = _redelivered(headers)
    else:
        headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
        message = _Message(headers)
    inflight = _inflight(store)
    _reply_lost_once(store, monkeypatch, "receipt")
    assert inflight.receive(message, {"demo.add"}) == "parked"
    assert list(store.held("w1")) == ["t1#p1|0|0"]
    # When it is tried again, it finds w1's own record of it
    verdict = inflight.receive(message, {"demo.add"})
    # Then it runs: not a duplicate acked until w1's hand-off or death
    assert verdict == "run"
    assert inflight.holds(inflight.key_of(message))


def test_a_handed_off_record_is_not_run_again_by_a_parked_retry(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a parked message whose receipt had landed, and whose record this worker then
    # republished (a hand-off drops it from the held hash; the owners entry stays)
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    inflight = _inflight(store)
    _reply_lost_once(store, monkeypatch, "receipt")
    assert inflight.receive(_Message(headers), {"demo.add"}) == "parked"
    store.call(lambda c: c.hdel(store.keys.held("w1"), "t1#p1|0|0"))
    # When the parked copy is tried again: a duplicate, the republished copy runs instead
    assert inflight.receive(_Message(headers), {"demo.add"}) == "duplicate"


def test_a_copy_of_what_runs_here_stays_a_duplicate_after_a_failed_receipt_of_it(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a receipt that failed before Redis wrote anything (parked), then recorded on its
    # retry: the task runs here
    from relier_celery.core.errors import StoreUnavailable

    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    inflight = _inflight(store)
    real = store.receipt

    def refused(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(store, "receipt", real)
        raise StoreUnavailable("relier cannot reach Redis: Connection refused")

    monkeypatch.setattr(store, "receipt", refused)
    assert inflight.receive(_Message(headers), {"demo.add"}) == "parked"
    assert inflight.receive(_Message(headers), {"demo.add"}) == "run"
    # When the broker gives this worker a copy of it (its own channel was reopened)
    verdict = inflight.receive(_redelivered(headers), {"demo.add"})
    # Then it is a duplicate: the failed receipt does not make it this worker's to run again
    assert verdict == "duplicate"


def test_a_copy_of_what_this_worker_runs_stays_a_duplicate(store: Store) -> None:
    # Given a delivery w1 received and runs (no receipt of it failed)
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    inflight = _inflight(store)
    assert inflight.receive(_Message(headers), {"demo.add"}) == "run"
    # When the broker gives w1 a copy of it (its own channel was reopened)
    verdict = inflight.receive(_redelivered(headers), {"demo.add"})
    # Then it is a duplicate: never twice on one worker
    assert verdict == "duplicate"
