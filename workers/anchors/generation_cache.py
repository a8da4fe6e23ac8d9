"""Deterministic replay cache of generated anchors: same prompt in, same anchors out, no LLM call.

Why: replaying ``anchor-requests`` (a backfill, a new encoder, a re-run after a bug fix in a later
stage) must reproduce the anchors the system produced, not new ones. An LLM does not guarantee that:
sampled retries, batch composition (padding changes the numerics of batched greedy decoding), server
versions and GPU kernels all move the output. So every generation is stored under a key naming
everything that shapes it, and a request whose key is stored is answered from the store.

The key (:func:`cache_key`) is a digest of: the history texts exactly as the LLM sees them (texts, not
item ids: an item whose text changed makes a new prompt), k, the model name, and the generator's
``prompt_hash`` (template + decoding parameters + backend path, see
:func:`workers.anchors.generators.prompt.prompt_hash`). Two users with identical histories share an entry, as they
would share the prompt. The first stored generation of a key wins (``INSERT OR IGNORE``): replays read
what was produced first.

Storage: one SQLite file (stdlib, no server, safe for several processes on one host through its own
locking) under ``<data_dir>/anchor-cache/``. Bounded by ``anchors.cache_max_entries``: beyond it the
oldest insertions are dropped (a dropped entry costs one regeneration, nothing else). Hits and misses
are counted in ``gpl_anchor_cache_lookups_total{result}`` and on the instance.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

from workers.anchors.generators.base import Generation
from workers.anchors.metrics import ANCHOR_CACHE

SCHEMA_VERSION = 1  # of the stored value; part of the key, so a format change never misreads old rows
PRUNE_SLACK = 0.05  # prune when 5% over the bound: one DELETE per many inserts, not one per insert


def cache_key(history: Sequence[str], k: int, model: str, prompt_hash: str) -> str:
    """Stable digest of what one generation depends on (independent of the process and platform)."""
    blob = orjson.dumps({"v": SCHEMA_VERSION, "history": list(history), "k": k, "model": model,
                         "prompt_hash": prompt_hash})
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


VERSION_BITS = 53  # anchor-set versions stay exact in every JSON reader (IEEE doubles) and in int64 payloads


def anchor_version(history_ids: Sequence[int], history_texts: Sequence[str], k: int, model: str,
                   prompt_hash: str, encoder: str) -> int:
    """The version of an anchor set, a digest of what made it (>= 1, 53 bits).

    Why content and not the generation time: sample ids are (request, item, anchor version) and the
    trainer drops repeats by id. A set regenerated after a restart (the anchors worker re-reads
    uncommitted requests) comes from the same inputs — and, through this cache or a deterministic
    vector backend, is the same set — so it must carry the same version, or the labeler's re-labeled
    requests get new ids and the trainer learns the same (request, item) pseudo-label twice. The
    material is the cache key's (history texts, k, model, prompt hash) plus the history ids (the set
    carries them for the labeler's features) and the encoder (the space its vectors live in). Order
    between a user's sets is ``AnchorSet.generated_at``, not the version.
    """
    blob = orjson.dumps({"v": SCHEMA_VERSION, "ids": [int(i) for i in history_ids], "history": list(history_texts),
                         "k": k, "model": model, "prompt_hash": prompt_hash, "encoder": encoder})
    digest = int.from_bytes(hashlib.blake2b(blob, digest_size=8).digest(), "big")
    return (digest >> (64 - VERSION_BITS)) or 1


class GenerationCache:
    """The on-disk store. Thread-safe through one lock: a worker is built in one thread and runs in
    another, and calls are few and small (one lookup and one insert per micro-batch)."""

    def __init__(self, directory: Path | str, max_entries: int = 1_000_000) -> None:
        self.path = Path(directory) / "anchors.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")  # readers of other processes never block the writer
        self._db.execute("PRAGMA synchronous=NORMAL")  # a lost last write costs a regeneration only
        self._db.execute("CREATE TABLE IF NOT EXISTS generations "
                         "(key TEXT PRIMARY KEY, value BLOB NOT NULL, created REAL NOT NULL)")
        self._count = int(self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0])

    def __len__(self) -> int:
        return self._count

    def get_many(self, keys: Sequence[str]) -> dict[str, Generation]:
        """The stored generations of the keys that have one; counts hits and misses."""
        with self._lock:
            return self._get_many(keys)

    def _get_many(self, keys: Sequence[str]) -> dict[str, Generation]:
        found: dict[str, Generation] = {}
        unique = list(dict.fromkeys(keys))
        for s in range(0, len(unique), 500):  # SQLite's bound-parameter limit
            chunk = unique[s : s + 500]
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(f"SELECT key, value FROM generations WHERE key IN ({marks})", chunk)
            for key, value in rows:
                found[str(key)] = _decode(bytes(value))
        hits = sum(1 for k in keys if k in found)
        self.hits += hits
        self.misses += len(keys) - hits
        if hits:
            ANCHOR_CACHE.labels(result="hit").inc(hits)
        if len(keys) - hits:
            ANCHOR_CACHE.labels(result="miss").inc(len(keys) - hits)
        return found

    def put_many(self, items: Sequence[tuple[str, Generation]]) -> None:
        """Store generations; a key already stored keeps its first value."""
        with self._lock:
            self._put_many(items)

    def _put_many(self, items: Sequence[tuple[str, Generation]]) -> None:
        if not items:
            return
        now = time.time()
        with self._db:  # one transaction for the batch
            self._db.execute("BEGIN")
            before = self._db.total_changes
            self._db.executemany("INSERT OR IGNORE INTO generations (key, value, created) VALUES (?, ?, ?)",
                                 [(k, _encode(g), now) for k, g in items])
            self._count += self._db.total_changes - before
        if self._count > self.max_entries * (1 + PRUNE_SLACK):
            self._prune()

    def prune(self) -> int:
        """Drop the oldest insertions beyond ``max_entries``; how many were dropped."""
        with self._lock:
            return self._prune()

    def _prune(self) -> int:
        excess = self._count - self.max_entries
        if excess <= 0:
            return 0
        cur = self._db.execute("DELETE FROM generations WHERE rowid IN "
                               "(SELECT rowid FROM generations ORDER BY created, rowid LIMIT ?)", (excess,))
        self._count -= cur.rowcount
        return int(cur.rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _encode(g: Generation) -> bytes:
    return orjson.dumps({"anchors": g.anchors, "logprobs": g.logprobs, "raw": g.raw, "tokens": g.tokens,
                         "parsed_first_try": g.parsed_first_try, "attempts": g.attempts,
                         "fallback": g.fallback})


def _decode(value: bytes) -> Generation:
    d = orjson.loads(value)
    return Generation(anchors=list(d["anchors"]), logprobs=[float(x) for x in d["logprobs"]],
                      raw=str(d["raw"]), tokens=int(d["tokens"]),
                      parsed_first_try=bool(d["parsed_first_try"]), attempts=int(d["attempts"]),
                      fallback=bool(d["fallback"]))
