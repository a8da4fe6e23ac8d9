"""An evaluation dataset on disk (docs/eval.md) loaded into flat arrays, one row per (request, candidate).

Why flat arrays: the comparison trains and scores several models over millions of (request, candidate)
rows; per-candidate objects (pydantic contracts) would cost more than the models. The events are read
with orjson straight from ``events.jsonl`` (the same file ``gpl replay`` streams), without building the
contracts, and only the fields the evaluation needs are kept.

Layout of a dataset directory::

    events.jsonl   items, recall and exposure events in the project's JSONL format (schemas/jsonl.py)
    split.json     {"test_start_ms": T, "user_test_start_ms": {"<user_id>": T_u, ...}?}
    truth.jsonl    optional, lines of either kind: {"user_id": ..., "item_id": ..., "label": 0|1} (the pair's
                   label in every request), or {"request_id": ..., "positive_item_ids": [...]} (that request's
                   positives; every other candidate of the request is 0: one draw per request)
    meta.json      optional: free-form provenance (what built the dataset, what was simulated)

Joining rules (the same as the streaming join, minus time-outs): a request is the union of its recall
event and its exposure event (matched by ``request_id``, in any order). An exposed item that the
recall did not list is added to the request's candidates (recall score NaN); a request with an
exposure but no recall consists of its exposed items only; a recall without an exposure has every
candidate unexposed. A candidate's ``label`` is its click when exposed, else its ``truth.jsonl``
label (the request's line first, then the pair's), else unknown (-1). A request belongs to the test
period when its time (recall ``ts``, else exposure ``ts``) is ``>= T_u`` for its user
(``user_test_start_ms``) or ``>= T`` for users not listed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

UNKNOWN = -1


@dataclass
class EvalDataset:
    """Rows are (request, candidate) pairs grouped by request: request r owns ``ptr[r]:ptr[r+1]``.

    Requests are ordered by (time, request id). Items are dense indices into ``item_ids`` (sorted);
    users dense indices into ``users``.
    """

    name: str
    item_ids: np.ndarray  # int64 [I], sorted
    item_text: list[str]
    item_category: np.ndarray  # int32 [I] index into ``categories``
    categories: list[str]
    users: list[str]
    request_ids: list[str]
    req_user: np.ndarray  # int64 [R]
    req_ts: np.ndarray  # int64 [R]
    is_test: np.ndarray  # bool [R]
    ptr: np.ndarray  # int64 [R + 1]
    item: np.ndarray  # int64 [N] dense item index
    recall_score: np.ndarray  # float32 [N], NaN for exposed items missing from the recall
    exposed: np.ndarray  # bool [N]
    position: np.ndarray  # int32 [N], -1 when unexposed
    label: np.ndarray  # int8 [N]: click for exposed rows, truth (or -1) for unexposed rows
    split: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str = ""
    req_explore: np.ndarray | None = None  # bool [R]: exposure flagged ``exploration`` (None: no such request)

    @property
    def explored(self) -> np.ndarray:
        """bool [R]: requests whose exposure was a uniform draw of the recall (the contract's flag)."""
        return self.req_explore if self.req_explore is not None else np.zeros(self.n_requests, bool)

    @property
    def n_requests(self) -> int:
        return len(self.request_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def row_request(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_requests, dtype=np.int64), np.diff(self.ptr))

    @property
    def row_user(self) -> np.ndarray:
        return self.req_user[self.row_request]

    @property
    def row_test(self) -> np.ndarray:
        return self.is_test[self.row_request]

    def stats(self) -> dict[str, float]:
        """Sizes and label coverage, for the report (what the numbers rest on)."""
        test_rows = self.row_test
        unexp = ~self.exposed
        out: dict[str, float] = {
            "users": float(len(self.users)),
            "items": float(self.n_items),
            "requests": float(self.n_requests),
            "train_requests": float((~self.is_test).sum()),
            "test_requests": float(self.is_test.sum()),
            "candidates_per_request": float(len(self.item)) / max(self.n_requests, 1),
            "exposed_per_request": float(self.exposed.sum()) / max(self.n_requests, 1),
            "click_rate": float((self.label[self.exposed] == 1).mean()) if self.exposed.any() else 0.0,
            "unexposed_known_fraction": float((self.label[unexp] >= 0).mean()) if unexp.any() else 0.0,
            "unexposed_positive_fraction": float((self.label[unexp] == 1).mean()) if unexp.any() else 0.0,
            "test_unexposed_positives": float(((self.label == 1) & unexp & test_rows).sum()),
            "test_exposed_positives": float(((self.label == 1) & self.exposed & test_rows).sum()),
        }
        sizes = np.diff(self.ptr)[self.is_test]
        if len(sizes):  # what an HR@K curve over test requests ranks within
            out |= {"test_candidates_per_request": float(sizes.mean()),
                    "test_candidates_per_request_min": float(sizes.min()),
                    "test_candidates_per_request_max": float(sizes.max())}
        return out


def load_dataset(path: Path | str, *, training_only: bool = False) -> EvalDataset:
    """Read a dataset directory (see the module docstring) into an :class:`EvalDataset`.

    ``training_only``: a directory that may lack split.json (e.g. a training event set for the
    calibrator); every request is then a training request.
    """
    root = Path(path)
    events = root / "events.jsonl"
    if not events.is_file():
        raise FileNotFoundError(f"{root}: no events.jsonl (see docs/eval.md for the dataset format)")
    split_file = root / "split.json"
    split: dict[str, Any]
    if training_only:
        split = {"test_start_ms": 2**62, "rule": "training only"}
    elif not split_file.is_file():
        raise FileNotFoundError(f'{root}: no split.json (a temporal split {{"test_start_ms": T}} is required)')
    else:
        split = orjson.loads(split_file.read_bytes())
    if not isinstance(split, dict) or not isinstance(split.get("test_start_ms"), int):
        raise ValueError(f"{split_file}: needs an integer 'test_start_ms'")
    per_user = split.get("user_test_start_ms") or {}
    if not isinstance(per_user, dict):
        raise ValueError(f"{split_file}: 'user_test_start_ms' must map user ids to integers")
    meta_file = root / "meta.json"
    meta = orjson.loads(meta_file.read_bytes()) if meta_file.is_file() else {}

    h = hashlib.blake2b(digest_size=8)
    items: dict[int, tuple[str, str]] = {}
    recalls: dict[str, tuple[str, int, list[int], list[float]]] = {}
    exposures: dict[str, tuple[str, int, list[int], list[int], list[bool]]] = {}
    explored: set[str] = set()  # requests whose exposure was a uniform draw of the recall (the contract's flag)
    with open(events, "rb") as f:
        for n, line in enumerate(f, 1):
            h.update(line)
            line = line.strip()
            if not line or line.startswith(b"#"):
                continue
            try:
                obj = orjson.loads(line)
                topic, v = obj["topic"], obj["value"]
                if topic == "items":
                    items[int(v["item_id"])] = (str(v.get("text", "")), str(v.get("category", "")))
                elif topic == "recall":
                    if "candidates" in v:  # schema_version 1: candidate objects
                        cands = v["candidates"]
                        rec_ids = [c["item_id"] for c in cands]
                        rec_scores = [float(c.get("score", 0.0)) for c in cands]
                    else:  # schema_version 2: parallel arrays
                        rec_ids = list(v["item_ids"])
                        rec_scores = [float(x) for x in v.get("scores") or [0.0] * len(rec_ids)]
                    recalls[v["request_id"]] = (str(v["user_id"]), int(v["ts"]), rec_ids, rec_scores)
                elif topic == "exposure":
                    its = v["items"]
                    exposures[v["request_id"]] = (
                        str(v["user_id"]),
                        int(v["ts"]),
                        [c["item_id"] for c in its],
                        [int(c.get("position", j)) for j, c in enumerate(its)],
                        [bool(c["clicked"]) for c in its],
                    )
                    if v.get("exploration"):
                        explored.add(v["request_id"])
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{events}:{n}: not a valid event line ({type(e).__name__}: {e})") from None

    truth: dict[tuple[str, int], int] = {}  # (user, item) -> label: one draw per pair
    req_truth: dict[str, set[int]] = {}  # request -> positives, every other candidate 0: one draw per request
    truth_file = root / "truth.jsonl"
    if truth_file.is_file():
        with open(truth_file, "rb") as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    t = orjson.loads(line)
                    if "request_id" in t:
                        req_truth[str(t["request_id"])] = {int(i) for i in t["positive_item_ids"]}
                    else:
                        truth[(str(t["user_id"]), int(t["item_id"]))] = int(bool(t["label"]))
                except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                    raise ValueError(f"{truth_file}:{n}: bad truth line ({e})") from None
        h.update(truth_file.read_bytes())
    h.update(orjson.dumps(split) if training_only else split_file.read_bytes())

    # requests in (time, id) order
    rids = sorted(set(recalls) | set(exposures), key=lambda r: (recalls[r][1] if r in recalls else exposures[r][1], r))
    # the catalogue: declared items plus any id seen only in events (no text: empty string)
    seen_ids: set[int] = set(items)
    for _, _, ids, _ in recalls.values():
        seen_ids.update(ids)
    for _, _, ids, _, _ in exposures.values():
        seen_ids.update(ids)
    item_ids = np.array(sorted(seen_ids), dtype=np.int64)
    cat_names = sorted({items.get(i, ("", ""))[1] for i in item_ids.tolist()})
    cat_index = {c: k for k, c in enumerate(cat_names)}
    item_text = [items.get(i, ("", ""))[0] for i in item_ids.tolist()]
    item_category = np.array([cat_index[items.get(i, ("", ""))[1]] for i in item_ids.tolist()], np.int32)

    users: dict[str, int] = {}
    req_user, req_ts = [], []
    sizes: list[int] = []
    raw_items: list[np.ndarray] = []
    r_scores: list[np.ndarray] = []
    r_exposed: list[np.ndarray] = []
    r_pos: list[np.ndarray] = []
    r_click: list[np.ndarray] = []
    for rid in rids:
        rec = recalls.get(rid)
        exp = exposures.get(rid)
        uid = rec[0] if rec else exp[0]  # type: ignore[index]
        ts = rec[1] if rec else exp[1]  # type: ignore[index]
        cand = np.asarray(rec[2] if rec else [], np.int64)
        score = np.asarray(rec[3] if rec else [], np.float32)
        if cand.size:  # an item recalled twice in one request keeps its first occurrence
            _, first = np.unique(cand, return_index=True)
            if first.size != cand.size:
                keep = np.sort(first)
                cand, score = cand[keep], score[keep]
        ex = np.zeros(cand.size, bool)
        pos = np.full(cand.size, -1, np.int32)
        clk = np.zeros(cand.size, bool)
        if exp is not None:
            e_ids = np.asarray(exp[2], np.int64)
            where = {int(c): j for j, c in enumerate(cand.tolist())}
            extra = [i for i in e_ids.tolist() if i not in where]
            if extra:
                cand = np.concatenate([cand, np.asarray(extra, np.int64)])
                score = np.concatenate([score, np.full(len(extra), np.nan, np.float32)])
                ex = np.concatenate([ex, np.zeros(len(extra), bool)])
                pos = np.concatenate([pos, np.full(len(extra), -1, np.int32)])
                clk = np.concatenate([clk, np.zeros(len(extra), bool)])
                where.update({i: cand.size - len(extra) + j for j, i in enumerate(extra)})
            rows = np.array([where[i] for i in e_ids.tolist()], np.int64)
            ex[rows] = True
            pos[rows] = np.asarray(exp[3], np.int32)
            clk[rows] = np.asarray(exp[4], bool)
        req_user.append(users.setdefault(uid, len(users)))
        req_ts.append(ts)
        sizes.append(int(cand.size))
        raw_items.append(cand)
        r_scores.append(score)
        r_exposed.append(ex)
        r_pos.append(pos)
        r_click.append(clk)

    user_list = list(users)
    req_user_a = np.asarray(req_user, np.int64)
    req_ts_a = np.asarray(req_ts, np.int64)
    ptr = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    flat_items = np.concatenate(raw_items) if raw_items else np.zeros(0, np.int64)
    item = np.searchsorted(item_ids, flat_items).astype(np.int64)
    exposed = np.concatenate(r_exposed) if r_exposed else np.zeros(0, bool)
    clicked = np.concatenate(r_click) if r_click else np.zeros(0, bool)
    label = np.full(len(item), UNKNOWN, np.int8)
    if truth:
        row_user = np.repeat(req_user_a, sizes)
        known_users = {u: k for k, u in enumerate(user_list)}
        t_keys = np.array(
            [
                known_users[u] * (1 << 40) + int(np.searchsorted(item_ids, i))
                for (u, i) in truth
                if u in known_users and _has(item_ids, i)
            ],
            np.int64,
        )
        t_vals = np.array([v for (u, i), v in truth.items() if u in known_users and _has(item_ids, i)], np.int8)
        order = np.argsort(t_keys)
        t_keys, t_vals = t_keys[order], t_vals[order]
        keys = row_user * (1 << 40) + item
        at = np.minimum(np.searchsorted(t_keys, keys), max(len(t_keys) - 1, 0))
        hit = (t_keys[at] == keys) if len(t_keys) else np.zeros(len(keys), bool)
        label[hit] = t_vals[at[hit]]
    for r, rid in enumerate(rids):
        positives = req_truth.get(rid)
        if positives is not None:
            label[ptr[r]:ptr[r + 1]] = np.isin(flat_items[ptr[r]:ptr[r + 1]], list(positives)).astype(np.int8)
    label[exposed] = clicked[exposed].astype(np.int8)

    cut = np.full(len(user_list), int(split["test_start_ms"]), np.int64)
    for u, t in per_user.items():
        k = users.get(str(u))
        if k is not None:
            cut[k] = int(t)
    is_test = req_ts_a >= cut[req_user_a]

    return EvalDataset(
        name=str(meta.get("name", root.name)),
        item_ids=item_ids,
        item_text=item_text,
        item_category=item_category,
        categories=cat_names,
        users=user_list,
        request_ids=list(rids),
        req_user=req_user_a,
        req_ts=req_ts_a,
        is_test=is_test,
        ptr=ptr,
        item=item,
        recall_score=np.concatenate(r_scores) if r_scores else np.zeros(0, np.float32),
        exposed=exposed,
        position=np.concatenate(r_pos) if r_pos else np.zeros(0, np.int32),
        label=label,
        split=split,
        meta=meta,
        digest=h.hexdigest(),
        req_explore=np.fromiter((r in explored for r in rids), bool, len(rids)) if explored else None,
    )


def _has(sorted_ids: np.ndarray, i: int) -> bool:
    k = int(np.searchsorted(sorted_ids, i))
    return k < len(sorted_ids) and int(sorted_ids[k]) == i


def subset(ds: EvalDataset, keep: np.ndarray, is_test: np.ndarray, name: str) -> EvalDataset:
    """The requests in ``keep`` (bool per request) with a new test flag (bool per request)."""
    reqs = np.flatnonzero(keep)
    sizes = np.diff(ds.ptr)[reqs]
    rows = np.concatenate([np.arange(ds.ptr[r], ds.ptr[r + 1]) for r in reqs]) if len(reqs) else np.zeros(0, np.int64)
    return replace(ds, name=name, request_ids=[ds.request_ids[r] for r in reqs.tolist()], req_user=ds.req_user[reqs],
                   req_ts=ds.req_ts[reqs], is_test=np.asarray(is_test, bool)[reqs],
                   ptr=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), item=ds.item[rows],
                   recall_score=ds.recall_score[rows], exposed=ds.exposed[rows], position=ds.position[rows],
                   label=ds.label[rows], split={"rule": f"validation view of {ds.name}"},
                   digest=f"{ds.digest}:{name}", req_explore=None if ds.req_explore is None else ds.req_explore[reqs])


def fresh_pairs(ds: EvalDataset, row_test: np.ndarray) -> np.ndarray:
    """Per flat row: True when the row's (user, item) pair was never exposed to that user in a training request.

    Training rows are never fresh (the scope is for test rows only)."""
    key = ds.row_user.astype(np.int64) * ds.n_items + ds.item
    seen = np.unique(key[ds.exposed & ~row_test])
    return row_test & ~np.isin(key, seen)


def validation_view(ds: EvalDataset, fraction: float = 0.2) -> EvalDataset:
    """The training period only: each user's last ``fraction`` of TRAINING requests (≥ 1, users with ≥ 2)
    become the held-out slice, the test requests are dropped. Settings are chosen on this view, never on
    the test period (docs/eval.md, "How the defaults were chosen")."""
    train = ~ds.is_test
    val = np.zeros(ds.n_requests, bool)
    for u in np.unique(ds.req_user[train]).tolist():
        r = np.flatnonzero(train & (ds.req_user == u))
        if len(r) < 2:
            continue
        r = r[np.lexsort((r, ds.req_ts[r]))]
        val[r[len(r) - max(1, int(np.ceil(fraction * len(r)))):]] = True
    return subset(ds, train, val, ds.name + "-validation")


__all__ = ["EvalDataset", "fresh_pairs", "load_dataset", "subset", "validation_view", "UNKNOWN"]
