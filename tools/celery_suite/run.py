"""Celery's own integration suite, vanilla and with relier, compared.

    python3 dev.py celery-suite [--subset ci|full] [--relier | --vanilla | --both]

1. Downloads the sdist of the installed celery version from the package registry (``pip
   download``), cached under ``.cache/celery-suite/`` (gitignored), and extracts its ``t/``
   test package without ``t/unit``, ``t/smoke`` and ``t/benchmarks``, plus its pytest settings.
2. For each run, starts a throwaway ``redis-server`` on a free loopback port
   (``relier_celery.testing.RedisServer``) as broker and result backend.
3. Runs the suite with pytest, unedited: vanilla, and with ``-p relier_everywhere`` (relier in
   the ``imports`` of every app the suite builds). ``-p bounds`` caps each test's timeout and
   reruns in both runs and logs each outcome as it happens; an overall timeout ends a run.
4. Prints both runs' counts and the tests that pass vanilla but not with relier, and exits 1
   if there is any (or if the relier run started no worker with relier in it).

Outcomes, the JUnit XML and pytest's output of the last runs are in
``.cache/celery-suite/results/``. See docs/celery-suite.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any, TextIO

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / ".cache" / "celery-suite"

sys.path.insert(0, str(HERE))
from subset import CI_SUBSET, IGNORED  # noqa: E402

# Exit status when the sdist cannot be downloaded (the project's test skips on it outside CI).
EXIT_NO_SDIST = 3
# Per run: (per-test timeout cap in seconds, reruns cap, overall timeout in seconds). No test of
# the CI subset needs more than 40 s vanilla (test_retry: 7 retries 5 s apart); a hang costs one
# per-test timeout.
LIMITS = {"ci": (60.0, 0, 480.0), "full": (90.0, 1, 3600.0)}
# Parts of the sdist's ``t/`` that t/integration needs: its package, helpers and settings.
WANTED = ("t/__init__.py", "t/canvas_helpers.py", "t/skip.py", "t/integration/", "pyproject.toml")


class NoSdist(RuntimeError):
    """The celery sdist could not be downloaded."""


def fetch_suite(celery_version: str) -> Path:
    """The folder with the suite of ``celery_version``, downloaded and extracted once."""
    dest = CACHE / f"celery-{celery_version}"
    if (dest / "t" / "integration" / "conftest.py").exists():
        return dest
    CACHE.mkdir(parents=True, exist_ok=True)
    sdist = CACHE / f"celery-{celery_version}.tar.gz"
    if not sdist.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps"]
        cmd += ["--no-binary", ":all:", "-d", str(CACHE), f"celery=={celery_version}"]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, check=False).returncode != 0 or not sdist.exists():
            raise NoSdist(f"could not download the sdist of celery {celery_version}")
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp, tarfile.open(sdist) as tar:
        prefix = f"celery-{celery_version}/"
        members = []
        for m in tar.getmembers():
            name = m.name.removeprefix(prefix)
            if m.name.startswith(prefix) and any(
                name == w or (w.endswith("/") and name.startswith(w)) for w in WANTED
            ):
                m.name = name
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
        shutil.rmtree(dest, ignore_errors=True)
        Path(tmp).rename(dest)
        Path(tmp).mkdir()  # for TemporaryDirectory's cleanup
    return dest


@dataclass
class Run:
    """One pytest run of the suite and its per-test outcomes."""

    mode: str  # "vanilla" or "relier"
    outcomes: dict[str, str] = field(default_factory=dict)
    messages: dict[str, str] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    cut: bool = False  # ended by the overall timeout
    returncode: int | None = None

    def count(self) -> Counter[str]:
        return Counter(self.outcomes.values())

    def summary(self) -> str:
        c = self.count()
        parts = [f"{c[k]} {k}" for k in ("passed", "failed", "error", "skipped") if c[k]]
        extra = " (cut by the overall timeout)" if self.cut else ""
        took = f" in {self.seconds:.0f} s" if self.seconds else ""
        return f"{self.mode}: {', '.join(parts) or 'nothing'}{took}{extra}"


def read_outcomes(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Per test: passed, failed (the test), error (setup, teardown or collection), skipped.

    The last attempt counts: a rerun of pytest-rerunfailures starts the test afresh. Within an
    attempt a failed phase stays failed."""
    phases: dict[str, dict[str, str]] = {}
    messages: dict[str, str] = {}
    if path.exists():
        for raw in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(raw)
            nodeid = rec["nodeid"]
            if rec["outcome"] == "rerun":
                phases[nodeid] = {}
                continue
            attempt = phases.setdefault(nodeid, {})
            # A failed subtest reports a failed call before the test's own call report.
            if attempt.get(rec["when"]) != "failed":
                attempt[rec["when"]] = rec["outcome"]
            if "message" in rec:
                messages[nodeid] = rec["message"]
    outcomes = {}
    for nodeid, p in phases.items():
        if "failed" in (p.get("collect"), p.get("setup"), p.get("teardown")):
            outcomes[nodeid] = "error"
        elif p.get("call") == "failed":
            outcomes[nodeid] = "failed"
        elif "skipped" in p.values():
            outcomes[nodeid] = "skipped"
        elif p.get("call") == "passed":
            outcomes[nodeid] = "passed"
        else:
            outcomes[nodeid] = "error"  # started, never finished: the run was cut
    return outcomes, messages


def batches(suite: Path, subset: str) -> list[list[str]]:
    """The selection, one batch per test file, each run by its own pytest process: a test that
    wedges the in-process worker ends only its file's session (vanilla has one: the twentieth
    ``start_worker`` of test_backend_leak_in_fixture_teardown.py never joins, and every session
    worker after it then hangs at start)."""
    if subset == "ci":
        selection = list(CI_SUBSET)
    else:
        files = sorted((suite / "t" / "integration").glob("test_*.py"))
        selection = [str(f.relative_to(suite)) for f in files]
        selection = [f for f in selection if f not in IGNORED]
    by_file: dict[str, list[str]] = {}
    for target in selection:
        by_file.setdefault(target.split("::")[0], []).append(target)
    return list(by_file.values())


def run_suite(suite: Path, mode: str, subset: str, out: Path, pytest_args: list[str]) -> Run:
    """Run the suite once, file by file, each against a fresh throwaway Redis."""
    from relier_celery.testing import RedisServer

    test_timeout, reruns, overall = LIMITS[subset]
    out.mkdir(parents=True, exist_ok=True)
    results, workers_log = out / "results.jsonl", out / "workers.jsonl"
    for p in (results, workers_log):
        p.unlink(missing_ok=True)
    # Without relier's own pytest11 plugin: it imports relier_celery, so the vanilla run would
    # have relier's signal handlers connected (inert, but not Celery as it ships).
    plugins = ["-p", "celery.contrib.pytest", "-p", "bounds", "-p", "no:relier"]
    if mode == "relier":
        plugins += ["-p", "relier_everywhere"]
    run = Run(mode)
    print(f"\n=== {mode} run ({subset}) ===", flush=True)
    started = time.monotonic()
    deadline = started + overall
    for batch in batches(suite, subset):
        left = deadline - time.monotonic()
        if left <= 0:
            run.cut = True
            print(f"!!! overall timeout of {overall:.0f} s: {batch[0]} not run", flush=True)
            continue
        name = Path(batch[0].split("::")[0]).stem
        cmd = [sys.executable, "-m", "pytest", *plugins, "-p", "no:cacheprovider"]
        cmd += ["-c", str(suite / "pyproject.toml"), "--rootdir", str(suite)]
        cmd += ["-q", "-rfE", f"--timeout={test_timeout:g}"]
        cmd += [f"--junitxml={out / f'junit-{name}.xml'}"]
        cmd += [f"--ignore={p}" for p in IGNORED] + batch + pytest_args
        with RedisServer() as url:
            port = url.rsplit(":", 1)[1].split("/")[0]
            env = {
                **os.environ,
                "TEST_BROKER": url,
                "TEST_BACKEND": url,
                "REDIS_HOST": "127.0.0.1",
                "REDIS_PORT": port,
                "PYTHONPATH": str(HERE),
                "RELIER_SUITE_TEST_TIMEOUT": f"{test_timeout:g}",
                "RELIER_SUITE_MAX_RERUNS": str(reruns),
                "RELIER_SUITE_RESULTS": str(results),
                "RELIER_SUITE_WORKERS_LOG": str(workers_log),
                "RELIER_SUITE_REDIS_URL": url,
            }
            print(f"\n--- {mode}: {name} (Redis {url}) ---", flush=True)
            print("+", " ".join(cmd), flush=True)
            with (out / "pytest.log").open("a", encoding="utf-8") as log:
                code, cut = _run_bounded(cmd, suite, env, left, log)
        run.cut = run.cut or cut
        run.returncode = max(run.returncode or 0, code if code is not None else 99)
    run.seconds = time.monotonic() - started
    load_outcomes(run, out)
    return run


def load_outcomes(run: Run, out: Path) -> Run:
    """Read a run's outcomes and workers from its results folder."""
    run.outcomes, run.messages = read_outcomes(out / "results.jsonl")
    workers_log = out / "workers.jsonl"
    if workers_log.exists():
        lines = workers_log.read_text(encoding="utf-8").splitlines()
        run.workers = [json.loads(line) for line in lines]
    return run


def _run_bounded(
    cmd: list[str], cwd: Path, env: dict[str, str], timeout: float, f: TextIO
) -> tuple[int | None, bool]:
    """Run ``cmd`` in its own process group, output to the terminal and ``f``; end the whole
    group after ``timeout`` seconds, and whatever of it is left (pool processes) at the end.
    Returns (returncode, whether it was cut)."""
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    stream = proc.stdout

    def pump() -> None:
        for line in stream:
            f.write(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        return proc.wait(timeout), False
    except subprocess.TimeoutExpired:
        print(f"\n!!! overall timeout of {timeout:.0f} s: ending the run", flush=True)
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
                return proc.wait(grace), True
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return proc.poll(), True
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        reader.join(5)


def compare(vanilla: Run, relier: Run) -> list[str]:
    """The tests that pass vanilla and do not pass with relier."""
    return sorted(
        t
        for t, o in vanilla.outcomes.items()
        if o == "passed" and relier.outcomes.get(t, "not run") != "passed"
    )


def report(runs: list[Run]) -> int:
    print("\n=== Celery's integration suite: results ===")
    for run in runs:
        print(run.summary())
        bad = sorted(t for t, o in run.outcomes.items() if o in ("failed", "error"))
        for t in bad:
            print(f"  {run.outcomes[t]:7} {t}  {run.messages.get(t, '')[:160]}")
    status = 0
    relier_runs = [r for r in runs if r.mode == "relier"]
    for run in relier_runs:
        if not any(w["relier"] for w in run.workers):
            print(f"!!! the relier run started no worker with relier in it: {run.workers}")
            status = 1
    if len(runs) == 2:
        vanilla, relier = runs
        lost = compare(vanilla, relier)
        gained = sorted(
            t
            for t, o in relier.outcomes.items()
            if o == "passed" and vanilla.outcomes.get(t) != "passed"
        )
        print(f"\npass vanilla, not with relier: {len(lost)}")
        for t in lost:
            o = relier.outcomes.get(t, "not run")
            print(f"  {o:7} {t}  {relier.messages.get(t, '')[:160]}")
        print(f"pass with relier, not vanilla: {len(gained)}")
        for t in gained:
            print(f"  {vanilla.outcomes.get(t, 'not run'):7} {t}")
        if not vanilla.count()["passed"]:
            print("!!! the vanilla run passed nothing: the setup is broken")
            status = 1
        if lost:
            status = 1
    elif any(r.count()["failed"] + r.count()["error"] for r in runs):
        status = 1
    return status


def baseline_path(subset: str, celery_version: str) -> Path:
    """Vanilla's outcomes of a selection for one celery version, committed with the project."""
    return HERE / "baseline" / f"{subset}-celery-{celery_version}.json"


def load_baseline(path: Path) -> Run:
    data = json.loads(path.read_text(encoding="utf-8"))
    return Run("vanilla", outcomes=dict(data["outcomes"]), seconds=0.0)


def save_baseline(path: Path, run: Run, celery_version: str, subset: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "celery": celery_version,
        "subset": subset,
        "outcomes": dict(sorted(run.outcomes.items())),
    }
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(f"vanilla baseline written: {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev.py celery-suite", description=__doc__.split("\n")[0])
    parser.add_argument("--subset", choices=("ci", "full"), default="full")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--both", dest="modes", action="store_const", const=("vanilla", "relier"))
    which.add_argument("--vanilla", dest="modes", action="store_const", const=("vanilla",))
    which.add_argument("--relier", dest="modes", action="store_const", const=("relier",))
    parser.add_argument("--fetch-only", action="store_true", help="download and extract, no run")
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="run relier only and compare with vanilla's recorded outcomes for this celery "
        "version (tools/celery_suite/baseline/); vanilla runs too when none is recorded",
    )
    parser.add_argument(
        "--record-baseline", action="store_true", help="write vanilla's outcomes as the baseline"
    )
    parser.add_argument(
        "--compare",
        nargs=2,
        metavar=("VANILLA_DIR", "RELIER_DIR"),
        help="compare two earlier runs' results folders (.cache/celery-suite/results/...)",
    )
    args, pytest_args = parser.parse_known_args(argv)
    if pytest_args[:1] == ["--"]:  # pytest would take what follows "--" for paths
        pytest_args = pytest_args[1:]
    if args.compare:
        vanilla_dir, relier_dir = (Path(d) for d in args.compare)
        return report(
            [load_outcomes(Run("vanilla"), vanilla_dir), load_outcomes(Run("relier"), relier_dir)]
        )
    modes = args.modes or ("vanilla", "relier")
    celery_version = installed_version("celery")
    recorded = baseline_path(args.subset, celery_version)
    use_baseline = args.baseline and recorded.exists()
    if use_baseline:
        modes = ("relier",)
    try:
        suite = fetch_suite(celery_version)
    except NoSdist as exc:
        print(f"celery-suite: {exc}", file=sys.stderr)
        return EXIT_NO_SDIST
    print(f"celery {celery_version}: suite in {suite}", flush=True)
    if args.fetch_only:
        return 0
    stamp = time.strftime("%Y%m%d-%H%M%S")
    runs = []
    if use_baseline:
        print(f"vanilla: the recorded outcomes of {recorded.relative_to(ROOT)}", flush=True)
        runs.append(load_baseline(recorded))
    for mode in modes:
        out = CACHE / "results" / f"{stamp}-{args.subset}-{mode}"
        runs.append(run_suite(suite, mode, args.subset, out, pytest_args))
        if mode == "vanilla" and (args.record_baseline or (args.baseline and not use_baseline)):
            save_baseline(recorded, runs[-1], celery_version, args.subset)
    status = report(runs)
    summary = {
        "celery": celery_version,
        "subset": args.subset,
        "runs": {
            r.mode: {
                "counts": dict(r.count()),
                "seconds": round(r.seconds),
                "cut": r.cut,
                "recorded": use_baseline and r.mode == "vanilla",
            }
            for r in runs
        },
        "pass_vanilla_not_relier": compare(*runs) if len(runs) == 2 else None,
    }
    last = CACHE / "results" / f"last-{args.subset}.json"
    last.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"\nsummary: {last}")
    return status


if __name__ == "__main__":
    sys.exit(main())
