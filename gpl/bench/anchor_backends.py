"""Anchor backends' throughput (``gpl bench anchors``) and the LLM's parse rate
(``python -m gpl.bench.anchor_backends``).

``bench_backends`` (the CLI's ``gpl bench anchors``): users/s of the vector backends ``sid`` and
``content`` — and of ``transformers`` when asked (slow) — side by side in one run, on one core, medians
over repeats interleaved backend by backend (every backend sees the same machine state). Users are
MovieLens users with their last ``anchors.history_items`` distinct positives (rating >= 4), the
worker's history rule, served in micro-batches of ``batch`` users as the worker serves them. Each
repeat reports wall time and process CPU time; on a shared machine the CPU-time rate is the one-core
figure (wall time also counts what other processes took). Item vectors come from the item collection
or, without one, the embedded MovieLens catalogue (``gpl.commands.sid.item_vectors``, cached).

The rest of this module is the older LLM measurement:

A measurement, not a test. ``bench_anchors`` runs
:class:`~workers.anchors.generators.transformers_backend.TransformersGenerator` (CPU) over the *same* prompts
at several batch sizes and reports users/s, generated tokens/s and the share of answers that parsed on the
first try (the rest were retried or fell back); optionally the same for
:class:`~workers.anchors.generators.openai_backend.OpenAIGenerator` against a local ``transformers serve``
(the OpenAI-compatible path of compose/deploy, with the CPU server standing in for ``vllm serve``).

Prompts are real: the last ``history_items`` positively rated movies (rating >= 4) of the first
MovieLens users who have that many, as ``gpl.simulate`` writes item texts. Users are served in
chunks of the batch size, as the worker serves micro-batches (retries happen per chunk). The model
load and one warm-up call are not timed. ``threads`` pins torch's intra-op threads (1 by default: on
a small shared CPU, OpenMP workers spin-waiting for a busy core make more threads slower); the load
average before and after is reported because other processes on the machine change the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from runtime.anchor_settings import OpenAIAnchors, TransformersAnchors
from runtime.settings import Settings
from workers.anchors.generators.base import AnchorGenerator, AnchorPrompt, Generation
from workers.anchors.generators.retrying import RetryingGenerator
from workers.anchors.vector_anchors import VectorAnchorSource

DEFAULT_MODEL_DIR = Path(".gpl") / "models" / "smollm2-135m-instruct"


def movielens_prompts(users: int, k: int, history_items: int = 8) -> list[AnchorPrompt]:
    """Prompts of the first ``users`` MovieLens users with ``history_items`` positives (most recent last)."""
    from gpl.simulate import load_movielens

    ml = load_movielens()
    out: list[AnchorPrompt] = []
    for u in range(ml.n_users):
        lo, hi = int(ml.user_start[u]), int(ml.user_start[u + 1])
        pos = [int(ml.r_item[j]) for j in range(lo, hi) if ml.r_rating[j] >= 4.0]
        if len(pos) >= history_items:
            out.append(AnchorPrompt(str(ml.user_ids[u]), [ml.item_text(i) for i in pos[-history_items:]], k))
        if len(out) >= users:
            break
    return out


def run_generator(gen: RetryingGenerator, prompts: Sequence[AnchorPrompt], chunk: int,
                  desc: str) -> dict[str, Any]:
    """Time ``gen`` over the prompts in chunks; throughput and outcome shares."""
    gens: list[Generation] = []
    t0 = time.perf_counter()
    with tqdm(total=len(prompts), desc=desc, unit="user", leave=False) as bar:
        for s in range(0, len(prompts), chunk):
            part = list(prompts[s : s + chunk])
            gens.extend(gen.generate(part))
            bar.update(len(part))
    secs = time.perf_counter() - t0
    n = len(gens)
    tokens = sum(g.tokens for g in gens)
    return {
        "users": n, "seconds": round(secs, 2), "users_per_s": round(n / secs, 3),
        "tokens": tokens, "tokens_per_s": round(tokens / secs, 2),
        "parsed_first_try": round(sum(g.parsed_first_try for g in gens) / n, 3),
        "retried": round(sum(not g.parsed_first_try and not g.fallback for g in gens) / n, 3),
        "fallback": round(sum(g.fallback for g in gens) / n, 3),
        "anchors_per_user": round(sum(len(g.anchors) for g in gens) / n, 2),
    }


def bench_anchors(batch_sizes: Sequence[int] = (1, 16, 64), users: int = 64, k: int = 4, *,
                  users_by_batch: Mapping[int, int] | None = None, openai_users: int = 0,
                  model_dir: Path | str | None = None, threads: int | None = 1) -> dict[str, Any]:
    """users/s, tokens/s and first-try parse share per batch size (and for the OpenAI path if asked).

    ``users_by_batch`` serves fewer users at a given batch size (batch 1 is the slow one); every size
    takes its users from the front of the same prompt list. ``openai_users`` > 0 also starts
    ``transformers serve`` on the model directory and runs that many users through OpenAIGenerator.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from runtime.model_assets import ensure_llm
    from workers.anchors.generators.transformers_backend import TransformersGenerator

    mdir = ensure_llm(Path(model_dir) if model_dir else DEFAULT_MODEL_DIR)
    prompts = movielens_prompts(max(users, openai_users), k)
    out: dict[str, Any] = {"k": k, "threads": threads, "model_dir": str(mdir), "load_before": os.getloadavg(),
                           "transformers": {}}
    for b in batch_sizes:
        n = min(users, (users_by_batch or {}).get(b, users))
        settings = TransformersAnchors(k=k, batch_size=b)
        gen = TransformersGenerator(mdir, settings, threads=threads)
        gen.generate(prompts[:1])  # warm-up: first-call allocations are not throughput
        out["transformers"][str(b)] = run_generator(gen, prompts[:n], b, f"transformers b={b}")
        del gen
    if openai_users > 0:
        out["openai_transformers_serve"] = bench_openai(mdir, prompts[:openai_users], k, threads)
    out["load_after"] = os.getloadavg()
    return out


def bench_openai(model_dir: Path, prompts: Sequence[AnchorPrompt], k: int,
                 threads: int | None) -> dict[str, Any]:
    """The OpenAI-compatible path against a local ``transformers serve`` (started and stopped here)."""
    from workers.anchors.generators.openai_backend import OpenAIGenerator

    log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"gpl-bench-serve-{os.getpid()}.log"
    server = TransformersServe(model_dir, log_path, threads=threads)
    try:
        cfg = OpenAIAnchors(base_url=server.url, served_model=str(model_dir), k=k, timeout_s=600)
        with OpenAIGenerator(cfg) as gen:
            gen.generate(list(prompts[:1]))  # warm-up
            res = run_generator(gen, prompts, len(prompts), "openai (transformers serve)")
            res["response_format_refused"] = not gen.structured  # transformers serve ignores it silently
            res["logprobs_returned"] = None  # transformers serve ignores logprobs: anchors get 0.0
            res["concurrency"] = cfg.concurrency
        return res
    finally:
        server.stop()


# ------------------------------------------------------------------------ a local OpenAI server


def transformers_serve_cmd() -> list[str] | None:
    """The ``transformers serve`` command of this environment, or None when its extras are missing.

    ``transformers serve`` needs ``transformers[serving]`` (fastapi, uvicorn, openai).
    """
    for mod in ("fastapi", "uvicorn", "openai"):
        try:
            __import__(mod)
        except ImportError:
            return None
    exe = shutil.which("transformers", path=str(Path(sys.executable).parent)) or shutil.which("transformers")
    return [exe, "serve"] if exe else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TransformersServe:
    """``transformers serve <model_dir>`` on a free loopback port, offline, stopped with a kill deadline.

    The server is pinned to the directory it loaded, so clients must send that path as the model id
    (``anchors.served_model``); its ``/v1/models`` answers 500 when offline.
    """

    def __init__(self, model_dir: Path, log_path: Path, startup_s: float = 120.0,
                 threads: int | None = None) -> None:
        import httpx

        cmd = transformers_serve_cmd()
        if cmd is None:
            raise RuntimeError("transformers serve needs fastapi, uvicorn and openai "
                               "(pip install 'transformers[serving]')")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false"}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [*cmd, str(model_dir), "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu",
             "--dtype", "float32", "--log-level", "warning"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                raise RuntimeError(f"transformers serve exited with {self.proc.returncode}; see {log_path}")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"transformers serve not healthy after {startup_s:.0f}s; see {log_path}")

    def stop(self, deadline_s: float = 15.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(deadline_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if not self.log.closed:
            self.log.close()


# --------------------------------------------------------------------- backends side by side


def _movielens_histories(n_users: int, history_items: int) -> tuple[list[str], list[list[int]]]:
    """(user ids, last ``history_items`` distinct positive item ids, most recent last) of the first users."""
    from gpl.simulate import load_movielens
    from gpl.simulate.movielens import positive_sequences
    from workers.history import recent_distinct

    seqs = positive_sequences(load_movielens())
    users = [u for u in sorted(seqs) if seqs[u]][:n_users]
    return [str(u) for u in users], [recent_distinct(seqs[u], history_items) for u in users]


def _timed(fn: Callable[[], int]) -> tuple[int, float, float]:
    w0, c0 = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - w0, time.process_time() - c0


def bench_backends(settings: Settings, backends: Sequence[str] = ("sid", "content"), *, users: int = 512,
                   batch: int = 256, repeats: int = 5, llm_users: int = 8, progress: bool = True,
                   llms: Sequence[str] = (), llm_batch: int = 0) -> dict[str, Any]:
    """users/s per backend on one core (torch and BLAS pinned to one thread): medians over ``repeats``.

    A backend that cannot be built (e.g. ``sid`` without trained artifacts) is reported with its error
    instead of stopping the others. ``transformers`` serves only ``llm_users`` users per repeat, in
    calls of ``llm_batch`` users (0: ``anchors.batch_size``); with ``llms`` it runs once per named LLM
    (rows ``transformers:<llm>``, same users) and reports tokens/s, parse and fallback shares and the
    first users' anchors of the last repeat.
    """
    import numpy as np
    import torch

    from gpl.backends import make_generator
    from gpl.bench.labeler import single_thread
    from gpl.commands.sid import item_vectors

    torch.set_num_threads(1)
    cfg = settings.anchors
    ids, vecs, source = item_vectors(settings, progress=progress)
    row = {int(i): r for r, i in enumerate(ids.tolist())}
    names, hists = _movielens_histories(users, cfg.history_items)
    hist_vecs = [vecs[[row[i] for i in h if i in row]] for h in hists]
    hists = [[i for i in h if i in row] for h in hists]
    out: dict[str, Any] = {"users": len(hists), "batch": batch, "k": cfg.k, "history_items": cfg.history_items,
                           "repeats": repeats, "item_vectors": source, "load_before": os.getloadavg(),
                           "backends": {}}
    runs: dict[str, Callable[[], int]] = {}
    last_gens: dict[str, list[Generation]] = {}
    rows = [f"{n}:{m}" if n.startswith("transformers") and llms else n
            for n in backends for m in (llms if n.startswith("transformers") and llms else [""])]
    for name in rows:
        try:
            if name.startswith("transformers"):
                over: dict[str, Any] = {"backend": "transformers"}
                if name.split(":", 1)[0] == "transformers-noprefix":  # the prefix KV cache off, side by side
                    over["prefix_cache"] = False
                if ":" in name:
                    over["llm"] = name.split(":", 1)[1]
                if llm_batch:
                    over["batch_size"] = llm_batch
                gen = make_generator(settings.with_overrides(anchors=over), threads=1)
                if isinstance(gen, VectorAnchorSource):
                    raise TypeError("transformers built a vector source")
                prompts = movielens_prompts(llm_users, cfg.k, cfg.history_items)
                gen.generate(prompts[:1])  # warm-up

                def llm(g: AnchorGenerator = gen, p: list[AnchorPrompt] = prompts, key: str = name) -> int:
                    last_gens[key] = g.generate(p)
                    return len(last_gens[key])

                runs[name] = llm
                continue
            src = make_generator(settings.with_overrides(anchors={"backend": name}), threads=1,
                                 encoder_dim=int(vecs.shape[1]))

            def run(src: Any = src) -> int:
                done = 0
                for s in range(0, len(hists), batch):
                    got = src.anchor_vectors(hists[s : s + batch], hist_vecs[s : s + batch], cfg.k)
                    done += sum(1 for a in got if len(a))
                return done

            run()  # warm-up (first-call allocations, lazy caches) is not throughput
            runs[name] = run
        except Exception as e:  # noqa: BLE001 - reported in the table, the other backends still run
            out["backends"][name] = {"error": f"{type(e).__name__}: {e}"}
    samples: dict[str, list[tuple[int, float, float]]] = {n: [] for n in runs}
    with single_thread() as blas:
        out["blas_threads"] = blas
        for _ in tqdm(range(repeats), desc="bench anchors", unit="repeat", disable=not progress):
            for name, fn in runs.items():
                samples[name].append(_timed(fn))
    for name, rs in samples.items():
        served = len(hists) if not name.startswith("transformers") else rs[0][0]
        out["backends"][name] = {
            "users_per_s_cpu": round(float(np.median([served / max(c, 1e-9) for _, _, c in rs])), 1),
            "users_per_s_wall": round(float(np.median([served / max(w, 1e-9) for _, w, _ in rs])), 1),
            "users": served, "users_with_anchors": rs[0][0],
            "repeats_cpu_s": [round(c, 3) for _, _, c in rs],
        }
        if name in last_gens:
            out["backends"][name] |= llm_stats(last_gens[name], float(np.median([w for _, w, _ in rs])),
                                               float(np.median([c for _, _, c in rs])))
    out["backends"] = {n: out["backends"][n] for n in rows if n in out["backends"]}  # as asked
    out["load_after"] = os.getloadavg()
    return out


def llm_stats(gens: Sequence[Generation], wall_s: float, cpu_s: float, examples: int = 3) -> dict[str, Any]:
    """Per-user time, tokens/s, outcome shares and the first users' anchors of one LLM run."""
    n = max(len(gens), 1)
    tokens = sum(g.tokens for g in gens)
    return {
        "s_per_user_wall": round(wall_s / n, 2), "s_per_user_cpu": round(cpu_s / n, 2),
        "tokens": tokens, "tokens_per_s_wall": round(tokens / max(wall_s, 1e-9), 2),
        "parsed_first_try": round(sum(g.parsed_first_try for g in gens) / n, 3),
        "fallback": round(sum(g.fallback for g in gens) / n, 3),
        "examples": [g.anchors for g in gens[:examples]],
    }


def backends_table(res: dict[str, Any]) -> str:
    """The result as a small text table (one row per backend)."""
    lines = [f"{'backend':<14}{'users/s (cpu)':>15}{'users/s (wall)':>16}{'anchored':>10}",
             "-" * 55]
    for name, r in res["backends"].items():
        if "error" in r:
            lines.append(f"{name:<14}  {r['error'][:200]}")
        else:
            lines.append(f"{name:<14}{r['users_per_s_cpu']:>15.1f}{r['users_per_s_wall']:>16.1f}"
                         f"{r['users_with_anchors']:>6}/{r['users']}")
    for name, r in res["backends"].items():
        if "s_per_user_wall" in r:
            lines.append(f"  {name}: {r['s_per_user_wall']:.2f} s/user wall ({r['s_per_user_cpu']:.2f} cpu), "
                         f"{r['tokens_per_s_wall']:.1f} tokens/s, first-try {r['parsed_first_try']:.0%}, "
                         f"fallback {r['fallback']:.0%}")
    lines.append(f"{res['users']} MovieLens users, batch {res['batch']}, K={res['k']}, history "
                 f"{res['history_items']}, median of {res['repeats']}, one core; load "
                 f"{res['load_before'][0]:.1f} -> {res['load_after'][0]:.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpl.bench.anchor_backends", description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="*", default=[1, 16, 64])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--users-at", nargs="*", default=[], metavar="BATCH=USERS",
                    help="fewer users at a batch size, e.g. 1=8")
    ap.add_argument("--openai-users", type=int, default=0,
                    help="also bench OpenAIGenerator via transformers serve")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads; 0: torch default")
    ap.add_argument("--model-dir", default=None)
    a = ap.parse_args(argv)
    by_batch = {int(x.split("=")[0]): int(x.split("=")[1]) for x in a.users_at}
    res = bench_anchors(a.batch_sizes, a.users, a.k, users_by_batch=by_batch, openai_users=a.openai_users,
                        model_dir=a.model_dir, threads=a.threads or None)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
