"""The scanner's cost with relier's state on Redis Cluster, at fleet scale.

    python benchmarks/bench_cluster.py [--workers 1000] [--records 1000000] [--dead 10] [--plain]

Against a throwaway 3-primary cluster (redis-server 7 on PATH): ``--workers`` live leases
holding ``--records`` in-flight records between them (each in its worker's held hash and in
the owners hash, as a receipt writes them), loaded with pipelined HSETs on the slot's owner.
Then ``--dead`` dead records: ``--dead`` more workers whose lease ran out holding one each,
and one dead worker holding ``--dead``. Prints the load time, the slot's memory, and the wall
time of ``Resurrector.scan_once()`` (what every worker's scanner runs each
``relier_scan_interval``): p50/p99/max of scans that find nothing to do, and of the scan that
finds the dead, claims their records and republishes them (to kombu's in-memory broker, so
the figure is relier's and Redis's, not a broker's). Last, the time to migrate relier's slot to
another primary (``--no-migrate`` to skip). ``--plain``: the same on one redis-server, to tell
the cluster's share from the scanner's. A benchmark,
not a test: it prints figures and never fails.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from celery import Celery
from stats import pct, timed

from relier_celery.core import events
from relier_celery.core.config import RelierConfig
from relier_celery.core.keys import Keys
from relier_celery.core.record import TaskRecord
from relier_celery.recovery.resurrect import Resurrector
from relier_celery.store.client import Store
from relier_celery.testing import RedisServer, task_headers
from relier_celery.testing.cluster import RedisClusterServer

CHUNK = 10_000  # HSET fields per pipelined command


def record(task_id: str, worker: str) -> TaskRecord:
    return TaskRecord(
        task_id=task_id,
        task_name="shop.tasks.job",
        body=json.dumps([[1, "order-000001"], {"priority": "normal"}, {}]).encode(),
        content_type="application/json",
        content_encoding="utf-8",
        headers=task_headers(task_id, "shop.tasks.job"),
        properties={"correlation_id": task_id},
        exchange="",
        routing_key="celery",
        worker=worker,
    )


def load(store: Store, workers: int, records: int, victims: int) -> float:
    """Leases and records of live workers, written straight to the slot's owner; seconds. The
    last ``victims`` workers' records are each their own message (they are resurrected last)."""
    start = time.perf_counter()
    names = [f"live{i}@host{i}/{1000 + i}/abcd1234" for i in range(workers)]
    for w in names:
        store.renew_lease(w, ttl=3600)
    node = owner(store)
    raw = record("t", names[0]).dumps()
    per = records // workers
    pipe = node.pipeline(transaction=False)
    for wi, w in enumerate(names):
        held, owners = {}, {}
        for j in range(per):
            delivery = f"w{wi}-t{j}"
            held[f"{delivery}|0|0"] = (
                record(delivery, w).dumps() if wi >= workers - victims else raw
            )
            owners[delivery] = f"{w}|0|0"
            if len(held) >= CHUNK:
                pipe.hset(store.keys.held(w), mapping=held)
                pipe.hset(store.keys.owners, mapping=owners)
                held, owners = {}, {}
        if held:
            pipe.hset(store.keys.held(w), mapping=held)
            pipe.hset(store.keys.owners, mapping=owners)
        if len(pipe) >= 20:
            pipe.execute()
    pipe.execute()
    return time.perf_counter() - start


def owner(store: Store) -> Any:
    """A plain client of the node that holds relier's slot (the server itself with --plain)."""
    client: Any = store.client
    if store.cluster is None:
        return client
    return client.get_node_from_key(store.keys.leases).redis_connection


def kill(store: Store, workers: int, each: int, round_: int) -> None:
    """``workers`` workers whose lease ran out, ``each`` records each (written by the receipt
    script)."""
    for i in range(workers):
        w = f"dead{round_}-{i}@host/1/dead"
        store.renew_lease(w, ttl=0.001)
        for j in range(each):
            rec = record(f"r{round_}-{i}-{j}", w)
            assert store.record(rec.delivery_id, w, rec.generation, rec.dumps()).recorded
    time.sleep(0.01)


def dead_scans(scanner: Resurrector, workers: int, each: int, rounds: int, base: int) -> str:
    found: list[float] = []
    # Not timed: the first republish opens the producer pool's connection, which a running
    # worker's scanner has long had.
    kill(scanner.store, workers, each, base - 1)
    scanner.scan_once()
    for n in range(rounds):
        kill(scanner.store, workers, each, base + n)
        start = time.perf_counter()
        handled = scanner.scan_once()
        found.append((time.perf_counter() - start) * 1e3)
        assert handled == workers * each, handled
    return (
        f"scan finding {workers} dead worker(s) holding {each} record(s) each, claiming and "
        f"republishing them ({rounds} rounds): p50 {pct(found, 50):.2f} ms, "
        f"p99 {pct(found, 99):.2f} ms, max {max(found):.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--dead", type=int, default=10)
    parser.add_argument("--scans", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--plain", action="store_true", help="one redis-server, no cluster")
    parser.add_argument("--migrate", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    events.unsubscribe(events.log_event)  # no log line per resurrected task
    server = RedisServer() if args.plain else RedisClusterServer()
    server.start()
    try:
        config = RelierConfig.from_mapping(
            {"relier_redis_url": server.url, "relier_redis_cluster": not args.plain}, "memory://"
        )
        store = Store(server.url, Keys(config.prefix), cluster=not args.plain)
        app = Celery("bench_cluster", broker="memory://", set_as_current=False)
        scanner = Resurrector(app, config, store, name="bench-scanner")
        seconds = load(store, args.workers, args.records, args.dead)
        node = owner(store)
        memory = node.info("memory")["used_memory_human"]
        held = node.hlen(store.keys.owners)
        print(
            f"loaded {args.workers} leases and {held:,} in-flight records in {seconds:.1f} s "
            f"(pipelined HSETs of {CHUNK} fields); the slot's owner uses {memory}"
        )
        trip = timed(lambda _: store.now_ms(), 200)
        print(
            f"one round trip (TIME through relier's client): p50 {pct(trip, 50):.0f} us; "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
        )
        scanner.scan_once()  # the first scan also looks for expired DLQ entries
        idle = timed(lambda _: scanner.scan_once(), args.scans, scale=1e3)
        print(
            f"scan, nothing dead ({args.scans} scans): p50 {pct(idle, 50):.2f} ms, "
            f"p99 {pct(idle, 99):.2f} ms, max {max(idle):.2f} ms"
        )
        print(dead_scans(scanner, args.dead, 1, args.rounds, 1))
        print(dead_scans(scanner, 1, args.dead, args.rounds, args.rounds + 2))
        # Last, --dead of the loaded workers die, with all their records.
        victims = [f"live{i}@host{i}/{1000 + i}/abcd1234" for i in range(args.workers)]
        victims = victims[-args.dead :]
        store.call(lambda c: c.zadd(store.keys.leases, dict.fromkeys(victims, 1)))
        finding = timed(lambda _: store.expired_leases(), args.scans, scale=1e3)
        print(
            f"finding {len(victims)} dead among {args.workers} leases (what a scan reads to "
            f"know who died): p50 {pct(finding, 50):.2f} ms, p99 {pct(finding, 99):.2f} ms"
        )
        start = time.perf_counter()
        handled = scanner.scan_once()
        took = time.perf_counter() - start
        print(
            f"the scan resurrecting their {handled:,} records: {took:.1f} s "
            f"({handled / took:,.0f} records/s)"
        )
        if args.migrate and isinstance(server, RedisClusterServer):
            cluster = server
            slot = store.client.home_slot  # type: ignore[attr-defined]
            dest = (cluster.owner(slot) + 1) % len(cluster.nodes)
            start = time.perf_counter()
            keys = cluster.migrate_slot(slot, dest)
            print(
                f"relier's slot ({keys:,} keys) migrated to another primary by MIGRATE in "
                f"{time.perf_counter() - start:.1f} s (scripts get TRYAGAIN meanwhile)"
            )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
