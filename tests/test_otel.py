"""The OpenTelemetry exporter: spans with ``rl.*`` attributes from real primitives against a real
Redis (in-memory SDK exporter), OTLP/HTTP to a real receiver from a real ``rl`` process, and
no OpenTelemetry import at all when disabled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)

from relier_celery.core import events
from relier_celery.core.record import TaskRecord
from relier_celery.observe.otel import OtelExporter, attribute_name
from relier_celery.recovery.resurrect import Resurrector
from relier_celery.store.client import Store
from relier_celery.testing import OtlpReceiver
from relier_celery.wiring.install import install

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


def dead_worker_holding(store: Store, task_id: str, crashes: int = 0) -> None:
    """A record of ``task_id`` (with a W3C traceparent header) held by a dead worker."""
    store.renew_lease("dead", ttl=0.01)
    rec = TaskRecord(
        task_id=task_id,
        task_name="jobs.x",
        body=b"[[1], {}, {}]",
        content_type="application/json",
        content_encoding="utf-8",
        headers={
            "id": task_id,
            "task": "jobs.x",
            "rl_crashes": crashes,
            "rl_resurrections": crashes,
            "traceparent": TRACEPARENT,
        },
        properties={},
        exchange="",
        routing_key="celery",
        worker="dead",
    )
    assert store.record(task_id, "dead", rec.generation, rec.dumps()).recorded
    time.sleep(0.05)


@pytest.fixture
def otel() -> Iterator[tuple[InMemorySpanExporter, InMemoryMetricReader]]:
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    exporter = OtelExporter(tracer_provider, MeterProvider(metric_readers=[reader]))
    events.subscribe(exporter)
    yield spans, reader
    events.unsubscribe(exporter)


def only(spans: InMemorySpanExporter, name: str) -> ReadableSpan:
    found = [s for s in spans.get_finished_spans() if s.name == name]
    assert len(found) == 1, [s.name for s in spans.get_finished_spans()]
    return found[0]


def metric_points(reader: InMemoryMetricReader) -> dict[str, int]:
    data = reader.get_metrics_data()
    out: dict[str, int] = {}
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = sum(int(p.value) for p in metric.data.data_points)
    return out


def test_the_attribute_rule() -> None:
    assert attribute_name("task_id") == "rl.task.id"
    assert attribute_name("timeout_type") == "rl.timeout.type"
    assert attribute_name("dlq_reason") == "rl.dlq.reason"
    assert attribute_name("worker") == "rl.worker"


def test_a_resurrection_is_a_span_in_the_tasks_own_trace(otel, redis_url: str) -> None:
    spans, reader = otel
    # Given a dead worker whose task message carried a trace context
    app = Celery("o1", broker=redis_url)
    rel = install(app)
    dead_worker_holding(rel.store, "t-res")
    # When a scanner resurrects it
    assert Resurrector(app, rel.config, rel.store, name="s").scan_once() == 1
    # Then the resurrection is a span, child of the task's trace, with rl.* attributes
    span = only(spans, "rl.task.resurrected")
    attrs = dict(span.attributes or {})
    assert attrs["rl.task.id"] == "t-res" and attrs["rl.task.name"] == "jobs.x"
    assert attrs["rl.worker"] == "dead" and attrs["rl.resurrections"] == 1
    assert attrs["rl.crashes"] == 1 and "traceparent" not in str(attrs)
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT_SPAN
    assert only(spans, "rl.scan.claimed").attributes["rl.count"] == 1  # type: ignore[index]
    assert metric_points(reader)["rl.resurrections"] == 1


def test_a_quarantine_is_a_span_with_its_dlq_reason(otel, redis_url: str) -> None:
    spans, reader = otel
    # Given a dead worker's task that already crashed max_resurrections times
    app = Celery("o2", broker=redis_url)
    app.conf.relier_max_resurrections = 1
    rel = install(app)
    dead_worker_holding(rel.store, "t-dlq", crashes=1)
    # When a scanner finds it, it goes to the DLQ
    Resurrector(app, rel.config, rel.store, name="s").scan_once()
    span = only(spans, "rl.task.quarantined")
    attrs = dict(span.attributes or {})
    assert attrs["rl.dlq.reason"] == "max_resurrections" and attrs["rl.task.id"] == "t-dlq"
    assert attrs["rl.dlq.id"] and format(span.context.trace_id, "032x") == TRACE_ID
    assert metric_points(reader)["rl.quarantines"] == 1


def test_a_timeout_inside_a_traced_task_is_a_child_of_its_run_span(otel) -> None:
    spans, reader = otel
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracer = provider.get_tracer("task")
    # Given a task run span, as opentelemetry-instrumentation-celery opens one around a run
    with tracer.start_as_current_span("run/jobs.slow") as run:
        # When the timeout watchdog reports a soft timeout (as timeouts._report does)
        events.emit(
            "task.timeout",
            "jobs.slow[t9] passed its soft timeout",
            task_id="t9",
            task_name="jobs.slow",
            timeout_type="soft",
        )
    # Then the timeout span is a child of that run span
    span = only(spans, "rl.task.timeout")
    assert span.attributes["rl.timeout.type"] == "soft"  # type: ignore[index]
    assert span.parent is not None and span.parent.span_id == run.get_span_context().span_id
    assert metric_points(reader)["rl.timeouts"] == 1


def test_drain_events_are_spans(otel) -> None:
    spans, reader = otel
    events.emit("drain.started", "draining", worker="w1/1/a", timeout=25.0)
    events.emit(
        "drain.finished", "drained", worker="w1/1/a", completed=3, handed_off=1, returned=2, lost=0
    )
    started = only(spans, "rl.drain.started")
    finished = only(spans, "rl.drain.finished")
    assert started.attributes["rl.timeout"] == 25.0  # type: ignore[index]
    assert finished.attributes["rl.handed.off"] == 1  # type: ignore[index]
    assert finished.attributes["rl.worker"] == "w1/1/a"  # type: ignore[index]
    assert metric_points(reader)["rl.drains"] == 1


def test_disabled_means_opentelemetry_is_never_imported(tmp_path: Path, redis_url: str) -> None:
    code = textwrap.dedent(f"""
        import sys
        # redis-py 8 imports OpenTelemetry by itself when it is installed (its own
        # observability module): only what relier adds counts.
        import redis, celery
        before = set(sys.modules)
        from celery import Celery
        import relier_celery, relier_celery.wiring.bootsteps, relier_celery.cli
        from relier_celery.core import events
        from relier_celery.observe import subscribers as observe
        app = Celery("z", broker="{redis_url}")
        observe.start(relier_celery.install(app))
        events.emit("task.resurrected", "x", task_id="t")
        added = sorted(m for m in set(sys.modules) - before if m.startswith("opentelemetry"))
        print(added)
        assert not added and "relier_celery.observe.otel" not in sys.modules
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    yield server
    server.close()


def test_a_real_rl_process_exports_over_otlp_http(tmp_path: Path, redis_url: str, receiver):
    # Given an app with relier_otel_enabled, and a dead worker's traced task
    (tmp_path / "otelapp.py").write_text(
        textwrap.dedent(f"""
        from celery import Celery
        app = Celery("otelapp", broker="{redis_url}")
        app.conf.imports = ("relier_celery",)
        app.conf.relier_otel_enabled = True
    """)
    )
    app = Celery("otelapp", broker=redis_url)
    dead_worker_holding(install(app).store, "t-otlp")
    # When the standalone resurrector runs once, configured by OTEL_* variables only
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "relier-otlp-test",
    }
    out = subprocess.run(
        [str(Path(sys.executable).parent / "rl"), "-A", "otelapp", "resurrector", "--once"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    # Then the receiver got the spans, with their attributes, in the task's trace
    assert receiver.services() == {"relier-otlp-test"}
    spans = {span.name: span for span in receiver.spans()}
    assert "rl.task.resurrected" in spans, (sorted(spans), out.stderr)
    span = spans["rl.task.resurrected"]
    attrs = {a.key: a.value for a in span.attributes}
    assert attrs["rl.task.id"].string_value == "t-otlp"
    assert attrs["rl.resurrections"].int_value == 1
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == PARENT_SPAN
    # And the counters as OTLP metrics
    names = receiver.metric_names()
    assert "rl.resurrections" in names
    # And the fleet-wide counter in Redis
    assert install(app).store.counters()["resurrections"] == 1


def test_the_protocol_and_exporter_come_from_otel_variables(monkeypatch) -> None:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcSpans,
    )
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetrics,
    )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpans,
    )

    from relier_celery.observe import otel

    for var in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER"):
        monkeypatch.delenv(var, raising=False)
    assert isinstance(otel._span_exporter(), HttpSpans)  # the specification's default
    assert isinstance(otel._metric_exporter(), HttpMetrics)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    assert isinstance(otel._span_exporter(), GrpcSpans)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")
    assert isinstance(otel._span_exporter(), HttpSpans)  # the per-signal variable wins
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "none")
    assert otel._span_exporter() is None


def test_an_instrumented_tasks_resurrection_stays_in_its_trace(otel, redis_url: str) -> None:
    """Where relier's records find the trace context, checked against the installed
    opentelemetry-instrumentation-celery on a real publish to a real Redis broker; then the
    resurrection span joins that trace and the republished message carries it unchanged."""
    import base64

    import redis as redis_lib
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    instrumentor = CeleryInstrumentor()
    instrumentor.instrument(tracer_provider=provider)
    try:
        app = Celery("traced", broker=redis_url)
        app.send_task("jobs.x", args=(1,))
    finally:
        instrumentor.uninstrument()
    raw = json.loads(redis_lib.Redis.from_url(redis_url).lrange("celery", 0, -1)[0])
    headers = raw["headers"]
    publish = next(s for s in spans.get_finished_spans() if s.name.startswith("apply_async"))
    trace_id = format(publish.context.trace_id, "032x")
    span_id = format(publish.context.span_id, "016x")
    assert headers["traceparent"].startswith(f"00-{trace_id}-{span_id}-")
    # Given that message held by a worker that died
    client = redis_lib.Redis.from_url(redis_url)
    client.delete("celery")
    rel = install(app)
    rel.store.renew_lease("dead", ttl=0.01)
    rec = TaskRecord(
        task_id=headers["id"],
        task_name="jobs.x",
        body=base64.b64decode(raw["body"]),
        content_type=raw["content-type"],
        content_encoding=raw["content-encoding"],
        headers=headers,
        properties={},
        exchange="",
        routing_key="celery",
        worker="dead",
    )
    assert rel.store.record(rec.task_id, "dead", rec.generation, rec.dumps()).recorded
    time.sleep(0.05)
    # When it is resurrected
    assert Resurrector(app, rel.config, rel.store, name="s").scan_once() == 1
    # Then the resurrection span is in the task's trace, under its publish span
    res = only(otel[0], "rl.task.resurrected")
    assert res.context.trace_id == publish.context.trace_id
    assert res.parent is not None and res.parent.span_id == publish.context.span_id
    # And the new message carries the same trace context, for the next run to continue
    again = json.loads(client.lrange("celery", 0, -1)[0])
    assert again["headers"]["traceparent"] == headers["traceparent"]
    assert again["headers"]["rl_resurrections"] == 1


@pytest.mark.parametrize("preinstalled", [False, True])
def test_enable_uses_a_global_provider_but_never_installs_one(preinstalled: bool) -> None:
    code = textwrap.dedent(f"""
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.trace import TracerProvider
        if {preinstalled}:
            trace.set_tracer_provider(TracerProvider())
        before = trace.get_tracer_provider()
        from relier_celery.observe import otel
        exporter = otel.enable()
        assert trace.get_tracer_provider() is before  # never replaced
        assert (exporter.tracer_provider is before) == {preinstalled}
        from opentelemetry.sdk.metrics import MeterProvider
        assert not isinstance(metrics.get_meter_provider(), MeterProvider)
    """)
    env = {**os.environ, "OTEL_TRACES_EXPORTER": "none", "OTEL_METRICS_EXPORTER": "none"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
