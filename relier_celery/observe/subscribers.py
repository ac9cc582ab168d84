"""Event subscribers beyond logging, started once per process by the worker and by the
standalone resurrector: the fleet-wide counters in Redis and, when ``relier_otel_enabled`` is
on, the OpenTelemetry exporter (imported only then). Publishers that want their events
(``admission.rejected``) counted or traced call :func:`start` once after ``install(app)``.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from relier_celery.core import events
from relier_celery.core.errors import ConfigError
from relier_celery.observe.counters import Counters

if TYPE_CHECKING:
    from relier_celery.wiring.install import Relier

__all__ = ["Observers", "start"]

_lock = threading.Lock()
_started: dict[tuple[str, str], Observers] = {}


@dataclass
class Observers:
    """The subscribers started for one relier store in this process."""

    counters: Counters
    otel: Any = None

    def close(self) -> None:
        """Write pending counters and export buffered spans (at shutdown)."""
        self.counters.close()
        if self.otel is not None:
            self.otel.flush()


def start(relier: Relier) -> Observers:
    """Subscribe the counters (and the OTel exporter if enabled); idempotent per store."""
    key = (relier.store.url, relier.config.prefix)
    with _lock:
        observers = _started.get(key)
        if observers is None:
            counters = Counters(relier.store)
            events.subscribe(counters)
            observers = Observers(counters)
            if relier.config.otel_enabled:
                try:
                    from relier_celery.observe import otel
                except ImportError as exc:
                    raise ConfigError(
                        "relier_otel_enabled is True but OpenTelemetry is not installed "
                        f"({exc}): pip install 'relier-celery[otel]'"
                    ) from exc
                observers.otel = otel.enable()
            _started[key] = observers
        return observers
