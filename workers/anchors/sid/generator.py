"""A small causal transformer over users' positive SID sequences, and SID anchors by constrained beam search.

Tokens. An item is ``depth`` tokens (its semantic codes, then the collision suffix); each SID position
has its own slice of one flat vocabulary ``[PAD, BOS, level-0 codes, level-1 codes, ...]``, so a code
means different things at different levels without a separate level embedding. A sequence is
``BOS, item_1 tokens, item_2 tokens, ...`` and the position alone says which level comes next:
the logits are restricted to that level's slice both in training and in decoding (the model never
spends probability on a token that cannot appear there).

Training (teacher forcing, :func:`train_generator`). Each user's positive sequence (time order, held-out
test item removed) is cut into windows of at most ``context_items`` items whose last ``stride`` items
are targets and whose earlier items are context only, so every item is a target exactly once per epoch
and, except at the start of a history, always with context — as at inference, where the model reads
the user's recent items. The window ends shift by a random offset each epoch.

Popularity downsampling. A few blockbusters dominate MovieLens positives; trained on raw frequencies the
model mostly learns "predict the blockbuster", which is the opposite of what pseudo-labels for
unexposed (long-tail) candidates need. Each epoch an occurrence of item i is kept *as a target* with
probability

    p_keep(i) = min(1, sqrt(t / f_i) + t / f_i),     f_i = count_i / total positive count (training)

(the word2vec frequent-word subsampling rule; ``t`` = ``subsample_t``, 0 disables it). A dropped
occurrence stays in the sequence as context — the user did like it, and it says something about them
— it only contributes no loss. Items with f_i <= ~2.6 t are never dropped.

Decoding (:func:`beam_search`). A prefix trie of the SIDs that exist (:class:`SIDTrie`) constrains each
step to codes that continue some real item, so every result is a valid SID. A step's log-probs are the
model's logits over the *valid* codes, renormalised (log-softmax over the allowed set): the score of a
SID is its sequence log-prob under the constrained model, summed over its tokens, and the K results
come back best first. Beam width >= K.

Already-liked items. By default (``exclude_history``) a semantic code all of whose items are in the
user's history is banned at the last step: pointing an anchor at what the user already has adds
nothing the "recent positives" fallback does not, and a user does not re-consume a film. On MovieLens
(two seeds, same models) it raised the held-out HR@4x10 from 4.6/5.3% to 4.8/6.4% and the exact
next-code hit rate from 2.0/2.3% to 3.8/4.3%.

Anchor vectors (:class:`SIDAnchorGenerator`). By default the beam runs over the ``levels`` semantic codes
only (depth 3): the suffix carries identity, not meaning, and two SIDs differing only in the suffix
would give the same vector twice. The anchor vector of a semantic code is, by default, the
**centroid** (unit mean) of the frozen vectors of the items carrying it; ``vector_mode="decoded"``
uses the RQ-VAE decoder instead. The centroid is chosen because it lies in the frozen space exactly
(the decoder reconstructs items with cosine ~0.8 only) and, on MovieLens with two seeds, it was ahead
at K=8 (HR@8x10 8.4/10.9% vs 7.6/10.0%) and mixed at K=4 (4.8/6.4% vs 5.1/5.6%) — differences near
the noise of 608 test users (``gpl anchors evaluate-sid`` reports both). The decoder stays available
because it also covers codes no item has yet.
"""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workers.anchors.sid.beam import SIDTrie, beam_search_many, sid_string
from workers.anchors.sid.sequence_model import BOS, SIDTransformer, _state_hash, item_tokens, load_generator
from workers.anchors.sid.tokenizer import SIDTokenizer


class SIDAnchorGenerator:
    """History of item ids -> K anchors (vector, sequence log-prob, SID string) from the trained models.

    Unlike the text backends in workers/anchors/generators/, anchors come out as vectors already in the
    frozen space: the anchors worker must not embed ``sid_string`` (it is a label for lineage and
    debugging, not text). ``model`` and ``prompt_hash`` fill the same lineage fields as a text backend.
    """

    def __init__(self, tokenizer: SIDTokenizer, model: SIDTransformer, *, vector_mode: str = "centroid",
                 depth: int | None = None, beam_width: int = 16, exclude_history: bool = True) -> None:
        if model.config.level_sizes != tokenizer.level_sizes:
            raise ValueError("generator and tokenizer disagree on the SID vocabulary")
        if vector_mode not in ("centroid", "decoded"):
            raise ValueError(f"vector_mode must be 'centroid' or 'decoded', not {vector_mode!r}")
        self.tokenizer = tokenizer
        self.net = model
        self.vector_mode = vector_mode
        self.depth = depth or tokenizer.levels
        if not tokenizer.levels <= self.depth <= model.config.depth:
            raise ValueError(f"depth must be in {tokenizer.levels}..{model.config.depth}")
        self.beam_width = beam_width
        self.exclude_history = exclude_history
        self._prefix_items = Counter(tuple(r) for r in tokenizer.sids[:, : self.depth].tolist())
        self.trie = SIDTrie(tokenizer.sids)
        self._tokens = item_tokens(tokenizer.sids, model.config)
        self._vec_cache: dict[tuple[int, ...], np.ndarray] = {}
        spec = json.dumps({"tokenizer": tokenizer.fingerprint, "weights": _state_hash(model),
                           "mode": vector_mode, "depth": self.depth, "beam": beam_width,
                           "exclude_history": exclude_history}, sort_keys=True)
        self.prompt_hash = hashlib.blake2b(spec.encode(), digest_size=8).hexdigest()
        self.model = f"sid-transformer-{self.prompt_hash[:8]}"

    def context(self, history_item_ids: Sequence[int]) -> list[int]:
        """BOS + tokens of the last ``context_items - 1`` known history items (unknown ids skipped)."""
        rows = [r for r in (self.tokenizer.row_of(i) for i in history_item_ids) if r is not None]
        rows = rows[-(self.net.config.context_items - 1):] if self.net.config.context_items > 1 else []
        return [BOS, *self._tokens[rows].reshape(-1).tolist()]

    def banned(self, history_item_ids: Sequence[int]) -> set[tuple[int, ...]]:
        """Depth-prefixes all of whose items are in the history (nothing new left to point at)."""
        if not self.exclude_history:
            return set()
        seen: Counter[tuple[int, ...]] = Counter()
        for r in {r for r in (self.tokenizer.row_of(i) for i in history_item_ids) if r is not None}:
            seen[tuple(int(c) for c in self.tokenizer.sids[r, : self.depth])] += 1
        return {p for p, n in seen.items() if n >= self._prefix_items[p]}

    def generate_sids_many(self, histories: Sequence[Sequence[int]], k: int
                           ) -> list[list[tuple[tuple[int, ...], float]]]:
        """One beam search over a batch of histories (the cheap way to serve a micro-batch of users)."""
        return beam_search_many(self.net, self.trie, [self.context(h) for h in histories], k,
                                beam_width=self.beam_width, depth=self.depth,
                                banned=[self.banned(h) for h in histories])

    def generate_sids(self, history_item_ids: Sequence[int], k: int) -> list[tuple[tuple[int, ...], float]]:
        return self.generate_sids_many([history_item_ids], k)[0]

    def vector(self, sid: tuple[int, ...]) -> np.ndarray:
        head = sid[: self.tokenizer.levels]
        v = self._vec_cache.get(head)
        if v is None:
            v = self.tokenizer.vector_of_prefix(head, self.vector_mode)
            self._vec_cache[head] = v
        return v

    def generate_anchors(self, history_item_ids: list[int], k: int) -> list[tuple[np.ndarray, float, str]]:
        """K anchors best first: (unit vector in the frozen space, sequence log-prob, SID string)."""
        return self.generate_anchors_many([history_item_ids], k)[0]

    def generate_anchors_many(self, histories: Sequence[Sequence[int]], k: int
                              ) -> list[list[tuple[np.ndarray, float, str]]]:
        return [[(self.vector(sid), lp, sid_string(sid)) for sid, lp in sids]
                for sids in self.generate_sids_many(histories, k)]

    def anchors(self, history_item_ids: list[int], k: int) -> list[Any]:
        """The same anchors as ``schemas.events.Anchor`` (text = SID string), ready for an AnchorSet."""
        from schemas.events import Anchor

        return [Anchor(text=s, vector=v.tolist(), logprob=lp)
                for v, lp, s in self.generate_anchors(history_item_ids, k)]

    @classmethod
    def load(cls, directory: Path | str, encoder_id: str | None = None, **kwargs: Any) -> SIDAnchorGenerator:
        """Tokenizer and generator from one artifact directory (``<data_dir>/sid/<encoder id>``)."""
        tok = SIDTokenizer.load(directory, encoder_id)
        return cls(tok, load_generator(directory, tok)[0], **kwargs)
