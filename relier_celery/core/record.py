"""The exact message as a worker received it, and how to publish it again unchanged.

Resurrection and hand-off republish this record, so nothing about the task changes but the
``rl_resurrections`` header: same body bytes, content type and encoding, headers, properties,
exchange and routing key (and so the same trace context, which travels in the headers).
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from relier_celery.core.delivery import (
    Generation,
    as_int,
    delivery_id,
    new_publication_id,
    trace_context,
)
from relier_celery.core.headers import CRASHES_HEADER, RESURRECTIONS_HEADER

__all__ = [
    "FETCHED_MARK",
    "Generation",
    "TaskRecord",
    "as_int",
    "delivery_id",
    "new_publication_id",
    "trace_context",
]

# First line of a held record written by the reliable fetch (fetch.lua), not by receipt.
FETCHED_MARK = "rlf1\n"

# AMQP message properties worth carrying over; the rest (delivery_tag, delivery_info,
# body_encoding) belong to one delivery by one transport and must not be copied.
_KEPT_PROPERTIES = (
    "correlation_id",
    "reply_to",
    "priority",
    "delivery_mode",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


def _copied(value: Any) -> Any:
    """A copy of a message's headers or properties that kombu may change without changing
    the record: dicts and lists copied all the way down, the rest (str, int, tuples) shared.
    What ``copy.deepcopy`` did, at a fraction of the cost (it was a scan's largest CPU cost)."""
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copied(v) for v in value]
    return value


@dataclass
class TaskRecord:
    """One received task message, kept in Redis while the task is in flight."""

    task_id: str
    task_name: str
    body: bytes
    content_type: str | None
    content_encoding: str | None
    headers: dict[str, Any]
    properties: dict[str, Any]
    exchange: str
    routing_key: str
    worker: str
    received_at: float = field(default_factory=time.time)
    # Set for a message relier's reliable fetch took from its queue (fetch.py): the queue's
    # list it came from (where it goes back to), its field in the worker's held hash and its
    # transport delivery tag.
    queue_key: str | None = None
    field_name: str | None = None
    delivery_tag: str | None = None

    def held_field(self) -> str:
        """The field of this delivery in its worker's held hash."""
        return self.field_name or self.generation.field(self.delivery_id)

    @property
    def delivery_id(self) -> str:
        """Which publication of its task id this message is (see :func:`delivery_id`)."""
        return delivery_id(self.headers, self.task_id)

    @property
    def generation(self) -> Generation:
        return Generation.from_headers(self.headers)

    @classmethod
    def from_message(cls, message: Any, worker: str) -> TaskRecord:
        """Capture a kombu message (protocol 2) before Celery or kombu touch it."""
        headers = dict(message.headers or {})
        info = message.delivery_info or {}
        body = message.body
        if isinstance(body, str):
            body = body.encode(message.content_encoding or "utf-8")
        props = {
            k: message.properties[k]
            for k in _KEPT_PROPERTIES
            if message.properties.get(k) is not None
        }
        return cls(
            task_id=str(headers.get("id")),
            task_name=str(headers.get("task")),
            body=bytes(body),
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            headers=headers,
            properties=props,
            exchange=str(info.get("exchange") or ""),
            routing_key=str(info.get("routing_key") or ""),
            worker=worker,
        )

    def dumps(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "task_id": self.task_id,
                "task_name": self.task_name,
                "body": base64.b64encode(self.body).decode("ascii"),
                "content_type": self.content_type,
                "content_encoding": self.content_encoding,
                "headers": self.headers,
                "properties": self.properties,
                "exchange": self.exchange,
                "routing_key": self.routing_key,
                "worker": self.worker,
                "received_at": self.received_at,
            },
            default=str,
            separators=(",", ":"),
        )

    @classmethod
    def loads(cls, raw: str | bytes, field_name: str | None = None) -> TaskRecord:
        """A record as stored in a held hash: relier's own JSON (written at receipt), or the
        queue's raw envelope as the reliable fetch moved it (``FETCHED_MARK`` first)."""
        if isinstance(raw, bytes):
            raw = raw.decode()
        if raw.startswith(FETCHED_MARK):
            return cls.from_fetched(raw, field_name)
        data = json.loads(raw)
        return cls(
            task_id=data["task_id"],
            task_name=data["task_name"],
            body=base64.b64decode(data["body"]),
            content_type=data["content_type"],
            content_encoding=data["content_encoding"],
            headers=data["headers"],
            properties=data["properties"],
            exchange=data["exchange"],
            routing_key=data["routing_key"],
            worker=data["worker"],
            received_at=data["received_at"],
        )

    @classmethod
    def from_fetched(cls, raw: str, field_name: str | None = None) -> TaskRecord:
        """Parse what fetch.lua stored: mark, worker, queue list, fetch time (ms), envelope."""
        _, worker, queue_key, at_ms, envelope = raw.split("\n", 4)
        record = cls.from_envelope(json.loads(envelope), worker, queue_key)
        record.received_at = int(at_ms) / 1000.0
        record.field_name = field_name
        return record

    @classmethod
    def from_envelope(
        cls, payload: dict[str, Any], worker: str, queue_key: str | None = None
    ) -> TaskRecord:
        """A record of a kombu Redis envelope (the JSON kombu keeps in its queue lists)."""
        props = payload.get("properties") or {}
        headers = dict(payload.get("headers") or {})
        info = props.get("delivery_info") or {}
        body: Any = payload.get("body") or ""
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        elif isinstance(body, str):
            body = body.encode(payload.get("content-encoding") or "utf-8")
        tag = props.get("delivery_tag")
        return cls(
            task_id=str(headers.get("id")),
            task_name=str(headers.get("task")),
            body=bytes(body),
            content_type=payload.get("content-type"),
            content_encoding=payload.get("content-encoding"),
            headers=headers,
            properties={k: props[k] for k in _KEPT_PROPERTIES if props.get(k) is not None},
            exchange=str(info.get("exchange") or ""),
            routing_key=str(info.get("routing_key") or ""),
            worker=worker,
            queue_key=queue_key,
            delivery_tag=None if tag is None else str(tag),
        )

    def envelope(self) -> str:
        """This message as kombu's Redis transport keeps it in a queue list, so that it can go
        back into its queue directly (at the head, for a resurrection) instead of through a
        publish (at the tail)."""
        props: dict[str, Any] = _copied(self.properties)
        props.update(
            body_encoding="base64",
            delivery_info={"exchange": self.exchange, "routing_key": self.routing_key},
            delivery_tag=self.delivery_tag or uuid.uuid4().hex,
        )
        return json.dumps(
            {
                "body": base64.b64encode(self.body).decode("ascii"),
                "content-encoding": self.content_encoding,
                "content-type": self.content_type,
                "headers": self.headers,
                "properties": props,
            },
            default=str,
        )

    @property
    def crashes(self) -> int:
        """How many times a worker died holding this task."""
        return as_int(self.headers.get(CRASHES_HEADER))

    def next_generation(self, crash: bool, extra: dict[str, Any] | None = None) -> TaskRecord:
        """The same message with its resurrection count (and, after a crash, its crash count)
        raised by one (and ``extra`` headers set)."""
        headers = _copied(self.headers)
        headers.update(extra or {})
        headers[RESURRECTIONS_HEADER] = self.generation.resurrections + 1
        if crash:
            headers[CRASHES_HEADER] = self.crashes + 1
        return TaskRecord(**{**self.__dict__, "headers": headers})

    def publish(self, producer: Any) -> None:
        """Publish this exact message with a kombu producer (copies: kombu mutates headers)."""
        producer.publish(
            self.body,
            exchange=self.exchange,
            routing_key=self.routing_key,
            content_type=self.content_type,
            content_encoding=self.content_encoding,
            headers=_copied(self.headers),
            declare=None,
            retry=True,
            retry_policy={"max_retries": 5, "interval_start": 0.2, "interval_step": 0.5},
            **_copied(self.properties),
        )
