"""The pseudo-label calibrator: a few anchor and prior features → a click probability, fitted without leakage.

Why not the old one-input map ``sigmoid((s - c) / T)``: similarity to an anchor alone says "this looks
like something the user clicked" but not how often such things are clicked at all, and on MovieLens it
was fitted on exposures the anchors had been built from (the clicked items sit on the anchors), so the
map learned a slope that fresh candidates do not have — or failed, and the configured map was used
without a word. Here:

* the inputs are the features of :mod:`workers.labeler.features` (anchor similarities, similarity to
  the history centroid, item popularity, the user's click rate);
* the model is a ridge logistic regression on standardised features, **monotone in the best anchor
  similarity** ``s1`` (its coefficient is constrained ≥ 0: if the free fit makes it negative it is
  pinned to 0 and the rest refitted), so "closer to an interest" never lowers a label;
* it must be fitted on rows the anchors did not see: the caller cross-fits (anchors from some of a
  user's requests, calibration rows from the others) — see ``workers/labeler/calibrator_fit.py``;
* :func:`fit_calibrator` **abstains** when, on held-out user folds, it does not beat the base rate
  (log-loss gain below ``min_gain`` or AUC below ``min_auc``): the caller then makes no pseudo-labels
  from that source and reports it, never a silent default map;
* an artifact carries its format, a content version (in every pseudo-label's lineage), the encoder
  and the catalogue it was fitted for; :func:`load_calibrator` refuses a missing, corrupt or foreign
  one with a :class:`CalibratorError` that names it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from workers.labeler.features import PRIOR_FEATURES

FORMAT = "gpl-calibrator/1"


class CalibratorError(ValueError):
    """A calibrator artifact that cannot be used here: missing, corrupt, or made for another space."""


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64)))  # no overflow for large |z|


def logloss(p: np.ndarray, y: np.ndarray) -> float:
    q = np.clip(np.asarray(p, np.float64), 1e-7, 1 - 1e-7)
    t = np.asarray(y, np.float64)
    return float(-(t * np.log(q) + (1 - t) * np.log(1 - q)).mean()) if len(t) else float("nan")


def binary_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann–Whitney AUC, ties counted 1/2; NaN with one class (kept here: workers do not import eval)."""
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels).astype(bool)
    npos, nneg = int(y.sum()), int((~y).sum())
    if npos == 0 or nneg == 0:
        return float("nan")
    order = np.argsort(s, kind="stable")
    ss = s[order]
    start = np.r_[0, np.flatnonzero(np.diff(ss)) + 1]
    end = np.r_[start[1:], len(s)]
    ranks = np.empty(len(s))
    ranks[order] = np.repeat((start + end + 1) / 2.0, end - start)
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """ECE over ``bins`` equal-width bins: Σ_b |Σ p − Σ y| / n."""
    q = np.asarray(p, np.float64)
    t = np.asarray(y, np.float64)
    if not len(q):
        return float("nan")
    b = np.minimum((q * bins).astype(np.int64), bins - 1)
    diff = np.bincount(b, weights=q, minlength=bins) - np.bincount(b, weights=t, minlength=bins)
    return float(np.abs(diff).sum() / len(q))


@dataclass(frozen=True)
class Calibrator:
    """``p = sigmoid(intercept + Σ coef · (x − mean) / scale)``, non-decreasing in ``monotone`` ("" = none)."""

    features: tuple[str, ...]
    mean: tuple[float, ...]
    scale: tuple[float, ...]
    coef: tuple[float, ...]
    intercept: float
    monotone: str
    encoder: str
    catalogue: str
    fitted_at: float = 0.0
    info: dict[str, Any] = field(default_factory=dict, compare=False)

    @functools.cached_property
    def version(self) -> str:
        """Content digest of the parameters and what they were fitted for: the lineage of a label
        (computed once: every SampleBatch's lineage names it, and the fields are frozen)."""
        blob = json.dumps([self.features, self.mean, self.scale, self.coef, self.intercept, self.monotone,
                           self.encoder, self.catalogue], sort_keys=True)
        return hashlib.blake2b(blob.encode(), digest_size=6).hexdigest()

    @functools.cached_property
    def _affine(self) -> tuple[np.ndarray, float]:
        """(w, b) with ``logit(x) = x @ w + b``: the standardisation folded into the coefficients once,
        so a request's labels cost one product instead of a subtraction, a division and a product."""
        w = np.asarray(self.coef, np.float64) / np.asarray(self.scale, np.float64)
        return w, float(self.intercept - np.asarray(self.mean, np.float64) @ w)

    def logit(self, x: np.ndarray) -> np.ndarray:
        w, b = self._affine
        return np.asarray(x, np.float64) @ w + b

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.logit(x))

    @functools.cached_property
    def _prior_weights(self) -> np.ndarray:
        w, _ = self._affine
        return np.where([f in PRIOR_FEATURES for f in self.features], w, 0.0)

    @property
    def reads_beyond_priors(self) -> bool:
        """Whether any feature is not a prior (similarity): only then do labels differ from their priors' part."""
        return any(f not in PRIOR_FEATURES for f in self.features)

    def prior_part(self, x: np.ndarray) -> np.ndarray:
        """What the prior features (popularity, the user's click rate) add to each logit, without the
        intercept: the offset of the trainer's residual rank term (constants per request cancel there)."""
        return np.asarray(x, np.float64) @ self._prior_weights

    def describe(self) -> str:
        terms = " ".join(f"{c:+.3g}·{f}" for f, c in zip(self.features, self.coef, strict=True))
        return f"calibrator {self.version}: sigmoid({self.intercept:.3g} {terms}) on standardised features"

    def save(self, path: Path | str) -> Path:
        """Write the artifact atomically (a reader never sees half a file)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps({"format": FORMAT, "version": self.version, **asdict(self)}, indent=1,
                                  sort_keys=True, default=float))
        tmp.replace(out)
        return out


def load_calibrator(path: Path | str, *, encoder: str, catalogue: str,
                    features: tuple[str, ...] | None = None) -> Calibrator:
    """The artifact at ``path``, checked against the space it will score in; CalibratorError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise CalibratorError(f"calibrator {p} does not exist (fit one with `gpl eval` or `gpl calibrate`)")
    try:
        d = json.loads(p.read_text())
        fmt = d.pop("format")
        stored_version = d.pop("version")
        cal = Calibrator(**{**d, "features": tuple(d["features"]), "mean": tuple(d["mean"]),
                            "scale": tuple(d["scale"]), "coef": tuple(d["coef"])})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CalibratorError(f"calibrator {p} is unreadable: {type(e).__name__}: {e}") from e
    if fmt != FORMAT:
        raise CalibratorError(f"calibrator {p} has format {fmt!r}; this version reads {FORMAT!r}")
    if cal.version != stored_version:
        raise CalibratorError(f"calibrator {p} is corrupt: its parameters hash to {cal.version}, not {stored_version}")
    if len({len(cal.features), len(cal.mean), len(cal.scale), len(cal.coef)}) != 1 or not all(
            math.isfinite(v) for v in (*cal.mean, *cal.scale, *cal.coef, cal.intercept)):
        raise CalibratorError(f"calibrator {p} is corrupt: inconsistent or non-finite parameters")
    if cal.encoder != encoder:
        raise CalibratorError(f"calibrator {p} was fitted under encoder {cal.encoder!r}; items use {encoder!r}")
    if cal.catalogue != catalogue:
        raise CalibratorError(f"calibrator {p} was fitted for catalogue {cal.catalogue!r}, not {catalogue!r}")
    if features is not None and cal.features != tuple(features):
        raise CalibratorError(f"calibrator {p} uses features {list(cal.features)}, expected {list(features)}")
    return cal


@dataclass(frozen=True)
class CalibrationFit:
    """The outcome of a fit: a calibrator, or an abstention with the figures that decided it."""

    calibrator: Calibrator | None
    abstain: bool
    reason: str
    cv: dict[str, float]


def _newton(x: np.ndarray, y: np.ndarray, l2: float, iters: int = 50) -> np.ndarray:
    """Ridge logistic regression by Newton steps; column 0 is the unpenalised intercept."""
    n, d = x.shape
    w = np.zeros(d)
    m = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    w[0] = math.log(m / (1 - m))
    reg = np.full(d, l2 * n)
    reg[0] = 0.0
    for _ in range(iters):
        p = sigmoid(x @ w)
        step = np.linalg.solve((x * (p * (1 - p))[:, None]).T @ x + np.diag(reg + 1e-9), x.T @ (p - y) + reg * w)
        w -= step
        if float(np.abs(step).max()) < 1e-9:
            break
    return w


def _fit(x: np.ndarray, y: np.ndarray, l2: float, mono: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale < 1e-12, 1.0, scale)
    z = (x - mean) / scale
    w = _newton(np.c_[np.ones(len(z)), z], y, l2)
    if mono is not None and w[1 + mono] < 0:  # pin the monotone coefficient at 0 and refit the others
        keep = np.flatnonzero(np.arange(x.shape[1]) != mono)
        w2 = _newton(np.c_[np.ones(len(z)), z[:, keep]], y, l2)
        w = np.zeros(x.shape[1] + 1)
        w[0] = w2[0]
        w[1 + keep] = w2[1:]
    return w, mean, scale


def fit_calibrator(x: np.ndarray, y: np.ndarray, groups: np.ndarray, features: tuple[str, ...], *,
                   encoder: str, catalogue: str, monotone: str | None = "s1", l2: float = 1e-4, folds: int = 5,
                   min_gain: float = 0.01, min_auc: float = 0.55) -> CalibrationFit:
    """Fit on cross-fitted rows ``(x, y)``; ``folds``-fold CV over ``groups`` (users) decides abstention.

    ``monotone``: the feature whose coefficient is constrained ≥ 0; None for a feature set without one
    (e.g. priors only, where no similarity exists to be monotone in).
    Abstains when the held-out log-loss is not at least ``min_gain`` (relative) below the log-loss of the
    training folds' base rate, or the held-out AUC is below ``min_auc``, or there is too little data.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    g = np.asarray(groups)
    if len(y) < 50 or y.min() == y.max():
        return CalibrationFit(None, True, f"too little data to fit ({len(y)} rows, {int(y.sum())} positives)",
                              {"rows": float(len(y)), "positives": float(y.sum())})
    mono = features.index(monotone) if monotone else None
    uniq, inv = np.unique(g.astype(str), return_inverse=True)
    fold_of = np.array([int.from_bytes(hashlib.blake2b(u.encode(), digest_size=4).digest(), "big") % folds
                        for u in uniq.tolist()])[inv]
    oof = np.full(len(y), np.nan)
    base = np.full(len(y), np.nan)
    for k in range(folds):
        tr, te = fold_of != k, fold_of == k
        if te.any() and tr.any():
            w, mean, scale = _fit(x[tr], y[tr], l2, mono)
            oof[te] = sigmoid(w[0] + ((x[te] - mean) / scale) @ w[1:])
            base[te] = y[tr].mean()
    ok = ~np.isnan(oof)
    cv = {"rows": float(len(y)), "positives": float(y.sum()), "cv_logloss": logloss(oof[ok], y[ok]),
          "base_logloss": logloss(base[ok], y[ok]), "cv_auc": binary_auc(oof[ok], y[ok]),
          "cv_ece": calibration_error(oof[ok], y[ok]), "cv_mean_p": float(oof[ok].mean()), "mean_y": float(y.mean())}
    cv["gain"] = 1.0 - cv["cv_logloss"] / cv["base_logloss"]
    if not (cv["gain"] >= min_gain and cv["cv_auc"] >= min_auc):
        return CalibrationFit(None, True, f"does not beat the base rate on held-out users (log-loss gain "
                              f"{cv['gain']:.3f} < {min_gain} or AUC {cv['cv_auc']:.3f} < {min_auc})", cv)
    w, mean, scale = _fit(x, y, l2, mono)
    cal = Calibrator(features=tuple(features), mean=tuple(mean.tolist()), scale=tuple(scale.tolist()),
                     coef=tuple(w[1:].tolist()), intercept=float(w[0]), monotone=monotone or "", encoder=encoder,
                     catalogue=catalogue, fitted_at=time.time(), info={"l2": l2, "folds": folds, **cv})
    return CalibrationFit(cal, False, "fitted", cv)
