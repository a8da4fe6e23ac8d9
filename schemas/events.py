"""Wire contracts of every topic (docs/design.md §3).

One message per *request*, never one per candidate: a recall of 3,000 candidates is one RecallEvent.
Every contract carries ``schema_version`` so a consumer can refuse what it does not understand, and
event time is epoch milliseconds. Ids at the edge: ``user_id`` is a string (it is the partition key of
every topic), ``item_id`` a non-negative 64-bit integer (it is also the Qdrant point id); producers
with string item ids map them with :func:`schemas.ids.item_id_from_str`.

The stream's events and the records between our stages are declared here. The base and the field types
(``schemas/contract.py``), the two contracts with more than one wire form (``schemas/recall.py``,
``schemas/unexposed.py``) and the dead letters (``schemas/dlq.py``) have modules of their own, and are
re-exported: ``from schemas.events import X`` names every contract, wherever it is declared.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from schemas.contract import (
    MAX_EPOCH_MS,
    MAX_ID_CHARS,
    MAX_INT64,
    SCHEMA_VERSION,
    SECONDS_HIGH,
    SECONDS_LOW,
    Contract,
    EpochMs,
    ItemId,
    RequestId,
    UserId,
    looks_like_seconds,
)
from schemas.dlq import DLQ_REASONS, REDRIVE_HEADER, DeadLetter
from schemas.recall import RECALL_SCHEMA_VERSION, Candidate, RecallEvent, recall_as_v2
from schemas.unexposed import PACKED_IDS, UNEXPOSED_SCHEMA_VERSION, UnexposedBatch, unpack_ids

__all__ = [
    "DLQ_REASONS",
    "MAX_EPOCH_MS",
    "MAX_ID_CHARS",
    "MAX_INT64",
    "PACKED_IDS",
    "RECALL_SCHEMA_VERSION",
    "REDRIVE_HEADER",
    "SCHEMA_VERSION",
    "SECONDS_HIGH",
    "SECONDS_LOW",
    "UNEXPOSED_SCHEMA_VERSION",
    "Anchor",
    "AnchorReason",
    "AnchorRequest",
    "AnchorSet",
    "Candidate",
    "Contract",
    "DeadLetter",
    "EpochMs",
    "ExposedItem",
    "ExposureEvent",
    "ItemEvent",
    "ItemId",
    "Lineage",
    "RecallEvent",
    "RequestId",
    "Sample",
    "SampleBatch",
    "SampleSource",
    "UnexposedBatch",
    "UserId",
    "looks_like_seconds",
    "recall_as_v2",
    "unpack_ids",
]


class ItemEvent(Contract):
    """An item's catalogue entry; the text is what the frozen encoder embeds."""

    item_id: ItemId
    text: str = Field(min_length=1, max_length=8192)
    category: str = ""
    ts: EpochMs = 0


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
    items: list[ExposedItem] = Field(json_schema_extra={"uniqueItems": True, "x-unique-by": "item_id"},
                                     description="no item_id twice (the contract checks it by item_id)")
    exploration: bool = Field(default=False, description=(
        "true when these items were drawn uniformly at random from the request's recall (an exploration or "
        "A/B slice), not chosen by the ranker: the calibrator then learns from the candidates it labels "
        "instead of the ones a ranker selected (preferred when there are enough such requests)"))

    @model_validator(mode="after")
    def _unique_items(self) -> ExposureEvent:
        ids = [it.item_id for it in self.items]
        if len(ids) != len(set(ids)):
            raise ValueError("exposure lists an item more than once")
        return self


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
    version: int = Field(ge=1, description="digest of what made the set (history, model, prompt, k, encoder): "
                                            "a regenerated set keeps it, and so its sample ids")
    anchors: list[Anchor] = Field(min_length=1)
    model: str
    prompt_hash: str
    encoder: str
    generated_at: EpochMs = Field(description="strictly increasing per user: the newest set wins")
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
    prior_logit: float | None = Field(default=None, description=(
        "pseudo samples of a calibrator that reads more than the priors: what the prior features "
        "(popularity, the user's click rate) add to the label's logit; the trainer's residual rank term "
        "ranks by the rest"))
    anchor_cross: list[float] | None = Field(default=None, min_length=2, max_length=2, description=(
        "the candidate's cosine to the user's anchors: [best, mean of the top two] (workers/anchor_cross.py), "
        "as the labeler scored it; absent (real labels, older labelers): the trainer reads the user's anchors"))


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

