"""A burst: task messages an AMQP broker delivered together, received together.

RabbitMQ gives a dead consumer's unacknowledged messages back all at once, and kombu hands them
to the consumer one per turn of its event loop. Each needs one Redis round trip (its receipt,
which decides whether its holder lives) before Celery may have it. Taken one by one, a burst of
four waited four round trips before its last task could start; kept until the socket has no
more to read, the burst's receipts go to Redis in one round trip (receipt.py). A message waits
for at most :data:`WAIT_AT_MOST` (the bytes waiting may not be a whole message), and a burst
holds at most :data:`BURST_MAX`. Only on Celery's event loop (the timer that ends a wait runs
on it) and on py-amqp's socket; any other consumer receives each message at once.
"""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

__all__ = ["BURST_MAX", "WAIT_AT_MOST", "Burst"]

BURST_MAX = 64
WAIT_AT_MOST = 0.002


class Burst:
    """The messages of one consumer's current burst."""

    def __init__(self, c: Any) -> None:
        self.c = c
        self.messages: list[Any] = []
        self._entry: Any = None
        self._poll: Any = None  # select.poll on the broker's socket, made on first use
        self._transport: Any = None
        self._enabled = getattr(c, "hub", None) is not None

    def keep(self, message: Any, flush: Callable[[], None]) -> bool:
        """Add ``message`` to the burst; True if it waits for more (``flush`` runs when the
        burst ends or :data:`WAIT_AT_MOST` has passed), False if the burst is complete."""
        self.messages.append(message)
        if len(self.messages) >= BURST_MAX or not self._more_to_read():
            return False
        if self._entry is None:
            self._entry = self.c.timer.call_after(WAIT_AT_MOST, flush)
        return True

    def take(self) -> list[Any]:
        """The burst's messages, in delivery order; the burst starts again empty."""
        messages, self.messages = self.messages, []
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None
        return messages

    def _more_to_read(self) -> bool:
        """Whether the broker's socket has bytes kombu has not read yet."""
        if not self._enabled:
            return False
        if self._poll is None:
            transport = getattr(getattr(self.c.connection, "connection", None), "transport", None)
            sock = getattr(transport, "sock", None)
            if sock is None or not hasattr(transport, "_read_buffer"):
                self._enabled = False  # not py-amqp: every message on its own
                return False
            self._transport = transport
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN)
        return bool(self._transport._read_buffer) or bool(self._poll.poll(0))
