"""Shared-cluster names: ``kafka.topic_prefix`` and ``kafka.topic_names`` reach every topic the stack touches.

The unit tests check the one registry (schemas/topics.py); the integration test runs the pipeline on the
session's Apache Kafka broker with a prefix and a rename, stages in child processes included, and then
lists the broker's topics: none may sit outside the prefix (faust's changelogs and assignor topic included).
Another runs the stack on the embedded broker it starts itself (the `gpl up` path), then the benchmark's bare
loop, under a prefix, and checks that the prefixed topics carry the traffic.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka.admin import AdminClient

from gpl.simulate import SimConfig, load_movielens, simulate, write_jsonl
from gpl.stack import Stack, Stages
from runtime.kafka import use_topic_names
from runtime.settings import KafkaSettings, load
from schemas.events import RecallEvent
from schemas.topics import (
    EXPOSURE,
    RECALL,
    SAMPLES,
    TOPICS,
    Naming,
    all_topic_names,
    app_id,
    broker_name,
    by_name,
    configure,
    spec,
)
from tests.fixtures.brokers import KafkaSlot
from tests.fixtures.settings import make_settings
from tests.helpers import drain, wait_for

DATA = Path(__file__).resolve().parents[2] / "data" / "movielens-small"
PREFIX = "team-a."


@pytest.fixture
def prefixed() -> Iterator[None]:
    before = configure(Naming(PREFIX, {"samples": "team-a.labels"}))
    yield
    configure(before)


def test_prefix_and_rename_reach_every_registry_name(prefixed: None) -> None:
    names = all_topic_names("gpl-streams")
    assert all(n.startswith(PREFIX) for n in names), names
    assert "team-a.recall" in names and "team-a.recall.dlq" in names and "team-a.labels.dlq" in names
    assert "team-a.gpl-streams-expiry" in names and app_id("gpl-streams") == "team-a.gpl-streams"
    assert SAMPLES.name == "team-a.labels" and spec("samples") is SAMPLES  # files and commands: logical names
    assert by_name("team-a.labels.dlq") is SAMPLES and by_name("recall") is TOPICS["recall"]
    assert by_name("recall.v0") is None
    from gpl.bench.bare_loop import bare_topics

    assert bare_topics() == ("team-a.bench-bare.recall", "team-a.bench-bare.exposure", "team-a.bench-bare.samples")


def test_names_an_operator_types_resolve_under_the_prefix(prefixed: None) -> None:
    """`gpl topics create recall`, `replay --topic recall --to …`, `groups reset --topic recall.dlq`: a registry
    name means the topic on the broker (a literal `recall` would be created outside the prefix)."""
    assert broker_name("recall") == "team-a.recall" and broker_name("recall.dlq") == "team-a.recall.dlq"
    assert broker_name("samples") == "team-a.labels" and broker_name("samples.dlq") == "team-a.labels.dlq"
    assert broker_name("team-a.recall") == "team-a.recall"  # already the broker's name
    assert broker_name("team-a.recall-copy") == "team-a.recall-copy" and broker_name("other") == "other"


def test_unknown_rename_is_refused_and_the_naming_restored() -> None:
    with pytest.raises(ValueError, match="unknown topic.*recal"):
        use_topic_names(KafkaSettings(topic_names={"recal": "x"}))
    assert TOPICS["recall"].name == "recall"


def test_prefix_must_be_a_topic_name() -> None:
    with pytest.raises(ValueError, match="topic_prefix"):
        KafkaSettings(topic_prefix="team a/")


@pytest.mark.integration
def test_prefixed_pipeline_on_kafka_leaves_nothing_outside_the_prefix(tmp_path: Path, kafka: KafkaSlot) -> None:
    from gpl.replay import replay_jsonl

    sim = simulate(load_movielens(DATA), SimConfig(seed=5, users=4, candidates=30, max_requests_per_user=4,
                                                   exposure_first_fraction=0.3))
    events = tmp_path / "events.jsonl"
    write_jsonl(sim, events)  # logical topic names, as every event file has them
    s = make_settings(tmp_path, kafka, partitions=2, encoder={"model": "hash-bow-64"},
                      kafka={"topic_prefix": PREFIX, "topic_names": {"samples": "team-a.labels"}},
                      anchors={"backend": "memory", "k": 3}, streams={"debounce_s": 0, "join_wait_s": 30},
                      labeler={"wait_for_anchors_s": 60, "top_n": 5, "random_n": 5, "cap": 8},
                      trainer={"checkpoint_every": 20, "batch_size": 16})
    recalls = [e for _, e in sim.events if isinstance(e, RecallEvent)]
    with Stack(s) as stack:  # stack.processes: streams, labeler and trainer in child processes
        assert SAMPLES.name == "team-a.labels"
        names = ("indexer", "streams", "anchors", "labeler", "trainer")
        stages = Stages({n: stack.make(n, **({"progress": False} if n in ("indexer", "trainer") else {}))
                         for n in names})
        with stages:
            counts = replay_jsonl(s, events, topics={"items"}, progress=False)
            assert set(counts) == {"team-a.items"}
            wait_for(lambda: stack.index.count(s.encoder.collection) == len(sim.items), 120, "items indexed")
            replay_jsonl(s, events, topics={"recall", "exposure"}, progress=False)
            streams, labeler = stages.stages["streams"], stages.stages["labeler"]
            wait_for(lambda: streams.accounting["joined"] == 2 * len(recalls), 120,
                     lambda: f"all requests joined: {streams.accounting.snapshot()}")
            wait_for(lambda: labeler.accounting["labeled"] >= 1, 120,
                     lambda: f"a batch labeled: {labeler.accounting.snapshot()}")
            samples = drain(s, "team-a.labels")
            trainer = stages.stages["trainer"]
            wait_for(lambda: trainer.counts["messages"] >= 1, 120,  # type: ignore[attr-defined]
                     lambda: f"trainer to consume samples: {trainer.counts}")  # type: ignore[attr-defined]
        assert not stages.errors, stages.errors
    assert TOPICS["samples"].name == "samples"  # the stack restored this process's naming
    assert any(x["source"] == "pseudo" for b in samples for x in b["samples"])
    on_broker = [t for t in AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics
                 if not t.startswith("__")]
    assert [t for t in on_broker if not t.startswith(PREFIX)] == []
    assert any(t.endswith("-changelog") for t in on_broker), on_broker  # faust's tables: under the prefix too
    assert "team-a.labels" in on_broker and "team-a.samples" not in on_broker
    assert f"{PREFIX}{s.streams.app_id}-expiry" in on_broker and "team-a.gpl-streams-expiry" not in on_broker


def test_no_stage_or_command_names_a_registry_topic_by_a_literal() -> None:
    """Every broker-side name comes from schemas/topics.py, so the prefix reaches it: a literal "recall" handed
    to a client (produce, subscribe, a TopicPartition, a faust topic) would escape it."""
    names = "|".join(sorted((t.logical for t in TOPICS.values()), key=len, reverse=True))
    literal = re.compile(rf"""(produce|subscribe|TopicPartition|\.topic)\(\s*\[?\s*["']({names})(\.dlq)?["']""")
    root = Path(__file__).resolve().parents[2]
    sources = [p for d in ("gpl", "streams", "workers") for p in sorted((root / d).rglob("*.py"))]
    hits = [f"{p.relative_to(root)}:{n}" for p in sources
            for n, line in enumerate(p.read_text().splitlines(), 1) if literal.search(line)]
    assert hits == []


@pytest.mark.integration
def test_topics_create_and_list_under_a_prefix(kafka: KafkaSlot, capsys: pytest.CaptureFixture[str]) -> None:
    from gpl.cli import main

    given = ["--set", "kafka.topic_prefix=team-b.", "--set", "streams.app_id=b-streams", "--set", "kafka.partitions=1"]
    try:
        assert main([*given, "topics", "create", "recall.dlq", "--bootstrap", kafka.bootstrap]) == 0
        assert capsys.readouterr().out.split() == ["created", "team-b.recall.dlq", "(1", "partitions)"]
        assert main([*given, "topics", "create", "--bootstrap", kafka.bootstrap]) == 0
        assert main([*given, "--set", f"kafka.bootstrap_servers={kafka.bootstrap}", "topics", "list"]) == 0
        listed = capsys.readouterr().out
        # a topic replay names the registry's topics the same way: `recall` is team-b.recall
        assert main([*given, "replay", "--topic", "recall", "--to", "team-b.copy", "--bootstrap", kafka.bootstrap]) == 0
    finally:
        configure(Naming())  # main set this process's naming, as it does for every command
    on_broker = [t for t in AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics
                 if not t.startswith("__")]
    assert sorted(on_broker) == sorted(["team-b.b-streams-expiry", "team-b.copy", *(f"team-b.{t}" for t in TOPICS),
                                        *(f"team-b.{t}.dlq" for t in TOPICS)])
    assert "team-b.recall.dlq" in listed and "missing" not in listed


def _records_by_topic(kafka: KafkaSettings) -> dict[str, int]:
    """Every topic on the broker with the records it holds (sum of its partitions' high watermarks)."""
    from confluent_kafka import TopicPartition

    from runtime.kafka import consumer

    c = consumer(kafka, "prefix-count")
    try:
        listed = c.list_topics(timeout=10).topics
        return {t: sum(c.get_watermark_offsets(TopicPartition(t, p), timeout=10)[1] for p in meta.partitions)
                for t, meta in listed.items()}
    finally:
        c.close()


@pytest.mark.integration
def test_prefixed_embedded_stack_carries_the_traffic_under_the_prefix(tmp_path: Path) -> None:
    """The `gpl up` path on the embedded Tansu broker (the stack starts it and applies its profile) under
    kafka.topic_prefix: streams and labeler, each in a child process, join and label through the prefixed
    topics, and the broker holds no topic of ours outside the prefix (faust's changelogs included). Then the
    benchmark's bare loop (`gpl bench e2e --baseline`), another child process, on its own topics: prefixed too,
    and it reads the prefixed anchors (a child that kept the logical names would label nothing)."""
    from gpl.bench.e2e import World, _bare, _run, _stack

    base = load(env={}, data_dir=str(tmp_path / "data"), broker={"kind": "embedded"},
                kafka={"topic_prefix": "team-e.", "partitions": 2})
    users, n = 6, 12
    world = World.make(np.random.default_rng(3), n, 400, users, 3, 32, 40)
    jars = tmp_path / "no-kafka-jars"  # the embedded broker needs none
    with _stack(base, world, ["streams", "labeler"], jars) as (s, stages, _):
        assert SAMPLES.name == "team-e.samples"
        run = _run(s, SAMPLES.name, RECALL.name, EXPOSURE.name, world.requests, 0.0, "p", False, lambda: {})
        held = _records_by_topic(s.kafka)
    assert not stages.errors, stages.errors
    assert run["labeled_requests"] == n, run
    ours = [t for t in held if not t.startswith("__")]
    assert [t for t in ours if not t.startswith("team-e.")] == [], ours
    assert all(held[f"team-e.{t}"] >= n for t in ("recall", "exposure", "unexposed", "samples")), held
    assert held["team-e.anchors"] == users, held
    assert any(t.endswith("-changelog") for t in ours), ours  # faust's join state: under the prefix too
    assert TOPICS["samples"].name == "samples"  # the stack restored this process's naming

    with _stack(base, world, [], jars) as (s, _, pids):
        bare = _bare(s, world.requests, 0.0, users, False, pids)
        held = _records_by_topic(s.kafka)
    assert bare["labeled_requests"] == n, bare
    assert [t for t in held if not t.startswith(("__", "team-e."))] == [], held
    assert all(held[f"team-e.bench-bare.{t}"] >= n for t in ("recall", "exposure", "samples")), held
