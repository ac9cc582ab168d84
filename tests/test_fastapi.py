"""The FastAPI example under a real uvicorn, hit over real HTTP: 200 until the tenant's burst is
spent, then 429 with Retry-After and RateLimit headers."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from email.message import Message
from pathlib import Path

import pytest
import redis

from relier_celery.testing import free_port, wait_for

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.timeout(40)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def web(redis_url: str) -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "examples.fastapi_app:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, "REDIS_URL": redis_url},
    )
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            urllib.request.urlopen(f"{base}/openapi.json", timeout=1).close()
            return True
        except OSError:
            return False

    try:
        wait_for(up, 20, what="uvicorn")
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _post(url: str, tenant: str) -> tuple[int, Message, bytes]:
    """(status, headers looked up case-insensitively, body)."""
    request = urllib.request.Request(url, method="POST", headers={"X-Tenant": tenant})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def test_fastapi_turns_a_refusal_into_429_with_retry_after(web: str, redis_url: str) -> None:
    url = f"{web}/emails?to=a@example.com"
    # Given a tenant allowed 5 emails a minute, 2 at once
    # When it sends three at once
    codes = [_post(url, "acme")[0] for _ in range(2)]
    status, headers, body = _post(url, "acme")
    # Then two are accepted (and queued) and the third is a 429 saying when to come back
    assert codes == [200, 200]
    assert status == 429
    assert 1 <= int(headers["retry-after"]) <= 12  # one interval of 5/m, rounded up
    assert headers["ratelimit-limit"] == "2"
    assert headers["ratelimit-remaining"] == "0"
    assert 0 < int(headers["ratelimit-reset"]) <= 24
    assert b"refused" in body
    assert redis.Redis.from_url(redis_url).llen("emails") == 2
    # Another tenant has its own allowance
    assert _post(url, "globex")[0] == 200
