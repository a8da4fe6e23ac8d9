"""The local stack and the stage runner: one code path for the embedded default and production.

* :class:`Stack` — a context manager: starts the embedded Tansu broker when no bootstrap servers are
  set, creates every topic with the project's partition counts, and opens the vector index (embedded
  qdrant-edge in ``data_dir`` or a Qdrant server). It always shuts them down.
* :class:`Stages` — runs chosen stages as threads over one stack. The embedded vector engine lives in
  this process, so embedded mode runs the stages that need it together; with a Qdrant server each
  stage can be its own process (``gpl run --stage labeler``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from gpl.backends import open_index
from gpl.runtime.broker import EmbeddedBroker
from gpl.runtime.encoder import Encoder, open_encoder
from gpl.runtime.health import HEALTH
from gpl.runtime.kafka import Accounting, create_topics
from gpl.runtime.metrics import STAGE_UP
from gpl.runtime.settings import Settings
from gpl.runtime.vectors.index import VectorIndex

log = logging.getLogger(__name__)
STAGES = ("streams", "indexer", "anchors", "labeler", "trainer", "calibration")


class Stage(Protocol):
    accounting: Accounting

    def run(self, stop: threading.Event) -> None: ...


class Stack:
    """Broker + topics + vector index (+ the frozen encoder on first use)."""

    def __init__(self, settings: Settings, *, broker_port: int | None = None) -> None:
        self._given = settings
        self._broker_port = broker_port  # pin the embedded broker (`gpl up --port`); default a free port
        self.settings = settings
        self.broker: EmbeddedBroker | None = None
        self.index: VectorIndex
        self._encoder: Encoder | None = None
        self._exit = ExitStack()

    def __enter__(self) -> Stack:
        s = self._given
        s.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            if not s.kafka.bootstrap_servers:
                self.broker = self._exit.enter_context(EmbeddedBroker(
                    self._broker_port or s.broker.port or None, s.data_dir / "tansu.log", storage=s.broker.storage,
                    data_dir=s.data_dir))
                s = s.with_overrides(kafka={"bootstrap_servers": self.broker.bootstrap})
            self.settings = s
            create_topics(s.kafka)
            self.index = self._exit.enter_context(open_index(s))
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self._exit.close()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = open_encoder(self.settings.encoder)
        return self._encoder

    def make(self, name: str, **kw: Any) -> Stage:
        """Build one stage over this stack's settings, index and encoder."""
        s, idx = self.settings, self.index
        if name == "streams":
            from streams.app import StreamsProcessor

            return StreamsProcessor(s, idx)
        if name == "indexer":
            from workers.indexer import Indexer

            return Indexer(s, idx, self.encoder, **kw)
        if name == "anchors":
            from gpl.backends import make_generator
            from workers.anchors import AnchorWorker

            gen = kw.pop("generator", None) or make_generator(s, index=idx, encoder_dim=self.encoder.dim)
            return AnchorWorker(s, idx, self.encoder, gen, **kw)
        if name == "labeler":
            from workers.labeler import Labeler

            return Labeler(s, idx, **kw)
        if name == "trainer":
            from workers.trainer import Trainer

            return Trainer(s, idx, **kw)
        if name == "calibration":
            from workers.calibration import CalibrationMonitor

            return CalibrationMonitor(s, **kw)
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")


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
