"""Issue 17: relier's state on a real 3-primary Redis Cluster, the broker on RabbitMQ. Real
workers SIGKILLed mid-run lose nothing (their tasks come back through the scanners' scripts on
the cluster), and relier's slot migrated to another primary while tasks run (ASK during the
move, MOVED after it, scripts loaded again on the new owner) loses nothing either."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fleet import Fleet, done, send_work, wait_all_done
from redis.crc import key_slot

from relier_celery.core.keys import Keys
from relier_celery.store.client import Store
from relier_celery.testing import wait_for
from relier_celery.testing.cluster import RedisClusterServer

pytestmark = pytest.mark.integration
SLOT = key_slot(b"rl")  # the hash tag {rl} of every relier key


@pytest.fixture
def cluster() -> Iterator[RedisClusterServer]:
    server = RedisClusterServer().start()
    yield server
    server.stop()


@pytest.fixture
def cluster_fleet(broker, cluster, redis_url: str, tmp_path: Path) -> Iterator[Fleet]:
    """Workers of chaos_app on RabbitMQ, relier's state on the cluster, the tasks' own
    execution counters on a plain Redis (``r``)."""
    f = Fleet(cluster.url, tmp_path)
    f.env.update(broker.env)
    f.env["RELIER_TEST_RESULTS"] = redis_url
    f.env["RELIER_TEST_CONF"] = json.dumps({"relier_redis_cluster": True})
    yield f
    f.stop_all()


def _held(store: Store) -> int:
    """Records held by any worker (every held key is in relier's one slot)."""
    owner = store.client.get_node_from_key(store.keys.leases)
    node = owner.redis_connection
    return sum(int(node.hlen(k)) for k in node.keys(store.keys.held("*")))


def _runs(r: redis.Redis, ns: range) -> list[int]:
    return [int(r.get(f"test:runs:{n}") or 0) for n in ns]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_sigkilled_workers_lose_nothing_with_state_on_a_cluster(
    broker, cluster, cluster_fleet, publisher, r
) -> None:
    # Given two workers on RabbitMQ (early acks: relier's record on the cluster is the only
    # copy of a task once it is delivered) and 40 tasks of 0.3 s
    store = Store(cluster.url, Keys("rl"), cluster=True)
    first = cluster_fleet.start(concurrency=2)
    cluster_fleet.start(concurrency=2)
    send_work(publisher, range(40), seconds=0.3)
    # When one is SIGKILLed mid-task, a replacement starts, and the other is SIGKILLed too
    wait_for(lambda: len(done(r)) >= 4, 30, what="four tasks done")
    first.kill(signal.SIGKILL)
    third = cluster_fleet.start(concurrency=2)
    wait_for(lambda: len(done(r)) >= 16, 30, what="sixteen tasks done")
    alive = [w for w in cluster_fleet.alive() if w is not third]
    alive[0].kill(signal.SIGKILL)
    cluster_fleet.start(concurrency=2)
    # Then every task completes (the dead workers' ones resurrected by the claim scripts on
    # the cluster) and no record is left behind
    wait_all_done(r, set(range(40)), 60, cluster_fleet)
    assert min(_runs(r, range(40))) >= 1
    assert "task.resurrected" in cluster_fleet.logs()
    wait_for(lambda: _held(store) == 0, 15, what="every record removed")
    assert broker.depth() == 0


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_relier_slot_migrated_mid_run_loses_nothing(
    broker, cluster, cluster_fleet, publisher, r
) -> None:
    # Given a worker running 40 tasks of 0.1 s with its state on the slot's first owner
    store = Store(cluster.url, Keys("rl"), cluster=True)
    worker = cluster_fleet.start(concurrency=2)
    send_work(publisher, range(40), seconds=0.1)
    wait_for(lambda: len(done(r)) >= 5, 30, what="five tasks done")
    src = cluster.owner(SLOT)
    dest = (src + 1) % len(cluster.nodes)
    # When relier's slot moves to another primary, with 0.2 s half way (clients get ASK)
    moved = cluster.migrate_slot(SLOT, dest, between=lambda: time.sleep(0.2))
    # Then the slot is the other node's, every task completes once at least, and the worker
    # keeps its lease and records on the new owner (its scripts loaded there on NOSCRIPT)
    assert moved > 0 and cluster.owner(SLOT) == dest
    wait_all_done(r, set(range(40)), 60, cluster_fleet)
    assert min(_runs(r, range(40))) >= 1 and sum(_runs(r, range(40))) == 40
    assert any(worker.hostname.split("@")[0] in w for w in store.leases())
    wait_for(lambda: _held(store) == 0, 15, what="every record removed")
    after = cluster.client(src).info("errorstats")
    # the worker's clients were redirected (ASK during the move is likely, not certain)
    assert after.get("errorstat_MOVED", {}).get("count", 0) > 0
    node = cluster.client(dest)
    assert node.exists(store.keys.leases) and node.info("commandstats").get("cmdstat_evalsha")
    assert "task.resurrected" not in worker.log()
    # and its presence connection followed the slot to the new owner (its next heartbeat)
    (name,) = [store.keys.presence(w) for w in store.leases()]
    wait_for(lambda: name in {c["name"] for c in node.client_list()}, 10, what="presence moved")
    assert broker.depth() == 0
