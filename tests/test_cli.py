from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from celery.bin.celery import celery as celery_cli
from click.testing import CliRunner


def _write_app(tmp_path: Path, redis_url: str, extra: str = "") -> None:
    (tmp_path / "cliapp.py").write_text(
        textwrap.dedent(f"""
        from celery import Celery
        app = Celery("cliapp", broker="{redis_url}")
        app.conf.imports = ("relier_celery",)
        app.conf.relier_lease_ttl = 9
        {extra}
    """)
    )


def test_config_command_through_clicks_runner(tmp_path, redis_url, monkeypatch) -> None:
    _write_app(tmp_path, "redis://user:hunter2@127.0.0.1:6379/0")
    monkeypatch.syspath_prepend(str(tmp_path))
    result = CliRunner().invoke(celery_cli, ["-A", "cliapp", "relier", "config", "--json"])
    assert result.exit_code == 0, result.output
    settings = json.loads(result.output)
    assert settings["relier_lease_ttl"] == 9.0
    assert settings["relier_redis_url"] == "redis://user:***@127.0.0.1:6379/0"


def test_config_command_through_real_celery_and_rl_subprocesses(tmp_path, redis_url) -> None:
    _write_app(tmp_path, redis_url)
    bindir = Path(sys.executable).parent
    for cmd in (
        [str(bindir / "celery"), "-A", "cliapp", "relier", "config"],
        [str(bindir / "rl"), "-A", "cliapp", "config"],
    ):
        out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "relier_lease_ttl" in out.stdout and "9.0" in out.stdout


def test_a_bad_setting_is_a_clear_cli_error(tmp_path, redis_url) -> None:
    _write_app(tmp_path, redis_url, "app.conf.relier_lease_tll = 3")
    out = subprocess.run(
        [str(Path(sys.executable).parent / "rl"), "-A", "cliapp", "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "unknown setting 'relier_lease_tll': did you mean 'relier_lease_ttl'?" in out.stderr
