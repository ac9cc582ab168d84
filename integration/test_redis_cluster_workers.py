"""Issue 17: relier's state on a real 3-primary Redis Cluster, the broker on RabbitMQ. Real
workers SIGKILLed mid-run lose nothing (their tasks come back through the scanners' scripts on
the cluster), relier's slot migrated to another primary while tasks run (ASK during the move,
MOVED after it, scripts loaded again on the new owner) loses nothing either, and neither does
a SIGKILL of the primary that owns relier's slot, whose replica takes over (a failover)."""

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
def cluster(request: pytest.FixtureRequest) -> Iterator[RedisClusterServer]:
    """Three primaries; a test passes e.g. ``{"replicas": 1}`` (indirect) for replicas."""
    server = RedisClusterServer(**getattr(request, "param", {})).start()
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


def _held(cluster: RedisClusterServer) -> int:
    """Records held by any worker (every held key is in relier's one slot, on its owner)."""
    node = cluster.client(cluster.owner(SLOT))
    return sum(int(node.hlen(k)) for k in node.keys(Keys("rl").held("*")))


def _runs(r: redis.Redis, ns: range) -> list[int]:
    return [int(r.get(f"test:runs:{n}") or 0) for n in ns]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_sigkilled_workers_lose_nothing_with_state_on_a_cluster(
    broker, cluster, cluster_fleet, publisher, r
) -> None:
    # Given two workers on RabbitMQ (early acks: relier's record on the cluster is the only
    # copy of a task once it is delivered) and 40 tasks of 0.3 s
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
    wait_for(lambda: _held(cluster) == 0, 15, what="every record removed")
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
    wait_for(lambda: _held(cluster) == 0, 15, what="every record removed")
    after = cluster.client(src).info("errorstats")
    # the worker's clients were redirected by the old owner: ASK during the move, MOVED after
    # it (a fresh-clone run on 6 December 2026 saw 11 ASK and no MOVED: the clients had
    # already refreshed their slot map when the move ended)
    redirects = sum(after.get(f"errorstat_{e}", {}).get("count", 0) for e in ("ASK", "MOVED"))
    assert redirects > 0, after
    node = cluster.client(dest)
    assert node.exists(store.keys.leases) and node.info("commandstats").get("cmdstat_evalsha")
    assert "task.resurrected" not in worker.log()
    # and its presence connection followed the slot to the new owner (its next heartbeat)
    (name,) = [store.keys.presence(w) for w in store.leases()]
    wait_for(lambda: name in {c["name"] for c in node.client_list()}, 10, what="presence moved")
    assert broker.depth() == 0


# A lease shorter than the outage the workers see (the failover, then redis-py's retry
# back-off): the survivor loses its lease and gives its tasks back; and one longer: it keeps it.
LEASES = [pytest.param("3", id="lease-3s"), pytest.param("8", id="lease-8s")]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("lease_ttl", LEASES)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
@pytest.mark.parametrize("cluster", [{"replicas": 1, "node_timeout_ms": 1000}], indirect=True)
def test_relier_primary_sigkilled_its_replica_takes_over_and_nothing_is_lost(
    broker, cluster, cluster_fleet, publisher, r, lease_ttl: str
) -> None:
    # Given two workers on RabbitMQ (early acks: a started task's only copy is relier's record
    # on the cluster), a replica per primary, and 30 tasks of 0.2 s
    store = Store(cluster.url, Keys("rl"), cluster=True)
    cluster_fleet.env["RELIER_TEST_LEASE_TTL"] = lease_ttl
    survivor, victim = (cluster_fleet.start(concurrency=2, wait=False) for _ in range(2))
    survivor.wait_ready()
    victim.wait_ready()
    send_work(publisher, range(30), seconds=0.2)
    wait_for(lambda: len(done(r)) >= 6, 30, what="six tasks done")
    assert len(store.leases()) == 2  # the test's client has met the cluster, like the workers'
    old = cluster.owner(SLOT)
    # the workers' relier_redis_url names the node that dies: their pool processes must not
    # need it
    assert cluster_fleet.redis_url == cluster.nodes[old].url
    # When the primary that owns relier's slot is SIGKILLed, and one worker with it
    killed = time.monotonic()
    cluster.kill(old)
    victim.kill(signal.SIGKILL)
    before = len(done(r))
    cluster.wait_ok(30)
    failover = time.monotonic() - killed
    # Then the old primary's replica owns relier's slot now
    new = cluster.owner(SLOT)
    assert new != old and cluster.client(new).info("replication")["role"] == "master"
    # and every task completes: the dead worker's through the survivor's scanner on the new
    # primary, the survivor's own once its clients found the new primary
    wait_all_done(r, set(range(30)), 45, cluster_fleet)
    all_done = time.monotonic() - killed
    runs = _runs(r, range(30))
    assert min(runs) >= 1
    log = survivor.log()
    assert survivor.proc is not None and survivor.proc.poll() is None, log
    assert "task.resurrected" in log
    if lease_ttl == "8":
        assert "lease.lost" not in log, f"failover {failover:.1f} s\n{log}"
    # and idempotent tasks (claimed in a pool process, through its own client) run once each
    for order in range(100, 106):
        publisher.send_task("chaos.charge", args=(order, 0.05))
    wait_all_done(r, set(range(100, 106)), 30, cluster_fleet)
    assert [int(r.get(f"test:charged:{n}") or 0) for n in range(100, 106)] == [1] * 6
    wait_for(lambda: _held(cluster) == 0, 15, what="every record removed")
    assert broker.depth() == 0
    # The survivor holds its lease on the new primary, and its presence connection moved there
    node = cluster.client(new)
    assert node.info("errorstats").get("errorstat_NOSCRIPT", {}).get("count", 0) > 0  # reloaded
    (worker,) = store.leases()
    assert worker.startswith(survivor.hostname.split("@")[0]) and node.exists(store.keys.leases)
    name = store.keys.presence(worker)
    wait_for(lambda: name in {c["name"] for c in node.client_list()}, 10, what="presence moved")
    print(
        f"cluster failover (lease {lease_ttl} s): node {old} -> {new} in {failover:.2f} s; "
        f"{before}/30 done at the kill, all done {all_done:.1f} s after it, "
        f"{sum(n > 1 for n in runs)} ran twice; survivor: {log.count('store.unavailable')} "
        f"store.unavailable, {log.count('lease.lost')} lease.lost, "
        f"{log.count('task.resurrected')} task.resurrected"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("cluster", [{"replicas": 1}], indirect=True)
@pytest.mark.parametrize("broker", ["rabbitmq"], indirect=True)
def test_a_worker_starts_through_further_seeds_while_its_seed_node_is_down(
    broker, cluster, publisher, r, redis_url: str, tmp_path: Path
) -> None:
    # Given relier_redis_url naming a node that is down (a replica: the cluster stays ok)
    seed = cluster.nodes[cluster.count]
    cluster.kill(cluster.count)
    fleet = Fleet(seed.url, tmp_path)
    fleet.env.update(broker.env)
    fleet.env["RELIER_TEST_RESULTS"] = redis_url
    try:
        # Then a worker knowing only that node refuses to start, with one line saying why
        fleet.env["RELIER_TEST_CONF"] = json.dumps({"relier_redis_cluster": True})
        with pytest.raises(RuntimeError, match="no Redis Cluster node answers"):
            fleet.start(concurrency=2)
        # And one given a live node in relier_redis_options["startup_nodes"] starts and works
        live = cluster.nodes[cluster.live()[0]].port
        fleet.env["RELIER_TEST_CONF"] = json.dumps(
            {
                "relier_redis_cluster": True,
                "relier_redis_options": {"startup_nodes": [f"127.0.0.1:{live}"]},
            }
        )
        fleet.start(concurrency=2)
        send_work(publisher, range(6), seconds=0.1)
        wait_all_done(r, set(range(6)), 30, fleet)
        assert _runs(r, range(6)) == [1] * 6
        wait_for(lambda: _held(cluster) == 0, 10, what="records to be removed")
    finally:
        fleet.stop_all()
