"""Celery's own integration suite, CI subset: with relier in every app's ``imports``, every
test of the subset that passes vanilla passes (``tools/celery_suite``, docs/celery-suite.md).

Downloads the celery sdist from the package registry (cached in ``.cache/celery-suite/``).
Skipped when it cannot be downloaded, except in CI (``CI=true``), where it must run;
``-m "not celery_suite"`` deselects it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tools" / "celery_suite" / "run.py"
LAST = ROOT / ".cache" / "celery-suite" / "results" / "last-ci.json"
EXIT_NO_SDIST = 3  # tools/celery_suite/run.py

# Up to two runs of the subset, each bounded by the driver (8 min), plus the download.
pytestmark = [pytest.mark.celery_suite, pytest.mark.slow, pytest.mark.timeout(1200)]


def _tail(text: str, lines: int = 80) -> str:
    return "\n".join(text.splitlines()[-lines:])


def test_relier_passes_every_subset_test_that_vanilla_passes() -> None:
    # Given Celery's suite of the installed version
    fetched = subprocess.run(
        [sys.executable, str(RUN), "--fetch-only"], capture_output=True, text=True, check=False
    )
    if fetched.returncode == EXIT_NO_SDIST and os.environ.get("CI") != "true":
        pytest.skip(f"celery sdist not downloadable: {fetched.stderr.strip()}")
    assert fetched.returncode == 0, fetched.stdout + fetched.stderr

    # When the CI subset runs with relier in every app, against vanilla's outcomes recorded for
    # this celery version (tools/celery_suite/baseline/; vanilla runs too where none is)
    LAST.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, str(RUN), "--subset", "ci", "--baseline"],
        capture_output=True,
        text=True,
        check=False,
    )

    # Then vanilla passed tests, relier ran in the workers, and no test passing vanilla
    # fails with relier
    summary = json.loads(LAST.read_text(encoding="utf-8"))
    assert summary["runs"]["vanilla"]["counts"].get("passed", 0) > 0, _tail(done.stdout)
    assert summary["pass_vanilla_not_relier"] == [], _tail(done.stdout)
    assert done.returncode == 0, _tail(done.stdout + done.stderr)
