"""A prefork worker's heartbeat on its event loop (recovery/loop_heartbeat.py): no thread while
the loop turns, a thread while it stands still, and a thread for good when another SIGALRM
handler takes over. Real Redis, kombu's real hub (its timers fired by hand, as its loop
would), a real SIGALRM."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator

import pytest
from kombu.asynchronous import Hub

from relier_celery.core.config import RelierConfig
from relier_celery.recovery.lease import Lease
from relier_celery.recovery.loop_heartbeat import LoopHeartbeat
from relier_celery.store.client import Store
from relier_celery.testing import wait_for

# The watchdog owns SIGALRM, which pytest-timeout's default method uses too.
pytestmark = pytest.mark.timeout(30, method="thread")

INTERVAL = 0.2


def _lease(store: Store) -> Lease:
    config = RelierConfig.from_mapping(
        {"relier_lease_ttl": 1.0, "relier_heartbeat_interval": INTERVAL}, broker_url=store.url
    )
    return Lease(config, store, "w1")


@pytest.fixture
def driven(store: Store) -> Iterator[tuple[Lease, LoopHeartbeat, Hub]]:
    """A lease taken (its thread started), then driven from a hub."""
    lease = _lease(store)
    hub = Hub()
    lease.acquire()
    heartbeat = LoopHeartbeat(lease, hub)
    before = signal.getsignal(signal.SIGALRM)
    heartbeat.start()
    try:
        yield lease, heartbeat, hub
    finally:
        heartbeat.stop()
        lease.release()
        hub.close()
        signal.signal(signal.SIGALRM, before)


def _turn(hub: Hub, seconds: float) -> None:
    """The loop turns for ``seconds``: its timers fire when due."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        hub.fire_timers(max_timers=10)
        time.sleep(0.01)


def test_the_loop_renews_and_the_thread_ends(store: Store, driven) -> None:
    lease, _, hub = driven
    # When the loop turns
    _turn(hub, 2 * INTERVAL)
    # Then the thread that started with the lease ends, and the loop keeps it renewed
    assert not lease.thread_running
    before = store.leases()["w1"]
    _turn(hub, 3 * INTERVAL)
    assert store.leases()["w1"] > before
    assert not lease.thread_running


def test_a_loop_standing_still_gets_the_thread_back_until_it_turns(store: Store, driven) -> None:
    lease, _, hub = driven
    _turn(hub, 2 * INTERVAL)
    assert not lease.thread_running
    # When the loop stands still (a broker reconnecting): no timer fires
    before = store.leases()["w1"]
    time.sleep(4 * INTERVAL)
    # Then the watchdog (SIGALRM) started the thread, which renews
    assert lease.thread_running
    assert store.leases()["w1"] > before
    # And when the loop turns again, the thread ends
    _turn(hub, 3 * INTERVAL)
    assert not lease.thread_running


def test_another_sigalrm_handler_leaves_the_heartbeat_to_a_thread_for_good(
    store: Store, driven, captured
) -> None:
    lease, _, hub = driven
    _turn(hub, 2 * INTERVAL)
    # When someone else installs a SIGALRM handler
    signal.signal(signal.SIGALRM, lambda *_: None)
    _turn(hub, 2 * INTERVAL)
    # Then a warning says so, and the thread renews from now on, the loop turning or not
    assert [e for e in captured if "SIGALRM" in e.message]
    _turn(hub, 3 * INTERVAL)
    assert lease.thread_running
    before = store.leases()["w1"]
    time.sleep(3 * INTERVAL)
    assert store.leases()["w1"] > before
    # And relier's timer is off: no alarm for their handler, nor for the default one restored
    # after it (which would terminate the process: a test worker died of it once)
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_another_sigalrm_owners_own_timer_is_left_alone(store: Store, driven, captured) -> None:
    lease, _, hub = driven
    _turn(hub, 2 * INTERVAL)
    # When someone else installs a SIGALRM handler and arms a timer of their own
    alarms: list[int] = []
    signal.signal(signal.SIGALRM, lambda *_: alarms.append(1))
    signal.setitimer(signal.ITIMER_REAL, 0.3, 0.3)
    try:
        _turn(hub, 2 * INTERVAL)
        # Then relier hands the heartbeat to its thread and leaves their timer as it is
        assert [e for e in captured if "SIGALRM" in e.message]
        assert lease.thread_running
        assert signal.getitimer(signal.ITIMER_REAL)[1] == pytest.approx(0.3)
        time.sleep(0.7)
        assert alarms
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_with_redis_unreachable_the_loop_waits_out_one_timeout_not_one_each_turn(
    store: Store, driven
) -> None:
    # Given a lease driven from the loop, whose Redis then stops answering (each renewal
    # fails at once)
    from relier_celery.core.errors import StoreUnavailable

    lease, _, hub = driven
    _turn(hub, 2 * INTERVAL)
    assert not lease.thread_running
    calls: list[str] = []
    real = lease.store.renew_lease

    def unreachable(*args: object) -> object:
        calls.append(threading.current_thread().name)
        raise StoreUnavailable("relier cannot reach Redis: Connection refused")

    lease.store.renew_lease = unreachable  # type: ignore[method-assign]
    _turn(hub, 6 * INTERVAL)
    # Then the loop tried once; the thread retries
    main = threading.main_thread().name
    assert calls.count(main) == 1 and len(calls) > 1
    assert lease.thread_running and lease.down
    # And when Redis answers again, the loop takes over once more
    lease.store.renew_lease = real  # type: ignore[method-assign]
    wait_for(lambda: not lease.down, 5)
    _turn(hub, 3 * INTERVAL)
    assert not lease.thread_running


def test_a_drain_hands_the_heartbeat_to_the_thread_for_good(store: Store, driven) -> None:
    lease, heartbeat, hub = driven
    _turn(hub, 2 * INTERVAL)
    # When a drain begins (from any thread): the loop is ending, and the shutdown waits for
    # the pool where the watchdog cannot run
    worker = threading.Thread(target=heartbeat.hand_to_thread)
    worker.start()
    worker.join()
    # Then the watchdog's timer is off, and the thread renews even while the loop turns
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    before = store.leases()["w1"]
    _turn(hub, 4 * INTERVAL)
    assert lease.thread_running
    assert store.leases()["w1"] > before


def test_stopping_hands_the_heartbeat_back_to_the_thread(store: Store, driven) -> None:
    lease, heartbeat, hub = driven
    _turn(hub, 2 * INTERVAL)
    assert signal.getsignal(signal.SIGALRM) is heartbeat._handler
    # When the worker stops (its loop is done; the pool may still finish tasks)
    heartbeat.stop()
    # Then the thread renews, and the SIGALRM handler is the one before
    assert lease.thread_running
    assert signal.getsignal(signal.SIGALRM) is not heartbeat._handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    before = store.leases()["w1"]
    time.sleep(3 * INTERVAL)
    assert store.leases()["w1"] > before


def test_the_first_turn_after_a_stall_renews_at_once(store: Store, driven) -> None:
    # Given a loop that stood still (the watchdog started the thread), as after a thaw
    lease, _, hub = driven
    _turn(hub, 2 * INTERVAL)
    time.sleep(4 * INTERVAL)
    assert lease.thread_running
    renewals: list[str] = []
    real = lease.renew

    def renew() -> None:
        renewals.append(threading.current_thread().name)
        real()

    lease.renew = renew  # type: ignore[method-assign]
    lease._last_sent = 0.0  # a renewal is due (the thread's last one was long ago)
    # When the loop turns once
    hub.fire_timers(max_timers=10)
    # Then that very turn renewed, on the loop: a thawed worker learns at once that its lease
    # was lost and fences itself, before its loop reads what the freeze left unread
    assert renewals == [threading.main_thread().name]


def test_the_loop_stopping_just_as_it_ended_the_thread_leaves_a_thread_renewing(
    store: Store, driven
) -> None:
    # Given a thread renewing while the loop stood still
    lease, heartbeat, hub = driven
    _turn(hub, 2 * INTERVAL)
    time.sleep(4 * INTERVAL)
    assert lease.thread_running
    # When the loop turns once (it ends the thread) and at once stops (a consumer restart),
    # before the thread has woken to end
    heartbeat._on_loop()  # the loop's timer, due: it ends the thread
    # The main thread then waits where the watchdog's handler cannot run (a system call the
    # kernel restarts): SIGALRM ignored stands for that
    signal.signal(signal.SIGALRM, signal.SIG_IGN)
    try:
        heartbeat.loop_stopped()
        # Then a thread is still there, and it renews while the loop stands still
        time.sleep(2 * INTERVAL)
        assert lease.thread_running
        before = store.leases()["w1"]
        time.sleep(3 * INTERVAL)
        assert store.leases()["w1"] > before
    finally:
        signal.signal(signal.SIGALRM, heartbeat._handler)


def test_after_celery_56_cleared_the_hubs_timer_rearm_brings_the_renewals_back(
    store: Store, driven
) -> None:
    # Given the loop renewing, then its hub's timer cleared (Celery 5.6 does it when the
    # consumer restarts)
    lease, heartbeat, hub = driven
    _turn(hub, 2 * INTERVAL)
    hub.timer.clear()
    # When relier registers its timer again (at the consumer's start)
    heartbeat.rearm()
    # Then the turning loop renews again, with no thread
    _turn(hub, 2 * INTERVAL)
    before = store.leases()["w1"]
    _turn(hub, 3 * INTERVAL)
    assert store.leases()["w1"] > before
    assert not lease.thread_running
