"""Wire contracts of every topic (docs/design.md §3).

One message per *request*, never one per candidate: a recall of 3,000 candidates is one RecallEvent.
Every contract carries ``schema_version`` so a consumer can refuse what it does not understand, and
event time is epoch milliseconds. Ids at the edge: ``user_id`` is a string (it is the partition key of
every topic), ``item_id`` a non-negative 64-bit integer (it is also the Qdrant point id); producers
with string item ids map them with :func:`schemas.ids.item_id_from_str`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SCHEMA_VERSION = 1
MAX_INT64 = 2**63 - 1
# year 3000 in epoch ms: a bound that no real clock reaches, and that keeps event times (and the sums the
# join makes of them, ts + wait) far inside int64, where a 2**63 would overflow the state records
MAX_EPOCH_MS = 32_503_680_000_000

ItemId = Annotated[int, Field(ge=0, le=MAX_INT64)]
MAX_ID_CHARS = 256
UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
EpochMs = Annotated[int, Field(ge=0, le=MAX_EPOCH_MS)]


class Contract(BaseModel):
    """Base of every message: frozen, strict about unknown versions, tolerant of extra fields."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    schema_version: int = SCHEMA_VERSION

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > SCHEMA_VERSION or v < 1:
            raise ValueError(f"unsupported schema_version {v} (this build reads 1..{SCHEMA_VERSION})")
        return v


class ItemEvent(Contract):
    """An item's catalogue entry; the text is what the frozen encoder embeds."""

    item_id: ItemId
    text: str = Field(min_length=1, max_length=8192)
    category: str = ""
    ts: EpochMs = 0


class Candidate(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    item_id: ItemId
    score: float = 0.0
    source: str = ""


class RecallEvent(Contract):
    """All candidates the recall stage returned for one request (thousands)."""

    request_id: RequestId
    user_id: UserId
    ts: EpochMs
    candidates: list[Candidate]


class ExposedItem(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    item_id: ItemId
    position: int = Field(ge=0)
    clicked: bool


class ExposureEvent(Contract):
    """What was shown for a request and what was clicked. May arrive before its recall."""

    request_id: RequestId
    user_id: UserId
    ts: EpochMs
    items: list[ExposedItem]

    @model_validator(mode="after")
    def _unique_items(self) -> ExposureEvent:
        ids = [it.item_id for it in self.items]
        if len(ids) != len(set(ids)):
            raise ValueError("exposure lists an item more than once")
        return self


class UnexposedBatch(Contract):
    """recall − exposure of one request: the candidates GPL must label."""

    request_id: RequestId
    user_id: UserId
    ts: EpochMs
    item_ids: list[ItemId]
    recall_scores: list[float] = Field(default_factory=list)


AnchorReason = Literal["cold_start", "drift", "new_positives", "expiry", "manual"]


class AnchorRequest(Contract):
    """Ask the GPU tier for new interest anchors of one user."""

    user_id: UserId
    reason: AnchorReason
    ts: EpochMs
    history: list[ItemId] = Field(description="recent positive items, most recent last")
    priority: int = Field(default=1, description="0 is served first (cold start)")
    drift: float = 0.0


class Anchor(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")
    text: str
    vector: list[float]
    logprob: float = Field(default=0.0, description="mean token log-prob of the anchor text")


class AnchorSet(Contract):
    """K interest anchors of one user embedded in the frozen space (also stored in Qdrant)."""

    user_id: UserId
    version: int = Field(ge=1, description="monotonic per user")
    anchors: list[Anchor] = Field(min_length=1)
    model: str
    prompt_hash: str
    encoder: str
    generated_at: EpochMs
    history: list[ItemId] = Field(default_factory=list)
    fallback: bool = Field(default=False, description="anchors came from the fallback, not the LLM")


SampleSource = Literal["click", "exposed-negative", "pseudo"]


class Sample(BaseModel):
    """One training example. Pseudo samples carry their per-item lineage."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    sample_id: str
    item_id: ItemId
    label: float = Field(ge=0.0, le=1.0)
    weight: float = Field(ge=0.0)
    source: SampleSource
    similarity: float | None = None
    matched_anchor: int | None = None
    confidence: dict[str, float] | None = None
    position: int | None = None


class Lineage(BaseModel):
    """Where a batch of pseudo-labels came from: enough to reproduce or to discard them later."""

    model_config = ConfigDict(frozen=True, extra="ignore")
    anchor_version: int
    anchor_model: str
    prompt_hash: str
    encoder: str
    collection: str
    anchor_age_ms: int = 0
    label_map: str = ""
    fallback: bool = False
    calibrator: str = ""  # version of the calibrator that made the labels (empty: the fixed map)


class SampleBatch(Contract):
    request_id: RequestId
    user_id: UserId
    ts: EpochMs
    samples: list[Sample]
    lineage: Lineage | None = None
    candidates_total: int = 0
    sampled_out: int = 0


class DeadLetter(Contract):
    """An input that could not be processed: the original bytes, why, and where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None
    value: str = Field(description="original bytes, base64")
    error: str
    reason: str = Field(description="short machine-readable class: malformed_json, schema, unknown_items, ...")
    stage: str
    ts: EpochMs
    # set only when the original was too large to fit a DLQ record under the producer's message limit:
    # ``value`` then holds its first bytes, and these identify the whole original
    original_size: int | None = Field(default=None, ge=0, description="bytes of the original, when truncated")
    sha256: str | None = Field(default=None, description="hex sha256 of the whole original, when truncated")
