"""The chaos suite's harness: stages as real OS processes on one real broker, and an exact ledger.

Each process group is ``python -m gpl.cli run --stage ...`` over a TOML settings file, started and
killed (SIGKILL, no goodbye) by the test; a group that exits on its own is a crash and fails the run.
The ledger compares what reached the topics and what the trainer's last checkpoint says it trained
against what the simulated world makes certain: every exposed item's real label trained exactly once,
every (request, item) pseudo-label at most once and none missing, every request joined.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from gpl.simulate import SimConfig, Simulation, load_movielens, simulate
from runtime.kafka import consumer
from runtime.settings import Settings
from schemas.events import ExposureEvent, ItemEvent, RecallEvent
from tests.helpers import drain

ROOT = Path(__file__).resolve().parents[2]
COORDINATOR_MOVING = (KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE,
                      KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError._TIMED_OUT)
UNKNOWN_LAG = 1 << 40  # a probe that could not read the committed offsets: counts as lag
DATA = ROOT / "data" / "movielens-small"


def toml_text(tree: Mapping[str, Any], prefix: str = "") -> str:
    """A settings tree as TOML: scalars first, then one table per nested section."""
    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    flat = [f"{k} = {scalar(v)}" for k, v in tree.items() if not isinstance(v, Mapping)]
    out = ([f"[{prefix}]"] if prefix and flat else []) + flat
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.append(toml_text(v, f"{prefix}.{k}" if prefix else k))
    return "\n".join(out) + "\n"


@dataclass
class Group:
    """One OS process running some stages; ``incarnation`` counts its (re)starts."""

    name: str
    stages: tuple[str, ...]
    proc: subprocess.Popen[bytes] | None = None
    incarnation: int = 0
    kills: int = 0


@dataclass
class Cluster:
    """Starts, kills and restarts stage processes; remembers every unexpected exit."""

    config: Path
    logs: Path
    groups: dict[str, Group]
    env: dict[str, str] = field(default_factory=dict)
    crashes: list[str] = field(default_factory=list)

    def start(self, name: str) -> None:
        g = self.groups[name]
        g.incarnation += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        log = open(self.logs / f"{name}-{g.incarnation}.log", "wb")  # noqa: SIM115 - the child owns it
        args = [sys.executable, "-m", "gpl.cli", "--config", str(self.config), "run"]
        for s in g.stages:
            args += ["--stage", s]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
               "GPL_METRICS_PORT": "0", **self.env}
        # its own process group: a kill takes the stage's children (reader stages run in a spawned child)
        # with it, as the death of a container or pod does
        g.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                  start_new_session=True)
        log.close()

    def start_all(self) -> None:
        for name in self.groups:
            self.start(name)

    def check(self) -> None:
        """Record any group that ended without being told to (and restart it, so the run goes on)."""
        for name, g in self.groups.items():
            if g.proc is not None and g.proc.poll() is not None:
                self.crashes.append(f"{name}#{g.incarnation} exited {g.proc.returncode}: {self.tail(name)}")
                self.start(name)

    def kill(self, name: str, *, parent_only: bool = False) -> None:
        """SIGKILL the whole process group at once (no goodbye from any of them), or with ``parent_only``
        the group's parent alone: its children (a reader stage in a spawned child) must die with it."""
        g = self.groups[name]
        assert g.proc is not None
        self.check()
        if parent_only:
            os.kill(g.proc.pid, signal.SIGKILL)
        else:
            os.killpg(g.proc.pid, signal.SIGKILL)
        g.proc.wait(30)
        g.kills += 1

    def stop_all(self, timeout: float = 90.0) -> dict[str, int]:
        """SIGTERM every group and wait: a clean stop exits 0 (the trainer checkpoints on the way out)."""
        self.check()
        for g in self.groups.values():
            if g.proc is not None:
                g.proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, g in self.groups.items():
            if g.proc is not None:
                try:
                    codes[name] = g.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    g.proc.kill()
                    codes[name] = -9
        return codes

    def tail(self, name: str, n: int = 2000) -> str:
        g = self.groups[name]
        p = self.logs / f"{name}-{g.incarnation}.log"
        return p.read_text(errors="replace")[-n:] if p.exists() else ""


def world(seed: int = 7, users: int = 30) -> Simulation:
    return simulate(load_movielens(DATA), SimConfig(seed=seed, users=users, candidates=40,
                                                   max_requests_per_user=8, exposure_first_fraction=0.3))


@dataclass(frozen=True)
class Expected:
    recalls: dict[str, RecallEvent]
    exposures: dict[str, ExposureEvent]
    items: list[ItemEvent]

    @classmethod
    def of(cls, sim: Simulation) -> Expected:
        return cls({e.request_id: e for _, e in sim.events if isinstance(e, RecallEvent)},
                   {e.request_id: e for _, e in sim.events if isinstance(e, ExposureEvent)}, list(sim.items))

    def unexposed(self) -> dict[str, set[int]]:
        out = {}
        for rid, r in self.recalls.items():
            shown = {it.item_id for it in self.exposures[rid].items}
            rest = {c for c in candidate_ids(r) if c not in shown}
            if rest:
                out[rid] = rest
        return out

    def real(self) -> set[tuple[str, int]]:
        return {(rid, it.item_id) for rid, e in self.exposures.items() for it in e.items}


def candidate_ids(r: RecallEvent) -> list[int]:
    """The recalled item ids, whichever way the contract carries them."""
    ids = getattr(r, "item_ids", None)
    return list(ids) if ids else [c.item_id for c in r.candidates]


def committed_lag(settings: Settings, group: str, topics: Iterable[str]) -> int:
    """Messages of ``topics`` not yet committed by consumer group ``group`` (the whole topic if none)."""
    c: Consumer = consumer(settings.kafka, "chaos-lag-probe", **{"group.id": group})
    try:
        tps = [TopicPartition(t, p) for t in topics
               for p in c.list_topics(t, timeout=10).topics[t].partitions]
        lag = 0
        for tp in c.committed(tps, timeout=10):
            low, high = c.get_watermark_offsets(tp, timeout=10)
            lag += high - (tp.offset if tp.offset >= 0 else low)
        return lag
    except KafkaException as e:
        # the group's coordinator is moving or loading (Kafka, while __consumer_offsets is being created or
        # after a broker restart): not known yet, which is not "caught up"; the caller asks again
        if e.args[0].code() in COORDINATOR_MOVING:
            return UNKNOWN_LAG
        raise
    finally:
        c.close()


def wait_until(cond: Callable[[], bool], timeout: float, what: Callable[[], str], every: float = 2.0,
               tick: Callable[[], None] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if tick is not None:
            tick()
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out: {what()}")


@dataclass
class Ledger:
    """What the topics and the trainer's last checkpoint hold, against what the world makes certain."""

    unexposed: dict[str, set[int]]
    real_on_topic: Counter[tuple[str, int]]
    pseudo_on_topic: set[tuple[str, int]]
    pseudo_requests: set[str]
    trained: dict[str, int]
    dead_letters: dict[str, int]

    @classmethod
    def read(cls, settings: Settings, expected: Expected) -> Ledger:
        from workers.trainer.checkpoints import latest_checkpoint, load_checkpoint

        unexposed: dict[str, set[int]] = {}
        for u in drain(settings, "unexposed", expect=len(expected.unexposed()), timeout=60):
            got = set(u["item_ids"])
            assert unexposed.setdefault(u["request_id"], got) == got, f"two different unexposed sets {u}"
        real: Counter[tuple[str, int]] = Counter()
        pseudo: set[tuple[str, int]] = set()
        pseudo_requests: set[str] = set()
        for b in drain(settings, "samples", timeout=60, settle=3.0):
            for x in b["samples"]:
                key = (b["request_id"], x["item_id"])
                if x["source"] == "pseudo":
                    pseudo.add(key)
                    pseudo_requests.add(b["request_id"])
                else:
                    real[key] += 1
        ckpt = latest_checkpoint(settings.checkpoints_dir)
        assert ckpt is not None, "the trainer never checkpointed"
        _, meta = load_checkpoint(ckpt)
        dlq = {t: len(drain(settings, t, timeout=5, settle=1.0)) for t in
               ("items.dlq", "recall.dlq", "exposure.dlq", "unexposed.dlq", "samples.dlq", "anchors.dlq",
                "anchor-requests.dlq")}
        return cls(unexposed, real, pseudo, pseudo_requests, dict(meta["counts"]), dlq)

    def problems(self, expected: Expected) -> list[str]:
        out = []
        want_unexposed = expected.unexposed()
        if self.unexposed != want_unexposed:
            missing = set(want_unexposed) - set(self.unexposed)
            wrong = [r for r in self.unexposed if self.unexposed[r] != want_unexposed.get(r)]
            out.append(f"unexposed batches: {len(missing)} requests missing, {len(wrong)} wrong")
        if set(self.real_on_topic) != expected.real():
            out.append(f"real labels on the topic: {len(expected.real() - set(self.real_on_topic))} missing, "
                       f"{len(set(self.real_on_topic) - expected.real())} unexpected")
        if self.trained.get("real") != len(expected.real()):
            out.append(f"real labels trained {self.trained.get('real')} times for {len(expected.real())} exposed "
                       "items (exactly once each expected)")
        if self.trained.get("pseudo") != len(self.pseudo_on_topic):
            out.append(f"pseudo-labels trained {self.trained.get('pseudo')} for {len(self.pseudo_on_topic)} distinct "
                       "(request, item) pairs on the topic (at most once each, none missing)")
        unlabeled = set(want_unexposed) - self.pseudo_requests
        if unlabeled:
            out.append(f"{len(unlabeled)} requests with unexposed candidates never pseudo-labeled")
        if any(self.dead_letters.values()):
            out.append(f"dead letters from valid traffic: {self.dead_letters}")
        return out
