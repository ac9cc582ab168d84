"""FastAPI / Starlette: a refused dispatch becomes HTTP 429 with ``Retry-After``.

    from relier_celery.contrib.fastapi import install_exception_handler

    app = FastAPI()
    install_exception_handler(app)

    @app.post("/emails")
    async def send(to: str) -> dict[str, str]:
        result = await send_email.apush(to, admission_key=to)  # may raise AdmissionRejected
        return {"task_id": result.id}

:class:`~relier_celery.AdmissionRejected` turns into 429 with ``Retry-After`` (whole seconds,
rounded up) and ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset``;
:class:`~relier_celery.AdmissionUnavailable` (admission failing closed) into 503 with
``Retry-After: 1``. Starlette is imported only when a response is built, so relier's core never
depends on it (``pip install relier-celery[fastapi]``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from relier_celery.core.errors import AdmissionRejected, AdmissionUnavailable
from relier_celery.features.admission import retry_after_header

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

__all__ = [
    "admission_exception_handler",
    "install_exception_handler",
    "rejection_headers",
    "unavailable_exception_handler",
]

# How long a client is asked to wait when admission cannot decide (Redis down).
UNAVAILABLE_RETRY_AFTER = 1


def rejection_headers(exc: AdmissionRejected) -> dict[str, str]:
    """The HTTP headers of a refusal: ``Retry-After`` and the IETF draft ``RateLimit-*``."""
    return {
        "Retry-After": retry_after_header(exc.retry_after),
        "RateLimit-Limit": str(exc.limit),
        "RateLimit-Remaining": str(max(0, exc.remaining)),
        "RateLimit-Reset": str(max(0, math.ceil(exc.reset))),
    }


async def admission_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: AdmissionRejected -> 429."""
    from starlette.responses import JSONResponse

    assert isinstance(exc, AdmissionRejected)
    body: dict[str, Any] = {
        "detail": str(exc),
        "reason": exc.reason,
        "retry_after": exc.retry_after,
    }
    return JSONResponse(body, status_code=429, headers=rejection_headers(exc))


async def unavailable_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: AdmissionUnavailable -> 503."""
    from starlette.responses import JSONResponse

    return JSONResponse(
        {"detail": str(exc)},
        status_code=503,
        headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
    )


def install_exception_handler(app: Any) -> None:
    """Register both handlers on a FastAPI or Starlette app (idempotent)."""
    app.add_exception_handler(AdmissionRejected, admission_exception_handler)
    app.add_exception_handler(AdmissionUnavailable, unavailable_exception_handler)
