from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from relier_celery.core.headers import CRASHES_HEADER, RESURRECTIONS_HEADER
from relier_celery.core.keys import Keys
from relier_celery.core.record import Generation, TaskRecord

prefixes = st.from_regex(r"[A-Za-z0-9_.\-]{1,12}", fullmatch=True)
ids = st.text(min_size=1, max_size=40)


def _tag(key: str) -> str:
    """The Redis Cluster hash tag: the first {...} with something inside."""
    m = re.search(r"\{([^}]+)\}", key)
    assert m, key
    return m.group(1)


@given(prefix=prefixes, worker=ids, task_id=ids)
def test_every_key_shares_one_hash_tag_so_every_script_stays_in_one_slot(prefix, worker, task_id):
    k = Keys(prefix)
    keys = [
        k.leases,
        k.owners,
        k.held(worker),
        k.claim(worker),
        k.done(task_id),
        k.dlq,
        k.dlq_index,
        k.scan_stamp,
    ]
    assert {_tag(key) for key in keys} == {prefix}
    assert all(key.startswith(f"{prefix}:") for key in keys)


def test_key_layout_is_stable() -> None:
    k = Keys("rl")
    assert k.leases == "rl:{rl}:leases"
    assert k.held("w1") == "rl:{rl}:held:w1"
    assert k.done("abc") == "rl:{rl}:done:abc"


@given(
    a=st.tuples(st.integers(0, 9), st.integers(0, 9)),
    b=st.tuples(st.integers(0, 9), st.integers(0, 9)),
)
def test_generations_order_retries_first_then_resurrections(a, b):
    assert (Generation(*a) < Generation(*b)) == (a < b)


class _Msg:
    def __init__(self) -> None:
        self.headers = {"id": "t1", "task": "x.y", "retries": 2, "traceparent": "00-abc"}
        self.body = b"\x00binary\xff"
        self.content_type = "application/json"
        self.content_encoding = "utf-8"
        self.properties = {
            "correlation_id": "t1",
            "priority": 3,
            "delivery_tag": "tag",
            "delivery_info": {},
            "body_encoding": "base64",
        }
        self.delivery_info = {"exchange": "ex", "routing_key": "rk"}


def test_record_keeps_the_exact_message_and_drops_per_delivery_properties() -> None:
    rec = TaskRecord.from_message(_Msg(), "w1")
    back = TaskRecord.loads(rec.dumps())
    assert back == rec
    assert back.body == b"\x00binary\xff"
    assert back.properties == {"correlation_id": "t1", "priority": 3}
    assert (back.exchange, back.routing_key) == ("ex", "rk")
    assert back.generation == Generation(2, 0)


def test_next_generation_raises_only_the_resurrection_header() -> None:
    rec = TaskRecord.from_message(_Msg(), "w1")
    nxt = rec.next_generation(crash=True)
    assert nxt.headers[RESURRECTIONS_HEADER] == 1 and nxt.crashes == 1
    extra = {RESURRECTIONS_HEADER, CRASHES_HEADER}
    assert {k: v for k, v in nxt.headers.items() if k not in extra} == rec.headers
    assert RESURRECTIONS_HEADER not in rec.headers  # the original is not mutated
    assert nxt.body == rec.body


def test_a_hand_off_raises_the_generation_but_not_the_crash_count() -> None:
    rec = TaskRecord.from_message(_Msg(), "w1").next_generation(crash=True)
    handed = rec.next_generation(crash=False)
    assert handed.generation > rec.generation
    assert handed.crashes == rec.crashes == 1
