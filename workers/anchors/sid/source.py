"""The ``sid`` backend of the streaming anchors worker: SID anchors as a :class:`VectorAnchorSource`.

Loading refuses, with :class:`SIDArtifactError` naming the directory and what is wrong, every artifact
that would give anchors that look fine and mean nothing: missing or unreadable files, a tokenizer
trained for another frozen encoder (or vectors of another dimension), a generator trained on another
tokenizer's SIDs, and a tokenizer that knows too few of the items in the catalogue the worker serves
(:func:`check_catalogue`). The worker never falls back to another route on its own.

At serving time a user none of whose history items has a SID gets no anchors (the worker dead-letters
the request as ``unknown_items``) instead of the model's unconditional guesses, which would be the
same for everyone.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.vectors.index import VectorIndex
from workers.anchors.sid.generator import SIDAnchorGenerator
from workers.anchors.sid.sequence_model import GENERATOR_FILE, load_generator
from workers.anchors.sid.tokenizer import TOKENIZER_FILE, SIDTokenizer
from workers.anchors.vector_anchors import VectorAnchors

HINT = "train it with `gpl anchors train-tokenizer` then `gpl anchors train-generator`"
MIN_CATALOGUE_COVERAGE = 0.5


class SIDArtifactError(RuntimeError):
    """A SID artifact is missing, unreadable, or belongs to another encoder, tokenizer or catalogue."""


def load_sid_generator(directory: Path | str, encoder_id: str, dim: int | None = None, *,
                       beam_width: int = 16) -> SIDAnchorGenerator:
    """Tokenizer and generator of ``directory``, checked against the encoder (id and vector dimension)."""
    d = Path(directory)
    for name in (TOKENIZER_FILE, GENERATOR_FILE):
        if not (d / name).is_file():
            raise SIDArtifactError(f"SID artifact {d / name} is missing: {HINT} (data_dir and encoder "
                                   f"{encoder_id!r} decide the directory)")
    try:
        tok = SIDTokenizer.load(d, encoder_id)
    except ValueError as e:  # wrong format or another encoder: the message says which
        raise SIDArtifactError(f"SID tokenizer {d / TOKENIZER_FILE} refused: {e}") from e
    except Exception as e:  # truncated/corrupt file: torch/pickle/zip raise many kinds
        raise SIDArtifactError(f"SID tokenizer {d / TOKENIZER_FILE} unreadable ({type(e).__name__}: {e}); "
                               f"{HINT}") from e
    if dim is not None and tok.centroids.shape[1] != dim:
        raise SIDArtifactError(f"SID tokenizer {d / TOKENIZER_FILE} holds {tok.centroids.shape[1]}-d vectors, "
                               f"the encoder {encoder_id!r} makes {dim}-d ones")
    try:
        net, _ = load_generator(d, tok)
    except ValueError as e:
        raise SIDArtifactError(f"SID generator {d / GENERATOR_FILE} refused: {e}") from e
    except Exception as e:
        raise SIDArtifactError(f"SID generator {d / GENERATOR_FILE} unreadable ({type(e).__name__}: {e}); "
                               f"{HINT}") from e
    return SIDAnchorGenerator(tok, net, beam_width=beam_width)


def check_catalogue(tokenizer: SIDTokenizer, index: VectorIndex, collection: str, where: str,
                    sample: int = 2048) -> float:
    """Share of the item collection's ids (first ``sample``) that have a SID; raises below one half.

    An empty or missing collection passes (the indexer may not have started): items arriving later
    without a SID only make some users' histories shorter, but a tokenizer of another catalogue would
    turn every history into nothing.
    """
    try:
        if index.count(collection) == 0:
            return 1.0
        ids = next(iter(index.scroll(collection, batch=sample))).ids
    except (KeyError, StopIteration):
        return 1.0
    known = float(np.mean([tokenizer.row_of(int(i)) is not None for i in ids.tolist()])) if len(ids) else 1.0
    if known < MIN_CATALOGUE_COVERAGE:
        raise SIDArtifactError(
            f"SID tokenizer {where} (fingerprint {tokenizer.fingerprint}, {len(tokenizer.item_ids)} items) knows "
            f"only {known:.0%} of {len(ids)} items sampled from {collection!r}: it was trained for another "
            "catalogue; retrain it on this one (gpl anchors train-tokenizer reads the item collection)")
    return known


class SIDAnchorSource:
    """:class:`~workers.anchors.vector_anchors.VectorAnchorSource` over a loaded :class:`SIDAnchorGenerator`.

    One beam search (:func:`~workers.anchors.sid.beam.beam_search_many`) serves the whole micro-batch. The
    item vectors the worker passes are not needed: the history enters as SIDs, the anchors leave as
    the centroids of their semantic codes. Labels are the SID strings (``sid:12-200-7``).
    """

    def __init__(self, generator: SIDAnchorGenerator) -> None:
        self.generator = generator
        self.model = generator.model
        self.prompt_hash = generator.prompt_hash

    def anchor_vectors(self, histories: Sequence[Sequence[int]], vectors: Sequence[np.ndarray], k: int
                       ) -> list[VectorAnchors]:
        tok = self.generator.tokenizer
        dim = tok.centroids.shape[1]
        known = [[i for i in h if tok.row_of(i) is not None] for h in histories]
        todo = [j for j, h in enumerate(known) if h]
        out = [VectorAnchors(np.zeros((0, dim), np.float32), [], [],
                             detail=f"none of {len(h)} history items has a SID in tokenizer {tok.fingerprint}")
               for h in histories]
        if todo:
            got = self.generator.generate_anchors_many([known[j] for j in todo], k)
            for j, anchors in zip(todo, got, strict=True):
                if anchors:
                    out[j] = VectorAnchors(np.stack([v for v, _, _ in anchors]).astype(np.float32),
                                           [float(lp) for _, lp, _ in anchors], [s for _, _, s in anchors])
                else:
                    out[j].detail = "every semantic code the beam reached is banned (already in the history)"
        return out
