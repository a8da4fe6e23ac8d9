"""The anchors section of the settings: one model per anchor backend, chosen by ``anchors.backend``.

Why a model per backend: six backends used to share one flat class of ~27 fields told apart by comments,
so ``anchors.base_url`` was accepted (and ignored) with the ``content`` backend, and a new backend had to
thread its options through every layer. Here each backend declares what it reads, the settings pick the
model by ``anchors.backend`` (a pydantic discriminated union; absent: ``content``), and a key that
belongs to another backend is refused in one line naming the backend it belongs to.

The names stay those of the flat class: ``anchors.<field>`` in the TOML file, ``--set anchors.x=...``,
``GPL_ANCHORS__X`` — only which keys a given backend accepts has narrowed.

Hierarchy (:data:`ANCHOR_BACKENDS` is the registry, backend name -> model; ``gpl/backends.py`` maps
the same names to factories):

* :class:`AnchorsBase` — every backend: K, the history window, the anchors worker's regeneration
  policy, and the local LLM asset (``llm``, ``model_dir``). The asset is shared on purpose: ``gpl models
  fetch``, ``gpl eval --anchors llm`` and the demo read it whatever backend serves, and the images bake
  ``GPL_ANCHORS__MODEL_DIR`` for every backend they may run (Dockerfile).
* :class:`TextAnchors` — text generators (``memory`` and the LLMs): the decoding and retry policy that
  the prompt hash covers.
* :class:`LLMAnchors` — real LLMs (``transformers``, ``vllm``, ``openai``): ``model_name``, which
  follows ``llm``.
* one leaf per backend with its own options (a new backend: a leaf here, a registry entry, a factory).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Discriminator, Field, SecretStr, Tag, model_validator
from pydantic_core import PydanticCustomError

from runtime.kafka_settings import Section

DEFAULT_BACKEND = "content"
# error type of a key that another backend owns (gpl/parser.py prints its message as it is)
FOREIGN_OPTION = "anchor_backend_option"
# error type of an unknown backend name; reported at anchors.backend
UNKNOWN_BACKEND = "anchor_backend"


class AnchorsBase(Section):
    """What every backend reads. Not selected itself: :data:`AnchorSettings` is one of the leaves."""

    backend: str = Field(
        default=DEFAULT_BACKEND,
        description="text: transformers, openai, vllm, memory; vectors: sid (trained SID artifacts), "
                    "content (k-means of the user's positives, no model)")
    k: int = Field(default=4, ge=1, le=32, description="anchors per user")
    history_items: int = Field(default=8, ge=1, description="recent distinct positives an anchor set is made "
                               "from (shown to the LLM, clustered, the SID context)")
    batch_size: int = Field(default=8, ge=1, description="requests per backend call (the worker's micro-batch)")
    batch_wait_ms: int = Field(default=200, ge=0)
    # the local LLM asset: read by gpl models fetch, gpl eval --anchors llm and the demo under any backend
    model_dir: str = Field(default="", description="HF model dir; empty: <data_dir>/models/<the llm's dir>")
    llm: Literal["smollm2-135m", "qwen2.5-coder-1.5b"] = Field(
        default="smollm2-135m", description="local LLM asset (gpl models fetch) used when model_dir is empty; "
                                            "qwen2.5-coder-1.5b: stronger, ~4x slower, 3.4 GB")
    # regeneration policy of the anchors worker
    debounce_s: float = Field(default=30.0, ge=0,
                              description="event-time gap below which a user's new request is dropped "
                                          "(cold start excepted)")
    max_pending: int = Field(default=1024, ge=1, description="requests read ahead; full: partitions paused")
    rate_limit: float = Field(default=0.0, ge=0, description="max generations/s; 0: follow measured capacity")
    cache: bool = Field(default=True, description="replay cache of generated anchors in data_dir")
    cache_max_entries: int = Field(default=1_000_000, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _own_options_only(cls, data: Any) -> Any:
        """Refuse, in one line, keys that another backend owns (a typo stays pydantic's extra_forbidden)."""
        if not isinstance(data, Mapping):
            return data
        by_owners: dict[str, list[str]] = {}  # "openai" or "transformers|vllm" -> its keys set here
        for key in data:
            if key not in cls.model_fields and owners(key):
                by_owners.setdefault("|".join(owners(key)), []).append(f"anchors.{key}")
        if by_owners:
            parts = [f"{keys[0]} is an option" if len(keys) == 1 else f"{', '.join(keys)} are options"
                     for keys in by_owners.values()]
            said = "; ".join(f"{part} of anchors.backend={who}" for part, who in zip(parts, by_owners, strict=True))
            raise PydanticCustomError(FOREIGN_OPTION, "{options}, not {backend}",
                                      {"options": said, "backend": cls.backend_name()})
        return data

    @classmethod
    def backend_name(cls) -> str:
        """The ``anchors.backend`` value that selects this model."""
        return str(cls.model_fields["backend"].default)


class TextAnchors(AnchorsBase):
    """Text generators: how they decode and re-ask (all of it is in the prompt hash, so cached anchors
    made under another policy are never replayed as this one's)."""

    max_new_tokens: int = Field(default=96, ge=8)
    temperature: float = Field(default=0.0, ge=0.0)
    retries: int = Field(default=1, ge=0, description="re-asks on unparseable output before the fallback")
    seed: int = 0


class LLMAnchors(TextAnchors):
    """Real LLMs: the model's name, a label and the replay cache's key."""

    model_name: str = Field(default="SmolLM2-135M-Instruct",
                            description="label and cache key; unset (or a registry model's): the llm's")

    @model_validator(mode="before")
    @classmethod
    def _model_name_follows_llm(cls, data: Any) -> Any:
        """``model_name`` unset, or naming another registry LLM (a copy that changed ``llm``): the llm's."""
        from runtime.model_assets import LLM_ASSETS

        if isinstance(data, dict) and data.get("llm", "smollm2-135m") in LLM_ASSETS:
            names = {a.model for a in LLM_ASSETS.values()}
            if data.get("model_name") in names | {None}:
                data = {**data, "model_name": LLM_ASSETS[data.get("llm", "smollm2-135m")].model}
        return data


class ContentAnchors(AnchorsBase):
    """``content``: spherical k-means of the user's recent positives; no model, no options of its own."""

    backend: Literal["content"] = "content"


class SIDAnchors(AnchorsBase):
    """``sid``: beam search over trained semantic-ID artifacts (``gpl anchors train-*``)."""

    backend: Literal["sid"] = "sid"
    sid_dir: str = Field(default="", description="artifacts; empty: <data_dir>/sid/<encoder>")
    beam_width: int = Field(default=16, ge=1, description="beams per user (>= k is used)")
    threads: int = Field(default=0, ge=0, description="torch intra-op threads of the beam search; 0: default")


class MemoryAnchors(TextAnchors):
    """``memory``: the deterministic pure-Python twin of an LLM (tests, ablations)."""

    backend: Literal["memory"] = "memory"


class TransformersAnchors(LLMAnchors):
    """``transformers``: the local model in process, on CPU."""

    backend: Literal["transformers"] = "transformers"
    threads: int = Field(default=0, ge=0, description="torch intra-op threads; 0: default")
    prefix_cache: bool = Field(default=True, description="compute the shared chat template and system "
                               "prompt's KV cache once and reuse it for every batch")


class VLLMAnchors(LLMAnchors):
    """``vllm``: the in-process vLLM engine (GPU); ``model_dir`` may name a hub id the GPU host reads."""

    backend: Literal["vllm"] = "vllm"


class OpenAIAnchors(LLMAnchors):
    """``openai``: any OpenAI-compatible server (vllm serve, transformers serve)."""

    backend: Literal["openai"] = "openai"
    base_url: str = Field(default="", description="OpenAI-compatible API root, e.g. http://vllm:8000/v1")
    api_key: SecretStr = SecretStr("")
    served_model: str = Field(default="", description="model id sent to the server; empty: ask /models")
    concurrency: int = Field(default=8, ge=1, description="requests in flight to the server")
    timeout_s: float = Field(default=60.0, gt=0, description="per HTTP request")
    http_retries: int = Field(default=3, ge=0, description="re-sends on 429/5xx/timeouts, with backoff")


# the registry: anchors.backend -> its settings model (order: as `gpl config show` and errors list them)
ANCHOR_BACKENDS: dict[str, type[AnchorsBase]] = {
    m.backend_name(): m for m in (TransformersAnchors, MemoryAnchors, OpenAIAnchors, VLLMAnchors, SIDAnchors,
                          ContentAnchors)
}


def owners(key: str) -> list[str]:
    """The backends whose model has the field ``key`` (empty: no backend has it)."""
    return [name for name, model in ANCHOR_BACKENDS.items() if key in model.model_fields]


def anchor_fields() -> frozenset[str]:
    """Every ``anchors.<field>`` name some backend accepts (deploy checks, "did you mean")."""
    return frozenset(f for model in ANCHOR_BACKENDS.values() for f in model.model_fields)


def _backend_of(value: Any) -> str | None:
    """The union's tag: ``backend`` of a dict (absent: the default backend) or of a built model."""
    if isinstance(value, Mapping):
        return str(value.get("backend", DEFAULT_BACKEND))
    return getattr(value, "backend", None)


_NAMES = [repr(n) for n in ANCHOR_BACKENDS]
_EXPECTED = f"{', '.join(_NAMES[:-1])} or {_NAMES[-1]}"  # pydantic's wording for a Literal
# the type of settings.anchors: the backend's model, picked by anchors.backend
AnchorSettings = Annotated[
    Annotated[TransformersAnchors, Tag("transformers")]
    | Annotated[MemoryAnchors, Tag("memory")]
    | Annotated[OpenAIAnchors, Tag("openai")]
    | Annotated[VLLMAnchors, Tag("vllm")]
    | Annotated[SIDAnchors, Tag("sid")]
    | Annotated[ContentAnchors, Tag("content")],
    Discriminator(_backend_of, custom_error_type=UNKNOWN_BACKEND,
                  custom_error_message=f"Input should be {_EXPECTED}"),
]

M = TypeVar("M", bound=AnchorsBase)


def merge_anchors(current: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` (a dump) updated by ``override``; when the backend changes, only the fields the new
    backend also has are carried over, so a copy that switches backend is not refused for the old one's."""
    backend = str(override.get("backend", current.get("backend", DEFAULT_BACKEND)))
    if backend != current.get("backend") and backend in ANCHOR_BACKENDS:
        fields = ANCHOR_BACKENDS[backend].model_fields
        current = {k: v for k, v in current.items() if k in fields}
    return {**current, **override}


def as_backend(cfg: AnchorsBase, model: type[M]) -> M:
    """``cfg`` as another backend's settings: the fields both have carried over, the rest the defaults.

    For tools that run one backend whatever ``anchors.backend`` serves (``gpl eval --anchors llm``
    generates with transformers even when the stream serves content anchors).
    """
    if isinstance(cfg, model):
        return cfg
    return model.model_validate(merge_anchors(cfg.model_dump(), {"backend": model.backend_name()}))


def untag(loc: tuple[int | str, ...], error_type: str) -> tuple[int | str, ...]:
    """A validation error's location as the settings name it: without the union's backend tag
    (``anchors.content.k`` -> ``anchors.k``); an unknown backend at ``anchors.backend``."""
    if error_type == UNKNOWN_BACKEND and loc == ("anchors",):
        return ("anchors", "backend")
    if len(loc) >= 2 and loc[0] == "anchors" and loc[1] in ANCHOR_BACKENDS:
        return (loc[0], *loc[2:])
    return loc
