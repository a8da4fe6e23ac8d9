"""MovieLens ml-latest-small as arrays: users, movies with their texts, ratings in time order.
"""
from __future__ import annotations

import csv
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "data" / "movielens-small"
NO_GENRE = "(no genres listed)"


@dataclass(frozen=True)
class MovieLens:
    """MovieLens in dense integer form (no pandas): items 0..I-1, users 0..U-1, ratings sorted.

    Ratings are sorted by (user, timestamp, movieId), so a user's timeline is the slice
    ``user_start[u]:user_start[u + 1]`` and "rated before request" is "global rating index < start".
    """

    item_ids: np.ndarray  # int64 [I] movieId, ascending
    titles: list[str]
    genres: list[tuple[str, ...]]  # per item, "(no genres listed)" dropped
    genre_names: tuple[str, ...]
    item_genres: np.ndarray  # bool [I, G]
    tags: list[tuple[str, ...]]  # per item, by number of distinct users who applied it (desc), then name
    user_ids: np.ndarray  # int64 [U] userId, ascending
    user_start: np.ndarray  # int64 [U + 1] offsets into the rating arrays
    r_user: np.ndarray  # int32 [N]
    r_item: np.ndarray  # int32 [N]
    r_rating: np.ndarray  # float32 [N]
    r_ts: np.ndarray  # int64 [N] seconds
    popularity: np.ndarray  # int64 [I] number of ratings

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    def item_text(self, i: int, max_tags: int = 5) -> str:
        parts = [self.titles[i]]
        if self.genres[i]:
            parts.append("genres: " + ", ".join(self.genres[i]))
        if max_tags > 0 and self.tags[i]:
            parts.append("tags: " + ", ".join(self.tags[i][:max_tags]))
        return " | ".join(parts)


def load_movielens(path: Path | str = DEFAULT_PATH) -> MovieLens:
    """Read movies.csv, ratings.csv and tags.csv with the csv module (~0.3 s for ml-latest-small)."""
    path = Path(path)
    with open(path / "movies.csv", newline="", encoding="utf-8") as f:
        rows = sorted((int(r["movieId"]), r["title"], r["genres"]) for r in csv.DictReader(f))
    item_ids = np.array([r[0] for r in rows], dtype=np.int64)
    index = {mid: i for i, mid in enumerate(item_ids.tolist())}
    titles = [r[1].strip() for r in rows]
    genres = [tuple(g for g in r[2].split("|") if g and g != NO_GENRE) for r in rows]
    genre_names = tuple(sorted({g for gs in genres for g in gs}))
    gi = {g: k for k, g in enumerate(genre_names)}
    item_genres = np.zeros((len(rows), len(genre_names)), dtype=bool)
    for i, gs in enumerate(genres):
        item_genres[i, [gi[g] for g in gs]] = True

    users: list[int] = []
    items: list[int] = []
    ratings: list[float] = []
    stamps: list[int] = []
    with open(path / "ratings.csv", newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for u, m, r, t in reader:
            known = index.get(int(m))
            if known is None:  # a rating of a movie missing from movies.csv has no item to show
                continue
            users.append(int(u))
            items.append(known)
            ratings.append(float(r))
            stamps.append(int(t))
    raw_user = np.array(users, dtype=np.int64)
    user_ids, r_user = np.unique(raw_user, return_inverse=True)
    r_item = np.array(items, dtype=np.int32)
    r_ts = np.array(stamps, dtype=np.int64)
    order = np.lexsort((r_item, r_ts, r_user))
    r_user, r_item, r_ts = r_user[order].astype(np.int32), r_item[order], r_ts[order]
    r_rating = np.array(ratings, dtype=np.float32)[order]
    user_start = np.searchsorted(r_user, np.arange(len(user_ids) + 1)).astype(np.int64)

    tag_users: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    tags_file = path / "tags.csv"
    if tags_file.exists():
        with open(tags_file, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                j = index.get(int(row["movieId"]))
                tag = " ".join(row["tag"].lower().split())
                if j is not None and tag:
                    tag_users[j][tag].add(int(row["userId"]))
    tags: list[tuple[str, ...]] = []
    for i in range(len(rows)):
        counted = tag_users.get(i, {})
        tags.append(tuple(t for t, _ in sorted(counted.items(), key=lambda kv: (-len(kv[1]), kv[0]))))

    return MovieLens(
        item_ids=item_ids, titles=titles, genres=genres, genre_names=genre_names, item_genres=item_genres,
        tags=tags, user_ids=user_ids.astype(np.int64), user_start=user_start, r_user=r_user, r_item=r_item,
        r_rating=r_rating, r_ts=r_ts, popularity=np.bincount(r_item, minlength=len(rows)).astype(np.int64),
    )


def positive_sequences(ml: MovieLens, threshold: float = 4.0) -> dict[int, list[int]]:
    """userId -> movieIds rated >= ``threshold``, oldest first (ties by movieId: the loader's order)."""
    keep = ml.r_rating >= threshold
    users = ml.user_ids[ml.r_user[keep]]
    items = ml.item_ids[ml.r_item[keep]]
    out: dict[int, list[int]] = {}
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        out.setdefault(int(u), []).append(int(i))
    return out
