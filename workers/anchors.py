"""Anchors: ``anchor-requests`` → interest anchors → frozen space → Qdrant ``anchors`` → ``anchors``.

Reads top to bottom: read requests ahead into a bounded pending queue (dead-lettering what does not
parse), pick the most urgent micro-batch (up to ``anchors.batch_size``), answer what the replay cache
knows, generate the rest, embed the anchor texts with the same frozen encoder as the items, upsert them
into Qdrant, publish one ``AnchorSet`` per user, flush, and only then commit the offsets the finished
work covers.

Two kinds of backend, one output. A text backend (:class:`~workers.generators.base.AnchorGenerator`:
LLMs, memory) writes phrases from the history *texts*; the worker embeds them. A vector backend
(:class:`~workers.vector_anchors.VectorAnchorSource`: ``sid``, ``content``) turns the history item
ids and their frozen vectors (read from the item collection with the texts, in the same call) into
anchor vectors itself, labelled with a short text for lineage. Both end in the same ``AnchorSet``
records and the same Qdrant points; vector backends are deterministic and skip the replay cache.

Regeneration policy (why each rule):

* **Newest per user.** A user has at most one pending request: a newer one supersedes the queued one
  (its anchors would be replaced at once), keeping the more urgent priority of the two (a cold start
  superseded by a drift request is still a user without anchors).
* **Priority.** The queue serves the lowest ``AnchorRequest.priority`` first (0 = cold start), then the
  oldest event time. Because the worker reads ahead up to ``anchors.max_pending`` requests, a cold
  start behind a backlog of drift refreshes is served before them, not after.
* **Debounce.** A request (cold start excepted) for a user whose last generation was made for a request
  less than ``anchors.debounce_s`` earlier *in event time* is dropped (``debounced``). Event time, not
  wall time, so a replay makes the same decisions; the stream already debounces its own triggers, this
  guards against re-emitted requests (rebalances, restarts, several producers).
* **Rate limit.** A token bucket (one token per user) gates dispatch. Its rate follows the worker's
  measured capacity (users per second of batch processing, an EWMA) with headroom, capped by
  ``anchors.rate_limit`` when set (a shared server's quota). When the backend slows down, requests wait
  in the bounded queue instead of piling up as timeouts at the server.
* **Backpressure.** When the queue holds ``max_pending`` requests the consumer's partitions are
  ``pause()``d, and ``resume()``d once it has drained to half: the backlog stays in Kafka (as lag, where
  it is visible and durable), never in this process's memory.
* **Outages.** A batch whose generation (or storage, or publication) fails as a whole goes back into the
  queue and is retried after an exponential backoff; the requests are never turned into fallback
  anchors or skipped, and their offsets stay uncommitted.

Replay cache (:mod:`workers.generation_cache`): a generation is stored under a key of the exact prompt
(history texts, k, model, prompt hash); a request whose key is stored is answered without the LLM, so
replaying a topic reproduces the same anchors.

Offsets: read-ahead and priorities finish requests out of order, so each partition commits up to (not
including) its oldest request still pending or in flight (the shared ledger of
:class:`~gpl.runtime.stage_io.StageIO`).

Counting (``Accounting("anchors")``): every request is ``in`` and ends as exactly one of ``emitted``,
``superseded``, ``debounced``, ``revoked`` (its partition went to another worker before it was served;
that worker reads it again) or ``dlq:<reason>`` (``dlq:unknown_items`` when none of its history items
has a text yet, or for a vector backend is in the item collection, or has a semantic ID;
``dlq:no_anchors`` if even the fallback had nothing to offer). ``fallback`` counts,
among the emitted, the sets whose anchors came from the generator's fallback instead of the LLM.

Point ids of anchors are derived from (user, slot), so a new generation overwrites the previous one in
place; slots beyond the new set's size are deleted after the upsert (never before: a reader may see a
moment of old and new slots, told apart by the ``version`` payload, but never a user without anchors).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm import tqdm

from gpl.runtime.encoder import Encoder
from gpl.runtime.kafka import Accounting
from gpl.runtime.metrics import (
    ANCHOR_BACKEND_ERRORS,
    ANCHOR_PAUSED,
    ANCHOR_QUEUED,
    ANCHOR_RATE,
    ANCHOR_REQUEST_DELAY,
    ANCHOR_SET_AGE,
)
from gpl.runtime.offsets import TP
from gpl.runtime.settings import Settings
from gpl.runtime.stage_io import StageIO
from gpl.runtime.stage_port import StagePort
from gpl.runtime.vectors.index import Points, VectorIndex
from gpl.runtime.vectors.normalize import normalize
from schemas.events import Anchor, AnchorRequest, AnchorSet
from schemas.topics import ANCHOR_REQUESTS, ANCHORS
from workers.anchor_policy import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    CapacityMeter,
    Debouncer,
    QueuedRequest,
    RequestQueue,
    TokenBucket,
    anchor_point_id,
    is_cold,
    rate_limit,
)
from workers.generation_cache import GenerationCache, anchor_version, cache_key
from workers.generators.base import AnchorGenerator, AnchorPrompt, Generation
from workers.history import recent_distinct
from workers.vector_anchors import VectorAnchorSource

log = logging.getLogger(__name__)
STAGE = "anchors"
MAX_SLOTS = 32  # AnchorSettings.k is at most 32: slots >= the new size up to this are deleted


@dataclass
class Origin:
    """Where a pending request came from: its message (for the DLQ) and its partition/offset."""

    msg: Any
    tp: TP
    offset: int


@dataclass
class _Made:
    """One user's new anchors before storage: texts (labels for a vector backend) and, if known, vectors."""

    req: AnchorRequest
    history: list[int]
    history_texts: list[str]  # as the text backend saw them (empty for a vector backend): version material
    texts: list[str]
    logprobs: list[float]
    vectors: np.ndarray | None  # None: embed the texts
    fallback: bool = False


@dataclass
class _LoopState:
    queue: RequestQueue[Origin] = field(default_factory=RequestQueue)
    paused: bool = False
    reassigned: bool = False
    retry_at: float = 0.0
    backoff_s: float = BACKOFF_START_S


class AnchorWorker:
    def __init__(self, settings: Settings, index: VectorIndex, encoder: Encoder,
                 generator: AnchorGenerator | VectorAnchorSource, *, progress: bool = False,
                 cache: GenerationCache | None = None) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.generator = generator
        self.items = settings.encoder.collection
        self.collection = settings.qdrant.anchors_collection
        self.accounting = Accounting(STAGE)
        self.progress = progress
        cfg = settings.anchors
        self.vector_source = generator if isinstance(generator, VectorAnchorSource) else None
        if cache is None and cfg.cache and self.vector_source is None:
            cache = GenerationCache(settings.data_dir / "anchor-cache", cfg.cache_max_entries)
        self.cache = cache
        self.debouncer = Debouncer(cfg.debounce_s)
        self.capacity = CapacityMeter()
        self.bucket = TokenBucket(rate_limit(None, cfg.rate_limit), burst=cfg.batch_size)
        self.max_queued = 0  # high-water mark of the pending queue (tests, logs)
        self.pauses = 0  # how often backpressure paused the partitions
        self._last_generated: dict[str, int] = {}
        # the indexer creates the item collection too: either may start first
        self.index.ensure_collection(self.items, encoder.dim)
        self.index.ensure_collection(self.collection, encoder.dim)

    def run(self, stop: threading.Event, *, io: StagePort | None = None) -> None:
        """Serve requests until ``stop``; ``io`` replaces the Kafka I/O (the in-memory twin of the unit tests)."""
        cfg = self.settings.anchors
        if io is None:
            io = StageIO(self.settings.kafka, STAGE, self.accounting, registry=self.settings.schema_registry)
        st = _LoopState()

        def on_assign(consumer_: Any, parts: list[Any]) -> None:
            st.reassigned = True  # re-apply a pause to the new assignment once consume() returns

        def on_revoke(consumer_: Any, parts: list[Any]) -> None:
            tps = {(tp.topic, tp.partition) for tp in parts}
            io.commit(offsets=io.ledger.committable(tps))  # what is finished stays finished
            dropped = st.queue.drop(lambda o: o.tp in tps)
            self.accounting.add("revoked", len(dropped))  # the ledger forgets them after this

        io.subscribe([ANCHOR_REQUESTS.name], on_assign=on_assign, on_revoke=on_revoke)
        wait_s = max(cfg.batch_wait_ms, 10) / 1000  # 0 would spin: wait at least 10 ms when idle
        bar = tqdm(desc="anchor users", unit="user", disable=not self.progress, leave=False)
        try:
            while not stop.is_set():
                room = cfg.max_pending - len(st.queue)
                now = time.monotonic()
                if len(st.queue) == 0:
                    timeout = wait_s
                elif now < st.retry_at:
                    timeout = min(wait_s, st.retry_at - now)
                else:
                    timeout = min(wait_s, self.bucket.wait_s(1))
                # paused: still call consume (callbacks, poll interval); only a fresh assignment can answer
                msgs = io.poll(max(1, room), timeout)
                if st.reassigned and st.paused:
                    io.pause()
                st.reassigned = False
                self._admit(msgs, st, io)
                self._backpressure(io, st)
                if len(st.queue) == 0 and msgs:  # only DLQ'd or debounced: make that durable, commit
                    io.commit(stop, what="dead letters")
                    continue
                if time.monotonic() < st.retry_at or len(st.queue) == 0:
                    continue
                n = self.bucket.take(min(cfg.batch_size, len(st.queue)))
                if n:
                    done = self._dispatch(io, st, st.queue.pop(n))
                    bar.update(done)
                    self._backpressure(io, st)
        finally:
            bar.close()
            ANCHOR_QUEUED.set(0)
            ANCHOR_PAUSED.set(0)
            io.close()

    def _admit(self, msgs: list[Any], st: _LoopState, io: StagePort) -> None:
        """Decode, dead-letter, debounce and queue a poll's messages (superseding per user)."""
        for m in msgs:
            origin = Origin(m, (m.topic() or ANCHOR_REQUESTS.name, m.partition() or 0), m.offset() or 0)
            self.accounting.add("in")
            req = io.decode(m, AnchorRequest)
            if req is None:
                continue
            if req.user_id not in st.queue and self.debouncer.blocks(req, is_cold(req)):
                self.accounting.add("debounced")
                io.done(m)
                continue
            loser = st.queue.push(req, origin)
            if loser is not None:
                self.accounting.add("superseded")
                io.done(loser.msg)
        self.max_queued = max(self.max_queued, len(st.queue))
        ANCHOR_QUEUED.set(len(st.queue))

    def _backpressure(self, io: StagePort, st: _LoopState) -> None:
        """Pause the partitions when the queue is full, resume them when it has drained to half."""
        cap = self.settings.anchors.max_pending
        if not st.paused and len(st.queue) >= cap:
            io.pause()
            st.paused = True
            self.pauses += 1
            ANCHOR_PAUSED.set(1)
            log.info("anchors: %d requests pending, partitions paused", len(st.queue))
        elif st.paused and len(st.queue) <= cap // 2:
            io.resume()
            st.paused = False
            ANCHOR_PAUSED.set(0)
            log.info("anchors: %d requests pending, partitions resumed", len(st.queue))
        ANCHOR_QUEUED.set(len(st.queue))

    def _dispatch(self, io: StagePort, st: _LoopState, batch: list[QueuedRequest[Origin]]) -> int:
        """Generate, store, publish and commit one micro-batch; on failure put it back and back off."""
        t0 = time.monotonic()
        by_user = {e.req.user_id: e for e in batch}
        try:
            sets, skipped = self._generate([e.req for e in batch])
        except Exception:
            log.exception("anchors: generating %d users failed; re-queued, retry in %.1fs", len(batch),
                          st.backoff_s)
            ANCHOR_BACKEND_ERRORS.labels(model=self.generator.model).inc()
            return self._requeue(st, batch)
        for user_id, why in skipped.items():
            io.dead_letter(by_user[user_id].origin.msg, ValueError(why[1]), reason=why[0])
        p = io.producer
        for aset in sets:
            p.produce(ANCHORS.name, io.wire.encode(ANCHORS.name, aset), key=aset.user_id.encode())
            p.poll(0)
        left = p.flush(30)
        if left:
            log.error("anchors: %d messages not delivered; batch re-queued", left)
            return self._requeue(st, batch)
        st.backoff_s = BACKOFF_START_S
        now_s = time.time()
        self.accounting.add("emitted", len(sets))
        for aset in sets:
            req = by_user[aset.user_id].req
            self.debouncer.generated(aset.user_id, req.ts)
            ANCHOR_REQUEST_DELAY.observe(max(0.0, now_s - req.ts / 1000))
        for e in batch:
            io.done(e.origin.msg)
        io.commit()
        rate = self.capacity.observe(len(batch), time.monotonic() - t0)
        self.bucket.set_rate(rate_limit(rate, self.settings.anchors.rate_limit))
        if rate is not None:
            ANCHOR_RATE.set(rate)
        return len(batch)

    def _requeue(self, st: _LoopState, batch: list[QueuedRequest[Origin]]) -> int:
        st.queue.restore(batch)
        st.retry_at = time.monotonic() + st.backoff_s
        st.backoff_s = min(BACKOFF_MAX_S, st.backoff_s * 2)
        ANCHOR_QUEUED.set(len(st.queue))
        return 0

    def generate_for(self, requests: list[AnchorRequest]) -> list[AnchorSet]:
        """Anchor sets for the requests (one per request that has known history items), stored in Qdrant.

        No broker involved: the run loop publishes what this returns. Requests with no usable history
        are left out (the run loop dead-letters them).
        """
        return self._generate(requests)[0]

    def _generate(self, requests: list[AnchorRequest]) -> tuple[list[AnchorSet], dict[str, tuple[str, str]]]:
        """(anchor sets, {user_id: (reason, detail)} of the requests that got none)."""
        skipped: dict[str, tuple[str, str]] = {}
        if self.vector_source is not None:
            made = self._make_vectors(self.vector_source, requests, skipped)
        else:
            made = self._make_texts(requests, skipped)
        if not made:
            return [], skipped
        sets = self._store(made)
        self.accounting.add("fallback", sum(1 for s in sets if s.fallback))
        return sets, skipped

    def _make_texts(self, requests: list[AnchorRequest], skipped: dict[str, tuple[str, str]]) -> list[_Made]:
        """Text backend: prompts of the history texts → generations (cache first); vectors come later."""
        histories = self.history_items(requests, need_text=True)
        prompts: list[AnchorPrompt] = []
        texts_of: dict[str, list[str]] = {}
        planned: list[tuple[AnchorRequest, list[int]]] = []
        for req in requests:
            ids, texts, _ = histories[req.user_id]
            if not texts:
                why = f"none of {len(req.history)} history items has a text in {self.items}"
                skipped[req.user_id] = ("unknown_items", why)
                continue
            prompts.append(AnchorPrompt(req.user_id, texts, self.settings.anchors.k))
            texts_of[req.user_id] = texts
            planned.append((req, ids))
        if not prompts:
            return []
        made: list[_Made] = []
        for (req, ids), gen in zip(planned, self._generate_cached(prompts), strict=True):
            if gen.anchors:
                made.append(_Made(req, ids, list(texts_of[req.user_id]), list(gen.anchors),
                                  [float(x) for x in gen.logprobs], None, gen.fallback))
            else:
                skipped[req.user_id] = ("no_anchors", f"generator returned no anchors (raw {gen.raw[:200]!r})")
        return made

    def _make_vectors(self, source: VectorAnchorSource, requests: list[AnchorRequest],
                      skipped: dict[str, tuple[str, str]]) -> list[_Made]:
        """Vector backend: history ids and their item vectors → anchor vectors, one call for the batch."""
        histories = self.history_items(requests, need_text=False)
        planned = []
        for req in requests:
            ids, _, vecs = histories[req.user_id]
            if not ids:
                why = f"none of {len(req.history)} history items is in {self.items}"
                skipped[req.user_id] = ("unknown_items", why)
            else:
                planned.append((req, ids, vecs))
        if not planned:
            return []
        got = source.anchor_vectors([ids for _, ids, _ in planned], [v for _, _, v in planned],
                                    self.settings.anchors.k)
        made: list[_Made] = []
        for (req, ids, _), va in zip(planned, got, strict=True):
            if len(va):
                made.append(_Made(req, ids, [], list(va.labels), list(va.logprobs), va.vectors))
            else:
                reason = "unknown_items" if va.detail.startswith("none of") else "no_anchors"
                skipped[req.user_id] = (reason, va.detail or "the vector backend returned no anchors")
        return made

    def _generate_cached(self, prompts: list[AnchorPrompt]) -> list[Generation]:
        """Generations of the prompts, from the replay cache where stored, else from the generator.

        Identical prompts in one batch (users with the same recent history) are generated once.
        Stored under the prompt hash the generator reports *after* generating: an OpenAI-compatible
        server that refused structured output changes it, and the entry must say how it was made.
        """
        generator = self.generator
        assert not isinstance(generator, VectorAnchorSource)  # only text backends get here
        if self.cache is None:
            return generator.generate(prompts)
        model = generator.model
        keys = [cache_key(p.history, p.k, model, generator.prompt_hash) for p in prompts]
        found = self.cache.get_many(keys)
        todo: dict[str, int] = {}
        for i, key in enumerate(keys):
            if key not in found:
                todo.setdefault(key, i)
        fresh: dict[str, Generation] = {}
        if todo:
            gens = generator.generate([prompts[i] for i in todo.values()])
            fresh = dict(zip(todo, gens, strict=True))
            ph = generator.prompt_hash
            self.cache.put_many([(cache_key(prompts[i].history, prompts[i].k, model, ph), fresh[key])
                                 for key, i in todo.items()])
        return [found[k] if k in found else fresh[k] for k in keys]

    def history_items(self, requests: list[AnchorRequest], *, need_text: bool = True
                      ) -> dict[str, tuple[list[int], list[str], np.ndarray]]:
        """Per user: the recent history ids found in the item collection, their texts and their vectors.

        Only the last ``anchors.history_items`` distinct items count (most recent last, as the backend
        sees them); one retrieve call serves the whole batch. ``need_text``: an item without a text
        does not count (a text backend cannot use it); a vector backend needs only the vector.
        """
        n = self.settings.anchors.history_items
        recent: dict[str, list[int]] = {}
        for req in requests:
            recent[req.user_id] = recent_distinct(req.history, n)
        wanted = sorted({i for ids in recent.values() for i in ids})
        found: dict[int, tuple[str, np.ndarray]] = {}
        dim = self.encoder.dim
        if wanted:
            pts = self.index.retrieve(self.items, wanted, with_payload=True)
            for row, (pid, payload) in enumerate(zip(pts.ids.tolist(), pts.payloads, strict=True)):
                text = str(payload.get("text") or "").strip()
                if text or not need_text:
                    found[int(pid)] = (text, pts.vectors[row])
        out: dict[str, tuple[list[int], list[str], np.ndarray]] = {}
        for user_id, ids in recent.items():
            known = [i for i in ids if i in found]
            vecs = np.zeros((0, dim), np.float32)
            if known:
                vecs = np.stack([found[i][1] for i in known]).astype(np.float32)
            out[user_id] = (known, [found[i][0] for i in known], vecs)
        return out

    def _store(self, done: list[_Made]) -> list[AnchorSet]:
        """Embed every anchor text in one call (text backends), upsert the points, delete stale slots,
        build the sets."""
        to_embed = [t for m in done if m.vectors is None for t in m.texts]
        embedded = iter(self.encoder.encode(to_embed) if to_embed else [])
        parts = [m.vectors if m.vectors is not None else np.stack([next(embedded) for _ in m.texts]) for m in done]
        vectors = normalize(np.concatenate(parts).astype(np.float32))  # make sure of the norm
        now = int(time.time() * 1000)
        users = [m.req.user_id for m in done]
        prev = self._previous_generated(users)
        # generated_at orders a user's sets (the labeler keeps the newest): strictly increasing per user
        # even if the clock went back; the version names the content (generation_cache.anchor_version)
        stamps = {u: max(now, prev.get(u, 0) + 1) for u in users}
        for u in users:
            if u in prev:  # the replaced set's age
                ANCHOR_SET_AGE.observe(max(0.0, (now - prev[u]) / 1000))
        gen, k = self.generator, self.settings.anchors.k
        versions = {m.req.user_id: anchor_version(m.history, m.history_texts, k, gen.model, gen.prompt_hash,
                                                  self.encoder.id) for m in done}
        ids: list[int] = []
        payloads = []
        stale: list[int] = []
        sets: list[AnchorSet] = []
        row = 0
        for m in done:
            req, hist = m.req, m.history
            version = versions[req.user_id]
            anchors = []
            for slot, (text, lp) in enumerate(zip(m.texts, m.logprobs, strict=True)):
                ids.append(anchor_point_id(req.user_id, slot))
                payloads.append({
                    "user_id": req.user_id, "version": version, "slot": slot, "text": text,
                    "logprob": float(lp), "model": self.generator.model, "encoder": self.encoder.id,
                    "prompt_hash": self.generator.prompt_hash, "fallback": m.fallback,
                    "generated_at": stamps[req.user_id],
                })
                anchors.append(Anchor(text=text, vector=vectors[row].tolist(), logprob=float(lp)))
                row += 1
            stale.extend(anchor_point_id(req.user_id, s) for s in range(len(m.texts), MAX_SLOTS))
            sets.append(AnchorSet(
                user_id=req.user_id, version=version, anchors=anchors, model=self.generator.model,
                prompt_hash=self.generator.prompt_hash, encoder=self.encoder.id, generated_at=stamps[req.user_id],
                history=hist, fallback=m.fallback,
            ))
        self.index.upsert(self.collection, Points(np.asarray(ids, np.int64), vectors, payloads))
        self.index.delete(self.collection, stale)
        for s in sets:
            self._last_generated[s.user_id] = s.generated_at
        return sets

    def _previous_generated(self, users: list[str]) -> dict[str, int]:
        """The users' current sets' ``generated_at`` (ms); a new set's is bumped past them.

        From this process's memory or, after a restart, from the stored slot-0 point of the user (one
        retrieve for the batch), so a user's sets stay ordered even if the clock went back.
        """
        unknown = [u for u in users if u not in self._last_generated]
        prev = {u: self._last_generated[u] for u in users if u in self._last_generated}
        if unknown:
            slot0 = [anchor_point_id(u, 0) for u in unknown]
            pts = self.index.retrieve(self.collection, slot0, with_payload=True)
            for payload in pts.payloads:
                u, t = payload.get("user_id"), payload.get("generated_at")
                if isinstance(u, str) and isinstance(t, int):
                    prev[u] = t
        return prev
