"""Broker profiles: the product's defaults are Apache Kafka's, and every remedy for the embedded Tansu
broker's quirks lives in its profile alone (runtime/broker.py EMBEDDED_PROFILE), applied by the stack
that starts it. No broker is needed for most of this: settings are plain values."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpl.stack import Stack, with_profile
from runtime.broker import EMBEDDED_PROFILE, EmbeddedBroker
from runtime.kafka import consumer, producer
from runtime.kafka_broker import KafkaBroker
from runtime.settings import Settings, load
from streams.transport import FAUST_FETCH_WAIT_MS, fetch_wait_ms


def test_production_defaults_carry_no_embedded_remedy() -> None:
    defaults = Settings()
    assert EMBEDDED_PROFILE, "the embedded profile is where the Tansu remedies live"
    for section, fields in EMBEDDED_PROFILE.items():
        for name, remedy in fields.items():
            assert getattr(getattr(defaults, section), name) != remedy, \
                f"{section}.{name}={remedy!r} is an embedded-broker remedy: it must not be a product default"
    assert KafkaBroker.profile() == {}  # Apache Kafka needs nothing beyond the defaults


def test_production_clients_are_configured_as_for_kafka() -> None:
    k = Settings().kafka
    assert k.producer_batch_messages >= 1000 and k.linger_ms > 0 and not k.refetch_gaps
    assert not k.check_time_lookup and k.fetch_wait_max_ms is None
    assert fetch_wait_ms(k) == FAUST_FETCH_WAIT_MS  # faust keeps its own fetch wait
    conf = producer(k)  # librdkafka accepts the settings (no broker is contacted to build a client)
    assert conf is not None
    c = consumer(k, "x")
    c.close()


def test_embedded_profile_applies_every_remedy_over_user_settings() -> None:
    s = load(env={"GPL_KAFKA__PRODUCER_BATCH_MESSAGES": "500", "GPL_KAFKA__LINGER_MS": "20"})
    assert s.kafka.producer_batch_messages == 500  # GPL_* names keep working
    p = with_profile(s, EmbeddedBroker.profile(), bootstrap_servers="127.0.0.1:1")
    for name, remedy in EMBEDDED_PROFILE["kafka"].items():
        assert getattr(p.kafka, name) == remedy
    assert p.kafka.bootstrap_servers == "127.0.0.1:1" and fetch_wait_ms(p.kafka) == 50
    assert load(env={"GPL_KAFKA__FETCH_WAIT_MAX_MS": "200"}).kafka.fetch_wait_max_ms == 200


@pytest.mark.integration
def test_the_stack_applies_the_profile_of_the_broker_it_starts(tmp_path: Path) -> None:
    s = load(env={}, data_dir=str(tmp_path), kafka={"partitions": 1})
    with Stack(s) as stack:
        assert stack.broker is not None and stack.broker.name == "embedded"
        for name, remedy in EMBEDDED_PROFILE["kafka"].items():
            assert getattr(stack.settings.kafka, name) == remedy
    given = load(env={}, data_dir=str(tmp_path), kafka={"bootstrap_servers": "127.0.0.1:1"})
    assert given.kafka.producer_batch_messages == Settings().kafka.producer_batch_messages  # a cluster: no profile
