"""Configuration-only enablement: relier installed in the environment (so Celery's CLI imports
it) changes nothing in a worker of an app that does not list it, and the same app with
``imports = ("relier_celery",)`` runs under relier."""

from __future__ import annotations

import json
import os
import re

from celery import Celery
from fleet import HERE

from relier_celery.core.config import RelierConfig
from relier_celery.testing import WorkerProcess, wait_for

# Every key a plain Celery worker and publisher leave on a Redis broker (with results ignored),
# and the test app's own.
VANILLA_KEY = re.compile(r"_kombu\.binding[._].*|unacked(_index|_mutex)?|celery|test:.*")
TASKS = 5


def _run(redis_url, r, publisher, tmp_path, enable: str) -> tuple[str, list[str], list[dict]]:
    """Start a vanilla_app worker at debug level, run TASKS tasks through it, stop it warm;
    return its log, its bootsteps and what each task saw."""
    worker = WorkerProcess(
        "vanilla_app",
        hostname=f"enable{enable}@%h",
        cwd=str(HERE),
        log_path=str(tmp_path / f"worker-enable{enable}.log"),
        extra=["--loglevel", "DEBUG"],
        env={
            "RELIER_TEST_REDIS": redis_url,
            "RELIER_TEST_ENABLE": enable,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        },
    )
    with worker:
        worker.wait_ready()
        for i in range(TASKS):
            publisher.send_task("vanilla.add", args=(i, 1))
        wait_for(lambda: r.llen("test:ran") >= TASKS, 30, what=f"{TASKS} tasks to run")
    # The package really was imported in the worker: the case this test is about.
    assert r.get("test:relier_imported") == "1"
    ran = [json.loads(x) for x in r.lrange("test:ran", 0, -1)]
    return worker.log(), json.loads(r.get("test:bootsteps")), ran


def _relier_keys(redis_url, r) -> list[str]:
    prefix = RelierConfig.from_app(Celery("probe", broker=redis_url, set_as_current=False)).prefix
    return sorted(k for k in r.keys("*") if k.startswith(f"{prefix}:"))


def test_a_vanilla_app_worker_is_untouched_by_relier_installed(
    redis_url, r, publisher: Celery, tmp_path
) -> None:
    # Given relier installed, and an app that lists it nowhere
    # When a real worker of that app runs a few tasks and shuts down
    log, bootsteps, ran = _run(redis_url, r, publisher, tmp_path, enable="0")
    # Then no relier log line (at debug level, where Celery lists every bootstep it starts)
    assert [line for line in log.splitlines() if "relier" in line.lower()] == []
    # and no relier bootstep in either blueprint
    assert [s for s in bootsteps if "relier" in s.lower()] == []
    assert "celery.worker.consumer.tasks.Tasks" in bootsteps
    # and no relier key in Redis: only Celery's and kombu's (and the test's own)
    assert _relier_keys(redis_url, r) == []
    assert sorted(k for k in r.keys("*") if not VANILLA_KEY.fullmatch(k)) == []
    # and no relier hook around the tasks, no relier header on their messages
    assert len(ran) == TASKS
    assert all(not t["relier_context"] and t["relier_schema"] is None for t in ran)


def test_the_same_app_with_relier_in_imports_runs_under_relier(
    redis_url, r, publisher: Celery, tmp_path
) -> None:
    # Given the same app with imports = ("relier_celery",)
    # When its worker runs the same tasks
    log, bootsteps, ran = _run(redis_url, r, publisher, tmp_path, enable="1")
    # Then relier started, with its bootsteps, wrote its keys and set each task's context
    assert "relier worker.started" in log
    assert {
        "relier_celery.bootsteps.RelierWorker",
        "relier_celery.bootsteps.RelierConsumer",
    } <= set(bootsteps)
    assert _relier_keys(redis_url, r) != []
    assert all(t["relier_context"] for t in ran)
