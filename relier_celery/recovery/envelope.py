"""The task message envelope: what relier checks on every message before Celery sees it.

Celery acks and drops a task message whose body it cannot decode (one critical log line), and
some malformed headers break its request handling. Relier checks the headers and decodes the
body of every task message first (one decode in the worker's main process); a message that
cannot run goes to the DLQ with its raw bytes (``undecodable``, ``invalid_message``), never to
Celery. The schema versions that let old and new workers share one queue are in
schema.py.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from kombu import serialization

from relier_celery.core.headers import (
    CRASHES_HEADER,
    REQUEUES_HEADER,
    RESURRECTIONS_HEADER,
    SCHEMA_HEADER,
)
from relier_celery.core.record import TaskRecord

__all__ = [
    "BadMessage",
    "check_headers",
    "decode_body",
    "message_version",
    "raw_record",
    "raw_record_of",
]


class BadMessage(Exception):
    """A message relier will not hand to Celery; ``reason`` names the DLQ reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


# -- headers ----------------------------------------------------------------------------
_OPTIONAL_STR = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "origin")


def check_headers(headers: Mapping[str, Any]) -> None:
    """Raise :class:`BadMessage` unless Celery can build a request from these headers."""
    for name in ("id", "task"):
        if not isinstance(headers.get(name), str) or not headers[name]:
            raise BadMessage("invalid_message", f"header {name!r} is {headers.get(name)!r}")
    for name in _OPTIONAL_STR:
        if headers.get(name) is not None and not isinstance(headers[name], str):
            raise BadMessage("invalid_message", f"header {name!r} is {headers[name]!r}")
    for name in ("retries", RESURRECTIONS_HEADER, CRASHES_HEADER, REQUEUES_HEADER):
        count = headers.get(name)
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or count < 0
        ):
            raise BadMessage("invalid_message", f"header {name!r} is {count!r}")
    for name in ("eta", "expires"):
        value = headers.get(name)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadMessage("invalid_message", f"header {name!r} is {value!r}")
        try:
            datetime.fromisoformat(value)
        except ValueError:
            raise BadMessage(
                "invalid_message", f"header {name!r} is not ISO 8601: {value!r}"
            ) from None
    limit = headers.get("timelimit")
    if limit is not None and not (
        isinstance(limit, list | tuple)
        and len(limit) == 2
        and all(
            x is None or (isinstance(x, int | float) and not isinstance(x, bool)) for x in limit
        )
    ):
        raise BadMessage("invalid_message", f"header 'timelimit' is {limit!r}")
    for name, kind in (("stamps", dict), ("stamped_headers", list), ("group_index", int)):
        value = headers.get(name)
        if value is not None and not isinstance(value, kind):
            raise BadMessage("invalid_message", f"header {name!r} is {value!r}")
    message_version(headers)


def message_version(headers: Mapping[str, Any]) -> int:
    """The schema version a message was published with (1 when it has none)."""
    value = headers.get(SCHEMA_HEADER)
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadMessage("invalid_message", f"header {SCHEMA_HEADER!r} is {value!r}")
    return value


# -- body -------------------------------------------------------------------------------
def accepted(app: Any) -> set[str]:
    """The content types the worker accepts (Celery's ``accept_content``)."""
    return set(serialization.prepare_accept_content(app.conf.accept_content))  # type: ignore[no-untyped-call]


def decode_body(
    body: Any, content_type: str | None, content_encoding: str | None, accept: set[str]
) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """Decode a protocol-2 body into (args, kwargs, embed) as Celery will, or raise.

    The content type must be one the worker accepts, exactly: kombu lets a missing type,
    ``application/data`` and ``application/text`` through undecoded, and Celery then fails on
    the raw bytes."""
    if not isinstance(content_type, str) or content_type not in accept:
        raise BadMessage(
            "undecodable",
            f"content type {content_type!r} is not in accept_content ({sorted(accept)})",
        )
    if content_encoding is not None and not isinstance(content_encoding, str):
        raise BadMessage("undecodable", f"content encoding {content_encoding!r}")
    try:
        data = serialization.loads(body, content_type, content_encoding, accept=accept)  # type: ignore[no-untyped-call]
    except Exception as exc:  # DecodeError, ContentDisallowed, anything a decoder raises
        raise BadMessage(
            "undecodable", f"body of type {content_type!r}/{content_encoding!r}: {exc!r}"
        ) from None
    if not isinstance(data, list | tuple) or len(data) != 3:
        raise BadMessage("invalid_message", f"body is not [args, kwargs, embed]: {_short(data)}")
    args, kwargs, embed = data
    if not isinstance(args, list | tuple):
        raise BadMessage("invalid_message", f"args are not a list: {_short(args)}")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise BadMessage("invalid_message", f"kwargs are not a dict: {_short(kwargs)}")
    if embed is not None and not isinstance(embed, dict):
        raise BadMessage("invalid_message", f"embed is not a dict: {_short(embed)}")
    return list(args), kwargs, embed or {}


def protocol_one(
    body: Any, content_type: str | None, encoding: str | None, accept: set[str]
) -> bool:
    """Whether a header-less message is a well-formed Celery protocol 1 task message."""
    try:
        data = serialization.loads(body, content_type, encoding, accept=accept)  # type: ignore[no-untyped-call]
    except Exception:
        return False
    return (
        isinstance(data, dict)
        and isinstance(data.get("task"), str)
        and isinstance(data.get("id"), str)
        and isinstance(data.get("args", []), list | tuple)
        and isinstance(data.get("kwargs", {}), dict)
    )


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."


def raw_record(
    worker: str,
    headers: Any,
    body: Any,
    content_type: Any = None,
    content_encoding: Any = None,
    delivery_info: Any = None,
) -> TaskRecord:
    """A DLQ-able record of any message, however malformed: raw body bytes, headers kept as
    far as they are a dict (so a malformed ``id`` stays readable in the entry). Only a
    well-formed ``id`` becomes the record's task id: a malformed one must not mark a good
    message with the same id as done."""
    if not isinstance(headers, dict):
        headers = {} if headers is None else {"rl_raw_headers": _short(headers)}
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode("utf-8", "surrogateescape")
    elif not isinstance(body, bytes | bytearray | memoryview):
        body = repr(body).encode()
    info = delivery_info if isinstance(delivery_info, dict) else {}
    task_id, task_name = headers.get("id"), headers.get("task")
    return TaskRecord(
        task_id=task_id if isinstance(task_id, str) and task_id else f"invalid-{uuid.uuid4()}",
        task_name=task_name if isinstance(task_name, str) and task_name else "<unknown>",
        body=bytes(body),
        content_type=content_type if isinstance(content_type, str) else None,
        content_encoding=content_encoding if isinstance(content_encoding, str) else None,
        headers=dict(headers),
        properties={},
        exchange=str(info.get("exchange") or ""),
        routing_key=str(info.get("routing_key") or ""),
        worker=worker,
    )


def raw_record_of(message: Any, worker: str) -> TaskRecord:
    """:func:`raw_record` of a kombu message."""
    return raw_record(
        worker,
        message.headers,
        message.body,
        message.content_type,
        message.content_encoding,
        message.delivery_info,
    )
