"""The trainer stage: ``samples`` → incremental pre-ranker → numbered checkpoints → a published model.

One package, one stage (``from workers.trainer import Trainer``):

* ``loop``         the Kafka loop (:class:`Trainer`): poll, hand each batch on, dead-letter, commit, rebalance;
* ``engine``       the pure rules: dedup, the vector wait, holdout or train, when to step, checkpoint, commit;
* ``stage``        the engine's decisions performed on the model, the index and the checkpoint files;
* ``offsets``      where a (re)started trainer reads from, past-end resets, the durable commit;
* ``rows``         the buffered rows, the mini-batch they become, the optimizer step;
* ``vectors``      the content-vector cache; ``vector_wait`` the bounded wait for an item's vector;
* ``state``        what a checkpoint holds; ``checkpoints`` the files (numbered, atomic, ``latest``);
* ``publish``      the quality gate run at every checkpoint, over ``holdout`` (the held-out slice),
                   ``gate`` (the figures and the rule; ``gate_noise`` its paired bootstrap) and
                   ``published_area`` (the model copies, the ``current`` pointer, the history).

``Trainer`` is loaded on first use, not with the package: the export and publish commands read
checkpoints and the published area without the Kafka loop's imports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from workers.trainer.loop import Trainer

__all__ = ["Trainer"]


def __getattr__(name: str) -> Any:
    """``Trainer`` from :mod:`workers.trainer.loop` on first access (PEP 562)."""
    if name == "Trainer":
        from workers.trainer.loop import Trainer

        return Trainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
