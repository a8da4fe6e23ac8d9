"""The local stack and the stage runner: one code path for the embedded default and production.

* :class:`Stack` — a context manager: starts a local broker when no bootstrap servers are set
  (``broker.kind``: the embedded Tansu one, or Apache Kafka) and applies that broker's settings profile
  (the embedded one carries every Tansu remedy: :data:`runtime.broker.EMBEDDED_PROFILE`), creates
  every topic with the project's partition counts, and opens the vector index (embedded qdrant-edge in
  ``data_dir`` or a Qdrant server). It always shuts them down.
* :class:`Stages` — runs chosen stages as threads over one stack. The embedded vector engine lives in
  this process, so the stages that write vectors (indexer, anchors) run here; with ``stack.processes``
  the readers (streams, labeler, trainer, calibration) each get a process of their own over the item
  snapshot (gpl/stage_process.py). With a Qdrant server each stage can be its own process
  (``gpl run --stage labeler``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from gpl.backends import open_index
from gpl.stage_build import STAGES as STAGES  # re-exported: the CLI lists them
from gpl.stage_build import build_stage
from gpl.stage_process import READERS, ProcessStage
from runtime.broker import Broker, EmbeddedBroker
from runtime.encoder import Encoder, open_encoder
from runtime.health import HEALTH
from runtime.kafka import create_topics, use_topic_names
from runtime.metrics import STAGE_UP
from runtime.settings import Settings
from runtime.vectors.index import VectorIndex
from runtime.vectors.snapshot import SnapshottingIndex, snapshot_dir
from schemas.topics import all_topic_names, configure

log = logging.getLogger(__name__)


class Tally(Protocol):
    """What callers read of a stage's accounting: an :class:`Accounting`, or a child process's mirror."""

    def snapshot(self) -> dict[str, int]: ...

    def __getitem__(self, outcome: str) -> int: ...


class Stage(Protocol):
    @property
    def accounting(self) -> Tally: ...

    def run(self, stop: threading.Event) -> None: ...


def local_broker(s: Settings, port: int | None = None) -> Broker:
    """The broker ``broker.kind`` names, not started: Tansu (embedded) or Apache Kafka, in ``data_dir``."""
    port = port or s.broker.port or None
    if s.broker.kind == "kafka":
        from runtime.kafka_broker import KafkaBroker

        return KafkaBroker(s.data_dir, port)
    return EmbeddedBroker(port, s.data_dir / "tansu.log", storage=s.broker.storage, data_dir=s.data_dir)


def with_profile(s: Settings, profile: dict[str, Any], **kafka: Any) -> Settings:
    """The settings with a broker's profile applied (section by section), then the given kafka fields."""
    sections = {k: dict(v) for k, v in profile.items()}
    sections["kafka"] = {**sections.get("kafka", {}), **kafka}
    return s.with_overrides(**sections)


class Stack:
    """Broker + topics + vector index (+ the frozen encoder on first use)."""

    def __init__(self, settings: Settings, *, broker_port: int | None = None, encoder: Encoder | None = None) -> None:
        self._given = settings
        self._broker_port = broker_port  # pin the embedded broker (`gpl up --port`); default a free port
        self.settings = settings
        self.broker: Broker | None = None
        self._index: VectorIndex | None = None
        self._encoder: Encoder | None = encoder  # given: e.g. the demo's cache of vectors already computed
        self._exit = ExitStack()

    def __enter__(self) -> Stack:
        s = self._given
        s.data_dir.mkdir(parents=True, exist_ok=True)
        self._exit.callback(configure, use_topic_names(s.kafka))  # this stack's topic names, restored on exit
        try:
            if not s.kafka.bootstrap_servers:
                self.broker = self._exit.enter_context(local_broker(s, self._broker_port))
                s = with_profile(s, self.broker.profile(), bootstrap_servers=self.broker.bootstrap)
            self.settings = s
            create_topics(s.kafka, all_topic_names(s.streams.app_id))  # this app id's expiry topic
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._exit.close()

    @property
    def index(self) -> VectorIndex:
        """The vector index, opened on first use: a process that runs only reader stages over the item
        snapshot (``gpl run --stage labeler`` beside ``gpl run --stage indexer``) never takes the embedded
        engine's directory lock."""
        if self._index is None:
            s = self.settings
            idx: VectorIndex = self._exit.enter_context(open_index(s))
            if s.stack.processes and not s.qdrant.url:  # readers in other processes see the items as files
                idx = SnapshottingIndex(idx, snapshot_dir(s.data_dir, s.encoder.collection), s.encoder.collection)
            self._index = idx
        return self._index

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = open_encoder(self.settings.encoder)
        return self._encoder

    def make(self, name: str, **kw: Any) -> Stage:
        """Build one stage over this stack's settings, index and encoder.

        With ``stack.processes`` (embedded engine), a stage that only reads vectors runs in its own
        process over the item snapshot (gpl/stage_process.py); the others run here, over the engine.
        """
        if self.settings.stack.processes and not self.settings.qdrant.url and name in READERS:
            return ProcessStage(name, self.settings, **kw)
        return build_stage(name, self.settings, self.index, lambda: self.encoder, **kw)


@dataclass
class Stages:
    """Stages running as threads; :meth:`stop` sets their stop event and joins them with a deadline."""

    stages: dict[str, Stage]
    stop_event: threading.Event = field(default_factory=threading.Event)
    threads: dict[str, threading.Thread] = field(default_factory=dict)
    errors: dict[str, BaseException] = field(default_factory=dict)

    def start(self) -> Stages:
        for name, stage in self.stages.items():
            HEALTH.register(name)
            t = threading.Thread(target=self._guard(name, stage), name=f"gpl-{name}", daemon=True)
            self.threads[name] = t
            t.start()
        return self

    def _guard(self, name: str, stage: Stage) -> Callable[[], None]:
        """Run one stage; a crash — or a loop that returns before it was asked to stop — is recorded,
        reported to /healthz and stops every stage: a process with a dead stage must not look alive
        (``gpl run`` then exits non-zero and the orchestrator restarts it)."""
        def target() -> None:
            # gpl_stage_up: a crashed stage thread leaves the process (and its scrape target) up
            STAGE_UP.labels(stage=name).set(1)
            try:
                stage.run(self.stop_event)
                if not self.stop_event.is_set():
                    raise RuntimeError(f"stage {name} returned before it was asked to stop")
                HEALTH.stopped(name)
            except BaseException as e:  # noqa: BLE001 - reported by errors/alive()/stop(), never swallowed
                log.critical("stage %s crashed: %r: stopping every stage", name, e, exc_info=e)
                self.errors[name] = e
                HEALTH.crashed(name, e)
                self.stop_event.set()
            finally:
                STAGE_UP.labels(stage=name).set(0)

        return target

    def wait_ready(self, note_every_s: float = 30.0) -> bool:
        """Wait until /readyz would answer 200 (every stage came round and holds partitions): ``gpl up``
        prints its ready line only then, so a script that waits for it finds the stages consuming. False
        when a stage crashed or a stop came first; a wait that drags on is said on stderr, not hidden."""
        started = noted = time.monotonic()
        while self.stages and not HEALTH.ready()[0]:
            if self.stop_event.wait(0.1) or self.errors:
                return False
            if time.monotonic() - noted > note_every_s:
                noted = time.monotonic()
                waiting = [n for n, st in HEALTH.report().items() if st["state"] != "running" or not st["partitions"]]
                log.warning("still waiting after %.0f s for stage(s) to hold partitions: %s",
                            noted - started, ", ".join(waiting))
        return not self.stop_event.is_set()

    def alive(self) -> dict[str, bool]:
        return {n: t.is_alive() for n, t in self.threads.items()}

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        for name, t in self.threads.items():
            t.join(timeout)
            if t.is_alive():
                log.warning("stage %s did not stop within %.0f s", name, timeout)

    def __enter__(self) -> Stages:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def accounting(self) -> dict[str, dict[str, int]]:
        return {n: s.accounting.snapshot() for n, s in self.stages.items()}
