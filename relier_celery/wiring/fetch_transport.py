"""The reliable fetch (fetch.py) put in place: kombu's Redis or Sentinel transport with
relier's channel, bound to one worker runtime, for the consumer's own broker connection only
(publishing and every other connection keep kombu's transport).
"""

from __future__ import annotations

from typing import Any

from relier_celery.wiring.fetch import RelierChannel, kombu_redis

__all__ = ["enable_for_consumer", "reliable_transport"]

_transports: dict[tuple[int, type], type] = {}


def reliable_transport(runtime: Any, base: Any = None) -> type:
    """kombu's Redis transport (or its Sentinel transport, ``base``) with relier's channel,
    bound to one worker runtime."""
    base = base or kombu_redis.Transport
    cls = _transports.get((id(runtime), base))
    if cls is None:
        if any(key[0] != id(runtime) for key in _transports):
            _transports.clear()  # one runtime per worker process
        channel = type("Channel", (RelierChannel, base.Channel), {"rl_runtime": runtime})
        cls = type(f"Relier{base.__name__}", (base,), {"Channel": channel})
        _transports[(id(runtime), base)] = cls
    return cls


def __getattr__(name: str) -> type:
    """The reliable transports by name
    (``relier_celery.wiring.fetch_transport:RelierTransport``): a consumer's connection names
    its transport by this path, not by the class, because Celery puts the connection's info in
    replies to remote control (``inspect stats``), which must be JSON."""
    for cls in _transports.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# kombu transports whose queues relier can fetch from: the plain Redis one and Sentinel's.
_FETCHABLE = (kombu_redis.Transport, kombu_redis.SentinelTransport)


def enable_for_consumer(c: Any, runtime: Any) -> None:
    """Give the consumer's own broker connection the reliable fetch (kombu's Redis and Redis
    Sentinel transports; other brokers and a disabled setting keep kombu's)."""
    if not runtime.config.reliable_fetch:
        return
    app = c.app

    def relier_connection_for_read(heartbeat: Any = None) -> Any:
        conn = app.connection_for_read(heartbeat=heartbeat)
        base = conn.get_transport_cls()
        if base in _FETCHABLE:
            conn.transport_cls = f"{__name__}:{reliable_transport(runtime, base).__name__}"
        return c.ensure_connected(conn)

    c.connection_for_read = relier_connection_for_read
