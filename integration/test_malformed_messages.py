"""Regression tests: one malformed message each, found by the fuzzer (test_fuzz_messages.py).

Whatever the headers, body bytes, content type or transport envelope, the message runs (a
failure result is fine) or lands in relier's DLQ, and the worker goes on serving: no crash, no
consumer restart, nothing left in the queue, in kombu's unacked hash or in relier's held
records.

Each case's ``celery_alone`` says what Celery and kombu 5.7 do with it without relier (found
by the fuzzer, read in their code and seen on a live worker), and so which of relier's checks
catches it: envelope.py (headers and body, before Celery sees a message), kombu_guard.py (raw
envelopes, before kombu parses them) or consumer_hooks.py (what Celery's handlers would drop). See
docs/malformed-messages.md for the whole catalog.

One worker serves every case (a fresh one only if a case killed it), so the whole file runs in
well under a minute.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fleet import Fleet, dlq_entries
from fuzz_messages import (
    MISSING,
    PICKLE,
    PROBE_ENV,
    Malformed,
    assert_serving,
    holds_raw,
    leftovers,
    outcome,
    publish,
    task_body,
    task_headers,
)
from kombu import Connection

from relier_celery.core.keys import Keys
from relier_celery.testing import RedisServer, wait_for

# Code paths, named once; the cases' celery_alone texts refer to them.
CRASH = (
    "WORKER DIES: {exc} escapes into kombu's hub loop; Celery's Consumer.start only retries "
    "connection/channel errors, so WorkController.start logs 'Unrecoverable error' and exits. "
)
CRASH_LOST = CRASH + (
    "Raised inside kombu's Redis channel after BRPOP popped the envelope and before QoS.append "
    "wrote it to the unacked hash: the message is LOST, before relier's receive."
)
CRASH_POISON = CRASH + (
    "Raised after relier's receive (recorded) and after QoS.append: the warm shutdown restores "
    "it to the queue, so it kills the next worker too."
)
RESTART_LOST = (
    "CONSUMER RESTART: KeyError({key!r}) inside kombu's Redis channel; kombu's Redis transport "
    "counts KeyError as a connection error, so Celery reconnects. Popped before QoS.append: "
    "the message is LOST, before relier's receive."
)
DECODE_LOST = (
    "SILENT LOSS: {where} -> Consumer.on_decode_error acks it and logs CRITICAL 'Can't decode "
    "message body'; no DLQ. {when}"
)
UNKNOWN_LOST = (
    "SILENT LOSS: headers without 'task' -> Celery tries protocol 1, the body is no dict with "
    "'task' -> on_unknown_message rejects (acks) it, 'Received and deleted unknown message'; "
    "relier's receive let it through unrecorded (not protocol 2)."
)


def case(
    label: str, m: Malformed | str, via: str = "producer", celery_alone: str | None = None
) -> Any:
    return pytest.param(m, via, id=label)


def hdrs(**changes: object) -> dict:
    """Celery's headers with fields replaced (``MISSING`` removes one)."""
    h = task_headers()
    for name, value in changes.items():
        if value is MISSING:
            h.pop(name)
        else:
            h[name] = value
    return h


GOOD = task_body((1000, 0))
CASES = [
    # -- broken transport envelopes (LPUSHed straight into the list) ----------------------
    case("envelope_not_json", "not json", "envelope", CRASH_LOST.format(exc="JSONDecodeError")),
    case("envelope_json_null", "null", "envelope", CRASH_LOST.format(exc="TypeError")),
    case("envelope_json_list", "[1, 2]", "envelope", CRASH_LOST.format(exc="TypeError")),
    case(
        "envelope_without_properties",
        Malformed(body=GOOD, properties=MISSING),
        "envelope",
        RESTART_LOST.format(key="properties"),
    ),
    case(
        "envelope_without_delivery_tag",
        Malformed(body=GOOD, properties={"delivery_info": {"exchange": "", "routing_key": "x"}}),
        "envelope",
        RESTART_LOST.format(key="delivery_tag"),
    ),
    case(
        "envelope_without_delivery_info",
        Malformed(body=GOOD, properties={"delivery_tag": "t1", "body_encoding": "base64"}),
        "envelope",
        RESTART_LOST.format(key="exchange") + " (raised by the Redis QoS.append itself)",
    ),
    case(
        "envelope_body_not_base64",
        Malformed(body="%%% not base64", encode_body=False),
        "envelope",
        CRASH_LOST.format(exc="binascii.Error (Channel.decode_body)"),
    ),
    case(
        "envelope_body_not_a_string",
        Malformed(body=5, encode_body=False),
        "envelope",
        CRASH_LOST.format(exc="TypeError (Channel.decode_body)"),
    ),
    case(
        "envelope_unknown_body_encoding",
        Malformed(body=GOOD, body_encoding="bogus"),
        "envelope",
        CRASH_LOST.format(exc="AttributeError (codecs.get(...) is None in decode_body)"),
    ),
    case(
        "envelope_headers_a_list",
        Malformed(body=GOOD, headers=[1, 2]),
        "envelope",
        CRASH_LOST.format(exc="AttributeError (kombu Message.__init__: headers.get)"),
    ),
    case(
        "envelope_headers_a_string",
        Malformed(body=GOOD, headers="abc"),
        "envelope",
        CRASH_LOST.format(exc="AttributeError (kombu Message.__init__: headers.get)"),
    ),
    case(
        "envelope_without_headers", Malformed(body=GOOD, headers=MISSING), "envelope", UNKNOWN_LOST
    ),
    case(
        "envelope_content_type_a_list",
        Malformed(body=GOOD, content_type=["application/json"]),
        "envelope",
        CRASH_POISON.format(exc="TypeError (unhashable, kombu loads' accept check)"),
    ),
    case(
        "envelope_content_type_empty",
        Malformed(body=GOOD, content_type=""),
        "envelope",
        CRASH_POISON.format(exc="ValueError (no content type = raw data; Request unpacks a str)"),
    ),
    case("envelope_content_type_an_int", Malformed(body=GOOD, content_type=5), "envelope"),
    case(
        "envelope_content_type_null",
        Malformed(body=GOOD, content_type=None),
        "envelope",
        CRASH_POISON.format(exc="ValueError (no content type = raw data; Request unpacks it)"),
    ),
    case(
        "envelope_content_encoding_an_int",
        Malformed(body=GOOD, content_encoding=5),
        "envelope",
        CRASH_POISON.format(exc="AttributeError (kombu loads: content_encoding.lower())"),
    ),
    case(
        "envelope_properties_a_list",
        Malformed(body=GOOD, properties=[1]),
        "envelope",
        CRASH_LOST.format(exc="AttributeError (virtual Message.__init__: properties.get)"),
    ),
    case(
        "envelope_delivery_info_a_list",
        Malformed(body=GOOD, properties={"delivery_tag": "t", "delivery_info": [1]}),
        "envelope",
        CRASH_LOST.format(exc="TypeError (Redis QoS.append: delivery['exchange'])"),
    ),
    case(
        "envelope_delivery_tag_a_list",
        Malformed(
            body=GOOD,
            properties={"delivery_tag": [1], "delivery_info": {"exchange": "", "routing_key": "x"}},
        ),
        "envelope",
        CRASH_LOST.format(exc="TypeError (Redis QoS.append: unhashable delivery tag)"),
    ),
    # -- headers ---------------------------------------------------------------------------
    case(
        "headers_without_id",
        Malformed(body=GOOD, headers=hdrs(id=MISSING)),
        celery_alone=(
            "RECONNECT LOOP: Request.__init__ reads headers['id'] -> KeyError, which kombu's "
            "Redis transport counts as a connection error: the consumer restarts, the channel "
            "restores the unacked message, it comes back, forever; the worker never serves "
            "again. Relier's receive let it through unrecorded (no 'id')."
        ),
    ),
    case(
        "headers_without_task",
        Malformed(body=GOOD, headers=hdrs(task=MISSING)),
        celery_alone=UNKNOWN_LOST,
    ),
    case(
        "headers_without_id_pickle",
        Malformed(body=GOOD, headers=hdrs(id=MISSING), content_type=PICKLE),
        celery_alone=(
            "SILENT LOSS: ContentDisallowed -> on_invalid_task rejects (deletes) it; relier's "
            "wrapper quarantines only what it recorded, and receive let it through unrecorded "
            "(no 'id')."
        ),
    ),
    case(
        "headers_task_a_list",
        Malformed(body=GOOD, headers=hdrs(task=["chaos.work"])),
        "envelope",
        CRASH_POISON.format(exc="TypeError (unhashable task name in strategies[...])")
        + " Relier also writes an unknown_task DLQ entry each time.",
    ),
    case(
        "headers_id_a_list",
        Malformed(body=GOOD, headers=hdrs(id=[1])),
        "envelope",
        CRASH_POISON.format(exc="TypeError (unhashable id, 'req.id in revoked')"),
    ),
    case(
        "headers_timelimit_a_string",
        Malformed(body=GOOD, headers=hdrs(timelimit="x")),
        celery_alone=CRASH_POISON.format(
            exc="ValueError (Request.execute_using_pool unpacks timelimit)"
        ),
    ),
    case(
        "headers_timelimit_three_items",
        Malformed(body=GOOD, headers=hdrs(timelimit=[1, 2, 3])),
        celery_alone=CRASH_POISON.format(
            exc="ValueError (Request.execute_using_pool unpacks timelimit)"
        ),
    ),
    case(
        "headers_timelimit_an_int",
        Malformed(body=GOOD, headers=hdrs(timelimit=5)),
        celery_alone=CRASH_POISON.format(
            exc="TypeError (Request.execute_using_pool unpacks timelimit)"
        ),
    ),
    case(
        "headers_bogus_compression",
        Malformed(body=GOOD, headers=hdrs(compression="bogus")),
        celery_alone=DECODE_LOST.format(
            where="kombu Message.__init__ fails to decompress, kombu Consumer._receive_callback "
            "sees message.errors",
            when="Before relier's receive: Celery's on_message is never called.",
        ),
    ),
    case("headers_unknown_task", Malformed(body=GOOD, headers=hdrs(task="no.such.task"))),
    case("headers_eta_not_a_date", Malformed(body=GOOD, headers=hdrs(eta="not a date"))),
    case("headers_eta_an_int", Malformed(body=GOOD, headers=hdrs(eta=5))),
    case("headers_expires_not_a_date", Malformed(body=GOOD, headers=hdrs(expires="garbage"))),
    case("headers_id_an_int", Malformed(body=GOOD, headers=hdrs(id=5))),
    case("headers_retries_a_string", Malformed(body=GOOD, headers=hdrs(retries="x"))),
    case("headers_odd_values", Malformed(body=GOOD, headers=hdrs(stamps=[1], group=[1]))),
    case(
        "headers_shadow_a_list",
        Malformed(body=GOOD, headers=hdrs(shadow=[1])),
        celery_alone=(
            "NEVER ACKED: it runs, but Request.on_accepted -> state.task_accepted counts "
            "{request.name: 1} with the unhashable shadow name -> TypeError in the pool's "
            "accept callback, before acknowledge(): the message stays in kombu's unacked hash "
            "and is redelivered after visibility_timeout (then dropped by relier as a "
            "duplicate, or run twice once completed_ttl has passed)."
        ),
    ),
    case(
        "headers_timelimit_strings",
        Malformed(body=GOOD, headers=hdrs(timelimit=["x", "y"])),
        celery_alone=CRASH_POISON.format(exc="ValueError (the pool's float(timelimit))"),
    ),
    # -- bodies ----------------------------------------------------------------------------
    case(
        "body_not_utf8",
        Malformed(body=b"\xff\xfe" + GOOD),
        celery_alone=DECODE_LOST.format(
            where="strategy reads message.payload -> DecodeError",
            when="After relier's receive, which recorded it: the held record leaks and is "
            "handed off (republished) at the next shutdown.",
        ),
    ),
    case(
        "body_truncated_json",
        Malformed(body=GOOD[:7]),
        celery_alone=DECODE_LOST.format(
            where="strategy reads message.payload -> DecodeError",
            when="After relier's receive (held record leaks).",
        ),
    ),
    case(
        "body_a_json_dict",
        Malformed(body=b'{"x": 1}'),
        celery_alone=CRASH_POISON.format(exc="ValueError (Request.__init__ unpacks the body)"),
    ),
    case(
        "body_a_2_list",
        Malformed(body=b"[[1000, 0], {}]"),
        celery_alone=CRASH_POISON.format(exc="ValueError (Request.__init__ unpacks the body)"),
    ),
    case(
        "body_json_null",
        Malformed(body=b"null"),
        celery_alone=CRASH_POISON.format(exc="TypeError (strategy: 'args' in None)"),
    ),
    case(
        "body_json_int",
        Malformed(body=b"5"),
        celery_alone=CRASH_POISON.format(exc="TypeError (strategy: 'args' in 5)"),
    ),
    case(
        "body_empty",
        Malformed(body=b""),
        celery_alone=CRASH_POISON.format(
            exc="TypeError (empty body is not decoded; 'args' in b'')"
        ),
    ),
    case(
        "body_raw_data_content_type",
        Malformed(body=GOOD, content_type="application/data"),
        celery_alone=CRASH_POISON.format(exc="ValueError (application/data is not decoded)"),
    ),
    case(
        "body_raw_data_bogus_encoding",
        Malformed(body=b"abc", content_type="application/data", content_encoding="bogus-8"),
        celery_alone=DECODE_LOST.format(
            where="kombu loads -> LookupError -> DecodeError", when="After relier's receive."
        ),
    ),
    case("body_kwargs_not_a_dict", Malformed(body=b"[[1000, 0], [1], {}]")),
    case("body_embed_not_a_dict", Malformed(body=b'[[1000, 0], {}, "x"]')),
    case("body_args_not_a_list", Malformed(body=b'["abc", {}, {}]')),
    case("body_a_json_string", Malformed(body=b'"args"')),
    case("body_a_3_char_json_string", Malformed(body=b'"abc"')),
    case(
        "body_a_2_char_json_string",
        Malformed(body=b'"ab"'),
        celery_alone=CRASH_POISON.format(exc="ValueError (Request.__init__ unpacks 'ab')"),
    ),
    case("body_protocol_1_dict", Malformed(body=b'{"args": [1000, 0], "kwargs": {}}')),
    case(
        "body_protocol_1_without_task",
        Malformed(body=b'{"args": [1000, 0]}', headers={}),
        celery_alone=UNKNOWN_LOST,
    ),
    case(
        "body_garbage_without_headers",
        Malformed(body=b"\xffgarbage", headers={}),
        celery_alone=DECODE_LOST.format(
            where="headers without 'task' -> protocol 1 decode -> DecodeError",
            when="Relier's receive let it through unrecorded.",
        ),
    ),
    # -- content types and encodings --------------------------------------------------------
    case("content_type_pickle", Malformed(body=GOOD, content_type=PICKLE)),
    case("content_type_yaml", Malformed(body=GOOD, content_type="application/x-yaml")),
    case("content_type_unknown", Malformed(body=GOOD, content_type="application/bogus")),
    case("content_encoding_bogus", Malformed(body=GOOD, content_encoding="bogus-8")),
    case("content_encoding_binary", Malformed(body=GOOD, content_encoding="binary")),
    case(
        "content_type_application_text",
        Malformed(body=GOOD, content_type="application/text"),
        celery_alone=CRASH_POISON.format(
            exc="ValueError (application/text is trusted by kombu, never decoded; "
            "Request unpacks the str)"
        ),
    ),
]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Fleet]]:
    server = RedisServer()
    url = server.start()
    fleet = Fleet(url, tmp_path_factory.mktemp("malformed"))
    yield url, fleet
    fleet.stop_all()
    server.stop()


_canaries = itertools.count(5000)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("message, via", CASES)
def test_a_malformed_message_runs_or_lands_in_the_dlq_and_the_worker_goes_on(shared, message, via):
    redis_url, fleet = shared
    client = redis.Redis.from_url(redis_url)
    keys = Keys("rl")
    client.delete(keys.dlq, keys.dlq_index, "test:ran", "test:done")
    # Given one worker (a new one if an earlier case killed it)
    if not fleet.alive():
        fleet.start(concurrency=1, **PROBE_ENV)
    w = fleet.alive()[-1]
    since = len(w.log())
    # When a malformed message arrives
    if isinstance(message, Malformed):
        with Connection(redis_url) as conn:
            publish(client, conn, message, via_producer=via == "producer")
    else:
        client.lpush("celery", message)
    # Then the worker still serves, without a crash or a consumer restart
    assert_serving(w, client, next(_canaries), since=since)

    # And the message ran or is in the DLQ
    def accounted() -> str | None:
        if isinstance(message, Malformed) and message.task_id is not None:
            return outcome(client, message)
        if dlq_entries(client):
            return "dlq"
        return "ran" if client.llen("test:ran") > 1 else None  # more than the canary

    def quarantined_raw() -> bool:
        return any(holds_raw(entry, message) for entry in dlq_entries(client))

    try:
        wait_for(accounted, 10, interval=0.2, what="the message to run or reach the DLQ")
    except TimeoutError:
        pytest.fail(f"the message vanished:\n{w.log()[since:][-3000:]}")
    # And a message in the DLQ is there with its raw bytes
    if accounted() == "dlq":
        assert quarantined_raw(), f"DLQ entries without the raw message: {dlq_entries(client)}"
    # And nothing is left behind
    assert leftovers(client) == {"queue": 0, "unacked": 0, "held": 0}, w.log()[since:][-3000:]
