"""Which recall candidates the vector index knows, and the ``streams.unknown_items`` policy for the rest.

Items and recalls are produced independently: a recall can name an item the indexer has not embedded yet
(they were produced together, or the indexer lags). The labeler can only score items with a vector, so
the processor decides per recall, by policy:

* ``drop`` (default): unknown candidates leave the request, counted (``unknown_candidates_dropped``);
  the request is joined as usual, its exposure still gives real labels.
* ``hold``: the recall waits in the join table until the indexer has its items (streams/app.py), bounded
  in count (``unknown_hold_max``; beyond it: drop, counted ``unknown_hold_full``) and in time
  (``unknown_hold_s``; then the still unknown ones are dropped, counted ``unknown_hold_timeout``).
* ``dlq``: the whole recall goes to the DLQ (``unknown_items``), as before this setting existed.
"""

from __future__ import annotations

import numpy as np

from runtime.kafka import Accounting
from runtime.settings import StreamsSettings
from runtime.vectors.id_index import IdIndex
from runtime.vectors.index import VectorIndex
from schemas.codec import DecodeError
from schemas.fast_codec import Recall


class Catalog:
    """Known item ids, refreshed from the vector index only for ids not seen yet.

    A hash set (:class:`~runtime.vectors.id_index.IdIndex`): every recall's candidates are checked,
    and a binary search over sorted ids cost ~4x as much per recall (unpredictable branches).
    """

    def __init__(self, index: VectorIndex, collection: str) -> None:
        self.index, self.collection = index, collection
        self._known = IdIndex()

    def unknown(self, ids: np.ndarray) -> np.ndarray:
        missing = ids[~self._is_known(ids)]
        if len(missing):
            found = self.index.retrieve(self.collection, np.unique(missing)).ids
            if len(found):
                self._known.add(found)
                missing = missing[~np.isin(missing, found)]
        return np.unique(missing)

    def _is_known(self, ids: np.ndarray) -> np.ndarray:
        if not len(self._known):
            return np.zeros(len(ids), bool)
        return self._known.contains(ids)


def without(recall: Recall, ids: np.ndarray) -> Recall:
    """The recall without the candidates ``ids`` (order kept)."""
    keep = ~np.isin(recall.item_ids, ids)
    return Recall(recall.request_id, recall.user_id, recall.ts, recall.item_ids[keep], recall.scores[keep])


class UnknownItems:
    """The policy above, applied to one recall at a time."""

    def __init__(self, catalog: Catalog, cfg: StreamsSettings, accounting: Accounting) -> None:
        self.catalog, self.cfg, self.accounting = catalog, cfg, accounting

    def screen(self, recall: Recall, held: int) -> tuple[Recall, np.ndarray]:
        """The recall to go on with, and the unknown ids to hold it for (empty unless it is to be held);
        ``held`` is how many recalls are held now. Raises DecodeError(``unknown_items``) under ``dlq``."""
        unknown = self.catalog.unknown(recall.item_ids)
        if not len(unknown):
            return recall, unknown
        if self.cfg.unknown_items == "dlq":
            raise DecodeError("unknown_items", f"recall {recall.request_id}: {len(unknown)} unknown item ids, "
                                               f"e.g. {unknown[:5].tolist()}")
        if self.cfg.unknown_items == "hold":
            if held < self.cfg.unknown_hold_max:
                return recall, unknown
            self.accounting.add("unknown_hold_full")
        return self.drop(recall, unknown), np.zeros(0, np.int64)

    def drop(self, recall: Recall, unknown: np.ndarray) -> Recall:
        kept = without(recall, unknown)
        self.accounting.add("unknown_candidates_dropped", len(recall.item_ids) - len(kept.item_ids))
        self.accounting.add("recalls_with_unknown")
        return kept
