"""The throwaway redis-server of the tests: one its owner never stopped does not outlive it."""

from __future__ import annotations

import gc
import os

import pytest

from relier_celery.testing import RedisServer, wait_for

pytestmark = pytest.mark.timeout(30)


def test_a_server_never_stopped_ends_with_its_object() -> None:
    # Given a server whose owner forgot to stop it
    server = RedisServer()
    server.start()
    proc = server.proc
    assert proc is not None and proc.poll() is None
    # When the object goes
    del server
    gc.collect()
    # Then so does the process
    wait_for(lambda: proc.poll() is not None, 10, what="the server to end")


def test_a_forked_child_that_exits_leaves_its_parents_server_running() -> None:
    server = RedisServer()
    server.start()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child: drops the object, runs the finalizers)
            del server
            gc.collect()
            os._exit(0)
        os.waitpid(pid, 0)
        assert server.proc is not None and server.proc.poll() is None
    finally:
        server.stop()
