"""A worker's presence connection (presence.py): named in Redis while its process lives, gone
the moment it dies, and not kept alive by a forked pool child."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from relier_celery.store.client import Store
from relier_celery.store.presence import Presence, PresenceCache
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
    assert store.keys.presence("w1@host/1/ab") in store.connection_names()
    assert PresenceCache(store).present("w1@host/1/ab")
    presence.close()
    # (Redis drops a closed connection from CLIENT LIST moments after the close, not at once)
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
        assert store.keys.presence("w2@host/1/ab") in store.connection_names()
    finally:
        presence.close()


def test_presence_reconnects_under_its_name_after_redis_dropped_it(store: Store) -> None:
    presence = Presence(store, "w3@host/1/ab")
    presence.open()
    try:
        name = store.keys.presence("w3@host/1/ab")
        store.call(lambda c: c.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"))
        assert name not in store.connection_names()
        try:
            presence.touch()  # the broken connection raises once, then reconnects
        except Exception:
            presence.touch()
        assert name in store.connection_names()
    finally:
        presence.close()


def test_a_name_with_spaces_is_still_one_client_name(store: Store) -> None:
    assert " " not in store.keys.presence("w 1@my host/1/ab")
