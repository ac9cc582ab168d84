from __future__ import annotations

from datetime import timedelta

import pytest
from celery import Celery

from relier_celery.core.config import RelierConfig, mask_url
from relier_celery.core.errors import ConfigError
from relier_celery.wiring.task_options import validate_task_options

REDIS = "redis://127.0.0.1:6379/0"


def test_defaults_take_the_broker_url_when_it_is_redis() -> None:
    # Given a Redis broker and no relier settings, When parsed
    config = RelierConfig.from_mapping({}, broker_url=REDIS)
    # Then relier uses the broker's Redis and the documented defaults
    assert config.redis_url == REDIS
    assert (config.heartbeat_interval, config.lease_ttl, config.scan_interval) == (1.0, 4.0, 1.0)
    assert config.max_resurrections == 3


def test_a_non_redis_broker_needs_an_explicit_url() -> None:
    with pytest.raises(ConfigError, match="relier_redis_url is not set"):
        RelierConfig.from_mapping({}, broker_url="amqp://guest:secret@localhost//")


def test_the_error_for_a_non_redis_broker_masks_its_password() -> None:
    with pytest.raises(ConfigError) as err:
        RelierConfig.from_mapping({}, broker_url="amqp://guest:secret@localhost//")
    assert "secret" not in str(err.value)


def test_unknown_key_names_the_key_and_suggests_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"relier_lease_tll.*did you mean 'relier_lease_ttl'"):
        RelierConfig.from_mapping({"relier_lease_tll": 5}, broker_url=REDIS)


@pytest.mark.parametrize(
    "key,value",
    [
        ("relier_lease_ttl", "6"),
        ("relier_max_resurrections", 2.5),
        ("relier_max_resurrections", True),
        ("relier_scanner_enabled", "yes"),
        ("relier_huge_pages", 1),
        ("relier_prefix", ""),
        ("relier_redis_url", 42),
    ],
)
def test_wrong_types_are_refused_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        RelierConfig.from_mapping({key: value}, broker_url=REDIS)


def test_lease_must_outlive_the_heartbeat() -> None:
    with pytest.raises(ConfigError, match=r"relier_lease_ttl.*must be above relier_heartbeat"):
        RelierConfig.from_mapping(
            {"relier_lease_ttl": 1, "relier_heartbeat_interval": 1}, broker_url=REDIS
        )


@pytest.mark.parametrize(
    "key", ["relier_scan_interval", "relier_heartbeat_interval", "relier_claim_ttl"]
)
def test_durations_must_be_positive(key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        RelierConfig.from_mapping({key: 0}, broker_url=REDIS)


def test_durations_accept_timedelta() -> None:
    config = RelierConfig.from_mapping({"relier_lease_ttl": timedelta(seconds=9)}, broker_url=REDIS)
    assert config.lease_ttl == 9.0


def test_prefix_with_braces_is_refused_because_it_would_break_the_hash_tag() -> None:
    with pytest.raises(ConfigError, match="relier_prefix"):
        RelierConfig.from_mapping({"relier_prefix": "a{b}"}, broker_url=REDIS)


def test_from_app_reads_relier_keys_of_the_celery_config() -> None:
    app = Celery("t", broker=REDIS)
    app.conf.relier_max_resurrections = 7
    assert RelierConfig.from_app(app).max_resurrections == 7


def test_describe_masks_passwords() -> None:
    config = RelierConfig.from_mapping({}, broker_url="redis://user:hunter2@host:6379/0")
    assert config.describe()["relier_redis_url"] == "redis://user:***@host:6379/0"
    assert mask_url("redis://host:6379/0") == "redis://host:6379/0"


def test_a_mistyped_relier_task_option_is_refused() -> None:
    app = Celery("t", broker=REDIS)

    @app.task(name="typo.job", shared=False, max_resurections=5)  # typo
    def job() -> None: ...

    with pytest.raises(ConfigError, match=r"max_resurections.*did you mean 'max_resurrections'"):
        validate_task_options(app)


def test_a_bad_max_resurrections_value_is_refused() -> None:
    app = Celery("t", broker=REDIS)

    @app.task(name="bad.job", shared=False, max_resurrections=-1)
    def job() -> None: ...

    with pytest.raises(ConfigError, match="max_resurrections must be an integer >= 0"):
        validate_task_options(app)


def test_valid_task_options_pass() -> None:
    app = Celery("t", broker=REDIS)

    @app.task(name="good.job", shared=False, max_resurrections=5)
    def job() -> None: ...

    validate_task_options(app)
