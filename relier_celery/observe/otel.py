"""OpenTelemetry exporter of relier's events: one span per event, and counters as metrics.

Imported only when ``relier_otel_enabled`` is on (``observe.start``), so a disabled relier
never imports OpenTelemetry. It subscribes to the event hub like any other subscriber; no
primitive calls OpenTelemetry.

Mapping (docs/observability.md):

- An event ``task.resurrected`` becomes a span named ``rl.task.resurrected`` (kind INTERNAL,
  zero duration, at the event's time), with the event's message as ``rl.message``.
- Every attribute ``some_key`` becomes ``rl.some.key``: ``task_id`` -> ``rl.task.id``,
  ``timeout_type`` -> ``rl.timeout.type``, ``dlq_reason`` -> ``rl.dlq.reason``. Values that
  are not str, bool, int or float are sent as strings; ``None`` is left out.
- ``traceparent`` / ``tracestate`` (W3C trace context, taken from the task message's headers,
  where opentelemetry-instrumentation-celery puts it) are not attributes: they make the span a
  child of the task's own trace. Without them the span's parent is the current context (the
  task's run span when the event fires inside an instrumented task), else a new trace.
- Counted events (``counters.COUNTED``) also add one to the counter ``rl.<name>``
  (``rl.resurrections``, ``rl.quarantines``, ...), with the low-cardinality attributes only.

The SDK is configured from the standard ``OTEL_*`` variables: service name and resource
attributes, ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` (``otlp``, ``console`` or
``none``), ``OTEL_EXPORTER_OTLP_(TRACES_|METRICS_)PROTOCOL`` (``http/protobuf``, the default, or
``grpc``), endpoints, headers and timeouts (read by the exporters themselves). A tracer or
meter provider the process already installed globally (``opentelemetry-instrument``, your own
setup) is used as it is; otherwise relier's providers are its own and never replace the global
ones, so an application may still set up OpenTelemetry later (in ``worker_process_init``, as
opentelemetry-instrumentation-celery suggests).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.metrics import Counter, MeterProvider
from opentelemetry.trace import SpanKind, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from relier_celery.core import events
from relier_celery.core.events import Event
from relier_celery.observe.counters import COUNTED

__all__ = ["OtelExporter", "attribute_name", "enable", "span_attributes"]

PREFIX = "rl."
# W3C trace context headers: used to parent the span, not exported as attributes.
TRACE_KEYS = ("traceparent", "tracestate")
# Attributes kept on metrics: a bounded set of values each (never ids).
METRIC_KEYS = ("task_name", "timeout_type", "dlq_reason")

_propagator = TraceContextTextMapPropagator()
_lock = threading.Lock()
_enabled: OtelExporter | None = None


def attribute_name(key: str) -> str:
    """``task_id`` -> ``rl.task.id``: the general rule for every event attribute."""
    return PREFIX + key.replace("_", ".")


def _value(value: Any) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    return str(value)


def span_attributes(event: Event) -> dict[str, Any]:
    """The span attributes of an event (trace context and ``None`` values left out)."""
    attrs: dict[str, Any] = {"rl.event": event.name, "rl.message": event.message}
    for key, value in event.attributes.items():
        if key in TRACE_KEYS or value is None:
            continue
        attrs[attribute_name(key)] = _value(value)
    return attrs


def parent_context(event: Event) -> Context | None:
    """The task's trace context carried by the event, if any."""
    carrier = {k: str(event.attributes[k]) for k in TRACE_KEYS if event.attributes.get(k)}
    if "traceparent" not in carrier:
        return None
    ctx = _propagator.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


class OtelExporter:
    """An event subscriber turning each event into a span, and counted events into metrics."""

    def __init__(
        self,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
    ) -> None:
        from relier_celery.core.version import __version__

        self.tracer_provider = tracer_provider or trace.get_tracer_provider()
        self.meter_provider = meter_provider or metrics.get_meter_provider()
        self.tracer = self.tracer_provider.get_tracer("relier_celery", __version__)
        meter = self.meter_provider.get_meter("relier_celery", __version__)
        self.counters: dict[str, Counter] = {
            event: meter.create_counter(
                f"rl.{name}", unit="{event}", description=f"relier {event} events"
            )
            for event, name in COUNTED.items()
        }

    def __call__(self, event: Event) -> None:
        at = int(event.at * 1e9)
        span = self.tracer.start_span(
            f"rl.{event.name}",
            context=parent_context(event),
            kind=SpanKind.INTERNAL,
            attributes=span_attributes(event),
            start_time=at,
        )
        span.end(end_time=at)
        counter = self.counters.get(event.name)
        if counter is not None:
            counter.add(
                1,
                {
                    attribute_name(k): _value(event.attributes[k])
                    for k in METRIC_KEYS
                    if event.attributes.get(k) is not None
                },
            )

    def flush(self, timeout_ms: int = 5000) -> None:
        """Export what is buffered now (at shutdown)."""
        for provider in (self.tracer_provider, self.meter_provider):
            force_flush = getattr(provider, "force_flush", None)
            if force_flush is not None:
                force_flush(timeout_ms)


def _protocol(signal: str) -> str:
    return (
        os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()


def _exporter_kind(signal: str) -> str:
    return os.environ.get(f"OTEL_{signal}_EXPORTER", "otlp").split(",")[0].strip().lower()


def _span_exporter() -> Any:
    kind = _exporter_kind("TRACES")
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if _protocol("TRACES") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter()


def _metric_exporter() -> Any:
    kind = _exporter_kind("METRICS")
    if kind == "none":
        return None
    if kind == "console":
        from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

        return ConsoleMetricExporter()
    if _protocol("METRICS") == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return OTLPMetricExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HTTPMetricExporter,
    )

    return HTTPMetricExporter()


def _tracer_provider() -> TracerProvider:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SDKTracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    current = trace.get_tracer_provider()
    if isinstance(current, SDKTracerProvider):
        return current  # the process configured OpenTelemetry itself
    provider = SDKTracerProvider(resource=Resource.create())
    exporter = _span_exporter()
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def _meter_provider() -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider as SDKMeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    current = metrics.get_meter_provider()
    if isinstance(current, SDKMeterProvider):
        return current
    exporter = _metric_exporter()
    readers = [PeriodicExportingMetricReader(exporter)] if exporter is not None else []
    return SDKMeterProvider(resource=Resource.create(), metric_readers=readers)


def enable() -> OtelExporter:
    """Configure the SDK from ``OTEL_*`` (unless the process already did) and subscribe the
    exporter to the event hub; once per process."""
    global _enabled
    with _lock:
        if _enabled is None:
            _enabled = OtelExporter(_tracer_provider(), _meter_provider())
            events.subscribe(_enabled)
        return _enabled
