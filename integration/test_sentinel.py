"""Redis Sentinel: the broker on kombu's Sentinel transport and relier's state on the same
Sentinel-managed master (kombu's ``sentinel://...;sentinel://...`` spelling), with the reliable
fetch. The primary is SIGKILLed mid-run and the sentinels promote the replica: nothing that
Redis acknowledged is lost (docs/sentinel.md). A Sentinel configuration that cannot work (no
master name, no sentinel answering, a master name no sentinel knows) stops the worker at start
with one line naming the settings."""

from __future__ import annotations

import json
import random
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from fleet import Fleet, wait_chaos_done
from sentinel_nodes import MASTER, SentinelGroup

from relier_celery.testing import RedisServer, find_redis_server, free_port, wait_for

TASKS = 400
TRANSPORT = {"master_name": MASTER, "unacked_restore_interval": 1}


@pytest.fixture
def group() -> Iterator[SentinelGroup]:
    g = SentinelGroup().start()
    yield g
    g.stop()


@pytest.fixture
def results_url() -> Iterator[str]:
    """Where tasks count their runs: apart from the Redis that fails over."""
    server = RedisServer()
    yield server.start()
    server.stop()


@pytest.mark.timeout(240)
def test_a_failover_mid_run_loses_no_task_and_the_fetch_follows_the_new_master(
    group: SentinelGroup, results_url: str, tmp_path
) -> None:
    results = redis.Redis.from_url(results_url, decode_responses=True)
    fleet = Fleet(group.url, tmp_path)
    fleet.env = {
        "RELIER_TEST_RESULTS": results_url,
        "RELIER_TEST_CONF": json.dumps({"broker_transport_options": TRANSPORT}),
    }
    publisher = Celery("publisher", broker=group.url)
    publisher.conf.broker_transport_options = TRANSPORT
    try:
        workers = [fleet.start(concurrency=2) for _ in range(2)]
        rng = random.Random(17)
        ids = {
            n: publisher.send_task("chaos.work", args=(n, rng.uniform(0.03, 0.08))).id
            for n in range(TASKS)
        }
        group.replicate_now()  # every task message is on the replica too
        wait_for(lambda: len(results.smembers("test:done")) >= 40, 30, what="work under way")
        old = group.master_port()
        group.kill_primary()
        wait_for(lambda: group.master_port() != old, 30, what="the sentinels to fail over")
        failed_over = time.time()
        wait_chaos_done(results, ids, 120, fleet)
        twice = sum(1 for n in ids if int(results.get(f"test:runs:{n}") or 0) > 1)
        print(
            f"sentinel: all {TASKS} done {time.time() - failed_over:.1f} s after the failover, "
            f"{twice} ran twice"
        )
        logs = fleet.logs()
        # The reliable fetch ran on the Sentinel transport, before and after the failover.
        assert "relier_reliable_fetch is on, but" not in logs, logs
        master = redis.Redis(port=group.master_port(), decode_responses=True)
        assert master.hlen("unacked") == 0, "kombu's fetch was used"
        assert all(w.proc is not None and w.proc.poll() is None for w in workers), logs
    finally:
        fleet.stop_all()
        publisher.close()


def _refused(fleet: Fleet, conf: dict[str, object]) -> str:
    """Start a worker with these settings; it must exit at start. Its last log line."""
    w = fleet.start(wait=False, RELIER_TEST_CONF=json.dumps(conf))
    assert w.proc is not None
    w.proc.wait(60)
    assert w.proc.returncode != 0, w.log()
    return w.log().strip().splitlines()[-1]


@pytest.mark.timeout(60)
def test_a_sentinel_url_without_a_master_name_stops_the_worker_naming_the_setting(fleet):
    line = _refused(fleet, {"relier_redis_url": f"sentinel://127.0.0.1:{free_port()}"})
    assert "is a Sentinel URL: set relier_redis_options = {'master_name':" in line


@pytest.mark.timeout(60)
def test_unreachable_sentinels_stop_the_worker_with_one_line_naming_the_settings(fleet):
    ports = [free_port(), free_port()]
    url = ";".join(f"sentinel://127.0.0.1:{p}" for p in ports)
    line = _refused(
        fleet, {"relier_redis_url": url, "relier_redis_options": {"master_name": MASTER}}
    )
    assert line.startswith("relier_celery.core.errors.StoreUnavailable: relier cannot reach Redis")
    assert f"relier_redis_url {url!r}: no sentinel answered" in line
    assert all(f"connecting to 127.0.0.1:{p}" in line for p in ports)
    assert "Check relier_redis_url and relier_redis_options['master_name']" in line
    assert "<redis.client" not in line, "redis-py's client reprs"


@pytest.mark.timeout(60)
def test_a_master_name_no_sentinel_knows_stops_the_worker_naming_the_settings(
    fleet, tmp_path
) -> None:
    # Given a real sentinel that monitors no master
    port = free_port()
    conf = tmp_path / "sentinel.conf"
    conf.write_text(f"port {port}\nbind 127.0.0.1\ndir {tmp_path}\n")
    sentinel = subprocess.Popen(
        [find_redis_server(), str(conf), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _answers(port), 10, what="the sentinel to listen")
        # When a worker asks it for a master it does not know (a typo)
        line = _refused(
            fleet,
            {
                "relier_redis_url": f"sentinel://127.0.0.1:{port}",
                "relier_redis_options": {"master_name": "mymastr"},
            },
        )
    finally:
        sentinel.kill()
        sentinel.wait(5)
    # Then the worker stops, saying so and naming the setting
    assert "the sentinels that answered know no master 'mymastr', or it is down" in line
    assert "relier_redis_options['master_name']" in line


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False
