"""Shared fixtures: the real brokers (tests/fixtures/brokers.py) and settings pointing at them
(tests/fixtures/settings.py), registered here as plugin modules.

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# the fixtures, one plugin module per concern (after the environment above: they import the project)
pytest_plugins = ("tests.fixtures.brokers", "tests.fixtures.settings")
