"""Start, watch and stop the streams processor's faust app (streams/app.py holds the pipeline itself).

Before faust starts: refuse input topics that are not co-partitioned, create the internal expiry topic with
the app's partition count (faust declares only topics it subscribes to alone; an auto-created one would
mismatch the changelogs) and the tables' changelogs, and make faust's data directory. faust creates a
missing changelog itself, but subscribes a few ms later: on Apache Kafka the group's metadata could miss
the new topic, and faust then refused every write of that table as a partition-count mismatch until its
metadata was refreshed, minutes later (a chaos run dead-lettered 169 valid inputs so, issue 21). Created
here, a topic is waited for until every partition has a leader. While it runs: a liveness beat, the assignment
and the consumer lag (read by a plain client that never joins the group). A crashed agent ends the stage
with its error. On stop: the coalesced table writes (streams/changelog.py) and the producer are flushed
before faust leaves the group, or a restart would recover tables missing their last records.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Protocol

from confluent_kafka import Consumer

from runtime.health import HEALTH
from runtime.kafka import create_topics, reader_config
from runtime.lag import LagGauge
from runtime.settings import Settings
from schemas.topics import EXPOSURE, RECALL, app_id
from streams.copartition import verify_copartitioned

log = logging.getLogger(__name__)
STAGE = "streams"


class Served(Protocol):
    """What :func:`serve` needs of the processor (streams/app.py's StreamsProcessor)."""

    settings: Settings
    app: Any  # faust.App
    expiry_topic_name: str
    agent_error: BaseException | None
    lag: LagGauge

    def flush_changelogs(self, partitions: set[int] | None = None) -> None: ...


def prepare(proc: Served) -> None:
    """What must hold before faust starts (the module docstring): co-partitioned inputs, the internal
    topics (expiry, changelogs), faust's data directory."""
    settings = proc.settings
    verify_copartitioned(settings.kafka, [RECALL.name, EXPOSURE.name])  # refuse to start otherwise
    changelogs = [table.changelog_topic_name for table in proc.app.tables.values()]
    create_topics(settings.kafka, [proc.expiry_topic_name, *changelogs], compacted=changelogs)
    (settings.data_dir / "streams").mkdir(parents=True, exist_ok=True)  # faust: mkdir(exist_ok=True) only


def serve(proc: Served, stop: threading.Event) -> None:
    """Run ``proc``'s faust app on a new event loop of this thread until ``stop`` is set or faust stops."""
    settings = proc.settings
    prepare(proc)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    lag_reader = Consumer(reader_config(settings.kafka, app_id(settings.streams.app_id)))  # faust's group
    app = proc.app

    async def main() -> None:
        await app.start()
        try:
            while not stop.is_set() and not app.should_stop:
                if proc.agent_error is not None:  # honest liveness (runtime/health.py)
                    raise RuntimeError(f"streams agent crashed: {proc.agent_error!r}") from proc.agent_error
                HEALTH.beat(STAGE)
                consumer = app._consumer  # noqa: SLF001 - None until faust has started it
                HEALTH.assigned(STAGE, len(consumer.assignment()) if consumer is not None else 0)
                if proc.lag.due():
                    owned = [(tp.topic, tp.partition) for tp in app.consumer.assignment()
                             if tp.topic in (RECALL.name, EXPOSURE.name)]
                    await loop.run_in_executor(None, proc.lag.update, lag_reader, owned)
                await asyncio.sleep(0.1)
        finally:
            try:
                proc.flush_changelogs()
                await asyncio.wait_for(app.producer.flush(), timeout=20)
            finally:
                await asyncio.wait_for(app.stop(), timeout=20)

    try:
        loop.run_until_complete(main())
    except TimeoutError:
        log.warning("streams: faust did not stop within 20 s")
    finally:
        lag_reader.close()
        loop.close()
