"""Users' positive sequences from MovieLens and the temporal leave-last-out split.

Why leave-last-out by time: an anchor generator is used to predict what a user will like *next*, so the
honest test is each user's latest positive, predicted from everything before it. That item never
enters training (neither the generator's sequences nor its popularity counts); the tokenizer sees item
vectors only, never users, so it cannot leak the split.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpl.simulate import MovieLens


def positive_sequences(ml: MovieLens, threshold: float = 4.0) -> dict[int, list[int]]:
    """userId -> movieIds rated >= ``threshold``, oldest first (ties by movieId: the loader's order)."""
    keep = ml.r_rating >= threshold
    users = ml.user_ids[ml.r_user[keep]]
    items = ml.item_ids[ml.r_item[keep]]
    out: dict[int, list[int]] = {}
    for u, i in zip(users.tolist(), items.tolist(), strict=True):
        out.setdefault(int(u), []).append(int(i))
    return out


@dataclass(frozen=True)
class Split:
    """``train[u]``: the sequence the generator may learn from; ``test[u]``: (history, held-out next item).

    A user with fewer than ``min_positives`` positives has no test case and trains on everything.
    """

    train: dict[int, list[int]]
    test: dict[int, tuple[list[int], int]]


def leave_last_out(seqs: dict[int, list[int]], min_positives: int = 2) -> Split:
    train: dict[int, list[int]] = {}
    test: dict[int, tuple[list[int], int]] = {}
    for u, s in seqs.items():
        if len(s) >= min_positives:
            train[u] = s[:-1]
            test[u] = (s[:-1], s[-1])
        else:
            train[u] = list(s)
    return Split(train, test)
