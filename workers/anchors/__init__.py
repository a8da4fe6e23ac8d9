"""The anchors stage: ``anchor-requests`` → interest anchors → frozen space → vector index → ``anchors``.

One package, one stage (``from workers.anchors import AnchorWorker``):

* ``loop``              the Kafka loop (:class:`AnchorWorker`): poll, then perform what the engine decided;
* ``engine``            the regeneration policy as a pure engine (which request is served when), written down;
* ``stage``             what a worker holds: the set maker and the engine (sets made without a broker);
* ``policy``            the engine's pure pieces: request queue, debounce, token bucket, capacity, backoff,
                        and the anchors collection's point ids (``anchor_point_id``);
* ``sets``              what a set is: history lookup, generation, embedding, index slots and versions;
* ``generation_cache``  the replay cache of generations, shared with ``gpl eval``;
* ``generators/``       the text backends behind one seam (memory, transformers, OpenAI-compatible, vLLM);
* ``vector_anchors``    the vector backends' seam and the ``content`` backend; ``sid/`` semantic-ID anchors.

``AnchorWorker`` is loaded on first use, not with the package: eval, the bench, the SID commands and
``workers/anchor_cross.py`` (the labeler's and trainer's anchor feature) import the domain modules
without the Kafka loop's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.anchors.loop import AnchorWorker

__all__ = ["AnchorWorker"]


def __getattr__(name: str) -> Any:
    """``AnchorWorker`` from :mod:`workers.anchors.loop` on first access (PEP 562)."""
    if name == "AnchorWorker":
        from workers.anchors.loop import AnchorWorker

        return AnchorWorker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
