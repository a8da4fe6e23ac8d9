"""The labeler stage: ``unexposed`` + ``anchors`` → match in the frozen space → ``samples`` (pseudo-labels).

One package, one stage (``from workers.labeler import Labeler``):

* ``loop``               the Kafka loop (:class:`Labeler`): poll → engine → stage, flush, commit, rebalance;
* ``engine``             the pure rules: the deferred queue (wait bound, size bound), the abstention hold,
                         the micro-batch, what a commit may pass;
* ``stage``              the engine's decisions performed: anchors cached, batches labeled and produced or
                         dead-lettered, the calibrator loaded, real labels joined; the accounting identities;
* ``pseudo_labels``      one request's candidates → pseudo-labels as arrays (``label_candidates``: the
                         steps ``gpl eval`` shares);
* ``assemble``           a micro-batch of decoded batches → SampleBatch bytes, stage by stage (``label_many``);
* ``matching``, ``item_matrix``, ``anchor_book``   the frozen space: items, users' anchor sets, max-cosine;
* ``features``, ``interaction_stats``, ``calibrator``, ``label_map``   the pseudo-label;
* ``confidence``, ``sampling``   its weight and which candidates get one;
* ``abstention``         why batches are held without a calibrator; ``recalibration`` and
                         ``outcome_memory`` the closed loop (pseudo-labels met by real labels).

``Labeler`` is loaded on first use, not with the package: eval, the bench and the calibration monitor
import the domain modules without the Kafka loop's imports. Everything but the loop is arrays, so the
hot path is a handful of vectorised numpy calls per request instead of per-candidate Python.

Frozen space
    Item vectors ``v_i`` come from the item collection ``items__<encoder>`` (kept in a dense in-process
    :class:`ItemMatrix`: a hash index of int64 ids over one float32 matrix; a retrieve from the vector
    engine costs ~12 ms per 1,000 vectors, a lookup + gather from the matrix ~0.1 ms). Anchors ``a_k``
    come from the ``anchors`` topic (:class:`AnchorBook`). Both are L2-normalised, so cosine is a dot
    product. Anchors embedded under another encoder than the items live in another space and are
    refused, never scored.

Matching
    ``s(u,i) = max_k cos(a_k, v_i)``; ``matched = argmax_k`` (which interest explained the candidate).

Pseudo-label (the map the paper leaves open; ours)
    ``p = sigmoid((s - center) / temperature)`` with ``labeler.label_center`` and
    ``labeler.label_temperature``. A logistic map because the quantity it stands for is a click
    probability, and a 1-D logistic regression of real labels on ``s`` has exactly this form:
    :func:`fit_label_map` fits ``center`` and ``temperature`` on exposed samples (real clicks and
    exposed negatives scored against the same user's anchors, see :func:`score_exposed`), so the
    defaults can be replaced by calibrated values. The map is monotone in ``s``.

Confidence (the weight ``w`` of a pseudo-label in the loss ``λ · w · BCE(f, p)``)
    ``w = coherence · consistency · generation · margin``; every term lies in [0, 1] and each is
    switched off (replaced by 1) by its ``labeler.use_<term>`` flag, for ablations:

    * ``coherence = (1 + mean_{j<k} cos(a_j, a_k)) / 2`` — anchors that agree with each other are a
      sharper picture of the user; 1 for a single anchor. Per anchor set.
    * ``consistency = (1 + cos(mean_k a_k, mean_h v_h)) / 2`` — the anchors' centroid against the
      centroid of the user's history items (the ones the anchors were generated from), both
      re-normalised; anchors that wandered away from what the user did weigh less. 1 (neutral, as if
      switched off) when no history item has a vector. Per anchor set.
    * ``generation = exp(logprob of the matched anchor)`` — the generator's mean token probability of
      the very anchor that produced this label (not the set's mean: a label rests on one anchor).
      Clipped to [0, 1]; sets without log-probs (logprob 0) give 1.
    * ``margin = |2p - 1|`` — how decisive the pseudo-label is. Chosen over the top-1/top-2 anchor gap:
      a candidate near two interests equally is not an uncertain label, while a candidate whose ``s``
      sits at ``center`` (p ≈ 0.5) is one the map cannot tell apart, and its soft target would only
      pull the pre-ranker towards 0.5.

    Every sample carries the four values actually used (1.0 for a disabled term) in ``confidence``;
    ``weight`` is their product.

Sampling (per request)
    The ``top_n`` most similar candidates plus ``random_n`` drawn uniformly without replacement from the
    rest, at most ``cap`` in all (the random part is cut first). The top part holds the likely
    positives (and the hardest negatives); the random part keeps the long tail, mostly confident
    negatives, in the training distribution.
    The generator's state comes from ``(labeler.seed, request_id)`` (:class:`RequestRng`), so a replay
    labels the same items.

Counting
    ``candidates_total = len(samples) + sampled_out + no_vector``: ``sampled_out`` (in the SampleBatch)
    are the candidates the policy did not keep, including repeats of an item already labeled for the
    request (``duplicate`` in the stats); ``no_vector`` the candidates whose item has no vector yet.
"""


from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.labeler.loop import Labeler

__all__ = ["Labeler"]


def __getattr__(name: str) -> Any:
    """``Labeler`` from :mod:`workers.labeler.loop` on first access (PEP 562)."""
    if name == "Labeler":
        from workers.labeler.loop import Labeler

        return Labeler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
