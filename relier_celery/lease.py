"""A worker's lease: the proof, renewed every ``heartbeat_interval``, that it is alive.

The heartbeat runs in a dedicated thread of the worker's main process, so task code cannot
starve it: prefork tasks run in other processes, and a threads or solo pool task would have to
hold the GIL for seconds without releasing it. When a renewal finds the lease had already run
out, the worker was taken for dead and its tasks may be running elsewhere: that is reported
loudly as ``lease.lost``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from . import events
from .config import RelierConfig
from .errors import StoreUnavailable
from .store import Store

__all__ = ["Lease"]


class Lease:
    """Keeps one worker's lease alive from a background thread."""

    def __init__(
        self,
        config: RelierConfig,
        store: Store,
        worker: str,
        on_renewed: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.worker = worker
        self.on_renewed = on_renewed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._down = False
        self._renewed = False

    def acquire(self) -> None:
        """Take the lease now (raises StoreUnavailable) and start renewing it."""
        self.store.renew_lease(self.worker, self.config.lease_ttl)
        self._thread = threading.Thread(target=self._loop, name="relier-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> int:
        """Stop renewing; forget the lease, or expire it now if records are left (they are
        then resurrected by the next scan). Return how many records were left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        return self.store.retire(self.worker)

    def renew(self) -> None:
        prev, now = self.store.renew_lease(self.worker, self.config.lease_ttl)
        # A lease that ran out, or that a scanner already forgot (it held nothing left to
        # resurrect), both mean this worker was taken for dead.
        gone = prev == -1 and self._renewed
        if gone or 0 <= prev < now:
            ago = "some time" if gone else f"{(now - prev) / 1000:.1f} s"
            events.emit(
                "lease.lost",
                f"this worker's lease ran out {ago} ago (paused or cut off from Redis?): it "
                "was taken for dead and its tasks may have been resurrected elsewhere. Raise "
                "relier_lease_ttl if pauses are expected",
                worker=self.worker,
            )
        self._renewed = True

    def _loop(self) -> None:
        while not self._stop.wait(self.config.heartbeat_interval):
            try:
                self.renew()
                if self.on_renewed is not None:
                    self.on_renewed()
                if self._down:
                    self._down = False
                    events.emit(
                        "store.recovered", "heartbeat reaches Redis again", worker=self.worker
                    )
            except StoreUnavailable as exc:
                if not self._down:
                    self._down = True
                    events.emit("store.unavailable", f"heartbeat failed: {exc}", worker=self.worker)
            except Exception as exc:
                events.emit("store.unavailable", f"heartbeat failed: {exc!r}", worker=self.worker)
