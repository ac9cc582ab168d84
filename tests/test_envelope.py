"""The message envelope (header checks, body decoding, schema versions and migrations) and the
schema header stamped at publish time."""

from __future__ import annotations

import json

import pytest
import redis
from celery import Celery
from hypothesis import given, settings
from hypothesis import strategies as st

from relier_celery.core.config import RelierConfig
from relier_celery.core.errors import ConfigError
from relier_celery.recovery import envelope, schema
from relier_celery.recovery.envelope import BadMessage, check_headers, decode_body
from relier_celery.wiring.task_options import validate_task_options

JSON = {"application/json"}
GOOD = {"id": "t1", "task": "shop.charge", "retries": 0, "eta": None, "timelimit": [None, None]}


def test_well_formed_headers_pass() -> None:
    check_headers(GOOD)
    check_headers({**GOOD, "eta": "2026-11-27T10:00:00+00:00", "relier_schema": 3})


@pytest.mark.parametrize(
    "bad",
    [
        {"id": None},
        {"id": ""},
        {"task": 42},
        {"retries": "3"},
        {"retries": -1},
        {"retries": True},
        {"eta": "tomorrow"},
        {"expires": 12},
        {"timelimit": [1]},
        {"timelimit": "10"},
        {"root_id": ["x"]},
        {"stamps": "x"},
        {"relier_schema": 0},
        {"relier_schema": "2"},
    ],
)
def test_malformed_headers_are_refused_with_the_header_named(bad) -> None:
    with pytest.raises(BadMessage, match=repr(next(iter(bad)))) as caught:
        check_headers({**GOOD, **bad})
    assert caught.value.reason == "invalid_message"


def test_a_body_decodes_as_celery_will() -> None:
    body = json.dumps([[1, "a"], {"k": 2}, {"callbacks": None}]).encode()
    assert decode_body(body, "application/json", "utf-8", JSON) == (
        [1, "a"],
        {"k": 2},
        {"callbacks": None},
    )


@pytest.mark.parametrize(
    "body, ctype, reason",
    [
        (b"\xff\x00garbage", "application/json", "undecodable"),
        (b"[1, 2", "application/json", "undecodable"),
        (b"\x80\x04K\x01.", "application/x-python-serialize", "undecodable"),  # not accepted
        (b'{"args": []}', "application/json", "invalid_message"),
        (b"[[], {}]", "application/json", "invalid_message"),
        (b"[{}, {}, {}]", "application/json", "invalid_message"),
        (b"[[], [], {}]", "application/json", "invalid_message"),
        (b"[[], {}, 7]", "application/json", "invalid_message"),
    ],
)
def test_a_body_celery_could_not_run_is_refused(body, ctype, reason) -> None:
    with pytest.raises(BadMessage) as caught:
        decode_body(body, ctype, "utf-8", JSON)
    assert caught.value.reason == reason


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=64), ctype=st.sampled_from(["application/json", "text/plain", ""]))
def test_no_body_makes_decoding_raise_anything_but_bad_message(body, ctype) -> None:
    # Property: whatever the bytes, the answer is (args, kwargs, embed) or BadMessage.
    try:
        args, kwargs, embed = decode_body(body, ctype, "utf-8", JSON)
    except BadMessage:
        return
    assert isinstance(args, list) and isinstance(kwargs, dict) and isinstance(embed, dict)


def test_protocol_one_is_recognised() -> None:
    body = json.dumps({"task": "t", "id": "1", "args": [], "kwargs": {}}).encode()
    assert envelope.protocol_one(body, "application/json", "utf-8", JSON)
    assert not envelope.protocol_one(b"[]", "application/json", "utf-8", JSON)


# -- schema versions --------------------------------------------------------------------
@pytest.fixture
def clean_migrations():
    saved = dict(schema._migrations)
    schema._migrations.clear()
    yield
    schema._migrations.clear()
    schema._migrations.update(saved)


def _app(version: int | None) -> Celery:
    app = Celery("schema_app", set_as_current=False)
    options = {} if version is None else {"schema_version": version}

    @app.task(name="shop.order", shared=False, **options)
    def order(order_id, amount, currency, note) -> None: ...

    return app


def test_migrations_run_in_order_up_to_the_workers_version(clean_migrations) -> None:
    @schema.migration("shop.order", from_version=1)
    def add_currency(args, kwargs):
        return [*args, "EUR"], kwargs

    @schema.migration("shop.order", from_version=2)
    def add_note(args, kwargs):
        return args, {**kwargs, "note": ""}

    schema.check_migrations(_app(3))
    assert schema.migrate("shop.order", 1, 3, [7, 9.5], {}) == ([7, 9.5, "EUR"], {"note": ""})
    assert schema.migrate("shop.order", 2, 3, [7, 9.5, "USD"], {}) == (
        [7, 9.5, "USD"],
        {"note": ""},
    )


def test_a_gap_in_the_migration_chain_stops_the_worker(clean_migrations) -> None:
    @schema.migration("shop.order", from_version=2)
    def add_note(args, kwargs):
        return args, kwargs

    with pytest.raises(ConfigError, match=r"no migration from version\(s\) \[1\]"):
        schema.check_migrations(_app(3))
    with pytest.raises(ConfigError, match="has a migration from version 2"):
        schema.check_migrations(_app(1))


def test_bad_migration_registrations_are_refused(clean_migrations) -> None:
    with pytest.raises(ConfigError, match="from_version must be an integer >= 1"):
        schema.migration("shop.order", from_version=0)
    schema.migration("shop.order", 1)(lambda a, k: (a, k))
    with pytest.raises(ConfigError, match="two migrations"):
        schema.migration("shop.order", 1)(lambda a, k: (a, k))


@pytest.mark.parametrize("bad", [0, -1, "2", 1.5, True])
def test_a_bad_schema_version_option_stops_the_worker(bad) -> None:
    with pytest.raises(ConfigError, match="schema_version must be an integer >= 1"):
        validate_task_options(_app(bad))


def test_new_settings_are_validated() -> None:
    base = {"relier_redis_url": "redis://x"}
    with pytest.raises(ConfigError, match="relier_schema_max_requeues must be 0 or more"):
        RelierConfig.from_mapping({**base, "relier_schema_max_requeues": -1})
    with pytest.raises(ConfigError, match="relier_dlq_retention must be above 0"):
        RelierConfig.from_mapping({**base, "relier_dlq_retention": 0})
    with pytest.raises(ConfigError, match="relier_dlq_on_failure must be True or False"):
        RelierConfig.from_mapping({**base, "relier_dlq_on_failure": "yes"})


class _Message:
    def __init__(self, body: bytes) -> None:
        self.body = body
        self.content_type = "application/json"
        self.content_encoding = "utf-8"
        self.headers = {"relier_schema": 1}


def test_a_migrated_body_is_rewritten_in_its_own_serializer() -> None:
    message = _Message(json.dumps([[1], {}, {}]).encode())
    schema.rewrite_body(message, [1, "EUR"], {"x": 1}, {}, 2)
    assert decode_body(message.body, message.content_type, message.content_encoding, JSON) == (
        [1, "EUR"],
        {"x": 1},
        {},
    )
    assert message.headers["relier_schema"] == 2


def test_every_published_task_carries_its_schema_version(redis_url: str) -> None:
    # Given an app whose task is at schema 2, publishing to a real Redis broker
    app = Celery("pub_app", broker=redis_url, set_as_current=True)
    app.conf.imports = ("relier_celery",)

    @app.task(name="shop.v2", shared=False, schema_version=2)
    def v2() -> None: ...

    @app.task(name="shop.v1", shared=False)
    def v1() -> None: ...

    # When both are dispatched (an explicit header wins)
    app.tasks["shop.v2"].apply_async()
    app.tasks["shop.v1"].apply_async()
    app.tasks["shop.v2"].apply_async(headers={"relier_schema": 5})
    # Then each message carries its task's version
    raw = redis.Redis.from_url(redis_url).lrange("celery", 0, -1)
    versions = sorted(json.loads(m)["headers"]["relier_schema"] for m in raw)
    assert versions == [1, 2, 5]
