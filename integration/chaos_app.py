"""The Celery app the integration tests run in real worker processes.

Relier is enabled by configuration only (``imports``). Every task records its executions in
Redis, so a test counts side effects from outside the workers.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from typing import Any

import redis
import redis.asyncio as aredis
from celery import Celery
from celery.signals import task_postrun, task_success
from kombu import Exchange, Queue

from relier_celery import TaskContext

REDIS_URL = os.environ.get("RELIER_TEST_REDIS", "redis://127.0.0.1:6379/15")
# Where tasks count their executions; apart from the broker when a test restarts the broker.
RESULTS_URL = os.environ.get("RELIER_TEST_RESULTS", REDIS_URL)

# The broker: relier's Redis unless a test runs on another one (RabbitMQ); then relier keeps
# its state in REDIS_URL, and the test's own queue and control exchange keep it apart from
# the other tests sharing that broker.
BROKER_URL = os.environ.get("RELIER_TEST_BROKER", REDIS_URL)

app = Celery("chaos_app", broker=BROKER_URL)
if BROKER_URL != REDIS_URL:
    app.conf.relier_redis_url = REDIS_URL
if os.environ.get("RELIER_TEST_QUEUE"):
    app.conf.task_default_queue = os.environ["RELIER_TEST_QUEUE"]
    app.conf.control_exchange = os.environ["RELIER_TEST_QUEUE"] + ".control"
    app.conf.event_exchange = os.environ["RELIER_TEST_QUEUE"] + ".events"
if os.environ.get("RELIER_TEST_QUEUE_ARGS"):
    # A quorum queue (Celery detects it: per-consumer QoS, native delayed delivery).
    _name = os.environ["RELIER_TEST_QUEUE"]
    app.conf.task_queues = (
        Queue(
            _name,
            Exchange(_name, os.environ.get("RELIER_TEST_EXCHANGE_TYPE", "direct")),
            routing_key=_name,
            queue_arguments=json.loads(os.environ["RELIER_TEST_QUEUE_ARGS"]),
        ),
    )
app.conf.update(
    imports=("relier_celery",),
    task_acks_late=os.environ.get("RELIER_TEST_ACKS_LATE") == "1",
    worker_prefetch_multiplier=int(os.environ.get("RELIER_TEST_PREFETCH", "4")),
    broker_transport_options={
        "visibility_timeout": float(os.environ.get("RELIER_TEST_VISIBILITY", "3600")),
        # Sweep for "expired" unacked messages every second, so a tiny visibility timeout
        # really redelivers within a test.
        "unacked_restore_interval": 1,
        "unacked_restore_throttle": 1,
    },
    worker_hijack_root_logger=False,
    relier_lease_ttl=float(os.environ.get("RELIER_TEST_LEASE_TTL", "3")),
    relier_heartbeat_interval=0.5,
    relier_scan_interval=0.5,
    relier_max_resurrections=int(os.environ.get("RELIER_TEST_MAX_RESURRECTIONS", "3")),
)
if os.environ.get("RELIER_TEST_NO_SCANNER") == "1":
    app.conf.relier_scanner_enabled = False
# Any further settings a test needs, including deliberately bad ones.
app.conf.update(json.loads(os.environ.get("RELIER_TEST_CONF", "{}")))
if os.environ.get("RELIER_TEST_HUGE_RECHECK"):  # integration/test_huge_pages_worker.py: not 30 s
    from relier_celery.wiring import huge_pages

    huge_pages.RECHECK = float(os.environ["RELIER_TEST_HUGE_RECHECK"])

_r: redis.Redis | None = None


def r() -> redis.Redis:
    global _r
    if _r is None:
        _r = redis.Redis.from_url(RESULTS_URL)
    return _r


@app.task(name="chaos.work")
def work(n: int, seconds: float = 0.0, pad: str = "") -> int:
    """Sleep, then record one completed execution of ``n`` (and the order of the starts)."""
    r().pipeline(transaction=False).incr(f"test:started:{n}").rpush("test:order", n).execute()
    time.sleep(seconds)
    r().incr(f"test:runs:{n}")
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.held_open")
def held_open(n: int, limit: float = 120.0) -> int:
    """Like work, but it runs until the test sets ``test:release:<n>`` (``limit`` seconds at
    most): a test that kills its worker mid-run, however slow the machine, kills it running."""
    r().pipeline(transaction=False).incr(f"test:started:{n}").rpush("test:order", n).execute()
    deadline = time.monotonic() + limit
    while not r().get(f"test:release:{n}") and time.monotonic() < deadline:
        time.sleep(0.05)
    r().incr(f"test:runs:{n}")
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.done_then_wait")
def done_then_wait(n: int, path: str, limit: float = 60.0) -> int:
    """Record one completed execution of ``n`` at once, then return once the file ``path``
    exists (``limit`` seconds at most): its end needs Redis no more, so a test can cut its
    pool process off Redis before it ends."""
    r().pipeline(transaction=False).incr(f"test:started:{n}").incr(f"test:runs:{n}").execute()
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


@app.task(name="chaos.traced", bind=True)
def traced(self, n: int, seconds: float) -> int:
    """Like work, and every start and end is written down with its worker and time."""
    where = {"n": n, "host": self.request.hostname, "pid": os.getpid()}
    r().rpush("test:trace", json.dumps({**where, "event": "start", "t": time.time()}))
    time.sleep(seconds)
    r().rpush("test:trace", json.dumps({**where, "event": "end", "t": time.time()}))
    r().incr(f"test:runs:{n}")
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.until")
def until(n: int, wall_time: float) -> int:
    """Like work, but its body ends at a given wall-clock time (to end at a window's edge)."""
    r().pipeline(transaction=False).incr(f"test:started:{n}").rpush("test:order", n).execute()
    time.sleep(max(wall_time - time.time(), 0.0))
    r().incr(f"test:runs:{n}")
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.poison", max_resurrections=2)
def poison(tag: str) -> None:
    """Kill the worker running it (the main process, then itself), every time."""
    r().incr(f"test:poison:{tag}")
    if r().get(f"test:fixed:{tag}"):  # the bug was fixed: it completes
        r().sadd("test:done", tag)
        return
    if os.environ.get("RELIER_TEST_POOL", "prefork") == "prefork":
        os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


@app.task(name="chaos.kill_child")
def kill_child(n: int) -> int:
    """Kill its own pool process the first time it runs (WorkerLostError), succeed after."""
    if r().incr(f"test:kill_child:{n}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.spin")
def spin(n: int, seconds: float) -> int:
    """Burn CPU in pure Python (no sleeping, no I/O) for ``seconds``."""
    r().incr(f"test:started:{n}")
    deadline = time.monotonic() + seconds
    x = 0
    while time.monotonic() < deadline:
        x += 1
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.flaky", bind=True, max_retries=5)
def flaky(self, n: int, failures: int) -> int:  # type: ignore[no-untyped-def]
    """Retry (same task id, a new message) ``failures`` times, then succeed."""
    if r().incr(f"test:flaky:{n}") <= failures:
        raise self.retry(countdown=0.2)
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.reject_once")
def reject_once(n: int) -> int:
    """Give the message back to the broker the first time (Reject(requeue=True)), then run."""
    from celery.exceptions import Reject

    if r().incr(f"test:reject_once:{n}") == 1:
        raise Reject("not yet", requeue=True)
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.boom")
def boom(n: int) -> None:
    """Always fail."""
    r().incr(f"test:boom:{n}")
    raise RuntimeError(f"boom {n}")


if os.environ.get("RELIER_TEST_BAD_TASK") == "1":

    @app.task(name="chaos.typo", max_resurections=2)  # deliberate typo: the worker must refuse
    def typo() -> None: ...


_aclients: dict[int, aredis.Redis] = {}


def ar() -> aredis.Redis:
    """An asyncio Redis client of the running loop (clients cannot cross loops)."""
    loop = asyncio.get_running_loop()
    if id(loop) not in _aclients:
        # redis-py 8 caps a pool at 100 connections and raises past it: 200 tasks on one loop
        # under a loaded machine can have more commands in flight at once.
        _aclients[id(loop)] = aredis.Redis.from_url(RESULTS_URL, max_connections=1000)
    return _aclients[id(loop)]


@app.task(name="chaos.async_io")
async def async_io(n: int, seconds: float = 0.01) -> int:
    """Await real Redis I/O on the worker process's loop; record the loop and the context."""
    client = ar()
    running = await client.incr("test:running")
    await client.eval(
        "if tonumber(redis.call('GET', KEYS[1]) or 0) < tonumber(ARGV[1]) then "
        "redis.call('SET', KEYS[1], ARGV[1]) end",
        1,
        "test:max_running",
        running,
    )
    await asyncio.sleep(seconds)
    await client.decr("test:running")
    await client.sadd("test:loops", f"{os.getpid()}:{id(asyncio.get_running_loop())}")
    await client.set(f"test:ctx:{n}", TaskContext.current().task_id)
    await client.sadd("test:done", n)
    return n


def save_progress_hook(ctx: TaskContext) -> None:
    """A sync soft-timeout hook: save where the task got to."""
    ctx.save_progress(step="halfway", n=ctx.args[0])


async def async_save_progress_hook(ctx: TaskContext) -> None:
    """An async soft-timeout hook."""
    await asyncio.sleep(0)
    ctx.save_progress(step="async-halfway", n=ctx.args[0])


@app.task(
    name="chaos.stall_async",
    soft_timeout=1,
    hard_timeout=2.5,
    on_soft_timeout=async_save_progress_hook,
)
async def stall_async(n: int, seconds: float = 30.0) -> int:
    """Stall past the hard timeout; the finally block must still run when cancelled."""
    await ar().incr(f"test:started:{n}")
    try:
        await asyncio.sleep(seconds)
    finally:
        await ar().set(f"test:cleanup:{n}", 1)
    await ar().sadd("test:done", n)
    return n


@app.task(
    name="chaos.stall_sync", soft_timeout=1, hard_timeout=3, on_soft_timeout=save_progress_hook
)
def stall_sync(n: int, seconds: float = 30.0) -> int:
    """A sync task stalling (for ``seconds``) past its hard timeout."""
    r().incr(f"test:started:{n}")
    time.sleep(seconds)
    r().sadd("test:done", n)
    return n


@app.task(
    name="chaos.long_with_hook",
    soft_timeout=60,
    hard_timeout=120,
    on_soft_timeout=save_progress_hook,
)
def long_with_hook(n: int, seconds: float = 6.0) -> int:
    """A long task whose soft-timeout hook only a drain would fire."""
    r().incr(f"test:started:{n}")
    time.sleep(seconds)
    r().incr(f"test:runs:{n}")
    r().sadd("test:done", n)
    return n


@app.task(name="chaos.charge", idempotent=True)
def charge(order: int, seconds: float = 0.5) -> dict:
    """A side effect that must happen once per order, however often the task is delivered."""
    count = r().incr(f"test:charged:{order}")
    time.sleep(seconds)
    r().sadd("test:done", order)
    return {"order": order, "charge": count}


@task_success.connect
def _record_result(sender: object = None, result: object = None, **_: object) -> None:
    if getattr(sender, "name", None) == "chaos.charge":
        r().rpush("test:results", json.dumps(result))


@task_postrun.connect
def _record_completed(
    sender: object = None, args: Any = None, state: object = None, **_: object
) -> None:
    """After a chaos.traced run succeeded and relier recorded its completion (on task_success,
    before this signal): written down, so a test tells a run that was complete in Redis at a
    freeze from one that was not."""
    if getattr(sender, "name", None) == "chaos.traced" and state == "SUCCESS" and args:
        done = {"n": args[0], "pid": os.getpid(), "t": time.time()}
        r().rpush("test:recorded", json.dumps(done))


@app.task(name="chaos.fenced", idempotent=True)
def fenced(order: int, seconds: float) -> dict:
    """An idempotent task reporting which process ran it."""
    r().incr(f"test:started:{order}")
    time.sleep(seconds)
    result = {"pid": os.getpid()}
    r().rpush(f"test:fenced:{order}", json.dumps(result))
    return result


def _pay(kind: str, order: int, seconds: float) -> dict:
    """Work, then one side effect naming the process that made it, then return. Runs in
    progress are listed (pool pid -> worker pid) so a test can kill a worker mid-run."""
    r().hset(f"test:{kind}:running", os.getpid(), os.getppid())
    r().rpush(f"test:{kind}:started:{order}", os.getpid())
    time.sleep(seconds)
    r().rpush(f"test:{kind}:{order}", f"{os.getppid()}:{os.getpid()}")
    r().sadd(f"test:{kind}:done", order)
    r().hdel(f"test:{kind}:running", os.getpid())
    return {"order": order, "pid": os.getpid()}


@app.task(name="chaos.pay", idempotent=True, idempotency_key=lambda order, seconds: f"pay-{order}")
def pay(order: int, seconds: float) -> dict:
    """An idempotent payment: a crash mid-run repeats the run (the default)."""
    return _pay("paid", order, seconds)


@app.task(
    name="chaos.pay_strict",
    idempotent=True,
    idempotency_on_crash="quarantine",
    idempotency_key=lambda order, seconds: f"strict-{order}",
)
def pay_strict(order: int, seconds: float) -> dict:
    """An idempotent payment that must never repeat unasked: a crash mid-run goes to the DLQ."""
    return _pay("strict", order, seconds)


@app.task(name="chaos.fails_until_fixed", bind=True, max_retries=2)
def fails_until_fixed(self, tag: str) -> str:  # type: ignore[no-untyped-def]
    """Fail (retrying twice) until the test sets test:fixed:<tag>."""
    r().incr(f"test:attempts:{tag}")
    if not r().get(f"test:fixed:{tag}"):
        raise self.retry(exc=ValueError(f"bad input {tag}"), countdown=0.1)
    r().sadd("test:done", tag)
    return tag


if os.environ.get("RELIER_TEST_LATE_TASK") == "1":

    @app.task(name="chaos.late")
    def late(tag: str) -> str:
        """A task only workers of a later deploy know."""
        r().sadd("test:done", tag)
        return tag


# Schema versions: a worker of deploy 1 or 2 (RELIER_TEST_SCHEMA) of one task whose arguments
# changed shape; each run records which deploy ran it with which arguments.
SCHEMA = int(os.environ.get("RELIER_TEST_SCHEMA", "1"))


def _versioned(order: int, *args: object) -> None:
    r().rpush(f"test:versioned:{order}", json.dumps([SCHEMA, order, *args]))
    r().sadd("test:done", order)


if SCHEMA == 1:

    @app.task(name="chaos.versioned")
    def versioned_v1(order: int, amount: float) -> None:
        _versioned(order, amount)

else:
    from relier_celery import migration

    @migration("chaos.versioned", from_version=1)
    def add_currency(args: list, kwargs: dict) -> tuple[list, dict]:
        if args[1] < 0:
            raise ValueError(f"cannot migrate a negative amount {args[1]}")
        return [*args, "EUR"], kwargs

    @app.task(name="chaos.versioned", schema_version=2)
    def versioned_v2(order: int, amount: float, currency: str) -> None:
        _versioned(order, amount, currency)


@app.task(name="chaos.idem_oom", idempotent=True)
def idem_oom(tag: str) -> str:
    """An idempotent task whose first attempt kills its own pool process mid-run, as the OOM
    killer would, while its worker lives on (WorkerLostError: resurrected at once)."""
    if r().incr(f"test:attempts:{tag}") == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    r().sadd("test:done", tag)
    return tag
