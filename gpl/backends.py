"""Backend factories: what the settings name, built from the foundation's and the workers' parts.

Stages never pick their own backends; the application does it here, once, so that ``workers/`` and
``streams/`` receive ready objects (an index, a generator) and stay free of optional dependencies.

Anchor backends are a registry: ``anchors.backend`` names a settings model
(:data:`runtime.anchor_settings.ANCHOR_BACKENDS`) and a factory (:data:`FACTORIES`) that receives the
settings as that model. A new backend is its settings model, one entry in each registry and its module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runtime.anchor_settings import (
    ANCHOR_BACKENDS,
    ContentAnchors,
    MemoryAnchors,
    OpenAIAnchors,
    SIDAnchors,
    TransformersAnchors,
    VLLMAnchors,
    as_backend,
)
from runtime.settings import Settings
from runtime.vectors.index import VectorIndex
from workers.anchors.generators.base import AnchorGenerator
from workers.anchors.vector_anchors import VectorAnchorSource


def open_index(settings: Settings) -> VectorIndex:
    """The index the settings ask for: a Qdrant server when ``qdrant.url`` is set, else the embedded engine."""
    if settings.qdrant.url:
        from runtime.vectors.server import ServerIndex

        return ServerIndex(settings.qdrant.url, api_key=settings.qdrant.api_key.get_secret_value() or None)
    from runtime.vectors.edge import EdgeIndex

    return EdgeIndex(settings.data_dir / "qdrant", hnsw=settings.qdrant.hnsw)


AnchorBackend = AnchorGenerator | VectorAnchorSource


@dataclass(frozen=True)
class BuildArgs:
    """What the caller adds to the settings: ``threads`` (else the backend's own ``threads``; 0 = torch's
    default), the ``index`` and ``encoder_dim`` a vector backend checks its artifacts against."""

    threads: int | None = None
    index: VectorIndex | None = None
    encoder_dim: int | None = None


def _content(settings: Settings, cfg: ContentAnchors, args: BuildArgs) -> AnchorBackend:
    from workers.anchors.vector_anchors import ContentAnchorSource

    return ContentAnchorSource()


def _sid(settings: Settings, cfg: SIDAnchors, args: BuildArgs) -> AnchorBackend:
    return make_sid_source(settings, threads=args.threads, index=args.index, encoder_dim=args.encoder_dim)


def _memory(settings: Settings, cfg: MemoryAnchors, args: BuildArgs) -> AnchorBackend:
    from workers.anchors.generators.memory import MemoryGenerator

    return MemoryGenerator(cfg)


def _transformers(settings: Settings, cfg: TransformersAnchors, args: BuildArgs) -> AnchorBackend:
    from runtime.model_assets import ensure_llm
    from workers.anchors.generators.transformers_backend import TransformersGenerator

    n = args.threads if args.threads is not None else (cfg.threads or None)
    return TransformersGenerator(ensure_llm(settings.llm_dir), cfg, threads=n)


def _openai(settings: Settings, cfg: OpenAIAnchors, args: BuildArgs) -> AnchorBackend:
    from workers.anchors.generators.openai_backend import OpenAIGenerator

    return OpenAIGenerator(cfg)


def _vllm(settings: Settings, cfg: VLLMAnchors, args: BuildArgs) -> AnchorBackend:
    from workers.anchors.generators.vllm_backend import VLLMGenerator, import_vllm

    import_vllm()  # fail with the install hint before fetching a model the engine cannot run
    if cfg.model_dir:
        return VLLMGenerator(cfg.model_dir, cfg)
    from runtime.model_assets import ensure_llm

    return VLLMGenerator(ensure_llm(settings.llm_dir), cfg)


# anchors.backend -> its factory; the settings model of each name is runtime.anchor_settings.ANCHOR_BACKENDS's
# (a factory receives settings.anchors as that model: the discriminated union has already picked it)
FACTORIES: dict[str, Callable[[Settings, Any, BuildArgs], AnchorBackend]] = {
    "transformers": _transformers,
    "memory": _memory,
    "openai": _openai,
    "vllm": _vllm,
    "sid": _sid,
    "content": _content,
}


def make_generator(settings: Settings, *, threads: int | None = None, index: VectorIndex | None = None,
                   encoder_dim: int | None = None) -> AnchorBackend:
    """The anchor backend ``settings.anchors.backend`` names: a text generator or a vector source.

    ``transformers`` fetches/converts the local model first; ``vllm`` does too unless
    ``anchors.model_dir`` names the model (a directory or a hub id the GPU host can read); ``openai``
    needs ``anchors.base_url``. ``threads`` (else ``anchors.threads``; 0 = torch's default) applies to
    the transformers and sid backends. ``sid`` loads the trained artifacts and refuses, with
    :class:`~workers.anchors.sid.source.SIDArtifactError`, missing or corrupt ones, another encoder's
    (``encoder_dim`` checks the vector size too) and, given the ``index``, another catalogue's.
    """
    cfg = settings.anchors
    model, factory = ANCHOR_BACKENDS.get(cfg.backend), FACTORIES.get(cfg.backend)
    if model is None or factory is None or not isinstance(cfg, model):
        raise ValueError(f"unknown anchors backend {cfg.backend!r}")
    return factory(settings, cfg, BuildArgs(threads, index, encoder_dim))


def sid_dir(settings: Settings) -> Path:
    """``<data_dir>/sid/<encoder id>`` (the id made safe for a directory name): where ``gpl anchors
    train-tokenizer|train-generator`` write by default. A new encoder gets new SIDs, never a mix."""
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in settings.encoder.model)
    return settings.data_dir / "sid" / safe


def sid_artifacts(settings: Settings) -> Path:
    """Where the sid backend reads its artifacts: ``anchors.sid_dir`` (backend sid) or :func:`sid_dir`."""
    cfg = settings.anchors
    return Path(cfg.sid_dir) if isinstance(cfg, SIDAnchors) and cfg.sid_dir else sid_dir(settings)


def make_sid_source(settings: Settings, *, threads: int | None = None, index: VectorIndex | None = None,
                    encoder_dim: int | None = None) -> VectorAnchorSource:
    """The ``sid`` backend: checked artifacts (see :func:`make_generator`), beam search on ``threads``."""
    from workers.anchors.sid.source import SIDAnchorSource, check_catalogue, load_sid_generator

    cfg = as_backend(settings.anchors, SIDAnchors)  # the backend's options; defaults under another backend
    n = threads if threads is not None else (cfg.threads or None)
    if n:
        import torch

        torch.set_num_threads(n)
    where = sid_artifacts(settings)
    gen = load_sid_generator(where, settings.encoder.model, encoder_dim, beam_width=cfg.beam_width)
    if index is not None:
        check_catalogue(gen.tokenizer, index, settings.encoder.collection, str(where))
    return SIDAnchorSource(gen)
