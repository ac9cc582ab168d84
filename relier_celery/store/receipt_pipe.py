"""receipt.lua calls sent without waiting for their replies, read when the socket has them.

The receipt of a redelivery handed to the pool ahead of its verdict (recovery/speculate.py)
must not hold the worker's event loop for a round trip, nor run in a thread (under CPU
contention a thread holding the GIL, preempted, stalls the loop for milliseconds: measured at
a kill, docs/rabbitmq.md). So the call goes out on a connection of its own, whose socket the
event loop watches, and its reply is read when it is there. One Redis server only (a Cluster
would need a connection per node).
"""

from __future__ import annotations

from typing import Any

import redis

from relier_celery.core.errors import StoreUnavailable
from relier_celery.store.registry import Receipt, ReceiptCall, _receipt

__all__ = ["ReceiptPipe"]


class ReceiptPipe:
    """One connection for receipt.lua calls whose replies are read later, in order."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._conn: Any = None

    def fileno(self) -> int:
        """The socket to watch; the connection must be open (:meth:`send` opened it)."""
        return int(self._conn._sock.fileno())

    def open(self) -> None:
        """Connect now (a worker's start): connecting costs round trips of its own (redis-py
        names its library), which would otherwise fall on the first redelivery after a kill.
        StoreUnavailable if Redis cannot be reached."""
        try:
            if self._conn is None:
                self._conn = self.store.client.connection_pool.make_connection()
                self._conn.connect()
        except redis.RedisError as exc:
            self.close()
            raise self.store.mapped_error(exc) from exc

    def send(self, calls: list[ReceiptCall]) -> None:
        """Send calls, together (StoreUnavailable if Redis cannot be reached: any of them
        may have been written)."""
        self.open()
        try:
            sha = self.store._scripts["receipt"].sha
            pack = self._conn.pack_command
            commands = [pack("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
            # No health check: its PING would read a reply still awaited as its PONG.
            self._conn.send_packed_command([b"".join(b"".join(c) for c in commands)], False)
        except redis.RedisError as exc:
            self.close()
            raise self.store.mapped_error(exc) from exc

    def ready(self) -> bool:
        """Whether a reply (or the end of the connection) waits to be read."""
        try:
            return self._conn is not None and bool(self._conn.can_read(timeout=0))
        except redis.RedisError:
            return True  # read() reports it

    def read(self) -> Receipt | Exception:
        """The next reply: a receipt, or the error Redis answered that call with (NoScriptError
        when it lost the script: the call did not run). A lost connection raises
        StoreUnavailable: every call sent and not read may have run."""
        try:
            return _receipt(self._conn.read_response())
        except redis.ResponseError as exc:
            return exc if isinstance(exc, redis.exceptions.NoScriptError) else self._mapped(exc)
        except (redis.RedisError, OSError, AttributeError) as exc:
            self.close()
            raise StoreUnavailable(f"relier lost its receipt connection to Redis: {exc}") from exc

    def _mapped(self, exc: Exception) -> Exception:
        mapped: Exception = self.store.mapped_error(exc)
        return mapped

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.disconnect()
