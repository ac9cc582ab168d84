"""Malformed task messages, published straight into the broker around Celery's publisher.

Two ways in:

* ``publish_raw``: kombu's ``Producer.publish`` with the body bytes, content type, content
  encoding and headers given verbatim (kombu serializes nothing when a content type is set).
* ``push_envelope``: LPUSH a raw transport envelope onto the Redis list ``celery``. Kombu's
  Redis transport stores each message as a JSON object ``{body, content-encoding,
  content-type, headers, properties: {delivery_tag, delivery_info, body_encoding, ...}}``;
  this way the envelope itself can be malformed (not JSON, fields missing, wrong types).

``Malformed`` describes one message either way, and the hypothesis strategies at the bottom
generate them: odd headers, bodies of the wrong shape, content types Celery refuses, bogus
encodings, broken envelopes.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import redis
from hypothesis import strategies as st
from kombu import Connection

from relier_celery import testing
from relier_celery.core.keys import Keys
from relier_celery.testing import WorkerProcess, wait_for

__all__ = [
    "PROBE_ENV",
    "QUEUE",
    "Malformed",
    "assert_serving",
    "bodies",
    "consumer_trouble",
    "content_encodings",
    "content_types",
    "envelope",
    "headers",
    "holds_raw",
    "leftovers",
    "malformed_messages",
    "outcome",
    "publish",
    "publish_raw",
    "push_envelope",
    "task_body",
    "task_headers",
]

QUEUE = "celery"
JSON = "application/json"
PICKLE = "application/x-python-serialize"
MISSING = object()  # an envelope field left out altogether


def task_headers(task_id: str | None = None, task: str = "chaos.work", **extra: Any) -> dict:
    """Protocol 2 headers as Celery's publisher writes them."""
    return testing.task_headers(task_id, task, origin="fuzz@test", **extra)


def task_body(args: Any = (), kwargs: Any = None, embed: Any = None) -> bytes:
    """A protocol 2 JSON body: ``[args, kwargs, embed]``."""
    embed = (
        {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
        if embed is None
        else embed
    )
    return json.dumps([list(args), kwargs or {}, embed]).encode()


@dataclass
class Malformed:
    """One message to publish. ``raw`` (a whole transport envelope, str or bytes) wins over
    the other fields; ``MISSING`` leaves a field out of the envelope."""

    body: Any = b"[[], {}, {}]"
    content_type: Any = JSON
    content_encoding: Any = "utf-8"
    headers: Any = field(default_factory=task_headers)
    properties: Any = None
    body_encoding: Any = "base64"
    encode_body: bool = True  # False: ``body`` goes into the envelope verbatim
    raw: str | bytes | None = None
    label: str = ""

    def __repr__(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if v is not MISSING and k != "label"}
        return "Malformed(" + ", ".join(f"{k}={v!r:.200}" for k, v in fields.items()) + ")"

    @property
    def task_id(self) -> Any:
        return self.headers.get("id") if isinstance(self.headers, dict) else None


def envelope(m: Malformed) -> str | bytes:
    """The string kombu's Redis transport would store for ``m`` (or ``m.raw`` verbatim)."""
    if m.raw is not None:
        return m.raw
    body = m.body
    if m.encode_body and m.body_encoding == "base64" and isinstance(body, bytes | str):
        body = base64.b64encode(body.encode() if isinstance(body, str) else body).decode()
    elif isinstance(body, bytes):
        body = body.decode("latin-1")
    properties = m.properties
    if properties is None:
        properties = {
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": QUEUE},
            "priority": 0,
            "body_encoding": m.body_encoding,
            "delivery_tag": str(uuid.uuid4()),
        }
    data = {
        "body": body,
        "content-encoding": m.content_encoding,
        "content-type": m.content_type,
        "headers": m.headers,
        "properties": properties,
    }
    return json.dumps({k: v for k, v in data.items() if v is not MISSING}, default=repr)


def push_envelope(client: redis.Redis, m: Malformed | str | bytes, queue: str = QUEUE) -> None:
    """LPUSH a raw transport envelope onto ``queue`` (kombu BRPOPs from the right)."""
    client.lpush(queue, m if isinstance(m, str | bytes) else envelope(m))


def publish_raw(
    conn: Connection,
    body: bytes | str,
    *,
    content_type: str,
    content_encoding: str | None = None,
    headers: dict | None = None,
    queue: str = QUEUE,
    **properties: Any,
) -> None:
    """Publish through kombu's producer with nothing serialized by kombu or Celery (the
    content type must be non-empty, else kombu serializes the body itself)."""
    producer = conn.Producer(serializer="json")
    producer.publish(
        body,
        exchange="",
        routing_key=queue,
        content_type=content_type,
        content_encoding=content_encoding,
        headers=headers,
        declare=None,
        retry=False,
        **properties,
    )


def _producer_can_send(m: Malformed) -> bool:
    return (
        m.raw is None
        and m.properties is None
        and m.body_encoding == "base64"
        and m.encode_body
        and isinstance(m.body, bytes)
        and isinstance(m.content_type, str)
        and m.content_type != ""
        and (m.content_encoding is None or isinstance(m.content_encoding, str))
        and isinstance(m.headers, dict)
        and all(v is not MISSING for v in (m.content_type, m.content_encoding, m.headers))
    )


def publish(client: redis.Redis, conn: Connection, m: Malformed, via_producer: bool) -> str:
    """Publish ``m`` through kombu's producer when it can carry it, else as an envelope;
    return which way it went."""
    if via_producer and _producer_can_send(m):
        publish_raw(
            conn,
            m.body,
            content_type=m.content_type,
            content_encoding=m.content_encoding,
            headers=json.loads(json.dumps(m.headers, default=repr)),
        )
        return "producer"
    push_envelope(client, m)
    return "envelope"


# -- hypothesis strategies --------------------------------------------------------------------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
_odd = st.one_of(
    _scalars,
    st.lists(_scalars, max_size=3),
    st.dictionaries(st.text(max_size=5), _scalars, max_size=3),
    st.just("x" * 70_000),  # huge
    st.just([[[[["deep"]]]]]),
    st.sampled_from(["2026-13-45T99:99:99", "9999-12-31T23:59:59", "0001-01-01", "not a date"]),
)

# Header fields Celery or relier read, each with values of the wrong type or shape.
_FIELDS = (
    "id",
    "task",
    "retries",
    "eta",
    "expires",
    "timelimit",
    "argsrepr",
    "kwargsrepr",
    "root_id",
    "parent_id",
    "group",
    "shadow",
    "stamps",
    "ignore_result",
    "rl_resurrections",
    "rl_crashes",
    "relier_schema",
    "compression",
)
_specials: dict[str, st.SearchStrategy[Any]] = {
    "task": st.sampled_from(["chaos.work", "chaos.boom", "no.such.task", "", "chaos.work\x00"]),
    "timelimit": st.one_of(st.lists(_scalars, max_size=3), _odd),
    # Not a far-future date: that is a valid ETA, held unacked until it is due.
    "eta": st.one_of(
        st.sampled_from(["2000-01-01T00:00:00", "2026-13-45T99:99:99", "0001-01-01", "soon"]),
        _scalars,
        st.lists(_scalars, max_size=2),
    ),
    "compression": st.sampled_from(["zlib", "bogus", "application/x-gzip"]),
}


def _rarely(draw: st.DrawFn, n: int) -> bool:
    """True with probability 1/2**n, shrinking to False (hypothesis favours the edges of an
    integer range, so ``integers(0, 9) == 0`` would come up far more often than one in 10)."""
    return all(draw(st.booleans()) for _ in range(n))


@st.composite
def headers(draw: st.DrawFn) -> Any:
    """Celery's protocol 2 headers with a few fields removed or replaced by odd values; or
    no dict at all."""
    if _rarely(draw, 4):  # one in 16
        return draw(st.one_of(st.lists(_scalars, max_size=3), st.text(max_size=10), st.none()))
    h = task_headers()
    for name in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        if draw(st.booleans()):
            h.pop(name, None)
        else:
            h[name] = draw(_specials.get(name, _odd))
    return h


# Arguments for chaos.work(n, seconds=0.0, pad=""): right, missing, extra or of the wrong
# type, never a long sleep (the canary must not wait behind one).
_args = st.sampled_from([[7], [7, 0], [7, 0.01, "pad"], [], ["x"], [7, "x"], [7, 0, "", 1]])


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Body bytes: right or wrong shapes of ``[args, kwargs, embed]``, broken JSON, garbage."""
    kind = draw(st.sampled_from(["shape"] * 6 + ["garbage", "truncated", "not utf-8", "huge"]))
    if kind == "garbage":
        return draw(st.binary(max_size=64))  # garbage, often not UTF-8
    if kind == "truncated":
        good = task_body((draw(st.integers(10**6, 10**7)), 0))
        return good[: draw(st.integers(0, len(good) - 1))]  # truncated JSON
    if kind == "not utf-8":
        return b"\xff\xfe" + task_body()  # not UTF-8
    if kind == "huge":
        return task_body((0, 0, "x" * draw(st.sampled_from([10, 300_000]))))  # huge
    shape = draw(
        st.sampled_from(
            [
                [draw(_args), {}, {}],  # well-formed
                {"args": [], "kwargs": {}},  # a dict (Celery's protocol 1 shape)
                [[], {}],  # a 2-list
                ["not a list", {}, {}],  # args not a list
                [[], ["not", "a", "dict"], {}],  # kwargs not a dict
                [[], {}, "not a dict"],  # embed not a dict
                [[], {}, {"callbacks": "x", "chord": 5}],  # embed of odd values
                5,
                "a string",
                None,
            ]
        )
    )
    return json.dumps(shape).encode()


content_types = st.sampled_from(
    [JSON, JSON, PICKLE, "application/x-yaml", "text/plain", "", "application/bogus"]
)
content_encodings = st.sampled_from(["utf-8", "utf-8", "binary", "bogus-8", ""])


@st.composite
def malformed_messages(draw: st.DrawFn) -> Malformed:
    """A message with any mix of odd headers, body, content type and encoding; one in eight
    has a broken transport envelope as well."""
    m = Malformed(
        body=draw(bodies()),
        content_type=draw(content_types),
        content_encoding=draw(content_encodings),
        headers=draw(headers()),
    )
    if _rarely(draw, 3):  # one in 8
        which = draw(st.integers(0, 5))
        if which == 0:
            m.raw = draw(st.sampled_from(["not json", "", "[1, 2]", "null", '{"body": "x"']))
        elif which == 1:
            m.properties = draw(st.sampled_from([MISSING, {}, [], "x"]))
        elif which == 2:
            m.body_encoding = draw(st.sampled_from(["bogus", None, 5]))
        elif which == 3:
            m.headers = MISSING
        elif which == 4:
            m.content_type = draw(st.sampled_from([MISSING, None, 5, ["application/json"]]))
        else:
            m.body = draw(st.sampled_from(["%%% not base64", 5, None]))
            m.encode_body = False
    return m


# -- checks ------------------------------------------------------------------------------------

# Worker settings of these tests: fuzz_probe records what Celery did with each message.
PROBE_ENV = {"RELIER_TEST_CONF": json.dumps({"imports": ["relier_celery", "fuzz_probe"]})}

# A worker in trouble: its consumer restarted (Celery's reconnect), or it died.
_TROUBLE = re.compile(
    r"Connection to broker lost|Unrecoverable error|Frequent restarts|consumer restarted"
    r"|Restoring \d+ unacknowledged"
)


def consumer_trouble(log: str) -> list[str]:
    """The lines of a worker log showing a consumer restart or a crash."""
    return [line for line in log.splitlines() if _TROUBLE.search(line)]


def assert_serving(
    w: WorkerProcess, client: redis.Redis, n: int, timeout: float = 15, since: int = 0
) -> None:
    """A canary ``chaos.work(n)`` completes, and the worker neither died nor restarted its
    consumer on the way (in its log after offset ``since``)."""
    canary = Malformed(body=task_body((n, 0)), headers=task_headers(f"canary-{n}"))
    client.lpush(QUEUE, envelope(canary))
    with contextlib.suppress(TimeoutError):
        wait_for(
            lambda: str(n).encode() in client.smembers("test:done") or w.proc.poll() is not None,
            timeout,
            interval=0.1,
            what=f"canary {n}",
        )
    log = w.log()[since:]
    assert w.proc is not None and w.proc.poll() is None, f"the worker died:\n{log[-4000:]}"
    assert str(n).encode() in client.smembers("test:done"), f"canary {n} never ran:\n{log[-4000:]}"
    trouble = consumer_trouble(log)
    assert not trouble, "the consumer restarted:\n" + "\n".join(trouble[:10])


def outcome(client: redis.Redis, m: Malformed) -> str | None:
    """How ``m`` ended, as far as Redis tells: ``ran`` (its task ran, or Celery failed it and
    relier saw the final state), ``dlq``, or None. Matches by task id, so only for messages
    with a distinct id."""
    keys = Keys("rl")
    task_id = m.task_id
    if task_id is None:
        return None
    if repr(task_id).encode() in client.lrange("test:ran", 0, -1):
        return "ran"
    for raw in client.hvals(keys.dlq):
        entry = json.loads(raw)
        kept = (entry.get("message") or {}).get("headers") or {}
        if str(task_id) in (entry.get("task_id"), str(kept.get("id"))):
            return "dlq"
    if client.exists(keys.done(str(task_id))):
        return "ran"
    return None


def holds_raw(entry: dict[str, Any], m: Malformed | str | bytes) -> bool:
    """Whether a DLQ entry keeps the message's raw bytes: its body, or its whole transport
    envelope, verbatim or base64-encoded, in the entry or in the entry's stored body (which,
    for an envelope kombu could not read, is the raw envelope text)."""
    text = json.dumps(entry)
    stored = base64.b64decode((entry.get("message") or {}).get("body") or "")
    raws: list[Any] = [envelope(m) if isinstance(m, Malformed) else m]
    if isinstance(m, Malformed) and m.body is not MISSING:
        if m.body in (b"", "", None):
            return stored == b"" or any(r in stored for r in (b'"body": null', b'"body": ""'))
        raws.append(m.body)
    for raw in raws:
        if isinstance(raw, str):
            data = raw.encode()
        elif isinstance(raw, bytes):
            data = raw
        else:
            data = json.dumps(raw).encode()
        b64 = base64.b64encode(data)
        if b64.decode() in text or data in stored or b64 in stored:
            return True
        # As a string inside a JSON envelope (bytes bodies are written as latin-1 text)
        quoted = json.dumps(raw if isinstance(raw, str) else data.decode("latin-1"))[1:-1]
        if quoted and (quoted in text or quoted.encode() in stored):
            return True
    return False


def leftovers(client: redis.Redis, timeout: float = 5) -> dict[str, int]:
    """Wait for the queue, kombu's unacked hash and relier's held records to empty; return
    what is left in each."""
    keys = Keys("rl")

    def counts() -> dict[str, int]:
        held = sum(client.hlen(k) for k in client.scan_iter(keys.held("*")))
        return {"queue": client.llen(QUEUE), "unacked": client.hlen("unacked"), "held": held}

    deadline = time.monotonic() + timeout
    while any(counts().values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return counts()
