"""Each Lua script, against a real spawned redis-server."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
import redis
from hypothesis import given, settings
from hypothesis import strategies as st

from relier_celery.core.errors import StoreUnavailable
from relier_celery.core.keys import Keys
from relier_celery.core.record import Generation
from relier_celery.store.client import Store
from relier_celery.testing import RedisServer, free_port

G0 = Generation(0, 0)


def test_receipt_records_then_drops_a_second_delivery_of_the_same_generation(
    store: Store, client: redis.Redis
):
    # Given a delivery recorded by worker A
    assert store.record("t1", "A", G0, "rec").recorded
    # When the broker delivers the same message again (to anyone)
    again = store.record("t1", "B", G0, "rec")
    # Then it is a duplicate of the held delivery, and only A holds a record
    assert not again.recorded and again.reason == "held" and again.detail.startswith("A|")
    assert client.hgetall(store.keys.held("A")) == {"t1|0|0": "rec"}
    assert client.hlen(store.keys.held("B")) == 0


def test_a_retry_or_a_resurrection_is_newer_and_runs(store: Store) -> None:
    assert store.record("t1", "A", G0, "rec").recorded
    assert store.record("t1", "B", Generation(0, 1), "rec").recorded  # resurrected
    assert store.record("t1", "C", Generation(1, 0), "rec").recorded  # Celery retry
    assert not store.record("t1", "D", Generation(0, 5), "rec").recorded  # older than retry 1


def test_complete_removes_the_record_and_remembers_the_generation(
    store: Store, client: redis.Redis
) -> None:
    store.record("t1", "A", G0, "rec")
    assert store.complete("t1", "A", G0, done_ttl=60)
    assert client.hlen(store.keys.held("A")) == 0
    assert client.hget(store.keys.owners, "t1") is None
    # A late broker redelivery of the finished delivery is a duplicate
    late = store.record("t1", "B", G0, "rec")
    assert not late.recorded and late.reason == "done"
    assert 0 < client.pttl(store.keys.done("t1")) <= 60_000


def test_complete_keeps_the_owner_entry_of_a_newer_delivery(
    store: Store, client: redis.Redis
) -> None:
    # Given a retry received elsewhere before the first delivery finished
    store.record("t1", "A", G0, "rec")
    store.record("t1", "B", Generation(1, 0), "rec")
    # When the first delivery completes
    store.complete("t1", "A", G0, done_ttl=60)
    # Then the retry stays held by B
    assert client.hget(store.keys.owners, "t1") == "B|1|0"
    assert client.hlen(store.keys.held("B")) == 1


def test_done_record_only_moves_forward(store: Store, client: redis.Redis) -> None:
    store.record("t1", "A", Generation(1, 0), "rec")
    store.complete("t1", "A", Generation(1, 0), done_ttl=60)
    store.complete("t1", "A", G0, done_ttl=60)
    assert client.get(store.keys.done("t1")) == "1|0"


def test_a_requeued_delivery_is_not_a_duplicate_when_it_comes_back(store: Store) -> None:
    store.record("t1", "A", G0, "rec")
    store.complete("t1", "A", G0, done_ttl=60)
    store.complete("t1", "A", G0, done_ttl=60, finished=False)  # Reject(requeue=True)
    assert store.record("t1", "B", G0, "rec").recorded


def test_lease_renew_reports_a_lease_that_had_run_out(store: Store) -> None:
    prev, now = store.renew_lease("A", ttl=0.05)
    assert prev == -1
    time.sleep(0.1)
    prev, now = store.renew_lease("A", ttl=5)
    assert prev < now  # it had expired
    prev, now = store.renew_lease("A", ttl=5)
    assert prev > now


def test_expired_workers_uses_the_server_clock(store: Store) -> None:
    store.renew_lease("dead", ttl=0.01)
    store.renew_lease("alive", ttl=30)
    time.sleep(0.05)
    assert list(store.expired_leases()) == ["dead"]


def test_claim_refuses_a_live_worker_and_a_claimed_one(store: Store) -> None:
    store.renew_lease("A", ttl=30)
    store.record("t1", "A", G0, "rec")
    assert store.claim(["A"], "s1", ttl=10) == {}
    store.renew_lease("A", ttl=0.01)
    time.sleep(0.05)
    assert store.claim(["A"], "s1", ttl=10) == {"A": {"t1|0|0": "rec"}}
    assert store.claim(["A"], "s2", ttl=10) == {}  # s1 holds the claim


def test_an_expired_claim_is_taken_again(store: Store) -> None:
    store.renew_lease("A", ttl=0.01)
    store.record("t1", "A", G0, "rec")
    time.sleep(0.05)
    assert store.claim(["A"], "s1", ttl=0.05)
    time.sleep(0.1)  # s1 died without finishing
    assert store.claim(["A"], "s2", ttl=10) == {"A": {"t1|0|0": "rec"}}


def test_claim_finish_forgets_an_emptied_dead_worker(store: Store, client: redis.Redis) -> None:
    store.renew_lease("A", ttl=0.01)
    store.record("t1", "A", G0, "rec")
    time.sleep(0.05)
    store.claim(["A"], "s1", ttl=10)
    store.take({"A": ["t1|0|0"]})
    assert store.claim_finish(["A"], "s1") == {"A": 0}
    assert client.zscore(store.keys.leases, "A") is None
    assert not client.exists(store.keys.claim("A"))


def test_racing_claims_hand_each_record_to_exactly_one_scanner(store: Store) -> None:
    # Given a dead worker holding 50 records
    store.renew_lease("A", ttl=0.01)
    for i in range(50):
        store.record(f"t{i}", "A", G0, "rec")
    time.sleep(0.05)
    # When 8 scanners claim it at the same moment
    results: list[dict[str, str]] = []
    barrier = threading.Barrier(8)

    def scan(n: int) -> None:
        s = Store(store.url, store.keys)
        barrier.wait()
        results.append(s.claim(["A"], f"s{n}", ttl=10).get("A", {}))

    threads = [threading.Thread(target=scan, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # Then exactly one got them all
    assert sorted(len(r) for r in results) == [0] * 7 + [50]


def test_retire_forgets_an_empty_worker_and_expires_one_with_records(
    store: Store, client: redis.Redis
) -> None:
    store.renew_lease("A", ttl=30)
    assert store.retire("A") == 0
    assert client.zscore(store.keys.leases, "A") is None
    store.renew_lease("B", ttl=30)
    store.record("t1", "B", G0, "rec")
    assert store.retire("B") == 1
    assert list(store.expired_leases()) == ["B"]


def test_dlq_put_writes_the_entry_and_drops_the_record_together(
    store: Store, client: redis.Redis
) -> None:
    store.record("t1", "A", G0, "rec")
    store.dlq_put("e1", '{"x":1}', 1000, "t1", G0, 60, worker="A", field="t1|0|0")
    assert client.hget(store.keys.dlq, "e1") == '{"x":1}'
    assert client.zscore(store.keys.dlq_index, "e1") == 1000
    assert client.hlen(store.keys.held("A")) == 0
    assert client.ttl(store.keys.dlq) == -1  # never expires by itself
    assert client.hget(store.keys.owners, "t1") is None
    assert not store.record("t1", "B", G0, "rec").recorded  # a late copy is a duplicate


def test_scripts_are_reloaded_after_script_flush(store: Store, client: redis.Redis) -> None:
    # Given scripts loaded by SHA, When Redis forgets them (restart, SCRIPT FLUSH)
    store.record("t1", "A", G0, "rec")
    client.script_flush()
    # Then the next call reloads and succeeds
    assert store.record("t2", "A", G0, "rec").recorded


def test_every_script_call_goes_by_sha(store: Store, client: redis.Redis) -> None:
    store.record("warm", "A", G0, "rec")
    client.config_resetstat()
    for i in range(20):
        store.record(f"t{i}", "A", G0, "rec")
    stats = client.info("commandstats")
    assert stats.get("cmdstat_evalsha", {}).get("calls") == 20
    assert "cmdstat_eval" not in stats


def test_self_check_warns_about_eviction_and_missing_aof(store: Store, client: redis.Redis) -> None:
    client.config_set("maxmemory-policy", "allkeys-lru")
    try:
        warnings = store.self_check()
    finally:
        client.config_set("maxmemory-policy", "noeviction")
    assert any("maxmemory-policy is 'allkeys-lru'" in w for w in warnings)
    assert any("appendonly" in w for w in warnings)


gens = st.tuples(st.integers(0, 5), st.integers(0, 5)).map(lambda t: Generation(*t))


@settings(max_examples=60, deadline=None)
@given(deliveries=st.lists(gens, min_size=1, max_size=8))
def test_only_strictly_newer_deliveries_are_recorded(redis_server, deliveries) -> None:
    # Property: a delivery runs iff it is newer than every delivery recorded before it.
    redis.Redis.from_url(redis_server.url).flushall()
    s = Store(redis_server.url, Keys("rl"))
    newest: Generation | None = None
    for n, gen in enumerate(deliveries):
        recorded = s.record("t", f"w{n}", gen, "rec").recorded
        assert recorded == (newest is None or gen > newest)
        if recorded:
            newest = gen


def _servers() -> list[str]:
    """The bundled Redis 6 and, when installed, the system's Redis 7: they report a refused
    write differently (inside a message vs as its own exception class)."""
    found = shutil.which("redis-server")
    return ["bundled", found] if found else ["bundled"]


@pytest.mark.parametrize("binary", _servers())
def test_a_full_or_read_only_redis_means_not_recorded_never_done(binary: str, store) -> None:
    server = None
    if binary != "bundled":
        server = RedisServer(binary=binary)
        server.start()
        store = Store(server.url, Keys("rl"))
    client = redis.Redis.from_url(store.url)
    try:
        store.record("warm", "A", G0, "rec")
        # Given a Redis out of memory under noeviction
        client.config_set("maxmemory", 1)
        # When relier tries to record, Then it is told the store is unavailable (the message
        # is parked with the broker), not that it succeeded or crashed
        with pytest.raises(StoreUnavailable, match="refused the write"):
            store.record("t1", "A", G0, "rec" * 1000)
        client.config_set("maxmemory", 0)
        # Given a replica (read-only), the same
        client.replicaof("127.0.0.1", free_port())
        with pytest.raises(StoreUnavailable, match="refused the write"):
            store.record("t2", "A", G0, "rec")
    finally:
        client.config_set("maxmemory", 0)
        client.replicaof("NO", "ONE")
        if server is not None:
            server.stop()
