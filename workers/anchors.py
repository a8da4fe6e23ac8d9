"""Anchors: ``anchor-requests`` → LLM interest anchors → frozen encoder → Qdrant ``anchors`` → ``anchors``.

Reads top to bottom: poll a micro-batch of requests (up to ``anchors.batch_size``, waiting at most
``anchors.batch_wait_ms`` for it to fill: the LLM is far cheaper per user in a batch), dead-letter what
does not parse, keep only the newest request of each user (an older one in the same batch is
superseded: its anchors would be replaced at once), look the history items' texts up in the item
collection, generate, embed the anchor texts with the same frozen encoder as the items, upsert them
into Qdrant, publish one ``AnchorSet`` per user, flush, and only then commit the offsets.

Counting (``Accounting("anchors")``): every request is ``in`` and ends as exactly one of ``emitted``,
``superseded`` or ``dlq:<reason>`` (``dlq:unknown_items`` when none of its history items has a text
yet, ``dlq:no_anchors`` if even the fallback had nothing to offer). ``fallback`` counts, among the
emitted, the sets whose anchors came from the generator's fallback instead of the LLM.

Point ids of anchors are derived from (user, slot), so a new generation overwrites the previous one in
place; slots beyond the new set's size are deleted after the upsert (never before: a reader may see a
moment of old and new slots, told apart by the ``version`` payload, but never a user without anchors).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterable
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from gpl.encoder import Encoder
from gpl.kafka import Accounting, DeadLetters, commit_offsets, consumer, producer
from gpl.settings import Settings
from gpl.vectors import Points, VectorIndex
from schemas.codec import DecodeError, decode, encode
from schemas.events import Anchor, AnchorRequest, AnchorSet
from schemas.topics import ANCHOR_REQUESTS, ANCHORS
from workers.generators import AnchorGenerator, AnchorPrompt, Generation

log = logging.getLogger(__name__)
STAGE = "anchors"
MAX_SLOTS = 32  # AnchorSettings.k is at most 32: slots >= the new size up to this are deleted
T = TypeVar("T")


def anchor_point_id(user_id: str, slot: int) -> int:
    """Deterministic non-negative 63-bit point id of a user's anchor slot (same id across generations)."""
    digest = hashlib.blake2b(f"{user_id}\x1f{slot}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << 63) - 1)


def newest_per_user(
    requests: Iterable[tuple[AnchorRequest, T]],
) -> tuple[dict[str, tuple[AnchorRequest, T]], int]:
    """The newest request of each user (by event time; on a tie the later one in the batch) and how many
    older ones it superseded. ``T`` rides along (the Kafka message, for dead-lettering)."""
    newest: dict[str, tuple[AnchorRequest, T]] = {}
    superseded = 0
    for req, extra in requests:
        cur = newest.get(req.user_id)
        if cur is not None:
            superseded += 1
            if req.ts < cur[0].ts:
                continue
        newest[req.user_id] = (req, extra)
    return newest, superseded


class AnchorWorker:
    def __init__(self, settings: Settings, index: VectorIndex, encoder: Encoder, generator: AnchorGenerator,
                 *, progress: bool = False) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.generator = generator
        self.items = settings.encoder.collection
        self.collection = settings.qdrant.anchors_collection
        self.accounting = Accounting(STAGE)
        self.progress = progress
        self._last_version: dict[str, int] = {}
        # the indexer creates the item collection too: either may start first
        self.index.ensure_collection(self.items, encoder.dim)
        self.index.ensure_collection(self.collection, encoder.dim)

    def run(self, stop: threading.Event) -> None:
        kafka, cfg = self.settings.kafka, self.settings.anchors
        c = consumer(kafka, STAGE)
        p = producer(kafka)
        dlq = DeadLetters(p, STAGE, self.accounting)
        c.subscribe([ANCHOR_REQUESTS.name])
        wait_s = max(cfg.batch_wait_ms, 10) / 1000  # 0 would spin: wait at least 10 ms when idle
        bar = tqdm(desc="anchor users", unit="user", disable=not self.progress, leave=False)
        try:
            while not stop.is_set():
                msgs = c.consume(num_messages=cfg.batch_size, timeout=wait_s)
                if not msgs:
                    continue
                # requests: decode, dead-letter what does not parse
                decoded = []
                offsets: dict[tuple[str, int], int] = {}
                for m in msgs:
                    if m.error():
                        log.error("consume error: %s", m.error())
                        continue
                    offsets[(m.topic() or ANCHOR_REQUESTS.name, m.partition() or 0)] = (m.offset() or 0) + 1
                    self.accounting.add("in")
                    try:
                        decoded.append((decode(m.value(), AnchorRequest), m))
                    except DecodeError as e:
                        dlq.send(m, e)
                # newest per user: an older request in the same batch would be overwritten at once
                newest, superseded = newest_per_user(decoded)
                self.accounting.add("superseded", superseded)
                # generate, embed, store in Qdrant; dead-letter the users that got nothing
                sets, skipped = self._generate([req for req, _ in newest.values()])
                for user_id, why in skipped.items():
                    dlq.send(newest[user_id][1], ValueError(why[1]), reason=why[0])
                # publish, make it durable, then commit what the batch covered
                for s in sets:
                    p.produce(ANCHORS.name, encode(s), key=s.user_id.encode())
                    p.poll(0)
                left = p.flush(30)
                if left:
                    log.error("%d messages not delivered; offsets not committed (redone on restart)", left)
                    continue
                self.accounting.add("emitted", len(sets))
                commit_offsets(c, offsets)
                bar.update(len(newest))
        finally:
            bar.close()
            p.flush(10)
            c.close()

    def generate_for(self, requests: list[AnchorRequest]) -> list[AnchorSet]:
        """Anchor sets for the requests (one per request that has known history items), stored in Qdrant.

        No broker involved: the run loop publishes what this returns. Requests with no usable history
        are left out (the run loop dead-letters them).
        """
        return self._generate(requests)[0]

    def _generate(self, requests: list[AnchorRequest]) -> tuple[list[AnchorSet], dict[str, tuple[str, str]]]:
        """(anchor sets, {user_id: (reason, detail)} of the requests that got none)."""
        skipped: dict[str, tuple[str, str]] = {}
        histories = self.history_texts(requests)
        prompts: list[AnchorPrompt] = []
        planned: list[tuple[AnchorRequest, list[int]]] = []
        for req in requests:
            ids, texts = histories[req.user_id]
            if not texts:
                why = f"none of {len(req.history)} history items has a text in {self.items}"
                skipped[req.user_id] = ("unknown_items", why)
                continue
            prompts.append(AnchorPrompt(req.user_id, texts, self.settings.anchors.k))
            planned.append((req, ids))
        if not prompts:
            return [], skipped
        gens = self.generator.generate(prompts)
        done: list[tuple[AnchorRequest, list[int], Generation]] = []
        for (req, ids), gen in zip(planned, gens, strict=True):
            if gen.anchors:
                done.append((req, ids, gen))
            else:
                why = f"generator returned no anchors (raw {gen.raw[:200]!r})"
                skipped[req.user_id] = ("no_anchors", why)
        if not done:
            return [], skipped
        sets = self._store(done)
        self.accounting.add("fallback", sum(1 for s in sets if s.fallback))
        return sets, skipped

    def history_texts(self, requests: list[AnchorRequest]) -> dict[str, tuple[list[int], list[str]]]:
        """Per user: the recent history ids that have a text in the item collection, and those texts.

        Only the last ``anchors.history_items`` distinct items count (most recent last, as the LLM sees
        them); one retrieve call serves the whole batch.
        """
        n = self.settings.anchors.history_items
        recent: dict[str, list[int]] = {}
        for req in requests:
            distinct = list(dict.fromkeys(reversed(req.history)))[:n]  # newest first, duplicates dropped
            recent[req.user_id] = distinct[::-1]
        wanted = sorted({i for ids in recent.values() for i in ids})
        texts: dict[int, str] = {}
        if wanted:
            pts = self.index.retrieve(self.items, wanted, with_payload=True)
            for pid, payload in zip(pts.ids.tolist(), pts.payloads, strict=True):
                text = str(payload.get("text") or "").strip()
                if text:
                    texts[int(pid)] = text
        out: dict[str, tuple[list[int], list[str]]] = {}
        for user_id, ids in recent.items():
            known = [i for i in ids if i in texts]
            out[user_id] = (known, [texts[i] for i in known])
        return out

    def _store(self, done: list[tuple[AnchorRequest, list[int], Generation]]) -> list[AnchorSet]:
        """Embed every anchor text in one call, upsert the points, delete stale slots, build the sets."""
        all_texts = [t for _, _, g in done for t in g.anchors]
        vectors = np.asarray(self.encoder.encode(all_texts), dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = (vectors / np.where(norms == 0, 1.0, norms)).astype(np.float32)  # make sure of the norm
        now = int(time.time() * 1000)
        versions = self._versions([req.user_id for req, _, _ in done], now)
        ids: list[int] = []
        payloads = []
        stale: list[int] = []
        sets: list[AnchorSet] = []
        row = 0
        for req, hist, gen in done:
            version = versions[req.user_id]
            anchors = []
            for slot, (text, lp) in enumerate(zip(gen.anchors, gen.logprobs, strict=True)):
                ids.append(anchor_point_id(req.user_id, slot))
                payloads.append({
                    "user_id": req.user_id, "version": version, "slot": slot, "text": text,
                    "logprob": float(lp), "model": self.generator.model, "encoder": self.encoder.id,
                    "prompt_hash": self.generator.prompt_hash, "fallback": gen.fallback, "generated_at": now,
                })
                anchors.append(Anchor(text=text, vector=vectors[row].tolist(), logprob=float(lp)))
                row += 1
            stale.extend(anchor_point_id(req.user_id, s) for s in range(len(gen.anchors), MAX_SLOTS))
            sets.append(AnchorSet(
                user_id=req.user_id, version=version, anchors=anchors, model=self.generator.model,
                prompt_hash=self.generator.prompt_hash, encoder=self.encoder.id, generated_at=now,
                history=hist, fallback=gen.fallback,
            ))
        self.index.upsert(self.collection, Points(np.asarray(ids, np.int64), vectors, payloads))
        self.index.delete(self.collection, stale)
        for s in sets:
            self._last_version[s.user_id] = s.version
        return sets

    def _versions(self, users: list[str], now: int) -> dict[str, int]:
        """Generation time in epoch ms, bumped past the user's previous version so it is monotonic.

        The previous version comes from this process's memory or, after a restart, from the stored
        slot-0 point of the user (one retrieve for the batch); a clock that went back cannot reorder.
        """
        unknown = [u for u in users if u not in self._last_version]
        prev = dict(self._last_version)
        if unknown:
            slot0 = [anchor_point_id(u, 0) for u in unknown]
            pts = self.index.retrieve(self.collection, slot0, with_payload=True)
            for payload in pts.payloads:
                u, v = payload.get("user_id"), payload.get("version")
                if isinstance(u, str) and isinstance(v, int):
                    prev[u] = v
        return {u: max(now, prev.get(u, 0) + 1) for u in users}
