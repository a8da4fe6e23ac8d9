"""Apache Kafka on this machine: a single-node KRaft broker+controller on loopback ports.

The same contract as :class:`runtime.broker.EmbeddedBroker` (the :class:`runtime.broker.Broker`
protocol): ``bootstrap``, ``start()``, ``stop()``, a context manager, ``pids``, and ``profile()``, the
settings it needs, which for Apache Kafka is nothing: the product's defaults are Kafka's.

Everything lives under ``<data_dir>/kafka-broker``: ``server.properties`` and ``log4j2.yaml`` (written at
every start), ``broker.json`` (the ports and the cluster id, so a restart on the same data directory comes
back on the same bootstrap address with its data), ``data/`` (the log directory, KRaft metadata included)
and ``kafka.log`` (the broker's log, unless ``log_file`` says otherwise). The storage is formatted once
(``kafka.tools.StorageTool format --standalone``); a formatted directory is started as it is.

The JVM runs as a :class:`runtime.broker.BoundChild`: it dies with its parent however that dies.
``stop()`` sends SIGTERM (a controlled shutdown: the logs are flushed and closed) and kills after a deadline.
The jars come from Maven Central once (runtime/kafka_dist.py); without Java or Maven the start fails
with one line that says what to install (:class:`runtime.kafka_dist.KafkaUnavailable`).
"""

from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from runtime.broker import BoundChild, free_port, port_is_free
from runtime.kafka_dist import ensure

log = logging.getLogger(__name__)

HEAP = "512m"  # a 2-core development machine: the broker stays small
# the shortest useful JVM set: G1 with short pauses, exit (and be restarted) rather than limp on OOM
JVM_FLAGS = ("-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true")
# the broker logs WARN and up, plus the lines that say it started and stopped
LOG4J2 = """\
Configuration:
  Appenders:
    Console:
      name: out
      target: SYSTEM_OUT
      PatternLayout:
        pattern: "[%d] %p %m (%c)%n"
  Loggers:
    Logger:
      - name: kafka.server.KafkaRaftServer
        level: INFO
      - name: kafka.Kafka
        level: INFO
    Root:
      level: WARN
      AppenderRef:
        - ref: out
"""


def cluster_id() -> str:
    """A KRaft cluster id: a random UUID in Kafka's base64 form (what ``kafka-storage random-uuid`` prints)."""
    while True:
        s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not s.startswith("-"):  # Kafka never hands out an id that reads as a command-line flag
            return s


def server_properties(port: int, controller_port: int, log_dir: Path, **extra: Any) -> dict[str, Any]:
    """One node that is both broker and controller, on loopback, one replica of everything."""
    props: dict[str, Any] = {
        "process.roles": "broker,controller",
        "node.id": 1,
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "offsets.topic.replication.factor": 1,
        "offsets.topic.num.partitions": 8,  # not 50: created on the first group's commit, on 2 cores
        "transaction.state.log.replication.factor": 1,
        "transaction.state.log.min.isr": 1,
        "transaction.state.log.num.partitions": 4,
        "share.coordinator.state.topic.replication.factor": 1,
        "share.coordinator.state.topic.min.isr": 1,
        "group.initial.rebalance.delay.ms": 0,
        # keep every record: retention counts from the record's own timestamp, and a replayed event file
        # (MovieLens: 1996-2018) carries its event times, so the default 7 days deleted a replay ~30 s after
        # the broker started (its first retention check) while the stages were still reading it
        "log.retention.ms": -1,
        # as compose.yaml and deploy/: the stack creates every topic with its partition count (an auto-created
        # one would take num.partitions, and faust refuses a changelog whose count differs from its source)
        "auto.create.topics.enable": "false",
        # >= kafka.max_message_bytes (4,000,000): a recall of 5,000 candidates is ~340 kB of JSON
        "message.max.bytes": 4_194_304,
        "replica.fetch.max.bytes": 4_194_304,
        "num.network.threads": 2,
        "num.io.threads": 4,
    }
    return props | extra


class KafkaBroker:
    """Apache Kafka (KRaft, one node) on 127.0.0.1:<port>, with its data in ``<data_dir>/kafka-broker``.

    ``dist_dir``: where the jars are cached (``<dist_dir>/kafka/<version>/lib``; default ``data_dir``).
    """

    name = "kafka"

    def __init__(self, data_dir: Path, port: int | None = None, log_file: Path | None = None, *,
                 dist_dir: Path | None = None, heap: str = HEAP, **properties: Any) -> None:
        self.dir = Path(data_dir) / "kafka-broker"
        self.dist_dir = Path(dist_dir) if dist_dir is not None else Path(data_dir)
        self.log_file = log_file or self.dir / "kafka.log"
        self.heap = heap
        self.properties = properties
        state = self._remembered()
        self.port = port or int(state.get("port", 0)) or free_port()
        self.controller_port = int(state.get("controller_port", 0)) or free_port()
        while self.controller_port == self.port:
            self.controller_port = free_port()
        self.cluster_id = str(state.get("cluster_id") or cluster_id())
        self.bootstrap = f"127.0.0.1:{self.port}"
        self.started_s = 0.0  # how long the last start took (format included)
        self._child: BoundChild | None = None
        self._out: IO[bytes] | None = None

    @staticmethod
    def profile() -> dict[str, Any]:
        """Settings overrides for this broker: none, the product's defaults are Apache Kafka's."""
        return {}

    # ------------------------------------------------------------------------------- durable state

    @property
    def log_dir(self) -> Path:
        return self.dir / "data"

    def _remembered(self) -> dict[str, Any]:
        try:
            return dict(json.loads((self.dir / "broker.json").read_text()))
        except (OSError, ValueError):
            return {}

    def _remember(self) -> None:
        (self.dir / "broker.json").write_text(json.dumps(
            {"port": self.port, "controller_port": self.controller_port, "cluster_id": self.cluster_id}))

    @property
    def formatted(self) -> bool:
        return (self.log_dir / "meta.properties").is_file()

    # ------------------------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 90.0) -> KafkaBroker:
        t0 = time.monotonic()
        java, lib = ensure(self.dist_dir)  # one clear line without Java or Maven
        for p in (self.port, self.controller_port):
            deadline = time.monotonic() + min(timeout, 15.0)  # a killed predecessor may still be exiting
            while not port_is_free(p) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not port_is_free(p):
                raise RuntimeError(f"kafka broker: port {p} on 127.0.0.1 is taken (another broker on this "
                                   f"data_dir?); stop it or set broker.port")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        props = self.dir / "server.properties"
        props.write_text("".join(f"{k}={v}\n" for k, v in server_properties(
            self.port, self.controller_port, self.log_dir, **self.properties).items()))
        (self.dir / "log4j2.yaml").write_text(LOG4J2)
        jvm = [java, f"-Xmx{self.heap}", "-Xms128m", *JVM_FLAGS,
               f"-Dlog4j2.configurationFile={self.dir / 'log4j2.yaml'}", "-cp", f"{lib}/*"]
        self._out = open(self.log_file, "ab")  # noqa: SIM115 - closed in stop()
        try:
            if not self.formatted:
                self._format(jvm, props, timeout)
            self._remember()
            self._child = BoundChild([*jvm, "kafka.Kafka", str(props)], out=self._out)
            self._wait_ready(t0 + timeout)
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0
        log.info("kafka broker on %s, pid %d, ready in %.1f s", self.bootstrap, self._child.pid, self.started_s)
        return self

    def _format(self, jvm: list[str], props: Path, timeout: float) -> None:
        done = subprocess.run([*jvm, "kafka.tools.StorageTool", "format", "-t", self.cluster_id, "-c", str(props),
                               "--standalone"], stdout=self._out, stderr=subprocess.STDOUT, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"formatting the Kafka storage in {self.log_dir} failed ({done.returncode}); "
                               f"log: {self.log_file}")

    def _wait_ready(self, deadline: float) -> None:
        from confluent_kafka.admin import AdminClient

        while time.monotonic() < deadline:
            if self._child is not None and self._child.poll() is not None:
                raise RuntimeError(f"the kafka broker exited with {self._child.poll()} (log: {self.log_file})")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    pass
            except OSError:
                time.sleep(0.1)
                continue
            try:
                md = AdminClient({"bootstrap.servers": self.bootstrap, "log.connection.close": False}).list_topics(
                    timeout=2)
                if md.brokers:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the kafka broker did not answer on {self.bootstrap} in time (log: {self.log_file})")

    @property
    def pids(self) -> list[int]:
        return [self._child.pid] if self._child is not None else []

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL after ``timeout``."""
        if self._child is not None:
            self._child.stop(timeout)
            self._child = None
        if self._out is not None:
            self._out.close()
            self._out = None

    def __enter__(self) -> KafkaBroker:
        return self.start() if self._child is None else self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
