from __future__ import annotations

import logging
import time

from relier_celery.core import events
from relier_celery.core.config import RelierConfig
from relier_celery.recovery.lease import Lease
from relier_celery.store.client import Store


def test_a_broken_subscriber_never_breaks_the_emitter(captured, caplog) -> None:
    def broken(event: events.Event) -> None:
        raise RuntimeError("exporter down")

    events.subscribe(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="relier_celery"):
            event = events.emit("task.resurrected", "t1 back", task_id="t1")
    finally:
        events.unsubscribe(broken)
    assert captured == [event]
    assert "subscriber" in caplog.text


def test_events_are_logged_and_counted(caplog) -> None:
    before = events.counters["task.quarantined"]
    with caplog.at_level(logging.INFO, logger="relier_celery"):
        events.emit("task.quarantined", "to the DLQ", task_id="t9", dlq_reason="x")
    assert "relier task.quarantined: to the DLQ task_id=t9 dlq_reason=x" in caplog.text
    assert events.counters["task.quarantined"] == before + 1


def test_a_renewal_after_the_lease_ran_out_reports_lease_lost(store: Store, captured) -> None:
    config = RelierConfig.from_mapping(
        {"relier_lease_ttl": 0.2, "relier_heartbeat_interval": 0.05}, broker_url=store.url
    )
    lease = Lease(config, store, "w1")
    lease.renew()
    assert not [e for e in captured if e.name == "lease.lost"]
    time.sleep(0.3)  # paused past the lease (GC, swap, SIGSTOP)
    lease.renew()
    lost = [e for e in captured if e.name == "lease.lost"]
    assert len(lost) == 1 and lost[0].attributes["worker"] == "w1"


def test_the_heartbeat_thread_keeps_the_lease_alive_and_release_forgets_it(store: Store) -> None:
    config = RelierConfig.from_mapping(
        {"relier_lease_ttl": 0.3, "relier_heartbeat_interval": 0.05}, broker_url=store.url
    )
    lease = Lease(config, store, "w1")
    lease.acquire()
    time.sleep(0.8)
    assert store.expired_leases() == {}
    assert lease.release() == 0
    assert "w1" not in store.leases()


def test_a_lease_forgotten_by_a_scanner_also_reports_lease_lost(store: Store, captured) -> None:
    config = RelierConfig.from_mapping(
        {"relier_lease_ttl": 0.2, "relier_heartbeat_interval": 0.05}, broker_url=store.url
    )
    lease = Lease(config, store, "w1")
    lease.renew()
    store.call(lambda c: c.zrem(store.keys.leases, "w1"))  # claimed and forgotten meanwhile
    lease.renew()
    assert [e.name for e in captured].count("lease.lost") == 1
