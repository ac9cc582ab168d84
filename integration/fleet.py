"""Helpers of the integration tests: a fleet of real workers, and counters read from Redis."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from kombu import Connection, Exchange, Queue

from relier_celery.core.keys import Keys
from relier_celery.testing import WorkerProcess, wait_for

HERE = Path(__file__).parent


AMQP_URL = os.environ.get("RELIER_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")
# Parametrize a test over both brokers: @pytest.mark.parametrize("broker", BROKERS, indirect=True)
BROKERS = ["redis", "rabbitmq"]
# The x-arguments of the test's queue on each kind of RabbitMQ broker.
QUEUE_ARGS: dict[str, dict[str, Any] | None] = {
    "rabbitmq": None,
    "rabbitmq-quorum": {"x-queue-type": "quorum"},
    # RabbitMQ's own redelivery count stops at 1 (drops the message past it), below relier's
    # max_resurrections.
    "rabbitmq-quorum-limit1": {"x-queue-type": "quorum", "x-delivery-limit": 1},
    # On a topic exchange: Celery's native delayed delivery carries countdown/ETA messages.
    "rabbitmq-quorum-topic": {"x-queue-type": "quorum"},
}
EXCHANGE_TYPES = {"rabbitmq-quorum-topic": "topic"}


@dataclass
class Broker:
    """Where the test's messages go. On RabbitMQ (shared by every test of the run), each test
    has its own queue, exchange and control exchange; relier's state stays in Redis."""

    name: str
    url: str
    queue: str = ""
    # The queue's x-arguments (a quorum queue: {"x-queue-type": "quorum"}), declared alike by
    # the workers (chaos_app) and the publisher (configure).
    queue_args: dict[str, Any] | None = None
    exchange_type: str = "direct"

    @classmethod
    def rabbitmq(cls, kind: str = "rabbitmq") -> Broker:
        with Connection(AMQP_URL, connect_timeout=5) as conn:
            try:
                conn.ensure_connection(max_retries=1)
            except Exception as exc:
                pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL}: {exc}")
        queue = f"rl-test-{uuid.uuid4().hex[:12]}"
        return cls(
            "rabbitmq", AMQP_URL, queue, QUEUE_ARGS[kind], EXCHANGE_TYPES.get(kind, "direct")
        )

    @property
    def env(self) -> dict[str, str]:
        if self.name == "redis":
            return {}
        env = {"RELIER_TEST_BROKER": self.url, "RELIER_TEST_QUEUE": self.queue}
        if self.queue_args:
            env["RELIER_TEST_QUEUE_ARGS"] = json.dumps(self.queue_args)
            env["RELIER_TEST_EXCHANGE_TYPE"] = self.exchange_type
        return env

    def configure(self, app: Celery) -> None:
        """Point a publishing app at the test's queue, declared as the workers declare it."""
        if not self.queue:
            return
        app.conf.task_default_queue = self.queue
        if self.queue_args:
            app.conf.task_queues = (test_queue(self.queue, self.queue_args, self.exchange_type),)

    def depth(self) -> int:
        """Messages waiting in the test's queue (RabbitMQ)."""
        with Connection(self.url) as conn:
            return int(conn.default_channel.queue_declare(self.queue, passive=True).message_count)

    def clean(self) -> None:
        with Connection(self.url) as conn, contextlib.suppress(Exception):
            channel = conn.default_channel
            channel.queue_delete(self.queue)
            for exchange in (
                self.queue,
                f"{self.queue}.control.pidbox",
                f"reply.{self.queue}.control.pidbox",  # Celery's control replies (the CLI's)
                f"{self.queue}.events",
            ):
                channel.exchange_delete(exchange)

    @staticmethod
    @contextlib.contextmanager
    def quorum_lock() -> Iterator[None]:
        """Held by a test on a quorum queue: Celery's workers then declare the native delayed
        delivery queues and exchanges (``celery_delayed_0`` .. ``27``, one set per vhost, no
        prefix setting), which the test deletes at its end, never while another one runs."""
        with open(os.path.join(tempfile.gettempdir(), "relier-test-quorum.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                with Connection(AMQP_URL) as conn, contextlib.suppress(Exception):
                    channel = conn.default_channel
                    for name in [f"celery_delayed_{level}" for level in range(28)]:
                        # Quorum queues refuse if_empty: look first (a message in one would
                        # be an ETA task of someone else; none of the tests sends one).
                        with contextlib.suppress(Exception):
                            if channel.queue_declare(name, passive=True).message_count == 0:
                                channel.queue_delete(name)
                        channel = conn.channel()  # a passive miss closes the channel
                        channel.exchange_delete(name)
                    channel.exchange_delete("celery_delayed_delivery")


def test_queue(name: str, args: dict[str, Any], exchange_type: str = "direct") -> Queue:
    """The test's queue with x-arguments, on its own exchange (direct, as Celery's default)."""
    return Queue(name, Exchange(name, exchange_type), routing_key=name, queue_arguments=args)


class Fleet:
    """Starts, kills and replaces real workers of ``chaos_app``."""

    def __init__(self, redis_url: str, tmp_path: Path) -> None:
        self.redis_url = redis_url
        self.tmp_path = tmp_path
        self.workers: list[WorkerProcess] = []
        self.env: dict[str, str] = {}
        self._n = 0

    def start(
        self, pool: str = "prefork", concurrency: int = 2, wait: bool = True, **env: str
    ) -> WorkerProcess:
        self._n += 1
        merged = {**self.env, **env}
        w = WorkerProcess(
            "chaos_app",
            pool=pool,
            concurrency=concurrency,
            hostname=f"w{self._n}@%h",
            cwd=str(HERE),
            log_path=str(self.tmp_path / f"worker{self._n}.log"),
            env={
                "RELIER_TEST_REDIS": self.redis_url,
                "RELIER_TEST_POOL": pool,
                "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
                **merged,
            },
        )
        w.start()
        self.workers.append(w)
        if wait:
            w.wait_ready()
        return w

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.proc is not None and w.proc.poll() is None]

    def kill_random(self, rng: random.Random) -> WorkerProcess:
        victim = rng.choice(self.alive())
        victim.kill()
        return victim

    def logs(self) -> str:
        return "\n".join(f"--- {w.hostname}\n{w.log()[-4000:]}" for w in self.workers)

    def stop_all(self, timeout: float = 10) -> None:
        """SIGTERM every worker at once, then wait for all within one ``timeout`` (a worker
        still up then is SIGKILLed): teardown costs one drain window, not one per worker."""
        live = [w for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for w in live:
            w.kill(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for w in live:
            assert w.proc is not None
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(max(0.0, deadline - time.monotonic()))
        for w in self.workers:
            w.stop(timeout=0)  # SIGKILL what is still up; always its whole process group


# Tests of broker redeliveries run with relier's reliable fetch (nothing redelivers: there is
# no unacked hash) and without it (kombu's fetch: relier drops the redelivered copies).
FETCH_MODES = [pytest.param(True, id="reliable-fetch"), pytest.param(False, id="kombu-fetch")]


def fetch_env(reliable: bool) -> dict[str, str]:
    return {} if reliable else {"RELIER_TEST_CONF": json.dumps({"relier_reliable_fetch": False})}


def send_work(app: Celery, ns: range, seconds: Any = 0.0) -> list[str]:
    ids = []
    for n in ns:
        secs = seconds(n) if callable(seconds) else seconds
        ids.append(app.send_task("chaos.work", args=(n, secs)).id)
    return ids


def done(r: redis.Redis) -> set[int]:
    return {int(x) for x in r.smembers("test:done")}


def wait_all_done(r: redis.Redis, expected: set[int], timeout: float, fleet: Fleet) -> None:
    try:
        wait_for(
            lambda: done(r) >= expected,
            timeout,
            interval=0.2,
            what=f"{len(expected)} tasks to complete",
        )
    except TimeoutError:
        missing = sorted(expected - done(r))
        raise AssertionError(
            f"{len(missing)} task(s) never completed: {missing[:20]}\n{fleet.logs()}"
        ) from None


def held_records(r: redis.Redis) -> int:
    keys = Keys("rl")
    return sum(r.hlen(k) for k in r.scan_iter(keys.held("*")))


def dlq_entries(r: redis.Redis) -> list[dict[str, Any]]:
    return [json.loads(v) for v in r.hvals(Keys("rl").dlq)]


def _trace(r: redis.Redis, task_id: str) -> str:
    """Where a task id is seen in Redis: queued, held by a worker, or in kombu's unacked."""
    keys = Keys("rl")
    where = [
        f"held by {k}" for k in r.scan_iter(keys.held("*")) if any(task_id in v for v in r.hvals(k))
    ]
    if any(task_id in raw for raw in r.lrange("celery", 0, -1)):
        where.append("queued")
    if any(task_id in raw for raw in r.hvals("unacked")):
        where.append("in kombu's unacked hash")
    return ", ".join(where) or "nowhere (lost without a trace)"


def wait_chaos_done(r: redis.Redis, ids: dict[int, str], timeout: float, fleet: Fleet) -> None:
    """Wait until every task id completes. None may vanish: with the reliable fetch a message
    is at every instant in its queue or in one worker's held record."""
    try:
        wait_for(lambda: done(r) >= set(ids), timeout, interval=0.2, what="every task")
    except TimeoutError:
        missing = sorted(set(ids) - done(r))
        traces = {n: _trace(r, ids[n]) for n in missing[:10]}
        raise AssertionError(
            f"{len(missing)} task(s) never completed: {traces}\n{fleet.logs()}"
        ) from None


def leftovers(r: redis.Redis) -> dict[str, int]:
    """What is left in Redis of tasks in flight: queued, held records, kombu's unacked."""
    return {
        "queued": int(r.llen("celery")),
        "held": held_records(r),
        "unacked": int(r.hlen("unacked")),
    }


def relier_cli(fleet: Fleet, *args: str) -> subprocess.CompletedProcess[str]:
    """``celery -A chaos_app relier ...`` as an operator runs it, on the fleet's broker."""
    env = {
        **os.environ,
        **fleet.env,
        "RELIER_TEST_REDIS": fleet.redis_url,
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "chaos_app", "relier", *args],
        cwd=HERE,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def close_amqp_connections(pid: int, port: int = 5672) -> int:
    """Close, from RabbitMQ's side, every AMQP connection of process ``pid`` (rabbitmqctl,
    as an operator or a network fault would): RabbitMQ gives its unacked messages back while
    the process lives on. How many were closed."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    local = set()
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[9] in inodes and int(cols[2].rsplit(":", 1)[1], 16) == port:
                    local.add(int(cols[1].rsplit(":", 1)[1], 16))
    listed = subprocess.run(
        ["rabbitmqctl", "list_connections", "pid", "peer_port", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()[1:]
    closed = 0
    for line in listed:
        conn, peer = line.split("\t")
        if int(peer) in local:
            subprocess.run(
                ["rabbitmqctl", "close_connection", conn, "relier test"],
                capture_output=True,
                timeout=60,
                check=True,
            )
            closed += 1
    return closed
