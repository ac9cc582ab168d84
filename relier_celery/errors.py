"""Every error relier raises derives from :class:`RelierError`, so callers can catch one type."""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "HardTimeout",
    "IdempotencyBusy",
    "IdempotencyConflict",
    "IdempotencyError",
    "IdempotencyInterrupted",
    "RecordRefused",
    "RelierError",
    "StoreUnavailable",
]


class RelierError(Exception):
    """Base class of every relier error."""


class ConfigError(RelierError):
    """A ``relier_*`` setting or a relier task option is missing, unknown or invalid."""


class StoreUnavailable(RelierError):
    """Redis could not be reached, so relier could not record or read its state."""


class RecordRefused(RelierError):
    """A message could not be recorded (for example, larger than ``relier_max_message_bytes``)."""


class HardTimeout(RelierError):
    """A task ran past its ``hard_timeout`` and was stopped: a failure, never a resurrection."""


class IdempotencyError(RelierError):
    """An idempotency key or result is unusable (wrong type, too long, not serializable)."""


class IdempotencyConflict(IdempotencyError):
    """An idempotency key was reused with different arguments than its first call."""


class IdempotencyBusy(IdempotencyError):
    """The key is being executed right now by a live owner; try again later."""


class IdempotencyInterrupted(IdempotencyError):
    """The key's owner died mid-run and the task must not repeat its side effect unasked
    (``idempotency_on_crash="quarantine"``): the delivery goes to the DLQ for an operator."""
