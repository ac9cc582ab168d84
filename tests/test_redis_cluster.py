"""Relier's store on a real 3-primary Redis Cluster (``relier_redis_cluster = True``): every Lua
script and every pipeline runs within relier's one slot, keyless commands (TIME, PING)
reach that slot's owner, scripts are reloaded on a node that received the slot by a resharding,
the presence connection follows the slot, a pool process reaches the cluster when the seed
node died; each configuration that cannot work is one line naming the setting."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from celery import Celery
from redis.crc import key_slot

from relier_celery.core.config import RelierConfig
from relier_celery.core.errors import ConfigError, StoreUnavailable
from relier_celery.core.keys import Keys
from relier_celery.core.record import Generation
from relier_celery.store.client import Store
from relier_celery.store.cluster import SlotCluster
from relier_celery.store.presence import Presence, PresenceCache
from relier_celery.testing import RedisServer, free_port
from relier_celery.testing.cluster import RedisClusterServer

pytestmark = pytest.mark.timeout(60)
G0 = Generation(0, 0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServer]:
    server = RedisClusterServer().start()
    yield server
    server.stop()


@pytest.fixture
def store(cluster: RedisClusterServer, request: pytest.FixtureRequest) -> Store:
    # A prefix per test: its slot (and so its owner) differs from test to test.
    return Store(cluster.url, Keys(f"c{abs(hash(request.node.name)) % 10**6}"), cluster=True)


def _slot(store: Store) -> int:
    return key_slot(f"{{{store.keys.prefix}}}".encode())


def test_the_store_talks_to_the_cluster_through_its_slot_owner(
    store: Store, cluster: RedisClusterServer
) -> None:
    client = store.client
    assert isinstance(client, SlotCluster) and client.home_slot == _slot(store)
    assert client.get_default_node().port == cluster.nodes[cluster.owner(_slot(store))].port
    # TIME of the slot's owner (the clock the scripts write deadlines with), read in a pipeline
    assert abs(store.overview()["now"] * 1000 - store.now_ms()) < 1000


def test_every_script_runs_on_the_cluster(store: Store, cluster: RedisClusterServer) -> None:
    k = store.keys
    # lease_renew, retire
    assert store.renew_lease("w1", 5)[0] == -1 and "w1" in store.leases()
    # receipt, complete
    assert store.record("d1", "w1", G0, "rec1").recorded
    assert not store.record("d1", "w2", G0, "rec1").recorded
    assert store.known({"d1", "nope"}) == {"d1"}  # a pipeline of HEXISTS and EXISTS
    assert store.complete("d1", "w1", G0, 60)
    # receipt, takeover mode (the holder's keys built in the script): d2 held by w3, taken by w1
    assert store.record("d2", "w3", G0, '{"headers": {}}').recorded
    assert store.take_over("d2", "w3", "w1", G0, "rec2", 0, 30).reason == "taken"
    assert store.renew_lease("w3", 5)[0] == -2  # its next renewal reads the taken marker
    # expired, claim, claim_finish: w4 holds one record and its lease ran out
    store.renew_lease("w4", 0.001)
    assert store.record("d3", "w4", G0, "rec3").recorded
    store.call(lambda c: c.zadd(k.leases, {"w4": 1}))
    assert store.expired_leases() == {"w4": 1.0}
    claimed = store.claim(["w4"], "s1", 30)
    assert claimed == {"w4": {"d3|0|0": "rec3"}}
    store.take({"w4": ["d3|0|0"]})
    assert store.claim_finish(["w4"], "s1") == {"w4": 0}
    # dlq_put, then a MULTI removing the entry
    store.dlq_put("e1", "{}", 1, "d4", G0, 60, worker="w1", field="d4|0|0")
    assert store.dlq_get("e1") == "{}" and store.dlq_remove(["e1"]) == 1
    # requeue: the script is single-slot when the queue is (a cluster never holds the Redis
    # broker's queues, so relier never calls it there; relier_redis_cluster forbids that)
    store.call(lambda c: c.hset(k.held("w1"), "f1", "env"))
    assert store.requeue("w1", "f1", f"{k.prefix}:{{{k.prefix}}}:q", "env", head=True)
    # idem_claim, idem_store, idem_release
    state, token, _ = store.idem_claim("key1", "w1", "t1", "h", 30)
    assert state == "claimed"
    assert store.idem_store("key1", str(token), "result", 30)
    assert store.idem_claim("key1", "w1", "t2", "h", 30)[:2] == ["done", "result"]
    state, token, _ = store.idem_claim("key2", "w1", "t3", "h", 30)
    assert store.idem_release("key2", str(token))
    # admit: two buckets of relier's slot, in one decision
    buckets = [(k.admission_task("t"), 1000, 2), (k.admission_queue("q"), 1000, 2)]
    assert store.admit(buckets)[0] == 1
    # retire; MULTI of the running set; pipelines of drain and counters
    store.set_running("w1", {"t1": 1.0}, 5, {"pid": "1"})
    store.drain_update("w1", {"state": "draining"})
    store.add_counters({"x": 2})
    store.add_recovery([(store.now_ms() - 100, 2)])
    assert store.workers_detail(["w1"])["w1"]["running"]["t1"] == 1.0
    assert store.counters() == {"x": 2} and len(store.overview()["recovery"]) == 2
    assert store.retire("w3") >= 0
    # Every one of relier's scripts was loaded on the slot's owner by one of the calls above
    shas = [script.sha for script in store._scripts.values()]
    assert len(shas) == 13
    assert cluster.client(cluster.owner(_slot(store))).script_exists(*shas) == [True] * len(shas)


def test_scripts_come_back_after_a_resharding_and_a_flush(
    store: Store, cluster: RedisClusterServer
) -> None:
    # Given a worker's lease and a record on the slot's owner
    assert store.renew_lease("w1", 30)[0] == -1
    assert store.record("d1", "w1", G0, "rec").recorded
    src = cluster.owner(_slot(store))
    dest = (src + 1) % len(cluster.nodes)
    # When the slot moves to another primary that never ran relier's scripts, half way
    # through a read by ASK, and the scripts are flushed everywhere
    seen: list[dict[str, str]] = []
    moved = cluster.migrate_slot(_slot(store), dest, between=lambda: seen.append(store.held("w1")))
    for i in range(len(cluster.nodes)):
        cluster.client(i).script_flush()
    # Then every key came along, the reads during the move were answered (ASK), and the
    # scripts run on the new owner (MOVED, then NOSCRIPT: loaded again)
    assert moved >= 3 and seen == [{"d1|0|0": "rec"}]
    assert store.renew_lease("w1", 30)[0] > 0
    assert store.complete("d1", "w1", G0, 60)
    assert store.client.get_default_node().port == cluster.nodes[dest].port


def test_presence_is_seen_and_follows_the_slot(store: Store, cluster: RedisClusterServer) -> None:
    presence = Presence(store, "w1@host/1/ab")
    presence.open()
    try:
        assert PresenceCache(store).present("w1@host/1/ab")
        src = cluster.owner(_slot(store))
        dest = (src + 1) % len(cluster.nodes)
        cluster.migrate_slot(_slot(store), dest)
        # Still present right after the move (every primary is asked)...
        assert PresenceCache(store).present("w1@host/1/ab")
        # ...and the next heartbeat moves the named, subscribed connection to the slot's new owner
        store.renew_lease("w1", 5)
        presence.touch()
        names = {c["name"] for c in cluster.client(dest).client_list()}
        assert store.keys.presence("w1@host/1/ab") in names
        channel = store.keys.presence_channels + "w1@host/1/ab"
        assert cluster.client(dest).pubsub_numsub(channel) == [(channel, 1)]
        assert store.keys.presence("w1@host/1/ab") not in {
            c["name"] for c in cluster.client(src).client_list()
        }
    finally:
        presence.close()
    assert not PresenceCache(store).present("w1@host/1/ab")


def test_a_live_holder_left_on_the_slots_old_owner_keeps_its_redelivery(
    store: Store, cluster: RedisClusterServer
) -> None:
    from test_publications import _inflight, _Message, _record

    from relier_celery.core.headers import PUBLICATION_HEADER
    from relier_celery.testing import task_headers

    # Given a delivery held by w0, alive, its presence connection on the slot's owner
    headers = task_headers("t1", task="demo.add", **{PUBLICATION_HEADER: "p1"})
    held = _record(headers)
    assert store.record(held.delivery_id, "w0", held.generation, held.dumps()).recorded
    alive = Presence(store, "w0")
    alive.open()
    try:
        # When the slot moves (w0's connection follows at its next heartbeat only) and the
        # broker redelivers w0's message (its channel closed) to w1
        src = cluster.owner(_slot(store))
        cluster.migrate_slot(_slot(store), (src + 1) % len(cluster.nodes))
        message = _Message(headers)
        message.delivery_info["redelivered"] = True
        verdict = _inflight(store).receive(message, {"demo.add"})
    finally:
        alive.close()
    # Then w0 keeps it: the receipt's script counted no subscriber on the new owner, and
    # every primary was asked before any takeover
    assert verdict == "duplicate"
    assert list(store.held("w0")) == ["t1#p1|0|0"]


# -- configurations that cannot work: one line naming the setting ---------------------------
AMQP = "amqp://guest:guest@127.0.0.1:5672//"


def test_the_setting_is_typed_and_shown() -> None:
    config = RelierConfig.from_mapping(
        {"relier_redis_url": "redis://10.0.0.1:7000", "relier_redis_cluster": True}, AMQP
    )
    assert config.redis_cluster and config.describe()["relier_redis_cluster"] is True
    with pytest.raises(ConfigError, match="relier_redis_cluster must be True or False"):
        RelierConfig.from_mapping({"relier_redis_cluster": "yes"}, "redis://h")


def test_cluster_with_the_redis_brokers_queues_is_refused() -> None:
    app = Celery("c", broker="redis://10.0.0.1:7000/0", set_as_current=False)
    app.conf.relier_redis_cluster = True
    with pytest.raises(ConfigError, match="relier_redis_cluster is True but relier_redis_url is"):
        RelierConfig.from_app(app)
    with pytest.raises(ConfigError, match="kombu has no Redis Cluster transport"):
        RelierConfig.from_mapping(
            {"relier_redis_url": "redis://10.0.0.1:7000/1", "relier_redis_cluster": True},
            "redis://10.0.0.1:7000/0",
        )


def test_cluster_with_a_broker_on_another_node_of_it_stops_the_worker(
    cluster: RedisClusterServer,
) -> None:
    broker = cluster.nodes[1].url
    store = Store(cluster.url, Keys("rl"), cluster=True, broker_url=broker)
    with pytest.raises(ConfigError, match=r"relier_redis_cluster is True but the broker's Redis"):
        store.self_check()
    assert Store(cluster.url, Keys("rl"), cluster=True, broker_url=AMQP).self_check() is not None


def test_cluster_with_a_sentinel_url_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"relier_redis_cluster is True but .* Sentinel"):
        RelierConfig.from_mapping(
            {"relier_redis_url": "sentinel://10.0.0.1:26379", "relier_redis_cluster": True}, AMQP
        )


def test_an_unreachable_seed_is_one_line_naming_the_setting() -> None:
    store = Store(f"redis://127.0.0.1:{free_port()}/0", Keys("rl"), cluster=True)
    with pytest.raises(StoreUnavailable, match="relier_redis_url: no Redis Cluster node") as err:
        store.self_check()
    assert "\n" not in str(err.value)


def test_a_database_other_than_0_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"relier_redis_url .* only database 0"):
        Store(f"redis://127.0.0.1:{free_port()}/3", Keys("rl"), cluster=True).self_check()


def test_a_seed_that_is_no_cluster_node_is_refused() -> None:
    plain = RedisServer()
    plain.start()
    try:
        with pytest.raises(ConfigError, match="is not a Redis Cluster node"):
            Store(plain.url, Keys("rl"), cluster=True).self_check()
    finally:
        plain.stop()


def test_a_cluster_node_without_the_setting_is_refused(cluster: RedisClusterServer) -> None:
    with pytest.raises(ConfigError, match="set relier_redis_cluster = True"):
        Store(cluster.url, Keys("rl")).self_check()


def test_a_forked_process_reaches_the_cluster_when_the_seed_node_is_gone() -> None:
    # Given a store seeded by a replica (the cluster stays ok without it) that met the cluster
    server = RedisClusterServer(replicas=1).start()
    try:
        seed = server.nodes[server.count].url
        store = Store(seed, Keys("rl"), cluster=True)
        store.meet_cluster()  # what a worker does before its pool forks
        # When that node dies and the process forks (a pool process; its first call)
        server.kill(server.count)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            ok = False
            try:
                store.renew_lease("w1", 5)
                ok = "w1" in store.leases()
            finally:
                os._exit(0 if ok else 1)
        # Then the child reached the cluster through the nodes its parent met
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        assert "w1" in store.leases()
        # while a new process knows only relier_redis_url, which names the dead node
        with pytest.raises(StoreUnavailable, match="no Redis Cluster node answers"):
            Store(seed, Keys("rl"), cluster=True).leases()
        # unless relier_redis_options names further seeds (a dead one, then a live one)
        gone, live = server.nodes[server.count].port, server.nodes[0].port
        seeds = {"startup_nodes": [f"127.0.0.1:{gone}", f"127.0.0.1:{live}"]}
        assert "w1" in Store(seed, Keys("rl"), seeds, cluster=True).leases()
        with pytest.raises(StoreUnavailable, match=f"nor at 127.0.0.1:{gone}"):
            only_dead = {"startup_nodes": [f"127.0.0.1:{gone}"]}
            Store(seed, Keys("rl"), only_dead, cluster=True).leases()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("options", "cluster", "error"),
    [
        ({"startup_nodes": ["10.0.0.2:7000"]}, False, "set relier_redis_cluster = True"),
        ({"startup_nodes": ["10.0.0.2"]}, True, "'10.0.0.2' is not host:port"),
        ({"startup_nodes": "10.0.0.2:99999"}, True, "'10.0.0.2:99999' is not host:port"),
    ],
)
def test_bad_further_seeds_are_one_line_naming_the_setting(
    options: dict[str, object], cluster: bool, error: str
) -> None:
    settings = {
        "relier_redis_url": "redis://10.0.0.1:7000/0",
        "relier_redis_cluster": cluster,
        "relier_redis_options": options,
    }
    with pytest.raises(ConfigError, match=error):
        RelierConfig.from_mapping(settings, broker_url="amqp://guest@localhost//")
