"""Constrained beam search over valid semantic IDs: only codes some item has are ever proposed.

A trie of the catalogue's SIDs masks the logits at each level, so every beam decodes to an item cell.
:func:`beam_search_many` batches many users' contexts into one forward pass per step.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workers.sid.sequence_model import PAD, SIDTransformer


class SIDTrie:
    """Prefix trie of the existing SIDs: ``next_codes(prefix)`` = codes that continue some real item."""

    def __init__(self, sids: np.ndarray) -> None:
        self.depth = sids.shape[1]
        self._next: dict[tuple[int, ...], np.ndarray] = {}
        for d in range(self.depth):
            uniq = np.unique(sids[:, : d + 1], axis=0)
            groups: dict[tuple[int, ...], list[int]] = {}
            for row in uniq.tolist():
                groups.setdefault(tuple(row[:d]), []).append(row[d])
            for prefix, codes in groups.items():
                self._next[prefix] = np.asarray(codes, np.int64)

    def next_codes(self, prefix: tuple[int, ...]) -> np.ndarray:
        return self._next.get(prefix, np.zeros(0, np.int64))

    def is_valid(self, sid: Sequence[int]) -> bool:
        """True for a full SID of some item or a prefix of one."""
        return 0 < len(sid) <= self.depth and int(sid[-1]) in self.next_codes(tuple(int(c) for c in sid[:-1]))


@torch.no_grad()
def beam_search_many(
    model: SIDTransformer,
    trie: SIDTrie,
    contexts: Sequence[Sequence[int]],
    k: int,
    *,
    beam_width: int = 16,
    depth: int | None = None,
    banned: Sequence[set[tuple[int, ...]]] | None = None,
    max_rows: int = 512,
) -> list[list[tuple[tuple[int, ...], float]]]:
    """For each context (tokens, BOS first): its K best valid SID prefixes of length ``depth``, best first.

    ``banned[i]`` lists full-depth prefixes context i must not produce (e.g. items the user already
    has); like invalid codes they are removed before the renormalisation. A result has fewer than K
    entries only when fewer allowed prefixes exist. All beams of all contexts of a step go through the
    model together, ``max_rows`` rows at a time.
    """
    cfg = model.config
    depth = depth or cfg.depth
    if not 1 <= depth <= cfg.depth:
        raise ValueError(f"depth must be in 1..{cfg.depth}")
    width = max(k, beam_width)
    ctxs = [list(c) for c in contexts]
    if any(len(c) + depth > cfg.max_len or not c for c in ctxs):
        raise ValueError(f"every context needs 1..{cfg.max_len - depth} tokens")
    beams: list[list[tuple[tuple[int, ...], float]]] = [[((), 0.0)] for _ in ctxs]
    for d in range(depth):
        off, size = cfg.offsets[d], cfg.level_sizes[d]
        rows = [ctx + [cfg.offsets[j] + c for j, c in enumerate(p)]
                for ctx, bs in zip(ctxs, beams, strict=True) for p, _ in bs]
        logits = _step_logits(model, rows, max_rows)[:, off : off + size].double()
        r = 0
        for u, bs in enumerate(beams):
            cand_prefix: list[tuple[int, ...]] = []
            cand_score: list[np.ndarray] = []
            for prefix, score in bs:
                lv_all = logits[r]
                r += 1
                valid = trie.next_codes(prefix)
                if banned is not None and d == depth - 1 and banned[u]:
                    ok = [c for c in valid.tolist() if prefix + (c,) not in banned[u]]
                    valid = np.asarray(ok, np.int64)
                if not len(valid):
                    continue
                lv = lv_all[torch.from_numpy(valid)]
                cand_prefix.extend(prefix + (int(c),) for c in valid.tolist())
                cand_score.append(score + (lv - torch.logsumexp(lv, 0)).numpy())
            if not cand_prefix:
                beams[u] = []
                continue
            scores = np.concatenate(cand_score)
            top = np.argsort(-scores, kind="stable")[: width if d < depth - 1 else k]
            beams[u] = [(cand_prefix[i], float(scores[i])) for i in top]
    return beams


def _step_logits(model: SIDTransformer, rows: list[list[int]], max_rows: int) -> torch.Tensor:
    out = []
    for s in range(0, len(rows), max_rows):
        chunk = rows[s : s + max_rows]
        lengths = torch.tensor([len(r) for r in chunk])
        x = torch.full((len(chunk), int(lengths.max())), PAD, dtype=torch.long)
        for i, r in enumerate(chunk):
            x[i, : len(r)] = torch.tensor(r)
        out.append(model.last_logits(x, lengths))
    return torch.cat(out) if out else torch.zeros(0, model.config.vocab)


def beam_search(model: SIDTransformer, trie: SIDTrie, context: Sequence[int], k: int, *,
                beam_width: int = 16, depth: int | None = None,
                banned: set[tuple[int, ...]] | None = None) -> list[tuple[tuple[int, ...], float]]:
    """One context's K best valid SID prefixes (see :func:`beam_search_many`)."""
    return beam_search_many(model, trie, [context], k, beam_width=beam_width, depth=depth,
                            banned=None if banned is None else [banned])[0]


def sid_string(sid: Sequence[int]) -> str:
    return "sid:" + "-".join(str(int(c)) for c in sid)
