"""Shared fixtures: the real brokers and settings pointing at them.

Integration tests use real brokers, started here (the vector side: the real embedded Qdrant engine where
vectors are under test, its numpy twin ``MemoryIndex`` in stage tests whose subject is the stage):

* ``fresh_broker``: an embedded Tansu broker per test (it starts in ~100 ms), so topics are fresh;
* ``kafka_broker``: ONE Apache Kafka broker for the whole session (KRaft, ~3 s to start); the jars are
  fetched with Maven on first use (``gpl kafka fetch``), and the Kafka tests are skipped, with the line
  that says what to install, where Java or Maven is missing;
* ``kafka``: that broker, with every topic of the previous test deleted first and the test's consumer
  groups and faust app id under a prefix of its own (:class:`KafkaSlot`);
* ``any_broker``: parametrised over both (``embedded``, ``kafka``): the test runs on each;
* ``broker``: THE integration tests' broker: the session's Apache Kafka (``kafka`` above), or the embedded
  one where ``TEST_BROKER=embedded`` or where Kafka cannot run here (no Java/Maven: said once in the
  header), so a PyPI-only machine still runs every integration test; ``broker_settings``: settings on it,
  topics created. ``settings`` (embedded) stays for the embedded set: the demo path and Tansu's remedies.

Settings for a broker come from :func:`make_settings`, which applies the broker's profile first (the
embedded one carries the Tansu remedies; Apache Kafka's is empty: the product's defaults are Kafka's).
"""

from __future__ import annotations

import os
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from runtime.broker import EmbeddedBroker  # noqa: E402
from runtime.kafka import create_topics  # noqa: E402
from runtime.kafka_broker import KafkaBroker  # noqa: E402
from runtime.kafka_dist import KafkaUnavailable, ensure  # noqa: E402
from runtime.settings import Settings, load  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
KAFKA_DIST = REPO / ".gpl"  # where `make setup` (gpl kafka fetch) put the jars


class KafkaSlot:
    """The session's Kafka broker as one test sees it: same ``bootstrap``, a profile that adds a namespace
    for the test's consumer groups and faust app (topic names are fixed: the fixture deleted the previous
    test's topics)."""

    name = "kafka"

    def __init__(self, broker: KafkaBroker) -> None:
        self.broker, self.bootstrap = broker, broker.bootstrap
        self.ns = f"t{uuid.uuid4().hex[:8]}"

    def profile(self) -> dict[str, Any]:
        p = {k: dict(v) for k, v in self.broker.profile().items()}
        p.setdefault("kafka", {})["group_prefix"] = self.ns
        p.setdefault("streams", {})["app_id"] = f"{self.ns}-streams"
        return p

    @property
    def pids(self) -> list[int]:
        return self.broker.pids


@pytest.fixture
def fresh_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture(scope="session")
def kafka_dist() -> Path:
    """Where the Kafka jars are (fetched now if `make setup` did not); skips without Java or Maven."""
    try:
        ensure(KAFKA_DIST)
    except KafkaUnavailable as e:
        pytest.skip(f"Apache Kafka: {e}")
    return KAFKA_DIST


@pytest.fixture(scope="session")
def kafka_broker(kafka_dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    # the broker looks for transactions past their timeout every 10 s by default: every 0.5 s here, so the
    # transactions test sees its timed-out transaction aborted within its wait on a loaded machine too
    with KafkaBroker(tmp_path_factory.mktemp("kafka"), dist_dir=kafka_dist,
                     **{"transaction.abort.timed.out.transaction.cleanup.interval.ms": 500}) as b:
        warm_group_coordinator(b.bootstrap)
        yield b


def warm_group_coordinator(bootstrap: str) -> None:
    """One consumer-group commit on the new broker, so ``__consumer_offsets`` exists before the first test:
    a fresh KRaft node creates it on the first group's request, and a faust app that joined then saw no
    message for 60 s once (the first test of a session, on a loaded machine)."""
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic("__gpl_warm", 1, 1)])["__gpl_warm"].result(30)
    p = Producer({"bootstrap.servers": bootstrap})
    p.produce("__gpl_warm", b"x")
    p.flush(30)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "__gpl_warm", "auto.offset.reset": "earliest",
                  "enable.auto.commit": False})
    c.subscribe(["__gpl_warm"])
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is not None and m.error() is None:
                c.commit(m, asynchronous=False)
                return
        raise TimeoutError(f"no consumer group could commit on the new Kafka broker {bootstrap} in 60 s")
    finally:
        c.close()


def wipe_topics(bootstrap: str, timeout: float = 30.0) -> None:
    """Delete every topic but Kafka's internal ones, and wait until the broker no longer lists them."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    names = [t for t in admin.list_topics(timeout=10).topics if not t.startswith("__")]
    if not names:
        return
    for f in admin.delete_topics(names, operation_timeout=timeout).values():
        try:
            f.result()
        except Exception as e:  # noqa: BLE001 - already gone is fine
            if "UNKNOWN_TOPIC" not in str(e):
                raise
    deadline = time.monotonic() + timeout
    while set(names) & set(admin.list_topics(timeout=10).topics):
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics still listed {timeout}s after their deletion")
        time.sleep(0.1)


@pytest.fixture
def kafka(kafka_broker: KafkaBroker) -> KafkaSlot:
    wipe_topics(kafka_broker.bootstrap)
    return KafkaSlot(kafka_broker)


@pytest.fixture(params=["embedded", "kafka"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    if request.param == "kafka":
        yield request.getfixturevalue("kafka")
        return
    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture(scope="session")
def broker_kind() -> str:
    """``kafka`` unless ``TEST_BROKER=embedded`` or Kafka cannot run here (not a ``GPL_`` name: the
    settings refuse unknown ones)."""
    if os.environ.get("TEST_BROKER", "kafka") == "embedded":
        return "embedded"
    try:
        ensure(KAFKA_DIST)
    except KafkaUnavailable as e:
        warnings.warn(f"integration tests on the embedded broker: Apache Kafka cannot run here ({e})", stacklevel=1)
        return "embedded"
    return "kafka"


@pytest.fixture
def broker(request: pytest.FixtureRequest, broker_kind: str, tmp_path: Path) -> Iterator[Any]:
    if broker_kind == "kafka":
        yield request.getfixturevalue("kafka")
        return
    with EmbeddedBroker(log_file=tmp_path / "tansu.log") as b:
        yield b


@pytest.fixture
def broker_settings(tmp_path: Path, broker: Any) -> Settings:
    s = make_settings(tmp_path, broker)
    create_topics(s.kafka)
    return s


def pytest_report_header(config: pytest.Config) -> str:
    return f"integration broker: {os.environ.get('TEST_BROKER', 'kafka')} (TEST_BROKER=embedded for Tansu)"


def make_settings(tmp_path: Path, broker: Any, partitions: int = 2, **overrides: object) -> Settings:
    """Settings for a test on ``broker`` (a started broker: its profile is applied first; or a bootstrap
    address, taken as it is), then ``overrides`` section by section."""
    profile: dict[str, Any] = {}
    if isinstance(broker, str):
        bootstrap = broker
    else:
        bootstrap, profile = broker.bootstrap, broker.profile()
    base: dict[str, Any] = {
        **{k: dict(v) for k, v in profile.items()},
        "data_dir": str(tmp_path / "data"),
        # the fixed map unless a test asks for the calibrator (tests/integration/test_calibrated_labeler.py does)
        "labeler": {"label_source": "map"},
    }
    base["kafka"] = {**base.get("kafka", {}), "bootstrap_servers": bootstrap, "partitions": partitions}
    for k, v in overrides.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = v
    return load(env={}, **base)


@pytest.fixture
def settings(tmp_path: Path, fresh_broker: EmbeddedBroker) -> Settings:
    s = make_settings(tmp_path, fresh_broker)
    create_topics(s.kafka)
    return s
