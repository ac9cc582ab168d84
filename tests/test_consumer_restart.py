"""A consumer that lost its broker connection keeps the jobs its prefork pool runs: Celery's
``Consumer.on_close`` flushes the pool, and Celery 5.5's ``AsynPool.flush`` clears the whole
job cache, so the results of tasks still running were dropped and relier never removed their
records (consumer_hooks.keep_running_jobs). Runs the installed Celery's own flush."""

from __future__ import annotations

from collections import deque
from types import SimpleNamespace
from typing import Any

import pytest
from billiard.pool import RUN
from celery.concurrency.asynpool import AsynPool

from relier_celery.wiring.consumer_hooks import keep_running_jobs

pytestmark = pytest.mark.timeout(30)


class _Job:
    """What AsynPool.flush reads of a job (billiard's ApplyResult)."""

    def __init__(self, cache: dict[int, Any], job: int, accepted: bool) -> None:
        self._cache, self._job, self._accepted = cache, job, accepted
        self._write_to = self._scheduled_for = None
        cache[job] = self

    def discard(self) -> None:
        self._cache.pop(self._job, None)


def _consumer() -> tuple[Any, dict[int, Any]]:
    cache: dict[int, Any] = {}
    pool = SimpleNamespace(
        _state=RUN,
        synack=False,
        outbound_buffer=deque(),
        maintain_pool=lambda: None,
        _active_writers=set(),
        _active_writes=set(),
        _busy_workers=set(),
        _cache=cache,
    )
    c = SimpleNamespace(pool=SimpleNamespace(_pool=pool), on_close=lambda: AsynPool.flush(pool))
    return c, cache


def test_a_job_a_pool_process_runs_survives_the_flush_of_a_lost_connection() -> None:
    c, cache = _consumer()
    running = _Job(cache, 1, accepted=True)
    _Job(cache, 2, accepted=False)  # written, not started: the broker redelivers it
    keep_running_jobs(c)
    c.on_close()
    # Its result finds it when the pool process reports it: the request ends as usual
    assert cache == {1: running}


def test_a_pool_without_a_job_cache_is_left_alone() -> None:
    closed: list[bool] = []
    c = SimpleNamespace(pool=SimpleNamespace(), on_close=lambda: closed.append(True))
    keep_running_jobs(c)
    c.on_close()
    assert closed == [True]
