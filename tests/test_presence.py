"""A worker's presence connection (presence.py): named in Redis while its process lives, gone
the moment it dies, and not kept alive by a forked pool child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from relier_celery.store.client import Store
from relier_celery.store.presence import SETTLE, SETTLE_FIRST, SETTLE_STEP, Presence, PresenceCache
from relier_celery.testing import wait_for

CHILD = """
import sys, time
from relier_celery.core.keys import Keys
from relier_celery.store.presence import Presence
from relier_celery.store.client import Store
presence = Presence(Store(sys.argv[1], Keys("rl")), "w7@host/1/ab")
presence.open()
print("open", flush=True)
time.sleep(60)
"""


def test_an_open_presence_is_seen_and_a_closed_one_is_not(store: Store) -> None:
    presence = Presence(store, "w1@host/1/ab")
    presence.open()
    assert store.present("w1@host/1/ab")
    assert store.keys.presence("w1@host/1/ab") in _names(store)  # for operators
    assert PresenceCache(store).present("w1@host/1/ab")
    presence.close()
    # (Redis drops a closed connection, and its subscription, moments after the close)
    wait_for(lambda: not PresenceCache(store).present("w1@host/1/ab"), 2, what="absent")


def test_a_sigkilled_process_is_absent_at_once(store: Store, redis_url: str) -> None:
    # Given a process holding its presence connection
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, redis_url], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "open"
        cache = PresenceCache(store)
        assert cache.present("w7@host/1/ab")
        # When it is SIGKILLed
        killed = time.monotonic()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(5)
        # Then Redis forgets it within moments, long before any lease would run out
        wait_for(lambda: not PresenceCache(store).present("w7@host/1/ab"), 2, what="absence")
        assert time.monotonic() - killed < 2
    finally:
        proc.kill()
        proc.wait()


def test_a_forked_child_that_exits_does_not_close_the_parents_presence(store: Store) -> None:
    presence = Presence(store, "w2@host/1/ab")
    presence.open()
    try:
        pid = os.fork()
        if pid == 0:  # the child: its copy of the socket is closed after the fork
            os._exit(0 if presence._conn is None else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        presence.touch()
        assert store.present("w2@host/1/ab")
    finally:
        presence.close()


def test_presence_reconnects_under_its_name_after_redis_dropped_it(store: Store) -> None:
    presence = Presence(store, "w3@host/1/ab")
    presence.open()
    try:
        name = store.keys.presence("w3@host/1/ab")
        store.call(lambda c: c.execute_command("CLIENT", "KILL", "TYPE", "pubsub"))
        wait_for(lambda: not store.present("w3@host/1/ab"), 2, what="dropped")
        assert name not in _names(store)
        try:
            presence.touch()  # the broken connection raises once, then reconnects
        except Exception:
            presence.touch()
        # Then it is subscribed again, under its name, and stays so
        assert store.present("w3@host/1/ab") and name in _names(store)
        presence.touch()
        assert store.present("w3@host/1/ab")
    finally:
        presence.close()


def _names(store: Store) -> set[str]:
    return {str(c.get("name", "")) for c in store.call(lambda c: c.client_list())}


def test_a_name_with_spaces_is_still_one_client_name(store: Store) -> None:
    assert " " not in store.keys.presence("w 1@my host/1/ab")


def test_a_holder_present_at_first_is_asked_again_soon_then_less_often(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a holder whose presence connection is still open when its redelivery arrives
    presence = Presence(store, "w9@host/1/ab")
    presence.open()
    waits: list[float] = []
    real_sleep = time.sleep

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 3:
            presence.close()  # its process finishes closing its sockets
        real_sleep(seconds)

    monkeypatch.setattr("relier_celery.store.presence.time.sleep", sleep)
    try:
        # When the receiver asks whether it is gone
        gone = PresenceCache(store).gone("w9@host/1/ab")
    finally:
        presence.close()
    # Then the first waits are a few ms each, doubling, and it is found gone
    assert gone
    assert waits[:3] == [SETTLE_FIRST, 2 * SETTLE_FIRST, 4 * SETTLE_FIRST]
    assert all(w <= SETTLE_STEP for w in waits)


def test_a_holder_that_stays_present_is_asked_for_settle_seconds_at_most(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    presence = Presence(store, "w10@host/1/ab")
    presence.open()
    waits: list[float] = []
    real_sleep = time.sleep
    monkeypatch.setattr(
        "relier_celery.store.presence.time.sleep", lambda s: (waits.append(s), real_sleep(s))
    )
    try:
        start = time.monotonic()
        assert not PresenceCache(store).gone("w10@host/1/ab")
    finally:
        presence.close()
    assert time.monotonic() - start >= SETTLE
    assert sum(waits) <= SETTLE + 1e-9
    assert max(waits) == SETTLE_STEP
