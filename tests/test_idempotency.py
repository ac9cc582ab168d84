"""Idempotency: key derivation, the claim state machine (against a real Redis), the lock and
eager task runs."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from relier_celery import install
from relier_celery.core.errors import (
    IdempotencyBusy,
    IdempotencyConflict,
    IdempotencyError,
    IdempotencyInterrupted,
)
from relier_celery.features.idempotency import (
    IdempotencyLock,
    default_key,
    idempotency_lock,
    validate_key,
)
from relier_celery.store.client import Store


def test_the_default_key_is_stable_across_processes_and_versions() -> None:
    # A fixed value: canonical JSON + SHA-256, no hash() randomisation, no repr().
    assert default_key("shop.charge", (42, "eur"), {"customer": "c1", "amount": 9.5}) == (
        "shop.charge:dea49532590a6f43f01b845b0e1d2ab922700a02a746067cf7eb9fbf4c5fa623"
    )


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=8,
)


@given(
    args=st.lists(json_values, max_size=3),
    kwargs=st.dictionaries(st.text(max_size=4), json_values, max_size=3),
)
def test_the_default_key_ignores_keyword_order_and_separates_calls(args, kwargs) -> None:
    reordered = dict(reversed(list(kwargs.items())))
    assert default_key("t", args, kwargs) == default_key("t", args, reordered)
    assert default_key("t", args, kwargs) != default_key("u", args, kwargs)
    assert default_key("t", args, kwargs) != default_key("t", [*args, "x"], kwargs)


@pytest.mark.parametrize("bad", [None, "", 42, "k" * 257])
def test_a_bad_key_is_a_clear_error(bad) -> None:
    with pytest.raises(IdempotencyError, match="idempotency key"):
        validate_key(bad)


def _lock(
    store: Store,
    key: str = "k",
    lease: str = "",
    args: str = "a",
    on_crash: str = "rerun",
    owner: str = "",
) -> IdempotencyLock:
    return IdempotencyLock(
        store,
        key,
        ttl=60,
        claim_ttl=60,
        lease=lease,
        owner=owner,
        fingerprint=args,
        on_crash=on_crash,
    )


def test_the_same_task_id_takes_its_own_stale_claim_over(store: Store) -> None:
    # Given a claim left by a task whose attempt a hard time limit killed (worker alive)
    store.renew_lease("w1", ttl=30)
    stale = _lock(store, lease="w1", owner="task-1").acquire()
    # When another task id claims the key, it must wait; the same task id's retry takes over
    with pytest.raises(IdempotencyBusy):
        _lock(store, lease="w1", owner="task-2").acquire()
    retry = _lock(store, lease="w1", owner="task-1").acquire()
    assert retry.taken_over and not stale.store("stale") and retry.store("ok")


def test_two_locks_on_one_key_never_hold_it_together(store: Store) -> None:
    first = IdempotencyLock(store, "k", ttl=60, claim_ttl=60).acquire()
    with pytest.raises(IdempotencyBusy):
        IdempotencyLock(store, "k", ttl=60, claim_ttl=60).acquire()
    first.release()


def test_claim_then_busy_then_done(store: Store) -> None:
    store.renew_lease("w1", ttl=30)
    first = _lock(store, lease="w1").acquire()
    with pytest.raises(IdempotencyBusy):
        _lock(store, lease="w2").acquire()
    assert first.store({"charged": 1})
    second = _lock(store).acquire()
    assert second.already_executed and second.cached_result == {"charged": 1}


def test_a_key_reused_with_other_arguments_is_a_conflict(store: Store) -> None:
    _lock(store, args="a").acquire().store(1)
    with pytest.raises(IdempotencyConflict, match="first used with other arguments"):
        _lock(store, args="b").acquire()


def test_a_failed_run_releases_the_claim_so_a_retry_runs(store: Store) -> None:
    store.renew_lease("w1", ttl=30)
    with pytest.raises(RuntimeError), _lock(store, lease="w1"):
        raise RuntimeError("card declined")
    again = _lock(store, lease="w1").acquire()
    assert not again.already_executed


def test_a_dead_owner_is_taken_over_and_fenced_out(store: Store) -> None:
    # Given an owner whose lease ran out (paused past it)
    store.renew_lease("w1", ttl=0.01)
    stale = _lock(store, lease="w1").acquire()
    time.sleep(0.05)
    # When another worker takes the key over
    store.renew_lease("w2", ttl=30)
    fresh = _lock(store, lease="w2").acquire()
    assert fresh.taken_over
    # Then the stale owner cannot store over it, and the new owner's result wins
    assert not stale.store("stale")
    assert fresh.store("fresh")
    assert _lock(store).acquire().cached_result == "fresh"


def test_quarantine_mode_never_repeats_an_interrupted_run_unless_released(store: Store) -> None:
    # Given an owner that died mid-run of a task that must not repeat its side effect
    store.renew_lease("w1", ttl=0.01)
    _lock(store, lease="w1", on_crash="quarantine").acquire()
    time.sleep(0.05)
    store.renew_lease("w2", ttl=30)
    # When its resurrection, then a duplicate, try to claim the key
    # Then neither runs: the run is marked interrupted
    for _ in range(2):
        with pytest.raises(IdempotencyInterrupted, match="release the DLQ entry"):
            _lock(store, lease="w2", on_crash="quarantine").acquire()
    # And an operator's release takes it over and runs it, once
    released = _lock(store, lease="w2", on_crash="approved").acquire()
    assert released.taken_over and not released.already_executed
    with pytest.raises(IdempotencyBusy):
        _lock(store, lease="w2", on_crash="approved").acquire()
    assert released.store("ran once more")
    hit = _lock(store, on_crash="quarantine").acquire()
    assert hit.already_executed and hit.cached_result == "ran once more"


def test_an_unserializable_result_is_refused_loudly(store: Store) -> None:
    lock = _lock(store).acquire()
    with pytest.raises(IdempotencyError, match="not a JSON value"):
        lock.store(object())


def test_the_lock_works_with_and_async_with(redis_url: str) -> None:
    app = Celery("lock_app", broker=redis_url)
    with idempotency_lock("webhook-1", app=app) as lock:
        assert not lock.already_executed
        lock.store("handled")

    async def again() -> tuple[bool, object]:
        async with idempotency_lock("webhook-1", app=app) as lock:
            return lock.already_executed, lock.cached_result

    assert asyncio.run(again()) == (True, "handled")


def test_an_idempotent_task_runs_its_side_effect_once_per_key(redis_url: str) -> None:
    app = Celery("idem_app", broker=redis_url)
    effects = redis.Redis.from_url(redis_url)

    @app.task(name="idem.charge", shared=False, idempotent=True)
    def charge(order: int, amount: float) -> dict:
        return {"charge": effects.incr(f"charged:{order}"), "amount": amount}

    @app.task(
        name="idem.by_order",
        shared=False,
        idempotent=True,
        idempotency_key=lambda order, amount: f"order-{order}",
    )
    def by_order(order: int, amount: float) -> int:
        return effects.incr(f"by-order:{order}")

    install(app)
    first = app.tasks["idem.charge"].apply(args=(7, 9.5)).get()
    second = app.tasks["idem.charge"].apply(args=(7, 9.5)).get()
    assert first == second == {"charge": 1, "amount": 9.5}
    assert app.tasks["idem.charge"].apply(args=(8, 9.5)).get()["charge"] == 1
    assert app.tasks["idem.by_order"].apply(args=(1, 5.0)).get() == 1
    conflict = app.tasks["idem.by_order"].apply(args=(1, 6.0))
    assert isinstance(conflict.result, IdempotencyConflict)


def test_push_validates_a_dispatch_time_key(redis_url: str) -> None:
    app = Celery("push_key", broker=redis_url)

    @app.task(name="idem.pushed", shared=False, idempotent=True)
    def pushed() -> None: ...

    install(app)
    with pytest.raises(IdempotencyError, match="256 characters at most"):
        app.tasks["idem.pushed"].push(idempotency_key="k" * 300)
    result = app.tasks["idem.pushed"].push(idempotency_key="order-42")
    assert result.id


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(st.sampled_from(["claim", "store", "release", "die", "approve"]), max_size=12),
    quarantine=st.booleans(),
)
def test_the_claim_state_machine(redis_server, steps, quarantine) -> None:
    # Properties: at most one holder at a time; a stored result is what every later claim
    # reads; in quarantine mode, a run whose owner died is never repeated until approved.
    redis.Redis.from_url(redis_server.url).flushall()
    s = Store(redis_server.url, __import__("relier_celery.core.keys", fromlist=["Keys"]).Keys("rl"))
    mode = "quarantine" if quarantine else "rerun"
    holder: IdempotencyLock | None = None
    stored: object = None
    dead_owner = False  # a claim is left by an owner whose lease ran out
    n = 0
    for step in steps:
        n += 1
        if step in ("claim", "approve"):
            s.renew_lease(f"w{n}", ttl=30)
            lock = _lock(s, lease=f"w{n}", on_crash="approved" if step == "approve" else mode)
            try:
                lock.acquire()
            except IdempotencyBusy:
                assert holder is not None
                continue
            except IdempotencyInterrupted:
                assert quarantine and dead_owner and step == "claim"
                continue
            if stored is not None:
                assert lock.already_executed and lock.cached_result == stored
            else:
                assert not lock.already_executed
                assert lock.taken_over == dead_owner
                holder, dead_owner = lock, False
        elif step == "store" and holder is not None:
            assert holder.store(n)
            stored, holder = n, None
        elif step == "release" and holder is not None:
            holder.release()
            holder = None
        elif step == "die" and holder is not None:
            s.renew_lease(holder.lease, ttl=0.001)
            time.sleep(0.005)
            holder, dead_owner = None, True


def test_with_redis_down_an_idempotent_task_never_runs_unprotected_and_is_retried() -> None:
    from relier_celery.core.errors import StoreUnavailable
    from relier_celery.testing import free_port

    # Given relier's Redis unreachable
    app = Celery("idem_down", broker="memory://", set_as_current=False)
    app.conf.relier_redis_url = f"redis://127.0.0.1:{free_port()}/0"
    ran = []

    @app.task(name="idem.down", shared=False, idempotent=True, max_retries=2)
    def charge(order):
        ran.append(order)

    install(app)
    from relier_celery.core import events

    seen = []
    events.subscribe(seen.append)
    try:
        # When it is run (eagerly: Celery runs each retry at once)
        result = app.tasks["idem.down"].apply(args=(1,))
    finally:
        events.unsubscribe(seen.append)
    # Then its body never ran, it was retried, and it failed loudly with the cause
    assert ran == []
    assert [e.name for e in seen].count("idempotency.unavailable") == 3  # 1 run + 2 retries
    assert result.failed() and isinstance(result.result, StoreUnavailable)


def test_a_result_that_cannot_be_kept_is_reported_and_the_run_not_failed() -> None:
    from relier_celery.core import events
    from relier_celery.testing import RedisServer

    # Given relier's Redis, which dies while the task body runs (after the claim)
    server = RedisServer()
    app = Celery("idem_store_down", broker="memory://", set_as_current=False)
    app.conf.relier_redis_url = server.start()
    runs = []

    @app.task(name="idem.store_down", shared=False, idempotent=True)
    def charge(order):
        runs.append(order)
        server.stop()
        return {"charged": order}

    install(app)
    seen = []
    events.subscribe(seen.append)
    try:
        result = app.tasks["idem.store_down"].apply(args=(3,))
    finally:
        events.unsubscribe(seen.append)
        server.stop()
    # Then the side effect happened once, the task succeeded, and the lost result is loud
    assert runs == [3] and result.successful() and result.result == {"charged": 3}
    assert "idempotency.store_failed" in [e.name for e in seen]
