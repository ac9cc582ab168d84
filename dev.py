#!/usr/bin/env python3
"""The two commands of the README, needing only Python 3.11+:

    python3 dev.py demo   # set up .venv, then run the demo (workers, a SIGKILL, tasks back)
    python3 dev.py test   # set up .venv, then run lint, types, layers and the whole test suite
    python3 dev.py celery-suite [--subset ci|full] [--relier|--vanilla|--both]
                          # Celery's own integration suite, vanilla and with relier, compared
                          # (docs/celery-suite.md)

Setting up creates ``.venv`` and installs the package with its dev extra (only when
pyproject.toml changed since the last install). Extra arguments go to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def run(*cmd: str | Path) -> None:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], cwd=ROOT, check=True)


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs on whatever python3 is
        sys.exit(f"relier_celery needs Python 3.11+, this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".relier-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest:
        run(PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip")
        run(PY, "-m", "pip", "install", "--quiet", "-e", ".[dev]")
        stamp.write_text(digest)


def main() -> None:
    args = sys.argv[1:]
    if not args or args[0] not in ("demo", "test", "setup", "celery-suite"):
        sys.exit(__doc__)
    setup()
    try:
        if args[0] == "demo":
            run(PY, "examples/demo.py", *args[1:])
        elif args[0] == "celery-suite":
            run(PY, "tools/celery_suite/run.py", *args[1:])
        elif args[0] == "test":
            run(
                PY,
                "-m",
                "ruff",
                "check",
                "relier_celery",
                "tests",
                "integration",
                "examples",
                "benchmarks",
                "tools",
            )
            run(PY, "-m", "mypy")
            # The layers of docs/design.md#layout (contract in setup.cfg).
            run(BIN / "lint-imports")
            # Three test processes on 2 cores: most integration tests wait on workers and
            # timers, not on the CPU. On 6 December 2026, both beside other work: -n 2 took
            # 20 min 48 s (at 6d477dd), -n 3 12 min 2 s (at 86efd78, 4 fewer Celery subset
            # tests and 2 more cluster tests), every test passing. -n 0 runs serially.
            # loadgroup: the RabbitMQ quorum-queue tests (one xdist group) share a lock.
            # --max-worker-restart 0: a test process that dies ends the run, failed, at once.
            # With loadgroup, xdist 3.8 replaced one and then waited for ever (6 December 2026:
            # a stray SIGALRM killed one, 4 tests never ran, CI would have stopped at 90 min).
            run(
                PY,
                "-m",
                "pytest",
                "-n",
                "3",
                "--dist",
                "loadgroup",
                "--max-worker-restart",
                "0",
                "tests",
                "integration",
                *args[1:],
            )
    except subprocess.CalledProcessError as exc:
        sys.exit(exc.returncode)


if __name__ == "__main__":
    main()
