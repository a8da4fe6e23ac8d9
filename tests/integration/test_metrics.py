"""The metrics endpoint and the consumer-lag gauge, against the real embedded broker."""

from __future__ import annotations

import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gpl.stack import Stages
from runtime import metrics
from runtime.broker import Broker
from runtime.kafka import Accounting, create_topics
from runtime.settings import Settings
from runtime.stage_io import StageIO
from schemas.events import ItemEvent
from tests.fixtures.settings import make_settings
from tests.helpers import item_index, produce, running, wait_for


@pytest.fixture
def settings(broker_settings: Settings) -> Settings:
    """This file's integration tests on the suite's broker (tests/fixtures/brokers.py: Apache Kafka by default)."""
    return broker_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def served() -> Iterator[int]:
    port = _free_port()
    server = metrics.serve(port, host="127.0.0.1")
    assert server is not None
    yield port
    server.shutdown()
    server.server_close()


def _get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


def test_metrics_only_on_the_metrics_path(served: int) -> None:
    status, ctype, body = _get(served, "/metrics")
    assert status == 200 and ctype.startswith("text/plain") and b"# TYPE gpl_messages_total counter" in body
    for path in ("/", "/healthz-typo", "/metrics/extra"):
        status, _, body = _get(served, path)
        assert status == 404 and b"gpl_" not in body, path


def test_more_routes_plug_into_the_same_server(served: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(metrics.ROUTES, "/ping", lambda: (200, "text/plain", b"pong"))
    assert _get(served, "/ping") == (200, "text/plain", b"pong")
    assert _get(served, "/metrics")[0] == 200


def test_serve_zero_port_serves_nothing() -> None:
    assert metrics.serve(0) is None


def test_reliability_curve_is_three_names_not_a_stat_label() -> None:
    import workers.calibration_metrics  # noqa: F401 - registers the calibration monitor's families

    names = {m.name for m in REGISTRY.collect()}
    assert {"gpl_pseudo_label_reliability_predicted_ratio", "gpl_pseudo_label_reliability_observed_ratio",
            "gpl_pseudo_label_reliability_pairs"} <= names
    assert "gpl_pseudo_label_reliability" not in names
    for m in REGISTRY.collect():
        if m.name.startswith("gpl_"):
            assert all("stat" not in s.labels for s in m.samples), m.name


def _lag(stage: str, topic: str) -> float | None:
    return REGISTRY.get_sample_value("gpl_consumer_lag_messages", {"stage": stage, "topic": topic})


@pytest.mark.integration
def test_stage_io_exports_consumer_lag(settings: Settings) -> None:
    """10 records, 4 read and committed: lag 6; the gauge follows commits and falls to 0."""
    items = [ItemEvent(item_id=i, text=f"item {i}", ts=1) for i in range(10)]
    produce(settings, "items", list(items), keys=None)
    kafka = settings.kafka.model_copy(update={"lag_interval_s": 3600.0})  # only forced updates
    io = StageIO(kafka, "lagtest", Accounting("lagtest"))
    with io:
        io.subscribe(["items"])
        got = []
        wait_for(lambda: bool(got.extend(io.poll(4 - len(got), 0.5)) or len(got) >= 4), 30, "4 records")
        for m in got[:4]:
            io.done(m)
        assert io.commit(threading.Event())
        assert io.update_lag(force=True) == {"items": 6}
        assert _lag("lagtest", "items") == 6
        rest: list = []
        wait_for(lambda: bool(rest.extend(io.poll(10, 0.5)) or len(rest) >= 6), 30, "the other 6")
        for m in rest:
            io.done(m)
        assert io.commit(threading.Event())
        assert io.update_lag(force=True) == {"items": 0}
        assert _lag("lagtest", "items") == 0


class _Crashes:
    accounting = Accounting("crashes")

    def run(self, stop: threading.Event) -> None:
        raise RuntimeError("boom")


class _Waits:
    accounting = Accounting("waits")

    def run(self, stop: threading.Event) -> None:
        stop.wait(30)


def test_stage_up_gauge_drops_when_a_stage_dies() -> None:
    def up(stage: str) -> float | None:
        return REGISTRY.get_sample_value("gpl_stage_up", {"stage": stage})

    with Stages({"waits": _Waits()}):
        wait_for(lambda: up("waits") == 1, 10, "gauge up while the stage runs")
    assert up("waits") == 0
    # a crash sets its own gauge to 0 and (honest liveness) stops the other stages of the process too
    with Stages({"crashes": _Crashes(), "waits": _Waits()}) as stages:
        wait_for(lambda: up("crashes") == 0 and up("waits") == 0, 10, "gauges down after the crash")
        assert "crashes" in stages.errors


@pytest.mark.integration
def test_streams_stage_exports_its_group_lag(tmp_path: Path, broker: Broker) -> None:
    """The faust stage's lag is read for its own group (app id) and falls to 0 once it committed."""
    from streams.app import StreamsProcessor
    from tests.integration.test_streams import ITEMS, exposure, recall

    s = make_settings(tmp_path, broker, partitions=1, kafka={"lag_interval_s": 0.5},
                      streams={"join_wait_s": 2.0, "debounce_s": 0})
    create_topics(s.kafka)
    proc = StreamsProcessor(s, item_index(ITEMS, s.encoder.collection))
    produce(s, "recall", [recall(f"r{i}", f"u{i}", [1, 2, 3]) for i in range(5)])
    produce(s, "exposure", [exposure(f"r{i}", f"u{i}", [1], {1}) for i in range(5)])
    with running(proc, "streams"):
        wait_for(lambda: proc.accounting["joined"] == 10, 60, "5 requests joined")
        wait_for(lambda: _lag("streams", "recall") == 0 and _lag("streams", "exposure") == 0, 60,
                 lambda: f"lag gauges at 0 (now {proc.lag.last})")
    assert set(proc.lag.last) == {"recall", "exposure"}
