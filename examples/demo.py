"""The demo: two real workers, tasks flowing, one worker SIGKILLed mid-task, its tasks
resurrected on the other, and a final accounting line. Run it with ``python3 dev.py demo``.

It starts its own throwaway redis-server, so it touches nothing of yours.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import sys
import time
from pathlib import Path

import redis
from celery import Celery

from relier_celery.testing import RedisServer, WorkerProcess, wait_for

HERE = Path(__file__).parent
ORDERS = 40


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def main() -> int:
    with RedisServer() as url:
        r = redis.Redis.from_url(url, decode_responses=True)
        env = {
            "DEMO_REDIS": url,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        workers = [
            WorkerProcess("demo_app", concurrency=2, hostname=f"{name}@%h", env=env, cwd=str(HERE))
            for name in ("alpha", "bravo")
        ]
        try:
            return run(r, url, workers)
        finally:
            for w in workers:
                w.stop(timeout=10)


def run(r: redis.Redis, url: str, workers: list[WorkerProcess]) -> int:
    alpha, bravo = workers
    say(f"redis-server started at {url}")
    alpha.start().wait_ready()
    bravo.start().wait_ready()
    say(
        f"two workers up: alpha (pid {alpha.pid}) and bravo (pid {bravo.pid}), "
        "relier enabled by `imports = ('relier_celery',)`"
    )
    publisher = Celery("publisher", broker=url)
    rng = random.Random(7)
    for order in range(ORDERS):
        publisher.send_task("demo.process_order", args=(order, rng.uniform(0.5, 1.5)))
    say(f"sent {ORDERS} orders (0.5-1.5 s each)")
    time.sleep(2.0)
    held = r.hlen(next(iter(r.scan_iter("rl:{rl}:held:alpha*")), "none"))
    say(f"alpha holds {held} task(s) in flight; sending SIGKILL to alpha (pid {alpha.pid})")
    alpha.kill(signal.SIGKILL)
    killed = time.monotonic()
    say(
        "alpha is dead. Its lease runs out within relier_lease_ttl (4 s); bravo's scanner "
        "then republishes alpha's tasks..."
    )
    seen = 0

    def progress() -> bool:
        nonlocal seen
        lines = [ln for ln in bravo.log().splitlines() if "task.resurrected" in ln]
        for line in lines[seen:]:
            task = line.split("task.resurrected: ", 1)[1].split(" republished")[0]
            say(f"  resurrected {task} ({time.monotonic() - killed:.1f} s after the kill)")
        seen = len(lines)
        return r.scard("demo:completed") >= ORDERS

    with contextlib.suppress(TimeoutError):
        wait_for(progress, 60, interval=0.2, what="every order to complete")
    completed = r.scard("demo:completed")
    lost = ORDERS - completed
    say(f"sent={ORDERS} completed={completed} resurrected={seen} lost={lost}")
    return 0 if lost == 0 and seen > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
