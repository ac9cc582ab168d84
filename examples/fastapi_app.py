"""A web app that dispatches Celery tasks under admission control.

    REDIS_URL=redis://localhost:6379/0 uvicorn examples.fastapi_app:app --port 8000
    curl -X POST 'localhost:8000/emails?to=a@example.com' -H 'X-Tenant: acme'   # 200, then 429

Each tenant (``X-Tenant`` header) may send 5 emails a minute, 2 at once; the ``emails`` queue as
a whole takes at most 100 a second and refuses new work while 10,000 wait. A refusal is an
HTTP 429 with ``Retry-After`` and ``RateLimit-*`` headers; if Redis is down, a 503.
"""

from __future__ import annotations

import os

from celery import Celery
from fastapi import FastAPI, Header

import relier_celery
from relier_celery.contrib.fastapi import install_exception_handler

celery_app = Celery("shop", broker=os.environ.get("REDIS_URL", "redis://localhost:6379/0"))
celery_app.conf.relier_admission = {"emails": {"rate": "100/s", "max_queue_depth": 10_000}}


@celery_app.task(name="shop.send_email", queue="emails", admission="5/m", admission_burst=2)
def send_email(to: str) -> str:
    return f"sent to {to}"


relier_celery.install(celery_app)  # a publisher never loads `imports`: install once

app = FastAPI()
install_exception_handler(app)


@app.post("/emails")
async def post_email(to: str, x_tenant: str = Header("public")) -> dict[str, str]:
    result = await send_email.apush(to, admission_key=x_tenant)
    return {"task_id": result.id}
