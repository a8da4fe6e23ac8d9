"""Anchor sets from requests: history lookup, generation, embedding, storage in the vector index.

Why a module of its own: the anchors stage's engine (workers/anchors/engine.py) decides *when* a user's anchors are
made (queue, priorities, debounce, rate, backpressure, retries); this decides *what* they are, with no
broker involved, so evaluation and tests call it directly (:meth:`AnchorMaker.generate_for`).

Two kinds of backend, one output. A text backend (:class:`~workers.anchors.generators.base.AnchorGenerator`:
LLMs, memory) writes phrases from the history *texts*; they are embedded here. A vector backend
(:class:`~workers.anchors.vector_anchors.VectorAnchorSource`: ``sid``, ``content``) turns the history item
ids and their frozen vectors (read from the item collection with the texts, in the same call) into
anchor vectors itself, labelled with a short text for lineage. Both end in the same ``AnchorSet``
records and the same Qdrant points; vector backends are deterministic and skip the replay cache.

Replay cache (:mod:`workers.anchors.generation_cache`): a generation is stored under a key of the exact prompt
(history texts, k, model, prompt hash); a request whose key is stored is answered without the LLM, so
replaying a topic reproduces the same anchors.

Point ids of anchors are derived from (user, slot), so a new generation overwrites the previous one in
place; slots beyond the new set's size are deleted after the upsert (never before: a reader may see a
moment of old and new slots, told apart by the ``version`` payload, but never a user without anchors).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from runtime.encoder import Encoder
from runtime.kafka import Accounting
from runtime.settings import Settings
from runtime.vectors.index import Points, VectorIndex
from runtime.vectors.normalize import normalize
from schemas.events import Anchor, AnchorRequest, AnchorSet
from workers.anchors.generation_cache import GenerationCache, anchor_version, cache_key
from workers.anchors.generators.base import AnchorGenerator, AnchorPrompt, Generation
from workers.anchors.metrics import ANCHOR_SET_AGE
from workers.anchors.policy import anchor_point_id
from workers.anchors.vector_anchors import VectorAnchorSource
from workers.history import recent_distinct

MAX_SLOTS = 32  # AnchorSettings.k is at most 32: slots >= the new size up to this are deleted


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


class AnchorMaker:
    """Makes and stores users' anchor sets; counts ``fallback`` sets in the stage's accounting."""

    def __init__(self, settings: Settings, index: VectorIndex, encoder: Encoder,
                 generator: AnchorGenerator | VectorAnchorSource, accounting: Accounting, *,
                 cache: GenerationCache | None = None) -> None:
        self.settings = settings
        self.index = index
        self.encoder = encoder
        self.generator = generator
        self.items = settings.encoder.collection
        self.collection = settings.qdrant.anchors_collection
        self.accounting = accounting
        cfg = settings.anchors
        self.vector_source = generator if isinstance(generator, VectorAnchorSource) else None
        if cache is None and cfg.cache and self.vector_source is None:
            cache = GenerationCache(settings.data_dir / "anchor-cache", cfg.cache_max_entries)
        self.cache = cache
        self._last_generated: dict[str, int] = {}
        # the indexer creates the item collection too: either may start first
        self.index.ensure_collection(self.items, encoder.dim)
        self.index.ensure_collection(self.collection, encoder.dim)

    def generate_for(self, requests: list[AnchorRequest]) -> list[AnchorSet]:
        """Anchor sets for the requests (one per request that has known history items), stored in Qdrant.

        No broker involved: the run loop publishes what this returns. Requests with no usable history
        are left out (the run loop dead-letters them).
        """
        return self.generate(requests)[0]

    def generate(self, requests: list[AnchorRequest]) -> tuple[list[AnchorSet], dict[str, tuple[str, str]]]:
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
