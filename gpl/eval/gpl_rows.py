"""The GPL rows of the comparison: which anchors, which calibrator features, which confidence terms.

Every GPL method labels through the streaming labeler's :func:`~workers.labeler.pseudo_labels.label_candidates`
(:func:`gpl.eval.pseudo.gpl_labels`) with a calibrator cross-fitted on the training period
(:mod:`workers.labeler.calibrator_fit`) for that anchor source and feature set. A calibrator that abstains gives
the method no pseudo-labels: the row says so (``unavailable``) and results.json keeps the figures that
decided it — there is no fallback map.

``gpl``            the shipped default: a calibrator of the priors only (log_recall, log_exposed, user_ctr;
                   no similarity, no monotone constraint), chosen by the validation rule (docs/eval.md);
                   like the labeler it labels users without anchors too
``gpl-anchors``    GPL as designed: content anchors (the stream's k-means backend), features ``FEATURES``
``gpl-noconf``     ablation: ``gpl-anchors`` with w = 1 (every ``labeler.use_<term>`` off)
``gpl-map``        ablation: the fixed map ``sigmoid((s1 - label_center) / label_temperature)`` of the
                   settings instead of a calibrator (the old labeler, kept to show what calibration buys)
``gpl-sid``        semantic-ID anchors (workers/anchors/sid), calibrator cross-fitted with SID anchors
``gpl-text``       LLM text anchors (opt-in, slow: 3 extra generations per user for the cross-fit folds)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from gpl.eval.anchor_sources import SourceAnchors
from gpl.eval.dataset import EvalDataset
from gpl.eval.pseudo import PseudoLabels, gpl_labels
from runtime.settings import LabelerSettings, Settings
from workers.labeler.calibrator import Calibrator
from workers.labeler.calibrator_fit import FEATURE_SETS, fit_dataset_calibrator
from workers.labeler.label_map import LabelMap
from workers.labeler.training_log import TrainingPriors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPLSpec:
    source: str  # anchor book: content, sid, text
    features: str | None  # FEATURE_SETS key; None: the fixed label map
    confidence: bool = True  # False: every confidence term off (w = 1)


SPECS: dict[str, GPLSpec] = {
    "gpl": GPLSpec("content", "priors"),
    "gpl-anchors": GPLSpec("content", "content"),
    "gpl-noconf": GPLSpec("content", "content", confidence=False),
    "gpl-map": GPLSpec("content", None),
    "gpl-sid": GPLSpec("sid", "content"),
    "gpl-text": GPLSpec("text", "content"),
}
LABELS = {
    "gpl": "GPL default: calibrated priors (no anchor features)",
    "gpl-anchors": "GPL content anchors + calibrator",
    "gpl-noconf": "GPL content anchors, w=1",
    "gpl-map": "GPL fixed label map (no calibrator)",
    "gpl-sid": "GPL SID anchors + calibrator",
    "gpl-text": "GPL LLM text anchors + calibrator",
}


def no_confidence(cfg: LabelerSettings) -> LabelerSettings:
    return cfg.model_copy(update={"use_coherence": False, "use_consistency": False, "use_generation": False,
                                  "use_margin": False})


class GPLRows:
    """Fits each GPL method's label once per dataset (no randomness), then labels per seed."""

    def __init__(self, ds: EvalDataset, item_vectors: np.ndarray, settings: Settings, methods: list[str],
                 books: dict[str, SourceAnchors]) -> None:
        self.ds, self.vectors, self.settings, self.books = ds, item_vectors, settings, books
        self.priors = TrainingPriors.of(ds, ~ds.is_test)
        self.labels: dict[str, LabelMap | Calibrator] = {}
        self.info: dict[str, dict[str, Any]] = {}
        self.unavailable: dict[str, str] = {}
        fits: dict[tuple[str, str], Any] = {}
        for m in methods:
            spec = SPECS[m]
            book = books.get(spec.source)
            if book is None:
                continue  # the anchor source failed: the caller reports why
            entry: dict[str, Any] = {"source": spec.source, "features": spec.features}
            if spec.features is None:
                self.labels[m] = LabelMap.from_settings(settings.labeler)
                entry |= {"label": "map", "abstain": False, "describe": self.labels[m].describe()}
            else:
                key = (spec.source, spec.features)
                if key not in fits:
                    fits[key] = fit_dataset_calibrator(ds, item_vectors, settings, features=FEATURE_SETS[spec.features],
                                                       anchor_fn=book.make)
                fit = fits[key]
                entry |= {"label": "calibrator", "abstain": fit.abstain, "reason": fit.reason, "cv": fit.cv}
                if fit.calibrator is None:
                    self.unavailable[m] = f"calibrator abstained, no pseudo-labels: {fit.reason}"
                else:
                    self.labels[m] = fit.calibrator
                    entry |= {"describe": fit.calibrator.describe(), "version": fit.calibrator.version}
            self.info[m] = entry

    def cfg(self, method: str) -> LabelerSettings:
        lab = self.settings.labeler
        return lab if SPECS[method].confidence else no_confidence(lab)

    def rows(self, method: str, seed: int) -> PseudoLabels:
        spec = SPECS[method]
        return gpl_labels(self.ds, self.vectors, self.books[spec.source], self.cfg(method), self.labels[method], seed,
                          self.priors)


__all__ = ["GPLRows", "GPLSpec", "SPECS", "LABELS", "no_confidence"]
