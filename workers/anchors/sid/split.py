"""The temporal leave-last-out split of users' positive sequences (built by the application from its data).

Why leave-last-out by time: an anchor generator is used to predict what a user will like *next*, so the
honest test is each user's latest positive, predicted from everything before it. That item never
enters training (neither the generator's sequences nor its popularity counts); the tokenizer sees item
vectors only, never users, so it cannot leak the split.
"""

from __future__ import annotations

from dataclasses import dataclass


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
