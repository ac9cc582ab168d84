"""Observability: fleet-wide counters, the OpenTelemetry exporter, the running set a worker
publishes, and the registry snapshot the CLI renders."""
