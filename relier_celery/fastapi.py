"""Kept so that ``from relier_celery.fastapi import install_exception_handler`` still works: the
module lives in :mod:`relier_celery.contrib.fastapi`."""

from __future__ import annotations

from relier_celery.contrib.fastapi import (
    admission_exception_handler,
    install_exception_handler,
    rejection_headers,
    unavailable_exception_handler,
)

__all__ = [
    "admission_exception_handler",
    "install_exception_handler",
    "rejection_headers",
    "unavailable_exception_handler",
]
