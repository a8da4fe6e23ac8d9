"""Constrained beam search over valid semantic IDs: only codes some item has are ever proposed.

A trie of the catalogue's SIDs masks the logits at each level, so every beam decodes to an item cell.
:func:`beam_search_many` serves many users at once and is built for throughput (the streaming
anchors worker's ``sid`` backend; ``gpl bench anchors`` measures it):

* each context goes through the model once, and a step runs only each beam's newest code against the
  cached context and the beam's cached earlier codes (:mod:`workers.anchors.sid.decode`), for all beams of
  all users of a chunk together;
* the trie is a table per level (node × code → child node, -1 where no item continues), so masking,
  renormalising and choosing the next beams are array operations over (users, beams, codes), not
  Python loops over beams.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from workers.anchors.sid.decode import Past, extend, prefill, reorder
from workers.anchors.sid.sequence_model import SIDTransformer

NEG = float("-inf")


class SIDTrie:
    """Prefix trie of the existing SIDs as per-level tables.

    ``children[d][node, code]`` is the node of prefix + (code,) at depth d + 1, or -1 when no item has
    that prefix; depth 0 has one node (0, the empty prefix). A table is as wide as the largest code
    used at its level: codes beyond it are invalid by construction.
    """

    def __init__(self, sids: np.ndarray) -> None:
        sids = np.asarray(sids, np.int64)
        self.depth = sids.shape[1]
        self.children: list[np.ndarray] = []
        node = np.zeros(len(sids), np.int64)
        n_nodes = 1
        for d in range(self.depth):
            width = int(sids[:, d].max()) + 1 if len(sids) else 0
            key = node * max(width, 1) + sids[:, d]
            uniq, inverse = np.unique(key, return_inverse=True)
            table = np.full((n_nodes, width), -1, np.int64)
            table[uniq // max(width, 1), uniq % max(width, 1)] = np.arange(len(uniq))
            self.children.append(table)
            node, n_nodes = inverse.ravel(), len(uniq)

    def node_of(self, prefix: Sequence[int]) -> int:
        """The node of a prefix, -1 when no item has it."""
        node = 0
        for d, c in enumerate(prefix):
            if d >= self.depth or not 0 <= int(c) < self.children[d].shape[1]:
                return -1
            table = self.children[d]
            node = int(table[node, int(c)])
            if node < 0:
                return -1
        return node

    def next_codes(self, prefix: tuple[int, ...]) -> np.ndarray:
        """Codes that continue ``prefix`` to some real item (empty when none)."""
        node = self.node_of(prefix) if len(prefix) < self.depth else -1
        if node < 0:
            return np.zeros(0, np.int64)
        return np.flatnonzero(self.children[len(prefix)][node] >= 0)

    def is_valid(self, sid: Sequence[int]) -> bool:
        """True for a full SID of some item or a prefix of one."""
        return 0 < len(sid) <= self.depth and self.node_of(sid) >= 0


def _banned_mask(trie: SIDTrie, banned: Sequence[set[tuple[int, ...]]], nodes: np.ndarray, width: int
                 ) -> np.ndarray:
    """(U, W, width) False where beam (u, w) extended by a code gives a prefix ``banned[u]`` lists."""
    u_n, w_n = nodes.shape
    ok = np.ones((u_n, w_n, width), bool)
    triples = [(u, trie.node_of(p[:-1]), int(p[-1])) for u, bs in enumerate(banned) for p in bs]
    triples = [t for t in triples if t[1] >= 0 and 0 <= t[2] < width]
    if not triples:
        return ok
    tb = np.asarray(triples, np.int64)
    n_nodes = max(int(nodes.max()), int(tb[:, 1].max())) + 1
    beam_key = (np.arange(u_n)[:, None] * n_nodes + nodes).ravel()  # beams of a user are distinct nodes
    order = np.argsort(beam_key, kind="stable")
    want = tb[:, 0] * n_nodes + tb[:, 1]
    pos = np.clip(np.searchsorted(beam_key[order], want), 0, len(order) - 1)
    hit = beam_key[order][pos] == want
    flat = ok.reshape(u_n * w_n, width)
    flat[order[pos[hit]], tb[hit, 2]] = False
    return ok


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
    chunk: int = 256,
) -> list[list[tuple[tuple[int, ...], float]]]:
    """For each context (tokens, BOS first): its K best valid SID prefixes of length ``depth``, best first.

    The score of a prefix is its log-prob under the model restricted to valid codes (each step's
    logits renormalised over the codes the trie allows). ``banned[i]`` lists full-depth prefixes
    context i must not produce (e.g. items the user already has); like invalid codes they are removed
    before the renormalisation. A result has fewer than K entries only when fewer allowed prefixes
    exist. ``chunk`` contexts are decoded together (memory grows with chunk × beams × context).
    """
    cfg = model.config
    depth = depth or cfg.depth
    if not 1 <= depth <= cfg.depth:
        raise ValueError(f"depth must be in 1..{cfg.depth}")
    ctxs = [list(c) for c in contexts]
    if any(len(c) + depth > cfg.max_len or not c for c in ctxs):
        raise ValueError(f"every context needs 1..{cfg.max_len - depth} tokens")
    out: list[list[tuple[tuple[int, ...], float]]] = []
    for s in range(0, len(ctxs), chunk):
        part = None if banned is None else banned[s : s + chunk]
        out.extend(_search(model, trie, ctxs[s : s + chunk], k, max(k, beam_width), depth, part))
    return out


def _search(model: SIDTransformer, trie: SIDTrie, ctxs: list[list[int]], k: int, width: int, depth: int,
            banned: Sequence[set[tuple[int, ...]]] | None) -> list[list[tuple[tuple[int, ...], float]]]:
    u_n = len(ctxs)
    if not u_n:
        return []
    cache, first = prefill(model, ctxs)
    nodes = np.zeros((u_n, 1), np.int64)  # -1: no beam in this slot
    scores = torch.zeros(u_n, 1, dtype=torch.float64)
    codes = torch.zeros(u_n, 1, 0, dtype=torch.long)
    past: Past | None = None
    for d in range(depth):
        table = trie.children[d]
        size = table.shape[1]
        if d == 0:
            logits = first[:, None, :size]
        else:
            logits, past = extend(model, cache, codes[..., -1], past)
            logits = logits[..., :size]
        child = table[np.maximum(nodes, 0)]  # (U, W, size)
        allowed = (child >= 0) & (nodes >= 0)[..., None]
        if banned is not None and d == depth - 1:
            allowed &= _banned_mask(trie, banned, nodes, size)
        ok = torch.from_numpy(allowed)
        lp = torch.log_softmax(logits.double().masked_fill(~ok, NEG), -1)
        cand = (scores[..., None] + lp).masked_fill(~ok, NEG)  # also clears rows with nothing allowed (NaN)
        keep = min(width if d < depth - 1 else k, cand.shape[1] * size)
        top, idx = cand.reshape(u_n, -1).topk(keep, dim=1)
        beam, code = idx // size, idx % size
        scores = top
        nodes = np.where(torch.isfinite(top).numpy(), child[np.arange(u_n)[:, None], beam.numpy(), code.numpy()], -1)
        codes = torch.cat([codes[torch.arange(u_n)[:, None], beam], code[..., None]], -1)
        if past is not None and d < depth - 1:
            past = reorder(past, beam)
    res_codes, res_scores = codes.tolist(), scores.tolist()
    return [[(tuple(c), float(sc)) for c, sc, n in zip(cs, ss, ns, strict=True) if n >= 0]
            for cs, ss, ns in zip(res_codes, res_scores, nodes.tolist(), strict=True)]


def beam_search(model: SIDTransformer, trie: SIDTrie, context: Sequence[int], k: int, *,
                beam_width: int = 16, depth: int | None = None,
                banned: set[tuple[int, ...]] | None = None) -> list[tuple[tuple[int, ...], float]]:
    """One context's K best valid SID prefixes (see :func:`beam_search_many`)."""
    return beam_search_many(model, trie, [context], k, beam_width=beam_width, depth=depth,
                            banned=None if banned is None else [banned])[0]


def sid_string(sid: Sequence[int]) -> str:
    return "sid:" + "-".join(str(int(c)) for c in sid)
