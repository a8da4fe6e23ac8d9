"""The metrics of stages that run in child processes (gpl/stage_process.py), served by their parent.

A child's stage updates the metrics of the child's own registry; the parent's ``/metrics`` must show
them, or a dashboard sees a working stage as dead. How: each child report carries its ``gpl_*`` metric
families (:func:`export_families`: plain tuples, pickled over the report pipe); the parent keeps the
last one per child (:data:`RELAYED`) and ``/metrics`` (:func:`metrics_route`) merges them with its own
registry: a sample present in several processes (same name and labels) is summed — each process
counts its own messages, and a metric a process never touched is 0 there — except ``*_created``, the
earliest. A child that ended is dropped (:meth:`Relayed.drop`): its stage is down, and so are its gauges.

Why not prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): the directory must be
set in the environment before *any* process imports prometheus_client (the parent's command line
included), every gauge needs a multiprocess aggregation mode, and the files of dead processes must be
cleaned by hand or their values live on. Here a dead child simply stops contributing, the parent's
registry stays the ordinary one, and nothing is written to disk.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.metrics_core import Metric

PREFIX = "gpl_"  # the project's own metrics; process_*/python_* describe each process, not a sum
Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]  # name, type, help, unit, samples


def export_families(metrics: Iterable[Metric] | None = None) -> list[Family]:
    """This process's ``gpl_*`` families as plain, picklable tuples (a child's part of its report)."""
    out: list[Family] = []
    for m in REGISTRY.collect() if metrics is None else metrics:
        if m.name.startswith(PREFIX):
            out.append((m.name, m.type, m.documentation, m.unit,
                        [(s.name, dict(s.labels), float(s.value)) for s in m.samples]))
    return out


class Relayed:
    """The last families each child sent, by a key of the child's (stage name and pid)."""

    def __init__(self) -> None:
        self._by_child: dict[str, list[Family]] = {}
        self._lock = threading.Lock()

    def put(self, child: str, families: list[Family]) -> None:
        with self._lock:
            self._by_child[child] = families

    def drop(self, child: str) -> None:
        with self._lock:
            self._by_child.pop(child, None)

    def children(self) -> list[str]:
        with self._lock:
            return sorted(self._by_child)

    def families(self) -> list[Family]:
        with self._lock:
            return [f for fams in self._by_child.values() for f in fams]


RELAYED = Relayed()


class Merged:
    """A collector view (``collect()``) of this process's registry merged with the relayed families."""

    def __init__(self, relayed: Relayed | None = None) -> None:
        self.relayed = relayed

    def collect(self) -> Iterator[Metric]:
        relayed = self.relayed if self.relayed is not None else RELAYED
        merged: dict[str, Metric] = {}
        values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        own = list(REGISTRY.collect())
        for m in own:
            if m.name.startswith(PREFIX):
                _add(merged, values, (m.name, m.type, m.documentation, m.unit,
                                      [(s.name, dict(s.labels), float(s.value)) for s in m.samples]))
        for fam in relayed.families():
            _add(merged, values, fam)
        for m in own:
            if not m.name.startswith(PREFIX):
                yield m
        for name, m in merged.items():
            for (sample, labels), value in values[name].items():
                m.add_sample(sample, dict(labels), value)
            yield m


def _add(merged: dict[str, Metric], values: dict[str, dict[Any, float]], fam: Family) -> None:
    name, typ, doc, unit, samples = fam
    if name not in merged:
        merged[name] = Metric(name, doc, typ, unit)
        values[name] = {}
    vals = values[name]
    for sample, labels, value in samples:
        key = (sample, tuple(sorted(labels.items())))
        if key not in vals:
            vals[key] = value
        elif sample.endswith("_created"):  # when the series was created: the earliest process's
            vals[key] = min(vals[key], value)
        else:
            vals[key] += value


MERGED = Merged()


def metrics_route() -> tuple[int, str, bytes]:
    """``/metrics``: the Prometheus exposition of this process and its children's stages."""
    return 200, CONTENT_TYPE_LATEST, generate_latest(MERGED)
