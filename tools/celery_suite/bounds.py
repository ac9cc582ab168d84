"""pytest plugin loaded in both runs of Celery's suite (``-p bounds``): bounds and a result log.

- Caps each test's timeout (the suite marks its flaky tests ``timeout=300``) and its reruns
  (``flaky(reruns=5)``, rerun on a ``TimeoutError``): a test that hangs under relier would
  otherwise cost half an hour. The caps come from ``RELIER_SUITE_TEST_TIMEOUT`` and
  ``RELIER_SUITE_MAX_RERUNS`` and apply to the vanilla run alike.
- Appends one JSON line per test phase report to ``RELIER_SUITE_RESULTS`` as it happens, so
  the outcomes of a run cut by the overall timeout are still known.
"""

from __future__ import annotations

import json
import os
from typing import IO

import pytest

TIMEOUT_ENV = "RELIER_SUITE_TEST_TIMEOUT"
RERUNS_ENV = "RELIER_SUITE_MAX_RERUNS"
RESULTS_ENV = "RELIER_SUITE_RESULTS"

_log: IO[str] | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _log
    path = os.environ.get(RESULTS_ENV)
    if path:
        _log = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the whole session


def pytest_unconfigure(config: pytest.Config) -> None:
    global _log
    if _log is not None:
        _log.close()
        _log = None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    timeout_cap = float(os.environ.get(TIMEOUT_ENV, "0") or 0)
    reruns_cap = os.environ.get(RERUNS_ENV)
    for item in items:
        timeout = item.get_closest_marker("timeout")
        if timeout_cap and timeout is not None:
            seconds = timeout.kwargs.get("timeout", timeout.args[0] if timeout.args else None)
            if seconds is None or float(seconds) > timeout_cap:
                item.add_marker(pytest.mark.timeout(timeout_cap), append=False)
        flaky = item.get_closest_marker("flaky")
        if reruns_cap is not None and flaky is not None:
            reruns = int(flaky.kwargs.get("reruns", 1))
            if reruns > int(reruns_cap):
                kwargs = {**flaky.kwargs, "reruns": int(reruns_cap)}
                item.add_marker(pytest.mark.flaky(*flaky.args, **kwargs), append=False)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if _log is None:
        return
    line = {
        "nodeid": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": round(report.duration, 3),
    }
    if report.failed:
        line["message"] = _first_line(report)
    _log.write(json.dumps(line) + "\n")
    _log.flush()


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if _log is not None and report.failed:
        line = {"nodeid": report.nodeid, "when": "collect", "outcome": "failed"}
        line["message"] = str(report.longrepr).strip().splitlines()[-1][:300]
        _log.write(json.dumps(line) + "\n")
        _log.flush()


def _first_line(report: pytest.TestReport) -> str:
    crash = getattr(report.longrepr, "reprcrash", None)
    if crash is not None:
        return str(crash.message).splitlines()[0][:300] if crash.message else ""
    return str(report.longrepr).strip().splitlines()[-1][:300] if report.longrepr else ""
