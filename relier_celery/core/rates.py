"""Rates and queue bounds as the settings and task options write them (``"100/s"``,
``{"emails": {"rate": "10/s", "burst": 20, "max_queue_depth": 10000}}``), parsed into values
admission.py decides with. Pure: a bad value is one :class:`ConfigError` naming the setting or
option and the fix, raised when the settings are read or a worker starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from relier_celery.core.errors import ConfigError

__all__ = [
    "UNITS",
    "Limit",
    "QueueRule",
    "Rate",
    "parse_depth",
    "parse_limit",
    "parse_queue_rules",
    "parse_rate",
]

UNITS = {
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}
_RATE = re.compile(r"\s*([-+]?\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*")


@dataclass(frozen=True)
class Rate:
    """``count`` admissions per ``period`` seconds, e.g. ``Rate(100, 1.0)`` for ``"100/s"``."""

    count: float
    period: float
    text: str

    @property
    def interval_us(self) -> int:
        """Microseconds between two admissions at the sustained rate (GCRA's emission interval),
        rounded up to a whole microsecond so admit.lua's arithmetic is exact integers: never
        faster than declared, and at most 1 us per admission slower (0.1% at 1000/s)."""
        return max(1, math.ceil(self.period * 1e6 / self.count))


@dataclass(frozen=True)
class Limit:
    """A rate and the burst it allows at once from idle."""

    rate: Rate
    burst: int


@dataclass(frozen=True)
class QueueRule:
    """What ``relier_admission`` says about one queue."""

    limit: Limit | None
    max_queue_depth: int | None


def parse_rate(value: Any, where: str) -> Rate:
    """``"100/s"``, ``"5/m"``, ``"1000/h"``, ``"10/5s"`` (ten per five seconds); a clear
    :class:`ConfigError` naming ``where`` otherwise."""
    fix = 'write it as "<count>/<unit>", e.g. "100/s", "5/m", "1000/h" or "10/5s"'
    if not isinstance(value, str):
        raise ConfigError(f"{where} must be a rate string, got {value!r}: {fix}")
    match = _RATE.fullmatch(value.lower())
    if match is None or match.group(3) not in UNITS:
        raise ConfigError(f"{where}: malformed rate {value!r}: {fix}")
    count = float(match.group(1))
    period = float(match.group(2) or 1) * UNITS[match.group(3)]
    if count <= 0 or period <= 0:
        raise ConfigError(f"{where}: rate {value!r} must be above 0 per period: {fix}")
    return Rate(count, period, value.strip())


def parse_limit(rate: Any, burst: Any, where: str) -> Limit:
    """A rate with its burst; the burst defaults to the rate's count (``"100/s"`` admits 100 at
    once from idle, then 100 per second)."""
    parsed = parse_rate(rate, where)
    if burst is None:
        return Limit(parsed, max(1, math.ceil(parsed.count)))
    if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
        raise ConfigError(f"{where}: burst must be an integer of 1 or more, got {burst!r}")
    return Limit(parsed, burst)


def parse_depth(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be an integer of 1 or more, got {value!r}")
    return value


def parse_queue_rules(raw: Mapping[str, Any]) -> dict[str, QueueRule]:
    """Parse ``relier_admission``: ``{"emails": "10/s"}`` or ``{"emails": {"rate": "10/s",
    "burst": 20, "max_queue_depth": 10000}}``."""
    rules: dict[str, QueueRule] = {}
    for queue, spec in raw.items():
        where = f"relier_admission[{queue!r}]"
        if not isinstance(queue, str) or not queue:
            raise ConfigError(f"relier_admission keys must be queue names, got {queue!r}")
        if isinstance(spec, str):
            rules[queue] = QueueRule(parse_limit(spec, None, where), None)
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(
                f"{where} must be a rate string like '10/s' or a dict with 'rate', 'burst', "
                f"'max_queue_depth', got {spec!r}"
            )
        unknown = set(spec) - {"rate", "burst", "max_queue_depth"}
        if unknown:
            raise ConfigError(
                f"{where} has unknown field(s) {sorted(unknown)}: known are 'rate', 'burst', "
                "'max_queue_depth'"
            )
        if "rate" not in spec and "max_queue_depth" not in spec:
            raise ConfigError(f"{where} needs a 'rate', a 'max_queue_depth', or both")
        if "rate" not in spec and "burst" in spec:
            raise ConfigError(f"{where}: 'burst' needs a 'rate'")
        limit = parse_limit(spec["rate"], spec.get("burst"), where) if "rate" in spec else None
        rules[queue] = QueueRule(
            limit, parse_depth(spec.get("max_queue_depth"), f"{where}['max_queue_depth']")
        )
    return rules
