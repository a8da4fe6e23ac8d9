"""Backend factories: what the settings name, built from the foundation's and the workers' parts.

Stages never pick their own backends; the application does it here, once, so that ``workers/`` and
``streams/`` receive ready objects (an index, a generator) and stay free of optional dependencies.
"""

from __future__ import annotations

from gpl.runtime.settings import Settings
from gpl.runtime.vectors.index import VectorIndex
from workers.generators.base import AnchorGenerator


def open_index(settings: Settings) -> VectorIndex:
    """The index the settings ask for: a Qdrant server when ``qdrant.url`` is set, else the embedded engine."""
    if settings.qdrant.url:
        from gpl.runtime.vectors.server import ServerIndex

        return ServerIndex(settings.qdrant.url, api_key=settings.qdrant.api_key or None)
    from gpl.runtime.vectors.edge import EdgeIndex

    return EdgeIndex(settings.data_dir / "qdrant", hnsw=settings.qdrant.hnsw)


def make_generator(settings: Settings, *, threads: int | None = None) -> AnchorGenerator:
    """The generator ``settings.anchors.backend`` names.

    ``transformers`` fetches/converts the local model first; ``vllm`` does too unless
    ``anchors.model_dir`` names the model (a directory or a hub id the GPU host can read); ``openai``
    needs ``anchors.base_url``. ``threads`` (else ``anchors.threads``; 0 = torch's default) applies to
    the transformers backend.
    """
    cfg = settings.anchors
    backend = cfg.backend
    if backend == "memory":
        from workers.generators.memory import MemoryGenerator

        return MemoryGenerator(cfg)
    if backend == "transformers":
        from gpl.runtime.model_assets import ensure_llm
        from workers.generators.transformers_backend import TransformersGenerator

        n = threads if threads is not None else (cfg.threads or None)
        return TransformersGenerator(ensure_llm(settings.llm_dir), cfg, threads=n)
    if backend == "openai":
        from workers.generators.openai_backend import OpenAIGenerator

        return OpenAIGenerator(cfg)
    if backend == "vllm":
        from workers.generators.vllm_backend import VLLMGenerator, import_vllm

        import_vllm()  # fail with the install hint before fetching a model the engine cannot run
        if cfg.model_dir:
            return VLLMGenerator(cfg.model_dir, cfg)
        from gpl.runtime.model_assets import ensure_llm

        return VLLMGenerator(ensure_llm(settings.llm_dir), cfg)
    raise ValueError(f"unknown anchors backend {backend!r}")
