"""Admission control: parsing, the GCRA arithmetic, admit.lua against a real redis-server,
exactness under concurrent publishers (threads and processes), and dispatch through Celery."""

from __future__ import annotations

import json
import multiprocessing
import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery, signals
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relier_celery import AdmissionRejected, AdmissionUnavailable, install
from relier_celery.core import events
from relier_celery.core.config import RelierConfig
from relier_celery.core.errors import ConfigError, RelierError, StoreUnavailable
from relier_celery.core.keys import Keys
from relier_celery.core.record import TaskRecord
from relier_celery.features.admission import (
    Limit,
    Rate,
    parse_limit,
    parse_queue_rules,
    parse_rate,
    retry_after_header,
)
from relier_celery.store.client import Store
from relier_celery.testing import free_port
from relier_celery.wiring.task_options import validate_task_options

pytestmark = pytest.mark.timeout(30)


def _bucket(store: Store, name: str, limit: Limit) -> tuple[str, int, int]:
    return (store.keys.admission_task(name), limit.rate.interval_us, limit.burst)


def _redis_us(client: redis.Redis) -> int:
    secs, micros = client.time()
    return int(secs) * 1_000_000 + int(micros)


# -- parsing and validation ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("100/s", 100, 1),
        ("5/m", 5, 60),
        ("1000/h", 1000, 3600),
        ("2/day", 2, 86400),
        ("10/5s", 10, 5),
        (" 2.5 / sec ", 2.5, 1),
        ("3/MIN", 3, 60),
    ],
)
def test_rates_parse(text: str, count: float, period: float) -> None:
    rate = parse_rate(text, "x")
    assert (rate.count, rate.period) == (count, period)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("100", "malformed rate"),
        ("abc/s", "malformed rate"),
        ("100/fortnight", "malformed rate"),
        ("", "malformed rate"),
        (100, "must be a rate string"),
        (None, "must be a rate string"),
        ("0/s", "must be above 0"),
        ("-5/s", "must be above 0"),
        ("5/0s", "must be above 0"),
    ],
)
def test_bad_rates_are_clear_errors_naming_where(value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_rate(value, "task 'a.b': admission")
    assert "task 'a.b': admission" in str(info.value)
    assert '"100/s"' in str(info.value)  # the fix is shown


@pytest.mark.parametrize("burst", [0, -1, 1.5, True, "5"])
def test_burst_below_one_or_not_an_integer_is_refused(burst: Any) -> None:
    with pytest.raises(ConfigError, match="burst must be an integer of 1 or more"):
        parse_limit("10/s", burst, "x")


def test_burst_defaults_to_the_rates_count() -> None:
    assert parse_limit("100/s", None, "x").burst == 100
    assert parse_limit("0.5/s", None, "x").burst == 1
    assert parse_limit("100/s", 7, "x").burst == 7


def test_queue_rules_parse_and_refuse_nonsense() -> None:
    rules = parse_queue_rules(
        {"emails": "10/s", "sms": {"rate": "1/s", "burst": 3, "max_queue_depth": 50}}
    )
    assert rules["emails"].limit == Limit(Rate(10, 1, "10/s"), 10)
    assert rules["sms"].limit is not None and rules["sms"].limit.burst == 3
    assert rules["sms"].max_queue_depth == 50
    assert parse_queue_rules({"q": {"max_queue_depth": 5}})["q"].limit is None
    for bad, message in (
        ({"q": 5}, "rate string like '10/s' or a dict"),
        ({"q": {"rate": "1/s", "brust": 2}}, "unknown field"),
        ({"q": {}}, "needs a 'rate', a 'max_queue_depth'"),
        ({"q": {"burst": 2, "max_queue_depth": 3}}, "'burst' needs a 'rate'"),
        ({"q": {"max_queue_depth": 0}}, r"\['max_queue_depth'\] must be an integer of 1 or"),
        ({"q": "fast"}, "malformed rate"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_queue_rules(bad)


def test_relier_admission_settings_are_validated_naming_the_key() -> None:
    config = RelierConfig.from_mapping(
        {"relier_admission": {"emails": "10/s"}, "relier_admission_fail_open": True},
        broker_url="redis://x",
    )
    assert config.admission == {"emails": "10/s"} and config.admission_fail_open
    assert RelierConfig.from_mapping({}, broker_url="redis://x").admission_fail_open is False
    with pytest.raises(ConfigError, match=r"relier_admission\['emails'\]: malformed rate"):
        RelierConfig.from_mapping({"relier_admission": {"emails": "ten"}}, broker_url="redis://x")
    with pytest.raises(ConfigError, match="relier_admission must be a dict"):
        RelierConfig.from_mapping({"relier_admission": "10/s"}, broker_url="redis://x")
    with pytest.raises(ConfigError, match="did you mean 'relier_admission_fail_open'"):
        RelierConfig.from_mapping({"relier_admission_failopen": True}, broker_url="redis://x")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"admission": "0/s"}, "task 'v.t': admission: rate '0/s' must be above 0"),
        ({"admission": "lots"}, "task 'v.t': admission: malformed rate"),
        ({"admission": "5/s", "admission_burst": 0}, "burst must be an integer of 1 or more"),
        ({"admission_burst": 5}, "admission_burst needs an admission rate"),
        ({"max_queue_depth": -1}, "task 'v.t': max_queue_depth must be an integer"),
        ({"admision": "5/s"}, "did you mean 'admission'"),
    ],
)
def test_bad_task_options_stop_the_worker_at_start(options: dict[str, Any], message: str) -> None:
    app = Celery("v", broker="memory://")

    def t() -> None:
        pass

    app.task(name="v.t", shared=False, **options)(t)
    with pytest.raises(ConfigError, match=message):
        validate_task_options(app)


# -- the arithmetic (a model of admit.lua, checked by hypothesis) --------------------------
def gcra(tat: int, now: int, interval: int, burst: int) -> tuple[bool, int, int]:
    """The decision admit.lua makes for one limit: (admitted, new tat, retry after)."""
    tat = max(tat, now)
    allow_at = tat + interval - burst * interval
    if allow_at > now:
        return False, tat, allow_at - now
    return True, tat + interval, 0


@settings(max_examples=200, deadline=None)
@given(
    interval=st.integers(1, 10**6),
    burst=st.integers(1, 50),
    gaps=st.lists(st.integers(0, 2 * 10**6), min_size=1, max_size=200),
)
def test_gcra_never_admits_more_than_burst_plus_rate_times_any_window(
    interval: int, burst: int, gaps: list[int]
) -> None:
    now, tat, admitted_at = 0, 0, []
    for gap in gaps:
        now += gap
        ok, tat, _ = gcra(tat, now, interval, burst)
        if ok:
            admitted_at.append(now)
    # Every window [admitted_at[i], admitted_at[j]] holds at most burst + length / interval.
    for i in range(len(admitted_at)):
        for j in range(i, len(admitted_at)):
            window = admitted_at[j] - admitted_at[i]
            assert (j - i + 1 - burst) * interval <= window


@settings(max_examples=200, deadline=None)
@given(
    interval=st.integers(1, 10**6),
    burst=st.integers(1, 50),
    calls=st.integers(1, 100),
)
def test_gcra_waiting_retry_after_is_enough_and_needed(
    interval: int, burst: int, calls: int
) -> None:
    tat, admitted = 0, 0
    for _ in range(calls):
        ok, tat, wait = gcra(tat, 0, interval, burst)
        if not ok:
            # Waiting exactly retry_after admits; a microsecond less does not.
            assert gcra(tat, wait, interval, burst)[0]
            assert not gcra(tat, wait - 1, interval, burst)[0]
            break
        admitted += 1
    assert admitted == min(calls, burst)


@given(seconds=st.floats(1e-6, 1e6))
def test_retry_after_header_is_whole_seconds_rounded_up(seconds: float) -> None:
    value = int(retry_after_header(seconds))
    assert (value >= seconds and value - seconds < 1) or value == 1


@given(count=st.integers(1, 10**6), unit=st.sampled_from(["s", "m", "h", "d"]))
def test_interval_is_whole_microseconds_never_faster_than_asked(count: int, unit: str) -> None:
    rate = parse_rate(f"{count}/{unit}", "x")
    period_us = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit] * 10**6
    # Rounded up to whole microseconds (exact integer arithmetic in Lua): never above the
    # declared rate, and less than one microsecond per admission below it.
    assert isinstance(rate.interval_us, int)
    assert rate.interval_us * count >= period_us
    assert (rate.interval_us - 1) * count < period_us


# -- admit.lua against a real Redis --------------------------------------------------------
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(bursts=st.lists(st.integers(1, 8), min_size=1, max_size=3), calls=st.integers(1, 12))
def test_several_limits_decide_all_or_nothing(
    redis_url: str, bursts: list[int], calls: int
) -> None:
    # Given limits slow enough that the test's own duration frees nothing (1 per hour)
    store = Store(redis_url, Keys(f"h{time.time_ns()}"))
    limits = [parse_limit("1/h", b, "x") for b in bursts]
    buckets = [_bucket(store, f"t{i}", lim) for i, lim in enumerate(limits)]
    # When a caller asks `calls` times
    outcomes = [store.admit(buckets) for _ in range(calls)]
    # Then the tightest burst admits, and a refusal consumed nothing in the other limits
    admitted = [o for o in outcomes if o[0] == 1]
    assert len(admitted) == min(calls, min(bursts))
    assert [o[2] for o in admitted] == [min(bursts) - 1 - i for i in range(len(admitted))]
    for i, limit in enumerate(limits):
        if limit.burst > min(bursts):
            solo = [store.admit([buckets[i]])[0] for _ in range(limit.burst)]
            assert sum(solo) == limit.burst - len(admitted)
    refused = [o for o in outcomes if o[0] == 0]
    for _, retry_ms, remaining, reset_ms, index in refused:
        assert bursts[index - 1] == min(bursts) and remaining == 0
        assert 3_500_000 < retry_ms <= 3_600_000 and reset_ms >= retry_ms


def test_burst_then_refusal_with_retry_after_remaining_and_reset(
    store: Store, client: redis.Redis
) -> None:
    # Given 10/s with a burst of 3
    bucket = _bucket(store, "t", parse_limit("10/s", 3, "x"))
    # When four calls arrive at once
    out = [store.admit([bucket]) for _ in range(4)]
    # Then three are admitted, with 2, 1, 0 left, and the fourth waits about 100 ms
    assert [o[0] for o in out] == [1, 1, 1, 0]
    assert [o[2] for o in out[:3]] == [2, 1, 0]
    _, retry_ms, remaining, reset_ms, index = out[3]
    assert 50 < retry_ms <= 100 and remaining == 0 and index == 1
    assert 250 < reset_ms <= 300  # three intervals until the burst is whole again
    assert 0 < client.pttl(bucket[0]) <= 301  # the key goes away once idle


def test_a_client_that_sleeps_retry_after_is_admitted(store: Store) -> None:
    bucket = _bucket(store, "t", parse_limit("20/s", 1, "x"))
    assert store.admit([bucket])[0] == 1
    allowed, retry_ms, *_ = store.admit([bucket])
    assert allowed == 0 and retry_ms > 0
    time.sleep(retry_ms / 1000)
    assert store.admit([bucket])[0] == 1


def test_skewed_client_clocks_do_not_matter(
    redis_url: str, client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given two publishers whose clocks are an hour ahead and an hour behind
    real = time.time
    ahead, behind = Store(redis_url, Keys("rl")), Store(redis_url, Keys("rl"))
    bucket = _bucket(ahead, "t", parse_limit("1/h", 4, "x"))
    before = _redis_us(client)
    out = []
    for i in range(8):
        skew = 3600 if i % 2 else -3600
        monkeypatch.setattr(time, "time", lambda skew=skew: real() + skew)
        out.append((behind if i % 2 else ahead).admit([bucket])[0])
    monkeypatch.setattr(time, "time", real)
    # Then they share one timeline, the Redis server's: exactly the burst is admitted
    assert out == [1, 1, 1, 1, 0, 0, 0, 0]
    tat = int(client.get(bucket[0]) or 0)
    assert before + 4 * 3_600_000_000 <= tat <= _redis_us(client) + 4 * 3_600_000_000


def _hammer(url: str, prefix: str, bucket: tuple[str, int, int], until: float, q: Any) -> None:
    """One process: 4 threads asking as often as a 2 ms pause allows, until the deadline."""
    store = Store(url, Keys(prefix))
    lock = threading.Lock()
    admitted = [0]

    def run() -> None:
        while time.time() < until:
            if store.admit([bucket])[0]:
                with lock:
                    admitted[0] += 1
            time.sleep(0.002)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(admitted[0])


def test_many_concurrent_publishers_never_exceed_rate_times_elapsed_plus_burst(
    redis_url: str, client: redis.Redis
) -> None:
    # Given 4 processes x 4 threads asking far more often than 100/s (burst 20) allows
    limit = parse_limit("100/s", 20, "x")
    store = Store(redis_url, Keys("rl"))
    bucket = _bucket(store, "hot", limit)
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    start_us = _redis_us(client)
    until = time.time() + 2.5
    procs = [ctx.Process(target=_hammer, args=(redis_url, "rl", bucket, until, q)) for _ in "abcd"]
    for p in procs:
        p.start()
    admitted = sum(q.get(timeout=20) for _ in procs)
    for p in procs:
        p.join(timeout=10)
    elapsed = (_redis_us(client) - start_us) / 1e6
    # Then what was admitted is within the GCRA bound and close to it
    bound = 100 * elapsed + 20
    print(f"admitted {admitted} in {elapsed:.3f} s; bound {bound:.1f}")
    assert admitted <= bound
    assert admitted >= 0.85 * 100 * (elapsed - 0.5)  # process start-up eats a little


def test_the_decision_is_one_evalsha_and_survives_a_script_flush(
    store: Store, client: redis.Redis
) -> None:
    bucket = _bucket(store, "t", parse_limit("1000/s", None, "x"))
    store.admit([bucket])
    client.config_resetstat()
    for _ in range(10):
        store.admit([bucket])
    stats = client.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 10 and "cmdstat_eval" not in stats
    client.script_flush()
    assert store.admit([bucket])[0] == 1  # reloaded on NOSCRIPT


def test_redis_down_is_store_unavailable() -> None:
    store = Store(f"redis://127.0.0.1:{free_port()}/0", Keys("rl"))
    with pytest.raises(StoreUnavailable):
        store.admit([_bucket(store, "t", parse_limit("1/s", 1, "x"))])


# -- dispatch through Celery ---------------------------------------------------------------
@pytest.fixture
def rejections() -> Iterator[list[events.Event]]:
    seen: list[events.Event] = []

    def keep(e: events.Event) -> None:
        if e.name.startswith("admission."):
            seen.append(e)

    events.subscribe(keep)
    yield seen
    events.unsubscribe(keep)


def _app(url: str, **conf: Any) -> Celery:
    app = Celery(f"adm{time.time_ns()}", broker=url)
    app.conf.update(conf)

    @app.task(name="adm.limited", admission="1/h", admission_burst=2, shared=False)
    def limited(x: int = 0) -> int:
        return x

    @app.task(name="adm.free", shared=False)
    def free(x: int = 0) -> int:
        return x

    @app.task(name="adm.deep", max_queue_depth=3, queue="deep", shared=False)
    def deep(x: int = 0) -> int:
        return x

    install(app)
    return app


def test_a_refused_push_raises_and_publishes_nothing(
    redis_url: str, client: redis.Redis, rejections: list[events.Event]
) -> None:
    task = _app(redis_url).tasks["adm.limited"]
    # Given a task limited to a burst of 2, pushed twice (not counted twice by apply_async)
    task.push(1)
    task.push(2)
    assert client.llen("celery") == 2
    # When a third push comes
    with pytest.raises(AdmissionRejected) as info:
        task.push(3)
    # Then nothing was published and the error says when to come back and why
    assert client.llen("celery") == 2
    err = info.value
    assert isinstance(err, RelierError)
    assert 3500 < err.retry_after <= 3600 and err.limit == 2 and err.remaining == 0
    assert err.rate == "1/h" and err.reason == "rate" and err.task_name == "adm.limited"
    assert "retry after" in str(err)
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.retry_after, copy.rate) == (str(err), err.retry_after, "1/h")
    (event,) = rejections
    assert event.name == "admission.rejected"
    assert event.attributes["task_name"] == "adm.limited"
    assert event.attributes["retry_after"] == err.retry_after


def test_delay_and_apply_async_are_limited_too(redis_url: str, client: redis.Redis) -> None:
    task = _app(redis_url).tasks["adm.limited"]
    task.delay(1)
    task.apply_async((2,))
    with pytest.raises(AdmissionRejected):
        task.delay(3)
    with pytest.raises(AdmissionRejected):
        task.s(4).apply_async()
    assert client.llen("celery") == 2
    # A Celery retry (apply_async with retries=N) was admitted once already and passes
    task.apply_async((5,), retries=1)
    assert client.llen("celery") == 3
    # Tasks without a limit are untouched
    for i in range(5):
        _app_free = task.app.tasks["adm.free"]
        _app_free.delay(i)
    assert client.llen("celery") == 8


def test_async_push_is_limited(redis_url: str, client: redis.Redis) -> None:
    import asyncio

    task = _app(redis_url).tasks["adm.limited"]

    async def main() -> None:
        await task.apush(1)
        await task.apush(2)
        with pytest.raises(AdmissionRejected):
            await task.apush(3)

    asyncio.run(main())
    assert client.llen("celery") == 2


def test_admission_keys_get_a_bucket_each_and_must_be_sane(
    redis_url: str, client: redis.Redis
) -> None:
    app = _app(redis_url)
    task = app.tasks["adm.limited"]
    for tenant in ("tenant-1", "tenant-2"):
        task.push(admission_key=tenant)
        task.apply_async(admission_key=tenant)
        with pytest.raises(AdmissionRejected) as info:
            task.push(admission_key=tenant)
        assert info.value.key == tenant
    assert client.llen("celery") == 4
    (raw, *_) = client.lrange("celery", 0, 0)
    assert "admission_key" not in raw  # never leaks into the message
    with pytest.raises(ConfigError, match="admission_key must be a non-empty string"):
        task.push(admission_key="")
    with pytest.raises(ConfigError, match="has no admission rate to scope"):
        app.tasks["adm.free"].push(admission_key="t")


def test_a_queue_limit_from_relier_admission(redis_url: str, client: redis.Redis) -> None:
    app = _app(redis_url, relier_admission={"slow": {"rate": "1/h", "burst": 3}})
    free = app.tasks["adm.free"]
    for i in range(3):
        free.push(i, queue="slow")
    with pytest.raises(AdmissionRejected) as info:
        free.push(queue="slow")
    assert info.value.queue == "slow" and info.value.limit == 3
    free.push(queue="celery")  # other queues are not limited
    assert client.llen("slow") == 3 and client.llen("celery") == 1


def test_task_routes_decide_the_queue_limit(redis_url: str, client: redis.Redis) -> None:
    app = _app(
        redis_url,
        relier_admission={"slow": {"rate": "1/h", "burst": 1}},
        task_routes={"adm.free": {"queue": "slow"}},
    )
    app.tasks["adm.free"].delay()
    with pytest.raises(AdmissionRejected) as info:
        app.tasks["adm.free"].delay()
    assert info.value.queue == "slow" and client.llen("slow") == 1


def test_a_broker_down_depth_check_fails_closed(redis_url: str) -> None:
    app = Celery(f"adm{time.time_ns()}", broker=f"redis://127.0.0.1:{free_port()}/0")
    app.conf.update(
        relier_redis_url=redis_url,
        broker_transport_options={"max_retries": 1, "interval_start": 0, "interval_max": 0.1},
    )

    @app.task(name="adm.deep", max_queue_depth=3, shared=False)
    def deep() -> None:
        pass

    install(app)
    with pytest.raises(AdmissionUnavailable, match="cannot read the depth of queue 'celery'"):
        deep.delay()


def test_max_queue_depth_counts_priority_sublists(
    redis_url: str, client: redis.Redis, rejections: list[events.Event]
) -> None:
    app = _app(redis_url)
    deep = app.tasks["adm.deep"]
    # Given messages of several priorities (kombu keeps each step in its own list)
    deep.push(1)
    deep.push(2, priority=5)
    deep.push(3, priority=9)
    assert client.llen("deep") == 1  # the plain LLEN would see only one
    # When the queue holds max_queue_depth messages, the next dispatch is refused
    with pytest.raises(AdmissionRejected) as info:
        deep.delay(4)
    assert info.value.reason == "queue_depth" and info.value.limit == 3
    assert info.value.retry_after > 0
    assert rejections[-1].attributes["reason"] == "queue_depth"
    # And once a worker took one, there is room again
    client.rpop("deep")
    deep.delay(5)


def test_fail_closed_and_fail_open_when_redis_is_down(
    redis_url: str, client: redis.Redis, rejections: list[events.Event]
) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    closed = _app(redis_url, relier_redis_url=dead).tasks["adm.limited"]
    with pytest.raises(AdmissionUnavailable, match="relier_admission_fail_open") as info:
        closed.push()
    assert isinstance(info.value, StoreUnavailable)
    assert client.llen("celery") == 0
    opened = _app(redis_url, relier_redis_url=dead, relier_admission_fail_open=True)
    opened.tasks["adm.limited"].push()
    assert client.llen("celery") == 1
    assert [e.name for e in rejections] == ["admission.fail_open"]


def test_before_task_publish_cannot_refuse_so_apply_async_is_guarded(
    redis_url: str, client: redis.Redis
) -> None:
    # Why relier wraps apply_async: Celery logs and swallows a before_task_publish error
    app = _app(redis_url)

    def refuse(**_: Any) -> None:
        raise RuntimeError("refused")

    signals.before_task_publish.connect(refuse, weak=False)
    try:
        app.tasks["adm.free"].delay()
    finally:
        signals.before_task_publish.disconnect(refuse)
    assert client.llen("celery") == 1


def test_relier_republishing_is_never_refused(redis_url: str, client: redis.Redis) -> None:
    # Given a limited task whose bucket is exhausted
    app = _app(redis_url)
    task = app.tasks["adm.limited"]
    task.push(1)
    task.push(2)
    with pytest.raises(AdmissionRejected):
        task.push(3)
    # When relier republishes a held message of it (resurrection / hand-off path)
    raw = json.loads(client.lpop("celery") or "")
    record = TaskRecord(
        task_id=raw["headers"]["id"],
        task_name="adm.limited",
        body=raw["body"].encode(),
        content_type=raw["content-type"],
        content_encoding=raw["content-encoding"],
        headers=raw["headers"],
        properties={},
        exchange="",
        routing_key="celery",
        worker="dead",
    )
    with app.producer_pool.acquire(block=True) as producer:
        record.next_generation(True).publish(producer)
    # Then it is published all the same
    assert client.llen("celery") == 2
