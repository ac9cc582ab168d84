"""A local OTLP/HTTP receiver for tests of the OpenTelemetry exporter."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OtlpReceiver"]


class OtlpReceiver:
    """A tiny OTLP/HTTP receiver on loopback, to test what relier exports: keeps every POST
    body by path (``/v1/traces``, ``/v1/metrics``) and decodes them with opentelemetry-proto
    (installed with opentelemetry-exporter-otlp)."""

    def __init__(self) -> None:
        received: dict[str, list[bytes]] = {}
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.setdefault(self.path, []).append(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def spans(self) -> list[Any]:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        out = []
        for body in list(self.received.get("/v1/traces", [])):
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans:
                for ss in rs.scope_spans:
                    out.extend(ss.spans)
        return out

    def services(self) -> set[str]:
        """The ``service.name`` of every resource that sent spans."""
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        return {
            a.value.string_value
            for body in list(self.received.get("/v1/traces", []))
            for rs in ExportTraceServiceRequest.FromString(body).resource_spans
            for a in rs.resource.attributes
            if a.key == "service.name"
        }

    def metric_names(self) -> set[str]:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
        )

        names: set[str] = set()
        for body in list(self.received.get("/v1/metrics", [])):
            for rm in ExportMetricsServiceRequest.FromString(body).resource_metrics:
                for sm in rm.scope_metrics:
                    names |= {m.name for m in sm.metrics}
        return names

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
