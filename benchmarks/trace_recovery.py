"""Where a recovery's milliseconds go: ``perf sched`` around single rounds of bench_rabbitmq.py.

    python benchmarks/trace_recovery.py [--rounds 4] [--warm 12] [--timeline] [--amqp URL]

Needs Linux ``perf`` and the right to trace the scheduler (root, or perf_event_paranoid -1).
Each round, for vanilla Celery and for relier alternately: a victim running 4 tasks pinned to
one CPU, an idle survivor pinned to another (warmed by ``--warm`` short tasks), a SIGKILL,
and ``perf sched record`` from just before the kill until every task started again. Prints,
per round, each task's start after the kill and the CPU time each process used in that
window (the survivor's main process, its pool processes, the victim, relier's Redis, the
rest by name); ``--timeline`` adds every run of 50 us or more on the survivor's CPU. Tracing
slows every process down: its figures explain a gap, bench_rabbitmq.py measures it
(docs/rabbitmq-recovery.md, "Where relier's two milliseconds go").
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import bench_rabbitmq as bench
from celery import Celery

from relier_celery.bench.harness import Harness
from relier_celery.testing import RedisServer, wait_for

# One line of `perf sched timehist`: time, [cpu], name[tid/pid], wait, sched delay, run (ms).
LINE = re.compile(
    r"\s*([\d.]+)\s+\[(\d+)\]\s+(.+?)\[(\d+)(?:/(\d+))?\]\s+[\d.]+\s+([\d.]+)\s+([\d.]+)"
)


def one_round(h: Harness, amqp: str, relier: bool, data: Path) -> dict:
    """Run and trace one round; return what report() needs."""
    r = h.reset()
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    app = Celery("pub", broker=amqp)
    app.conf.task_default_queue = queue
    side = "relier" if relier else "vanilla"
    victim = survivor = None
    try:
        ids = [0, 1, 2, 3]
        victim, survivor = bench.start_round(h, app, amqp, queue, relier, ids)
        pool = bench.children(survivor.pid)
        dying = bench.children(victim.pid)
        perf = subprocess.Popen(
            ["perf", "sched", "record", "-k", "CLOCK_MONOTONIC", "-o", str(data)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)  # perf is recording
        killed, killed_mono = time.time(), time.monotonic()
        victim.kill(signal.SIGKILL)
        wait_for(lambda: all(r.llen(f"bench:starts:{n}") >= 2 for n in ids), 60, interval=0.005)
        perf.send_signal(signal.SIGINT)
        perf.wait(60)
        starts = [float(r.lindex(f"bench:starts:{n}", 1).split("|")[0]) - killed for n in ids]
        if not relier:
            h.check_vanilla("trace round", [victim, survivor])
        return {
            "side": side,
            "data": data,
            "from": killed_mono,
            "starts": sorted(starts),
            "roles": {
                os.getpid(): "this script",
                victim.pid: "victim main",
                **{p: "victim pool" for p in dying},
                survivor.pid: "survivor main",
                **{p: "survivor pool" for p in pool},
            },
        }
    finally:
        for w in (victim, survivor):
            if w is not None:
                w.stop(timeout=0)
        app.close()
        bench.drop_queue(amqp, queue)


def report(round_: dict, redis_pid: int, timeline: bool) -> None:
    """Print a traced round: the starts, the CPU per process, the survivor's CPU in time."""
    out = subprocess.run(
        ["perf", "sched", "timehist", "-i", str(round_["data"])],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    start, end = round_["from"], round_["from"] + round_["starts"][-1]
    roles = {**round_["roles"], redis_pid: "redis"}
    used: collections.Counter[str] = collections.Counter()
    runs = []
    for line in out.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        at, cpu, name, tid, pid, _delay, run = m.groups()
        ends, ms = float(at), float(run)
        begins = ends - ms / 1000
        if int(tid) == 0 or ends < start or begins > end:
            continue  # idle, or outside the window
        who = roles.get(int(pid or tid), name.strip())
        used[who] += ms
        if int(cpu) == bench.PIN["survivor"] and ms >= 0.05:  # type: ignore[index]
            runs.append(
                f"  {1000 * (begins - start):6.2f} -> {1000 * (ends - start):6.2f} ms  {who}"
            )
    print(
        f"{round_['side']:>7}: starts {', '.join(f'{1000 * s:.1f}' for s in round_['starts'])} "
        "ms after the kill; CPU ms in that window: "
        + ", ".join(f"{who} {ms:.1f}" for who, ms in used.most_common(8))
    )
    if timeline:
        print("\n".join(runs))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="traced rounds a side")
    parser.add_argument("--warm", type=int, default=12, metavar="N")
    parser.add_argument("--timeline", action="store_true")
    parser.add_argument("--amqp", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        parser.error("needs Linux perf (perf sched record)")
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        parser.error("needs two CPUs")
    bench.PIN = {"victim": cpus[1], "survivor": cpus[0]}
    bench.WARM = args.warm
    traces = Path(tempfile.mkdtemp(prefix="trace-rmq-"))
    server = RedisServer()
    with server as url:
        assert server.proc is not None
        redis_pid = server.proc.pid
        h = Harness(url, traces)
        for k in range(args.rounds):
            for relier in (False, True) if k % 2 == 0 else (True, False):
                done = one_round(h, args.amqp, relier, traces / f"{k}-{relier}.data")
                report(done, redis_pid, args.timeline)
    print(f"perf data and worker logs kept in {traces}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
