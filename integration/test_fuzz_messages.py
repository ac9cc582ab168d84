"""Fuzzing a real worker with malformed messages (hypothesis): whatever arrives, the worker
goes on serving, and every message runs or lands in relier's DLQ.

Deterministic in CI (derandomized, no example database, no shrinking against a live worker).
To hunt for new cases locally, raise ``RELIER_FUZZ_EXAMPLES``; a case found goes into
test_malformed_messages.py as an explicit regression test.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import redis
from fleet import dlq_entries
from fuzz_messages import (
    PROBE_ENV,
    Malformed,
    assert_serving,
    holds_raw,
    leftovers,
    malformed_messages,
    outcome,
    publish,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kombu import Connection

from relier_celery.core.keys import Keys
from relier_celery.testing import WorkerProcess

EXAMPLES = int(os.environ.get("RELIER_FUZZ_EXAMPLES", "3"))
BATCH = 15  # messages per example, then a canary
SETTLE = 8.0  # seconds for a batch to run or reach the DLQ after the canary ran


def unaccounted(client: redis.Redis, batch: list[Malformed], w: WorkerProcess) -> list[Malformed]:
    """The messages of ``batch`` that neither ran nor reached the DLQ. Messages without a
    usable id are matched by count against DLQ entries and runs no id'd message explains,
    and against the duplicates relier dropped (odd ids such as ``None`` repeat; counted over the
    whole worker log, so generously)."""
    missing = [m for m in batch if outcome(client, m) is None]
    known = {repr(m.task_id) for m in batch} | {str(m.task_id) for m in batch}
    spare = sum(
        str(json.loads(raw).get("task_id")) not in known for raw in client.hvals(Keys("rl").dlq)
    )
    spare += sum(
        raw.decode() not in known and not raw.decode().startswith("'canary")
        for raw in client.lrange("test:ran", 0, -1)
    )
    spare += w.log().count("task.duplicate_dropped")
    return missing[spare:]


@pytest.mark.timeout(90)
def test_fuzzed_malformed_messages_run_or_land_in_the_dlq(fleet, redis_url):
    client = redis.Redis.from_url(redis_url)
    w = fleet.start(concurrency=2, **PROBE_ENV)
    canaries = iter(range(10_000, 20_000))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(
        batch=st.lists(malformed_messages(), min_size=BATCH, max_size=BATCH),
        via_producer=st.booleans(),
    )
    def a_batch_runs_or_lands_in_the_dlq(batch: list[Malformed], via_producer: bool) -> None:
        keys = Keys("rl")
        client.delete(keys.dlq, keys.dlq_index, "test:ran")
        # When a batch of malformed messages arrives
        with Connection(redis_url) as conn:
            ways = [publish(client, conn, m, via_producer) for m in batch]
        # Then a canary still runs, the worker neither died nor restarted its consumer
        assert_serving(w, client, next(canaries))
        # And every message ran or is in the DLQ; nothing is left queued, unacked or held
        left = wait_accounted(client, batch, w)
        assert not left, (
            "vanished:\n"
            + "\n".join(f"{m!r}"[:400] for m in left[:5])
            + f"\n(published {ways})\n{w.log()[-3000:]}"
        )
        assert leftovers(client) == {"queue": 0, "unacked": 0, "held": 0}, w.log()[-3000:]
        # And every DLQ entry keeps the raw bytes of the message it stands for
        for entry in dlq_entries(client):
            assert any(holds_raw(entry, m) for m in batch), f"no raw message in {entry}"

    a_batch_runs_or_lands_in_the_dlq()


def wait_accounted(client: redis.Redis, batch: list[Malformed], w: WorkerProcess) -> list:
    """Wait up to SETTLE seconds for every message of ``batch`` to be accounted for; return
    the ones that are not."""
    deadline = time.monotonic() + SETTLE
    left = unaccounted(client, batch, w)
    while left and time.monotonic() < deadline:
        time.sleep(0.25)
        left = unaccounted(client, batch, w)
    return left
