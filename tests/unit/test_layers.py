"""The layering stays: imports point down, no module imports itself back, no module grows past 400 lines,
and the tests mirror the layers.

Layers, bottom to top (docs/design.md §4):

0. ``schemas``      contracts: the records on the wire, their codec, the topic registry;
1. ``runtime``      the foundation: settings, Kafka clients and the consume loop, offsets, metrics,
                    encoder, broker, model assets, vector index adapters;
2. ``streams``, ``workers``  the stages: Kafka loops and domain logic (neither imports the other);
3. ``gpl``          the application: command line, stack wiring, backend factories, demo, replay,
                    simulator, benchmarks, eval.

Every import in the source is an edge, including imports inside functions and under ``TYPE_CHECKING``:
a lazy import against the direction is still a dependency against it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("schemas", "runtime", "gpl", "streams", "workers")
MAX_LINES = 400


def layer(module: str) -> tuple[int, str]:
    """(rank, group) of a project module; groups of the same rank may not import each other."""
    top = module.split(".")[0]
    if top == "schemas":
        return 0, "schemas"
    if module == "runtime" or module.startswith("runtime."):
        return 1, "runtime"
    if top in ("streams", "workers"):
        return 2, top
    return 3, "application"


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, name: str, known: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports (``from pkg import module`` resolves to the module)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, name, known) for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in g:
        if root in index:
            continue
        work = [(root, iter(sorted(g[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(g.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_imports_point_down() -> None:
    wrong = []
    for src, targets in graph().items():
        rank, group = layer(src)
        for dst in sorted(targets):
            r2, g2 = layer(dst)
            if r2 > rank or (r2 == rank and g2 != group):
                wrong.append(f"{src} ({group}) imports {dst} ({g2})")
    assert wrong == []


def test_no_module_over_400_lines() -> None:
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert long == {}


STAGE_CLASS_MAX = 200
LOOP_MAX = 150
STAGE_SUFFIXES = ("Stage", "Engine", "Processor", "Loop", "Monitor", "Worker")


def stage_classes(root: Path = ROOT) -> dict[str, int]:
    """Lines of every stage class: a class of streams/ or workers/ with a ``run`` method (a stage's loop) or
    named for a stage's part (…Stage, …Engine, …Processor, …Loop, …Monitor, …Worker)."""
    out: dict[str, int] = {}
    for pkg in ("streams", "workers"):
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.ClassDef) or node.end_lineno is None:
                    continue
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)}
                if "run" in methods or node.name.endswith(STAGE_SUFFIXES):
                    out[f"{path.relative_to(root)}:{node.name}"] = node.end_lineno - node.lineno + 1
    return out


def test_stage_classes_stay_small_and_worker_loops_thin() -> None:
    """A stage is a thin loop over a pure engine (docs/design.md §4): no stage class over 200 lines, and
    the Kafka loop of each worker package (``workers/<stage>/loop.py``) at most 150."""
    classes = stage_classes()
    assert len(classes) >= 10, classes  # the walk finds the stages (a rename would empty it silently)
    assert {k: n for k, n in classes.items() if n > STAGE_CLASS_MAX} == {}
    loops = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for p in (ROOT / "workers").glob("*/loop.py")}
    assert len(loops) >= 3 and {k: n for k, n in loops.items() if n > LOOP_MAX} == {}


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    """The checks above are only worth something if they can fail."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert layer("workers.labeler") > layer("runtime.kafka") > layer("schemas.events")
    assert layer("gpl.demo")[0] == 3 and layer("streams.app")[1] != layer("workers.labeler")[1]


@pytest.mark.parametrize("name", ["runtime", "schemas", "streams", "workers"])
def test_no_grab_bag_modules(name: str) -> None:
    """Each file is named for the one thing it holds: no utils/helpers/misc/common modules."""
    bad = [p.name for p in (ROOT / name).rglob("*.py") if p.stem in {"utils", "helpers", "misc", "common", "util"}]
    assert bad == []


TEST_LAYERS = {"schemas", "runtime", "streams", "workers", "app"}


def test_the_tests_mirror_the_layers() -> None:
    """A test lives where a newcomer looks for it: ``tests/unit/<layer>/`` for pure logic of one layer
    (in-memory twins, no broker, no engine process), ``tests/integration/`` for what starts the real
    broker or vector engine, ``tests/chaos/`` for the soak; only fixtures and helpers sit in ``tests/``."""
    tests = ROOT / "tests"
    loose = sorted(p.name for p in tests.glob("test_*.py"))
    assert not loose, f"put these under tests/unit/<layer>/ or tests/integration/: {loose}"
    layers = {p.name for p in (tests / "unit").iterdir() if p.is_dir() and not p.name.startswith("__")}
    assert layers == TEST_LAYERS, f"unit test folders {sorted(layers)} are not the layers {sorted(TEST_LAYERS)}"
    found = {p.parent.relative_to(tests).as_posix() for p in tests.rglob("test_*.py")}
    allowed = {"unit", "integration", "chaos", *(f"unit/{x}" for x in TEST_LAYERS)}
    assert found <= allowed, f"test folders outside the layout: {sorted(found - allowed)}"
    assert len(list((tests / "integration").glob("test_*.py"))) >= 10
