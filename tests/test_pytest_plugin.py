"""The ``relier`` pytest plugin: registered through its entry point, its fixtures available in
any pytest run, inert for tests that do not use them, and alongside Celery's own plugin."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from datetime import timedelta
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import redis

import relier_celery.contrib.pytest as plugin
from relier_celery.wiring.install import get


def test_the_plugin_is_registered_as_the_relier_pytest11_entry_point(
    request: pytest.FixtureRequest,
) -> None:
    (ep,) = [ep for ep in entry_points(group="pytest11") if ep.name == "relier"]
    assert ep.value == "relier_celery.contrib.pytest"
    assert request.config.pluginmanager.get_plugin("relier") is plugin


def test_relier_config_is_an_empty_dict_by_default(relier_config: dict[str, object]) -> None:
    assert relier_config == {}


@pytest.mark.relier(relier_max_resurrections=7)
def test_relier_app_publishes_to_the_throwaway_redis_with_relier_installed(
    relier_app: object, relier_redis_url: str
) -> None:
    # Given the plugin's app, with one setting from the marker
    app = relier_app
    # When a task is sent
    result = app.send_task("somewhere.add", args=(1, 2))  # type: ignore[attr-defined]
    # Then the message is queued in the throwaway Redis, and relier read the setting
    queued = redis.Redis.from_url(relier_redis_url).lrange("celery", 0, -1)
    assert any(result.id.encode() in m for m in queued)
    assert app.conf.result_backend == relier_redis_url  # type: ignore[attr-defined]
    installed = get(app)
    assert installed is not None and installed.config.max_resurrections == 7
    # relier's own state too, whatever the user's app names
    assert installed.config.redis_url == relier_redis_url


def test_worker_app_applies_the_tests_settings_over_the_users_app_and_enables_relier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a user's app configured for production, without relier
    (tmp_path / "users_app.py").write_text(
        "from celery import Celery\n"
        "app = Celery('users_app', broker='redis://prod:6379/0', set_as_current=False)\n"
        "app.conf.imports = 'users_app.tasks'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = {"broker_url": "redis://127.0.0.1:1/0", "relier_lease_ttl": timedelta(seconds=9)}
    monkeypatch.setenv(plugin.CONFIG_ENV, plugin._encode(settings))
    # When a worker process loads it through the plugin
    app = plugin.worker_app("users_app:app")
    # Then the test's settings win, unchanged (a timedelta stays one), and relier is enabled
    assert app.conf.broker_url == "redis://127.0.0.1:1/0"
    assert app.conf.relier_lease_ttl == timedelta(seconds=9)
    assert app.conf.imports == ("users_app.tasks", "relier_celery")


def test_worker_app_refuses_an_app_that_installed_relier_with_its_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "installed_app.py").write_text(
        "from celery import Celery\n"
        "import relier_celery\n"
        "app = Celery('installed_app', broker='redis://prod:6379/0', set_as_current=False)\n"
        "relier_celery.install(app)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(RuntimeError, match="would use redis://prod:6379/0"):
        plugin.worker_app("installed_app:app")


def _pytest(
    tmp_path: Path, source: str, *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run a fresh pytest (this environment's plugins, no project conftest) on one file."""
    (tmp_path / "test_user.py").write_text(textwrap.dedent(source))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}, **env}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_fresh_pytest_run_has_the_fixtures_and_stays_inert_without_them(
    tmp_path: Path,
) -> None:
    run = _pytest(
        tmp_path,
        """
        import os, subprocess

        def test_without_fixtures_nothing_was_started(request):
            assert request.config.pluginmanager.get_plugin("relier") is not None
            children = subprocess.run(["pgrep", "-P", str(os.getpid())], capture_output=True)
            assert children.stdout == b""

        def test_with_fixtures(relier_app, relier_redis_url):
            assert relier_app.conf.broker_url == relier_redis_url

        def test_a_worker_without_a_target(relier_worker):
            pass
        """,
    )
    out = run.stdout + run.stderr
    assert "PASSED test_user.py::test_without_fixtures_nothing_was_started" in out, out
    assert "PASSED test_user.py::test_with_fixtures" in out, out
    assert "define a relier_app_target fixture" in out, out
    assert "2 passed, 1 error" in out, out


def test_the_plugin_and_celerys_own_pytest_plugin_load_together(tmp_path: Path) -> None:
    run = _pytest(
        tmp_path,
        """
        def test_both(celery_app, celery_config, relier_app, relier_config):
            assert celery_app is not relier_app
            assert celery_app.conf.broker_url != relier_app.conf.broker_url
        """,
        "-p",
        "celery.contrib.pytest",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout


def test_relier_app_refuses_to_run_when_the_shell_points_celery_at_another_broker(
    tmp_path: Path,
) -> None:
    run = _pytest(
        tmp_path,
        """
        def test_publish(relier_app):
            pass
        """,
        CELERY_BROKER_URL="redis://production:6379/0",
    )
    assert "CELERY_BROKER_URL is set" in run.stdout, run.stdout + run.stderr
    assert "1 error" in run.stdout
