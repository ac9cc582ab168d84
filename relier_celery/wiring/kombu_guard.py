"""Wiring into kombu's Redis transport: raw envelopes kombu cannot parse go to the DLQ.

kombu's Redis transport pops a message (BRPOP) and parses its JSON envelope (body, headers,
properties) before any consumer callback runs, so before relier's receipt check. An envelope
that is not JSON, or lacks a field kombu reads, raises inside kombu's event loop: the worker
process exits, or its consumer restarts, and the popped message is gone (see
docs/dlq.md#malformed-messages). Relier checks each envelope as kombu hands it to its consumer
and quarantines, with its raw text, one that would break kombu.

Only a message written to Redis by hand (or by a buggy client) looks like this: a Celery
publisher always writes a well-formed envelope. The check costs a few dict lookups per message.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kombu import compression

from relier_celery.core.errors import StoreUnavailable
from relier_celery.recovery import envelope
from relier_celery.recovery.dlq import quarantine

__all__ = ["fetched_slot", "guard_transport", "problem"]

logger = logging.getLogger("relier_celery")


class _BadBody(Exception):
    """kombu could not decode an envelope's body (raised while kombu builds its Message)."""


class _Unparsable(dict[str, Any]):
    """What the tolerant ``loads`` returns for a popped item that is not JSON."""


def problem(payload: Any) -> str | None:
    """Why kombu would fail on this raw envelope, or None when it is fine."""
    if isinstance(payload, _Unparsable):
        return f"the envelope is not JSON: {payload['error']}"
    if not isinstance(payload, dict):
        return f"the envelope is {type(payload).__name__}, not a JSON object"
    props = payload.get("properties")
    if not isinstance(props, dict):
        return f"'properties' is {props!r}"
    tag = props.get("delivery_tag")
    if not isinstance(tag, str | int) or isinstance(tag, bool):
        return f"'delivery_tag' is {tag!r}"
    info = props.get("delivery_info")
    if not isinstance(info, dict) or "exchange" not in info or "routing_key" not in info:
        return f"'delivery_info' is {info!r}"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"'headers' is {type(headers).__name__}, not an object"
    name = (headers or {}).get("compression")
    if name:
        try:
            compression.get_decoder(name)  # type: ignore[no-untyped-call]
        except Exception:
            return f"unknown compression {name!r}"
    body = payload.get("body")
    if body is not None and not isinstance(body, str | bytes):
        return f"the body is {type(body).__name__}"
    # A body kombu cannot decode (bad base64, unknown body_encoding) is caught as kombu decodes
    # it (see install): checking here would decode every body twice.
    return None


# The text of the envelope this thread parsed last: kombu parses an envelope, then delivers it,
# so a quarantined envelope keeps its exact bytes.
_last = threading.local()


class _Slot:
    """The held field of the envelope being delivered, when the reliable fetch took it."""

    def __init__(self, worker: str, field: str) -> None:
        self.worker, self.field, self.quarantined = worker, field, False


@contextmanager
def fetched_slot(worker: str, field: str) -> Iterator[_Slot]:
    """Around the delivery of a fetched envelope: a quarantine drops its held field in the
    same step as it writes the DLQ entry."""
    _last.slot = slot = _Slot(worker, field)
    try:
        yield slot
    finally:
        _last.slot = None


def _quarantine_raw(runtime: Any, payload: Any, queue: str, why: str) -> None:
    raw = getattr(_last, "text", None)
    if raw is None or getattr(_last, "payload", None) is not payload:
        raw = json.dumps(payload, default=str)
    headers = payload.get("headers") if isinstance(payload, dict) else None
    slot: _Slot | None = getattr(_last, "slot", None)
    record = envelope.raw_record(
        runtime.worker_id,
        headers if isinstance(headers, dict) else None,
        raw,
        "application/x-kombu-envelope",
        "utf-8",
        {"routing_key": queue},
    )
    quarantine(
        runtime.store,
        record,
        "invalid_envelope",
        f"kombu's Redis transport could not read this message from queue {queue!r}: {why}. "
        "The body of this entry is the raw envelope, as it was in the queue",
        done_ttl=runtime.config.completed_ttl,
        held_by=slot.worker if slot is not None else None,
        field=slot.field if slot is not None else None,
    )
    if slot is not None:
        slot.quarantined = True


def guard_transport(runtime: Any) -> None:
    """Patch kombu's Redis transport once per process (a no-op for other transports)."""
    import importlib

    # Typed as Any: this patches kombu's internals, which its type hints do not describe.
    kombu_redis: Any = importlib.import_module("kombu.transport.redis")
    if getattr(kombu_redis.Transport._deliver, "__relier__", False):
        return
    strict_loads = kombu_redis.loads

    def tolerant_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            payload = strict_loads(text, *args, **kwargs)
        except ValueError as exc:  # JSONDecodeError; kombu's unacked entries are always JSON
            payload = _Unparsable(error=str(exc))
        _last.text, _last.payload = text, payload
        return payload

    decode_body = kombu_redis.Channel.decode_body

    def checked_decode_body(self: Any, body: Any, encoding: Any = None) -> Any:
        try:
            return decode_body(self, body, encoding)
        except Exception as exc:
            raise _BadBody(f"kombu cannot decode the body ({encoding!r}): {exc!r}") from None

    deliver = kombu_redis.Transport._deliver

    def guarded_deliver(self: Any, message: Any, queue: Any) -> Any:
        why = problem(message)
        if why is None:
            try:
                return deliver(self, message, queue)
            except _BadBody as exc:  # raised building kombu's Message: not yet in "unacked"
                why = str(exc)
        try:
            _quarantine_raw(runtime, message, str(queue), why)
        except StoreUnavailable as exc:
            if getattr(_last, "slot", None) is not None:
                # Fetched: it stays in this worker's held hash, and goes back to its queue at
                # the next hand-off, or to the DLQ from there if this worker dies.
                logger.error(
                    "relier: a malformed message from %r could not be quarantined (%s); it "
                    "stays held by this worker: %s",
                    queue,
                    exc,
                    why,
                )
                return None
            logger.critical(
                "relier: a malformed message popped from %r could not be quarantined (%s) and "
                "is LOST: %s; raw: %.4000r",
                queue,
                exc,
                why,
                message,
            )
        return None

    guarded_deliver.__relier__ = True  # type: ignore[attr-defined]
    kombu_redis.loads = tolerant_loads
    kombu_redis.Transport._deliver = guarded_deliver
    kombu_redis.Channel.decode_body = checked_decode_body
