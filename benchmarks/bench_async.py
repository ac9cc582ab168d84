"""Per-task overhead of relier's persistent event loop vs ``asyncio.run`` per task.

    python benchmarks/bench_async.py [--tasks 3000]

Each "task" is a coroutine that awaits once. Prints microseconds per task for both and the
ratio. A benchmark, not a test: it prints figures and never fails on them.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from relier_celery import aio


async def task() -> int:
    await asyncio.sleep(0)
    return 1


def per_task_us(run: object, tasks: int) -> float:
    start = time.perf_counter()
    for _ in range(tasks):
        run(task())  # type: ignore[operator]
    return (time.perf_counter() - start) / tasks * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=3000)
    args = parser.parse_args()
    per_task_us(aio.run, 100)  # warm up: start the loop thread
    persistent = per_task_us(aio.run, args.tasks)
    fresh = per_task_us(asyncio.run, args.tasks)
    print(
        f"per-task overhead over {args.tasks} tasks: persistent loop {persistent:.1f} us, "
        f"asyncio.run per task {fresh:.1f} us, ratio {fresh / persistent:.1f}x in favour of the "
        "persistent loop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
