"""Per-task overhead of relier's persistent event loop vs ``asyncio.run`` per task.

    python benchmarks/bench_async.py [--tasks 3000]

Each "task" is a coroutine that awaits once. Prints microseconds per task for both and the
ratio; then how long dispatching stalls a running event loop with ``push()`` vs ``apush()``
(a 1 ms ticker's longest gap), against a throwaway local redis-server. A benchmark, not a
test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from relier_celery.features import aio


async def task() -> int:
    await asyncio.sleep(0)
    return 1


def per_task_us(run: object, tasks: int) -> float:
    start = time.perf_counter()
    for _ in range(tasks):
        run(task())  # type: ignore[operator]
    return (time.perf_counter() - start) / tasks * 1e6


async def loop_stall_ms(task: object, publishes: int, use_apush: bool) -> float:
    """Longest gap (ms) a 1 ms ticker sees while ``publishes`` tasks are dispatched."""
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    for i in range(publishes):
        if use_apush:
            await task.apush(i)  # type: ignore[attr-defined]
        else:
            task.push(i)  # type: ignore[attr-defined]
            await asyncio.sleep(0)
    stop.set()
    await ticking
    return max(gaps) * 1000


def dispatch(publishes: int) -> None:
    """push() called inside the event loop vs await apush(): how long the loop is stalled."""
    from celery import Celery

    from relier_celery import install
    from relier_celery.testing import RedisServer

    with RedisServer() as url:
        app = Celery("bench_dispatch", broker=url)

        @app.task(name="bench.dispatch", shared=False)
        def target(i: int) -> None: ...

        install(app)
        target.push(0)  # connect first
        blocking = asyncio.run(loop_stall_ms(target, publishes, use_apush=False))
        nonblocking = asyncio.run(loop_stall_ms(target, publishes, use_apush=True))
        print(
            f"dispatch of {publishes} tasks from a running loop: longest loop stall with push() "
            f"{blocking:.1f} ms, with await apush() {nonblocking:.1f} ms"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    parser.add_argument("--publishes", type=int, default=300)
    args = parser.parse_args()
    per_task_us(aio.run, 100)  # warm up: start the loop thread
    persistent = per_task_us(aio.run, args.tasks)
    fresh = per_task_us(asyncio.run, args.tasks)
    print(
        f"per-task overhead over {args.tasks} tasks: persistent loop {persistent:.1f} us, "
        f"asyncio.run per task {fresh:.1f} us (asyncio.run / persistent = "
        f"{fresh / persistent:.2f})"
    )
    dispatch(args.publishes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
