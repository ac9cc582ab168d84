"""Redis Sentinel settings: kombu's URL spelling, the master's name, and the reliable fetch on
kombu's Sentinel transport (pure logic; integration/test_sentinel.py fails a real one over)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from celery import Celery

from relier_celery.core.config import RelierConfig, mask_url
from relier_celery.core.errors import ConfigError, StoreUnavailable
from relier_celery.core.keys import Keys
from relier_celery.store.client import Store, connect, parse_sentinel_url
from relier_celery.testing import free_port
from relier_celery.wiring.fetch import RelierChannel, kombu_redis
from relier_celery.wiring.fetch_transport import reliable_transport

URL = "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://10.0.0.2;sentinel://10.0.0.3:26380"


def test_kombus_spelling_names_every_sentinel_and_the_masters_password_and_db() -> None:
    nodes, master = parse_sentinel_url(URL)
    assert nodes == [("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)]
    assert master == {"password": "s3cret", "db": 2}


def test_anything_else_in_a_sentinel_url_is_refused() -> None:
    with pytest.raises(ValueError, match="not a sentinel"):
        parse_sentinel_url("sentinel://10.0.0.1;redis://10.0.0.2")


def test_a_sentinel_url_without_a_master_name_stops_the_worker_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match="relier_redis_options"):
        RelierConfig.from_mapping({"relier_redis_url": URL})


def test_a_sentinel_broker_lends_relier_its_url_and_master_name() -> None:
    app = Celery("s", broker=URL, set_as_current=False)
    app.conf.broker_transport_options = {"master_name": "mymaster", "visibility_timeout": 9}
    config = RelierConfig.from_app(app)
    assert config.redis_url == URL
    assert config.redis_options == {"master_name": "mymaster"}


def test_passwords_never_print() -> None:
    config = RelierConfig.from_mapping(
        {
            "relier_redis_url": URL,
            "relier_redis_options": {"master_name": "m", "sentinel_kwargs": {}, "password": "p"},
        }
    )
    shown = config.describe()
    assert "s3cret" not in str(shown) and shown["relier_redis_options"]["password"] == "***"
    assert mask_url(URL).count("sentinel://") == 3 and "s3cret" not in mask_url(URL)


def test_the_client_asks_the_sentinels_for_the_master() -> None:
    client = connect(URL, {"master_name": "mymaster"})
    pool = client.connection_pool
    assert type(pool).__name__ == "SentinelConnectionPool"
    assert pool.service_name == "mymaster"
    assert pool.connection_kwargs["db"] == 2 and pool.connection_kwargs["password"] == "s3cret"


def test_the_reliable_fetch_wraps_kombus_sentinel_transport_too() -> None:
    runtime = SimpleNamespace()
    cls = reliable_transport(runtime, kombu_redis.SentinelTransport)
    assert issubclass(cls, kombu_redis.SentinelTransport)
    mro = cls.Channel.__mro__
    assert mro.index(RelierChannel) < mro.index(kombu_redis.SentinelChannel)
    assert reliable_transport(runtime, kombu_redis.SentinelTransport) is cls
    plain = reliable_transport(runtime)
    assert issubclass(plain, kombu_redis.Transport) and plain is not cls


def test_sentinels_that_do_not_answer_are_one_short_line_naming_the_settings() -> None:
    ports = [free_port(), free_port()]
    url = ";".join(f"sentinel://:pw@127.0.0.1:{p}" for p in ports)
    store = Store(url, Keys("rl"), {"master_name": "mymaster"})
    with pytest.raises(StoreUnavailable) as caught:
        store.call(lambda c: c.ping())
    line = str(caught.value)
    assert "\n" not in line and len(line) < 600 and "pw" not in line
    assert all(f"connecting to 127.0.0.1:{p}" in line for p in ports)
    assert "Check relier_redis_url and relier_redis_options['master_name']" in line
