"""The project's producer writes each record once and in order through a paused broker (issue 21).

The chaos suite's broker stop (SIGSTOP for 30 s) lost unexposed batches on Apache Kafka: the producer of
the traffic retried the requests the paused broker had not answered, and without idempotence the retried
batches landed behind newer ones (when the broker came back its partitions had no leader for a moment). The
streams join reads each partition in event time, so recalls that landed behind later requests expired
unjoined; a batch written twice would send a valid record to the DLQ as a duplicate. The broker's leader
loss on resume is a race, so here the retries are made certain instead: the paused broker leaves requests
unanswered past the producer's socket timeout (1 s here, 60 s by default), and librdkafka retries them while
the broker still holds the first copies. Without idempotence that wrote records twice (7 of ~7,000 in three
pauses, measured); with it, none.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from runtime.kafka import create_topics, producer
from runtime.kafka_broker import KafkaBroker
from runtime.settings import load
from tests.helpers import records

pytestmark = pytest.mark.integration
USERS = 30  # keys, as the traffic's user ids
PAUSES = 3
PAUSE_S = 3.0


class _TimedOut(logging.Handler):
    """librdkafka's log lines (the producer's ``logger``): counts its requests that timed out in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.timed_out = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.timed_out += "Timed out ProduceRequest" in record.getMessage()


@pytest.mark.slow  # a broker of its own, paused past the socket timeout: chaos-like, `make test-all`
def test_a_paused_broker_gets_each_record_once_and_in_order(tmp_path: Path, kafka_dist: Path) -> None:
    # its controller fences it after 3 s without a heartbeat (Kafka's default: 9 s): a pause may also take
    # the partitions' leader away on resume, as the chaos test's 30 s stop did
    fenced_fast: dict[str, Any] = {"broker.session.timeout.ms": 3000, "broker.heartbeat.interval.ms": 500}
    with KafkaBroker(tmp_path, dist_dir=kafka_dist, **fenced_fast) as broker:
        s = load(env={}, data_dir=str(tmp_path / "data"),
                 kafka={"bootstrap_servers": broker.bootstrap, "partitions": 3})
        create_topics(s.kafka, ["recall"])
        timed_out = _TimedOut()
        librdkafka = logging.getLogger(f"{__name__}.librdkafka")
        librdkafka.setLevel(logging.INFO)  # the request time-outs are notices
        librdkafka.addHandler(timed_out)  # module-level name: removed when the test ends
        p = producer(s.kafka, **{"socket.timeout.ms": 1000, "logger": librdkafka})
        failed: list[str] = []
        stop = threading.Event()
        sent = 0

        def send() -> None:  # a numbered sequence over the users' keys, ~300 records/s
            nonlocal sent
            while not stop.is_set():
                p.produce("recall", str(sent).encode(), key=str(sent % USERS).encode(),
                          on_delivery=lambda err, _m: failed.append(str(err)) if err else None)
                sent += 1
                p.poll(0)
                time.sleep(0.003)

        sender = threading.Thread(target=send)
        sender.start()
        try:
            for _ in range(PAUSES):
                time.sleep(2)
                os.kill(broker.pids[0], signal.SIGSTOP)
                try:
                    time.sleep(PAUSE_S)
                finally:
                    os.kill(broker.pids[0], signal.SIGCONT)
            time.sleep(2)
        finally:
            stop.set()
            sender.join()
        try:
            assert p.flush(60) == 0 and not failed, failed[:3]
        finally:
            librdkafka.removeHandler(timed_out)
        assert timed_out.timed_out, "no request timed out: the pauses did not make the producer retry"

        got = [(k, int(v)) for k, v in records(s, "recall", expect=sent, timeout=60) if v is not None]
        values = [v for _, v in got]
        assert len(values) == len(set(values)), f"{len(values) - len(set(values))} records written twice"
        assert sorted(values) == list(range(sent)), f"{sent - len(set(values))} records lost"
        by_key: dict[bytes | None, list[int]] = {}
        for key, value in got:  # records() reads each partition in offset order
            by_key.setdefault(key, []).append(value)
        behind = {k: vs for k, vs in by_key.items() if vs != sorted(vs)}
        assert not behind, f"{len(behind)} keys' records out of order"
