"""The streams stage's faust wiring: the app, its topics and tables, the agent, the timer and the start task.

Declared here, apart from the processor's logic (streams/app.py), because it is configuration: which broker
settings faust gets, which topics are read and written as raw bytes (we decode, so bad input reaches its DLQ
with the original bytes instead of crashing the agent), which state is changelogged and how. The processor
hands in its handlers (:class:`Handlers`) and gets back the :class:`Topology` it sends to.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Protocol

import faust

from runtime.faust_config import faust_settings
from runtime.settings import Settings
from schemas.topics import ANCHOR_REQUESTS, EXPOSURE, RECALL, SAMPLES, UNEXPOSED, app_id, expiry_topic
from streams.changelog import CoalescingTable
from streams.transport import SCHEME

RAW: dict[str, Any] = {"key_type": bytes, "value_type": bytes, "key_serializer": "raw", "value_serializer": "raw"}
RAW_TABLE: dict[str, Any] = {"key_type": bytes, "value_type": bytes}  # faust picks "raw" for bytes


class Handlers(Protocol):
    """What the faust app calls back into (streams/app.py's StreamsProcessor)."""

    agent_error: BaseException | None
    ready: threading.Event

    async def process(self, m: Any) -> None: ...

    async def expire_due(self) -> None: ...

    async def on_recover(self) -> None: ...

    def flush_changelogs(self, partitions: set[int] | None = None) -> None: ...

    async def on_revoked(self, sender: Any, *args: Any, signal: Any = None, **_: Any) -> None: ...


@dataclass
class Topology:
    """The app and what the processor reads, writes and keeps."""

    app: faust.App
    expiry_topic_name: str
    expiry_topic: Any  # faust.TopicT
    out_samples: Any
    out_unexposed: Any
    out_anchor_requests: Any
    dlq: dict[str, Any]  # input topic -> its dead-letter topic
    dlq_max_bytes: int  # a dead letter larger than the producer accepts would fail the agent on every restart
    pending: CoalescingTable  # join records (waiting requests and markers) by request id
    interest: CoalescingTable  # interest state by user id


def build_topology(s: Settings, handlers: Handlers) -> Topology:
    """The faust app of the streams stage, top to bottom."""
    cfg = s.streams
    # the stage's own settings, then the deployment's: security, client properties (runtime/faust_config.py)
    app = faust.App(app_id(cfg.app_id), **faust_settings(s.kafka, dict(
        broker=[f"{SCHEME}://{b}" for b in s.kafka.bootstrap_servers.split(",")],
        store="memory://",
        datadir=str(s.data_dir / "streams"),  # faust's own state files, not in the working directory
        topic_partitions=s.kafka.partitions,
        # faust counts bytes: 1 byte means one record per batch (the embedded profile's remedy), else 1 MiB
        producer_max_batch_size=1 if s.kafka.producer_batch_messages == 1 else 1 << 20,
        # faust joins its group in ~3 s with these, ~30 s with its defaults (any broker)
        broker_rebalance_timeout=5,
        broker_session_timeout=6,
        broker_heartbeat_interval=1,
        web_enabled=False,
        autodiscover=False,
        topic_allow_declare=True,
        stream_wait_empty=False,
    )))
    # the embedded profile's fetch wait (None: faust's own), read by streams/transport.py
    setattr(app, "gpl_fetch_wait_max_ms", s.kafka.fetch_wait_max_ms)  # noqa: B010
    # topics: declared in schemas/topics.py, bound here as raw bytes (we decode, so bad input
    # reaches its DLQ with the original bytes instead of crashing the agent)
    # the expiry topic is internal and read by the same agent as the inputs: co-partitioned with them,
    # so an expiry runs where its request lives
    expiry_name = expiry_topic(cfg.app_id)
    events = app.topic(RECALL.name, EXPOSURE.name, expiry_name, **RAW)
    expiry = app.topic(expiry_name, partitions=s.kafka.partitions, internal=True, **RAW)
    out_samples = app.topic(SAMPLES.name, **RAW)
    out_unexposed = app.topic(UNEXPOSED.name, **RAW)
    out_anchor_requests = app.topic(ANCHOR_REQUESTS.name, **RAW)
    dlq = {t: app.topic(f"{t}.dlq", **RAW) for t in (RECALL.name, EXPOSURE.name)}
    dlq_max_bytes = min(int(app.conf.producer_max_request_size), s.kafka.max_message_bytes)
    # state: join records (waiting requests and markers) by request id; interest by user id (changelogged)
    # both coalesce their changelog writes per key (streams/changelog.py); flushed before every commit
    coalesce = dict(coalesce_ms=cfg.changelog_coalesce_ms, max_dirty=cfg.changelog_max_dirty,
                    partitions=s.kafka.partitions, beacon=app.tables.beacon, **RAW_TABLE)
    pending = CoalescingTable(app, name="pending", on_recover=handlers.on_recover, **coalesce)
    interest = CoalescingTable(app, name="interest", **coalesce)
    app.tables.add(pending)
    app.tables.add(interest)
    setattr(app, "gpl_before_commit", handlers.flush_changelogs)  # noqa: B010 - called by streams/transport.py
    app.on_partitions_revoked.connect(handlers.on_revoked)  # type: ignore[arg-type]  # mode types it narrowly

    @app.agent(events)
    async def recall_exposure(stream: faust.StreamT) -> None:
        async for event in stream.events():
            try:
                await handlers.process(event.message)  # every message's own failure ends in its DLQ
            except Exception as e:  # what is left (the DLQ itself failing): end the stage, never limp on
                handlers.agent_error = e
                raise

    @app.timer(interval=0.5)
    async def expire() -> None:
        await handlers.expire_due()

    @app.task
    async def started() -> None:
        handlers.ready.set()

    return Topology(app, expiry_name, expiry, out_samples, out_unexposed, out_anchor_requests, dlq, dlq_max_bytes,
                    pending, interest)
