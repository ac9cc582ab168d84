"""Every error relier raises derives from :class:`RelierError`, so callers can catch one type."""

from __future__ import annotations

__all__ = [
    "AdmissionRejected",
    "AdmissionUnavailable",
    "BenchError",
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


class BenchError(RelierError):
    """A benchmark could not run (a worker failed, a phase timed out) or its vanilla side ran
    relier, so its figures would not compare relier with vanilla Celery."""


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


class AdmissionRejected(RelierError):
    """A dispatch was refused by admission control; nothing was published. Retry after
    ``retry_after`` seconds."""

    def __init__(
        self,
        message: str,
        *,
        retry_after: float = 0.0,
        limit: int = 0,
        remaining: int = 0,
        reset: float = 0.0,
        reason: str = "rate",
        rate: str | None = None,
        task_name: str = "",
        key: str | None = None,
        queue: str | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        """Seconds to wait before the same dispatch can be admitted."""
        self.limit = limit
        """The burst of the limit that refused (or the queue depth bound, for ``queue_depth``)."""
        self.remaining = remaining
        """Dispatches the limit would still admit right now (0 when refused)."""
        self.reset = reset
        """Seconds until the limit is back to its full burst."""
        self.reason = reason
        """``"rate"`` (a rate limit refused) or ``"queue_depth"`` (the queue is too deep)."""
        self.rate = rate
        """The rate that refused, as configured (``"100/s"``), or None for a depth refusal."""
        self.task_name = task_name
        self.key = key
        self.queue = queue

    def __reduce__(self) -> tuple[object, ...]:
        # Keep the limit info across pickling (a worker's result backend, multiprocessing).
        return (_rebuild_rejected, (type(self), str(self), self.__dict__))


def _rebuild_rejected(
    cls: type[AdmissionRejected], message: str, state: dict[str, object]
) -> AdmissionRejected:
    error = cls(message)
    error.__dict__.update(state)
    return error


class AdmissionUnavailable(StoreUnavailable):
    """Admission control could not decide (Redis or the broker unreachable) and fails closed:
    nothing was published. ``relier_admission_fail_open = True`` lets dispatches through instead."""
