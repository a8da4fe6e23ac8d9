"""What a trainer checkpoint holds, in one place: the payload written and the model read back.

Split out of ``workers/trainer/loop.py`` so the checkpoint's contents (format ``workers/trainer/checkpoints.py``
``FORMAT``) are read top to bottom beside each other: the model and its optimizer, the trainer settings
and encoder it was trained under, the next offset of every partition, the cumulative counts, the
seen-set of sample keys, the held-out rows of the publishing gate, the users' recent clicks and the
samples still waiting for a vector. They are written in one atomic file, so they roll back together.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from runtime.offsets import TP
from runtime.settings import Settings
from workers.click_memory import ClickMemory
from workers.model import ModelConfig, PreRanker, make_optimizer
from workers.trainer.checkpoints import FORMAT
from workers.trainer.holdout import Holdout
from workers.trainer.vector_wait import VectorWait


def payload(settings: Settings, *, version: int, model: PreRanker | None, opt: torch.optim.Optimizer | None,
            offsets: dict[TP, int], counts: dict[str, int], seen: set[int], holdout: Holdout,
            memory: ClickMemory | None, waiting: VectorWait) -> dict[str, Any]:
    """The checkpoint of the trainer's state now (``model`` None: checkpointed before the first step)."""
    return {
        "format": FORMAT,
        "version": version,
        "wall_time": int(time.time() * 1000),  # epoch ms like every time here (read_checkpoint: older in s)
        "model_config": model.cfg.to_dict() if model is not None else None,
        "model_state": model.state_dict() if model is not None else {},
        "optimizer_state": opt.state_dict() if opt is not None else {},
        "trainer_settings": settings.trainer.model_dump(mode="json"),
        "encoder": settings.encoder.model,
        "collection": settings.encoder.collection,
        "offsets": [[t, p, o] for (t, p), o in sorted(offsets.items())],
        "counts": dict(counts),
        "seen": torch.tensor(sorted(seen), dtype=torch.int64),
        "holdout": holdout.state(),
        "click_memory": memory.state() if memory is not None else None,
        "vector_wait": waiting.state(),
    }


def build(mc: ModelConfig, lr: float) -> tuple[PreRanker, torch.optim.Optimizer]:
    """A fresh model and its optimizer."""
    model = PreRanker(mc)
    return model, make_optimizer(model.parameters(), lr)


def restore_model(ckpt: dict[str, Any], collection: str, lr: float
                  ) -> tuple[PreRanker, torch.optim.Optimizer] | None:
    """The checkpoint's model and optimizer (None: checkpointed before the first sample trained).

    Refuses a checkpoint of another collection: a new encoder needs a new model. ``lr`` replaces the
    saved learning rate (the operator may change it between runs).
    """
    if ckpt["collection"] != collection:
        raise ValueError(
            f"checkpoint {ckpt['path']} was trained on {ckpt['collection']!r}, settings say "
            f"{collection!r}: a new encoder needs a new model (another data_dir)"
        )
    if ckpt["model_config"] is None:
        return None
    model, opt = build(ModelConfig.from_dict(ckpt["model_config"]), lr)
    model.load_state_dict(ckpt["model_state"])
    opt.load_state_dict(ckpt["optimizer_state"])
    for g in opt.param_groups:
        g["lr"] = lr
    return model, opt


def restore_memory(ckpt: dict[str, Any]) -> ClickMemory | None:
    """The users' recent clicks the checkpoint saved (None: the model reads no history)."""
    state = ckpt.get("click_memory")
    if not state:
        return None
    memory = ClickMemory(int(state["n"]))
    memory.restore(state)
    return memory
