"""`rl bench all --quick --json` as a user runs it: a real `rl` subprocess, no -A, its own
embedded Redis and real workers of both sides. Every figure of the table is in the JSON, the
vanilla side is proven vanilla, and relier's figures are the guarantees'."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relier_celery.bench.report import TABLE_FIELDS, lookup

RL = str(Path(sys.executable).parent / "rl")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_all_quick_json_has_every_field_of_the_table(tmp_path: Path) -> None:
    # When the whole quick benchmark runs, from a folder with no app in it
    started = time.monotonic()
    out = subprocess.run(
        [RL, "bench", "all", "--quick", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
    )
    took = time.monotonic() - started
    assert out.returncode == 0, out.stderr[-3000:]
    # Then stdout is one JSON document (no table), and stderr says which step it is on
    doc = json.loads(out.stdout)
    assert "bench [1/10]" in out.stderr and "Traceback" not in out.stderr
    print(f"rl bench all --quick: {took:.0f} s; steps {doc['step_seconds']}")
    # with every field the table shows
    for path in TABLE_FIELDS:
        lookup(doc, path)
    assert doc["quick"] is True
    # And the vanilla side was checked after each of its phases
    proof = doc["vanilla_proof"]
    assert proof["ok"] is True
    assert proof["phases_checked"] == 6
    assert proof["relier_log_lines"] == proof["relier_bootsteps"] == proof["relier_keys"] == 0
    # And relier's figures are its guarantees': nothing lost under SIGKILL chaos or a drain,
    # every killed task running again within seconds, no duplicate side effect
    d, rec, idem, drain = doc["delivery"], doc["recovery"], doc["idempotency"], doc["drain"]
    assert d["relier"]["kills"] >= 2 and d["vanilla"]["kills"] >= 2
    assert d["relier"]["lost"] == 0
    assert d["relier"]["delivered"] + d["relier"]["quarantined"] == d["tasks"]
    assert d["vanilla"]["delivered"] + d["vanilla"]["lost"] == d["tasks"]
    assert rec["relier"]["recovered"] == rec["relier"]["tasks"] > 0
    assert 0 < rec["relier"]["p50"] <= rec["relier"]["p99"] < 10
    assert rec["vanilla"]["visibility_timeout_s"] > rec["vanilla"]["within_s"]
    assert idem["relier"]["orders_never_charged"] == 0
    assert idem["relier"]["duplicate_effects"] <= 1  # a worker killed between effect and record
    assert idem["dispatches"] == 2 * idem["orders"]
    assert drain["relier"]["lost"] == drain["relier"]["completed_twice"] == 0
    assert drain["relier"]["exit_s"] > 0 and drain["vanilla"]["exit_s"] > 0
    # And the costs are figures, whatever their size on a shared machine
    adm, tp = doc["admission"], doc["overhead"]["throughput"]
    assert adm["ping_p99_ms"] > 0 and adm["decision_p99_ms"] > 0
    assert adm["ratio_to_ping_p99"] == pytest.approx(
        adm["decision_p99_ms"] / adm["ping_p99_ms"], rel=0.05
    )
    assert tp["relier_per_s"] > 0 and tp["vanilla_per_s"] > 0
    assert tp["ratio"] == pytest.approx(tp["relier_per_s"] / tp["vanilla_per_s"], rel=0.01)
    lat = doc["overhead"]["latency"]
    assert lat["added_p50_ms"] == pytest.approx(
        lat["relier_p50_ms"] - lat["vanilla_p50_ms"], abs=0.002
    )
