"""One persistent event loop per worker process: the loop every ``async def`` task and async
hook of this process runs on (aio.py, timeouts.py).

It lives in a daemon thread and is created on first use after fork (a forked pool child never
inherits its parent's loop). The calling thread blocks on the result; many threads share the
one loop. Never ``asyncio.run`` per task: creating and closing a loop costs far more than the
task, and it breaks clients that outlive one task.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["get_loop", "run"]

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_pid = -1


def get_loop() -> asyncio.AbstractEventLoop:
    """This process's persistent loop, started on first use."""
    global _loop, _pid
    if _loop is None or _pid != os.getpid():
        with _lock:
            if _loop is None or _pid != os.getpid():
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=loop.run_forever, name="relier-event-loop", daemon=True
                )
                thread.start()
                _loop, _pid = loop, os.getpid()
    return _loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the persistent loop and wait for its result from a non-loop thread."""
    loop = get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError(
            "relier_celery.features.aio.run() called from the loop itself: await instead"
        )
    return asyncio.run_coroutine_threadsafe(coro, loop).result()
