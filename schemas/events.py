"""Wire contracts of every topic (docs/design.md §3).

One message per *request*, never one per candidate: a recall of 3,000 candidates is one RecallEvent.
Every contract carries ``schema_version`` so a consumer can refuse what it does not understand, and
event time is epoch milliseconds. Ids at the edge: ``user_id`` is a string (it is the partition key of
every topic), ``item_id`` a non-negative 64-bit integer (it is also the Qdrant point id); producers
with string item ids map them with :func:`schemas.ids.item_id_from_str`.
"""

from __future__ import annotations

import binascii
import struct
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1
MAX_INT64 = 2**63 - 1
# year 3000 in epoch ms: a bound that no real clock reaches, and that keeps event times (and the sums the
# join makes of them, ts + wait) far inside int64, where a 2**63 would overflow the state records
MAX_EPOCH_MS = 32_503_680_000_000

ItemId = Annotated[int, Field(ge=0, le=MAX_INT64)]
MAX_ID_CHARS = 256
UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
RequestId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS)]
# The plausibility bound on event times: epoch *seconds* of any date from 2001-09-09 to year 5138 lie in
# [1e9, 1e11), where milliseconds would mean January 1970 to March 1973, when no event of ours happened.
# So a value there is refused as a producer sending seconds (the first mistake docs/producers.md warns
# about); small values (synthetic clocks and tests count from 0) and real milliseconds pass.
SECONDS_LOW, SECONDS_HIGH = 10**9, 10**11


def looks_like_seconds(ts: int) -> bool:
    """True for an event time that is implausible as milliseconds and plausible as seconds."""
    return SECONDS_LOW <= ts < SECONDS_HIGH


def _not_seconds(ts: int) -> int:
    if looks_like_seconds(ts):
        raise ValueError(f"{ts} is epoch seconds? event times are epoch milliseconds (send {ts * 1000})")
    return ts


EpochMs = Annotated[int, Field(ge=0, le=MAX_EPOCH_MS), AfterValidator(_not_seconds)]


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


RECALL_SCHEMA_VERSION = 2  # the columnar recall; version 1 (a list of candidate objects) is still read


class RecallEvent(Contract):
    """All candidates the recall stage returned for one request (thousands), as parallel arrays.

    Version 2 (what producers should send): ``item_ids``, ``scores`` and optional ``sources`` are
    parallel arrays of equal length and the item ids are unique. Why columns: a recall is the largest
    message of the system, and a list of ``{"item_id", "score", "source"}`` objects costs the reader one
    dict per candidate; arrays go from orjson straight into numpy (``schemas.fast_codec.decode_recall``).
    Version 1 (``candidates``: a list of Candidate objects) is still accepted and converted to columns
    on validation, so the model is columnar whatever was sent; its repeats of an item are kept, as
    version 1 never forbade them.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=lambda s: _document_v1(s))

    schema_version: int = RECALL_SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    ts: EpochMs
    item_ids: list[ItemId] = Field(description="recalled items, unique (schema_version 2)",
                                   json_schema_extra={"uniqueItems": True})
    scores: list[float] | None = Field(default=None, description="recall score of each item (absent: all 0)")
    sources: list[str] | None = Field(default=None, description="recall source of each item (optional)")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > RECALL_SCHEMA_VERSION or v < 1:
            raise ValueError(f"unsupported schema_version {v} (this build reads recall 1..{RECALL_SCHEMA_VERSION})")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _columns(cls, data: object, handler: ModelWrapValidatorHandler[RecallEvent]) -> RecallEvent:
        """Version 1 input (``candidates``) becomes the version 2 columns (a version omitted next to
        ``candidates`` means 1, the default of version-1 producers); version 2 must list an item once."""
        v1 = isinstance(data, dict) and (
            "candidates" in data or data.get("schema_version", RECALL_SCHEMA_VERSION) == 1)
        ev = handler(_v1_to_columns(data) if v1 else data)  # type: ignore[arg-type]
        n = len(ev.item_ids)
        for name, col in (("scores", ev.scores), ("sources", ev.sources)):
            if col is not None and len(col) != n:
                raise ValueError(f"{name} has {len(col)} entries but item_ids has {n} (parallel arrays)")
        if not v1 and len(set(ev.item_ids)) != n:
            raise ValueError("item_ids lists an item more than once")
        return ev

    @property
    def candidates(self) -> list[Candidate]:
        """The version 1 view, built on demand for tools and tests (never on the decoding path)."""
        scores = self.scores if self.scores is not None else [0.0] * len(self.item_ids)
        sources = self.sources if self.sources is not None else [""] * len(self.item_ids)
        return [Candidate(item_id=i, score=s, source=o)
                for i, s, o in zip(self.item_ids, scores, sources, strict=True)]


def _document_v1(schema: dict[str, object]) -> None:
    """The exported JSON Schema describes version 2; the version 1 form it still accepts rides along."""
    schema["x-schema-version-1"] = {
        "description": "still accepted: schema_version 1 (or absent) with 'candidates' instead of the arrays",
        "candidates": {"type": "array", "items": Candidate.model_json_schema()},
    }


def recall_as_v2(value: dict[str, object]) -> dict[str, object] | None:
    """A version 1 recall value (``candidates``) rewritten as version 2 columns, for tools that emit
    version 2 (``gpl replay``); None when the rewrite would not be exact: not version 1, a candidate
    that is not an object with an ``item_id``, or an item listed twice (version 1 allows it, version 2
    does not). Such values are left to the contract to judge, as a producer's would be."""
    cands = value.get("candidates")
    if value.get("schema_version", 1) != 1 or "item_ids" in value or type(cands) is not list:
        return None
    if not all(type(c) is dict and "item_id" in c for c in cands):
        return None
    ids = [c["item_id"] for c in cands]
    try:
        if len(set(ids)) != len(ids):
            return None
    except TypeError:  # an unhashable id: malformed, the contract says so
        return None
    out = {k: v for k, v in value.items() if k != "candidates"}
    out.update(schema_version=RECALL_SCHEMA_VERSION, item_ids=ids, scores=[c.get("score", 0.0) for c in cands])
    if any("source" in c for c in cands):
        out["sources"] = [c.get("source", "") for c in cands]
    return out


def _v1_to_columns(data: dict[str, object]) -> dict[str, object]:
    """A version 1 recall (``candidates`` objects) as version 2 columns; the contract validates the rest."""
    if data.get("schema_version", 1) != 1:
        raise ValueError("'candidates' is the schema_version 1 form; version 2 carries item_ids/scores")
    if "candidates" not in data:
        raise ValueError("schema_version 1 carries 'candidates'; send item_ids/scores as schema_version 2")
    if "item_ids" in data:
        raise ValueError("both 'candidates' (version 1) and 'item_ids' (version 2)")
    cands = data["candidates"]
    if not isinstance(cands, list):
        raise ValueError("'candidates' must be a list")
    parsed = []
    for j, c in enumerate(cands):
        try:
            parsed.append(Candidate.model_validate(c))
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in ("candidates", j, *first.get("loc", ())))
            raise ValueError(f"{loc}: {first.get('msg')}") from None
    out = {k: v for k, v in data.items() if k != "candidates"}
    out.update(schema_version=RECALL_SCHEMA_VERSION, item_ids=[c.item_id for c in parsed],
               scores=[c.score for c in parsed])
    if any(c.source for c in parsed):
        out["sources"] = [c.source for c in parsed]
    return out


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


UNEXPOSED_SCHEMA_VERSION = 2  # adds the packed id forms; version 1 (a JSON list only) is still read
# field → (struct code, numpy dtype) of the packed forms: little-endian uint32 / int64, read the same way by the
# contract (struct) and by the fast paths that write and read them (numpy: streams/join.py, the labeler's decoder)
PACKED_IDS = {"item_ids_le32": ("I", "<u4"), "item_ids_le64": ("q", "<i8")}


class UnexposedBatch(Contract):
    """recall − exposure of one request: the candidates GPL must label.

    The ids come in exactly one of three forms. ``item_ids``: a JSON list (every version). From
    schema_version 2 (what the streams stage writes), packed: base64 (RFC 4648, padded) of the ids as
    little-endian unsigned 32-bit integers (``item_ids_le32``, when every id is below 2**32) or signed
    64-bit ones (``item_ids_le64``). Why: this is the largest message between our own stages; 1,000
    hashed 63-bit ids are ~20 kB of decimal text and 10.7 kB packed (5.3 kB for 32-bit ids), and the
    labeler reads them with one base64 decode and no per-id parsing. Whatever the form, the model holds
    the list ``item_ids``, so a consumer sees one shape.
    """

    model_config = ConfigDict(frozen=True, extra="ignore", json_schema_extra=lambda s: _one_id_form(s))

    schema_version: int = UNEXPOSED_SCHEMA_VERSION
    request_id: RequestId
    user_id: UserId
    ts: EpochMs
    item_ids: list[ItemId] = Field(default_factory=list, description="the candidates (or one packed form)")
    item_ids_le32: str | None = Field(default=None, exclude=True, description="schema_version 2: the candidates "
                                      "as little-endian uint32, base64 (read into item_ids)")
    item_ids_le64: str | None = Field(default=None, exclude=True, description="schema_version 2: the candidates "
                                      "as little-endian int64, base64 (read into item_ids)")
    recall_scores: list[float] = Field(default_factory=list, description="each candidate's recall score, in "
                                       "item_ids order; empty unless streams.unexposed_scores is on")

    @field_validator("schema_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v > UNEXPOSED_SCHEMA_VERSION or v < 1:
            raise ValueError(f"unsupported schema_version {v} (this build reads unexposed "
                             f"1..{UNEXPOSED_SCHEMA_VERSION})")
        return v

    @model_validator(mode="before")
    @classmethod
    def _unpack(cls, data: object) -> object:
        """A packed form becomes ``item_ids``; exactly one of the three forms must be there."""
        if not isinstance(data, dict):
            return data
        forms = [k for k in ("item_ids", *PACKED_IDS) if k in data]
        if len(forms) != 1:
            raise ValueError(f"send the ids in one form, not {len(forms)}: item_ids, or from schema_version 2 "
                             "item_ids_le32 or item_ids_le64")
        form = forms[0]
        if form == "item_ids":
            return data
        if data.get("schema_version", 1) < 2:
            raise ValueError(f"{form} needs schema_version 2")
        return {**data, "item_ids": unpack_ids(data[form], form), form: None}


def unpack_ids(packed: object, form: str = "item_ids_le64") -> list[int]:
    """The ids of a packed ``form`` value; ValueError names what is wrong with it."""
    code, _ = PACKED_IDS[form]
    width = struct.calcsize(code)
    if not isinstance(packed, str):
        raise ValueError(f"{form} must be a base64 string")
    try:
        raw = binascii.a2b_base64(packed, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"{form} is not base64: {e}") from None
    if len(raw) % width:
        raise ValueError(f"{form} holds {len(raw)} bytes, not a whole number of {8 * width}-bit ids")
    ids = list(struct.unpack(f"<{len(raw) // width}{code}", raw))
    if any(i < 0 for i in ids):
        raise ValueError(f"{form} holds a negative id")
    return ids


def _one_id_form(schema: dict[str, object]) -> None:
    """The exported JSON Schema requires exactly one of the id forms."""
    schema["oneOf"] = [{"required": [k]} for k in ("item_ids", *PACKED_IDS)]


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


# Every dead-letter reason a stage writes, with what it means: ``gpl dlq --reason`` accepts these and no
# other (a typo would match nothing, silently), and tests/integration/test_operator_commands.py checks that each reason
# written anywhere in the code is declared here.
DLQ_REASONS: dict[str, str] = {
    "empty": "no value (a tombstone or null)",
    "malformed_json": "not JSON",
    "bad_frame": "a Confluent frame that does not parse",
    "schema": "JSON that breaks the contract (a field missing, of the wrong type, out of range)",
    "schema_registry": "a framed record whose schema id or payload the registry refuses",
    "empty_candidates": "a recall without candidates",
    "oversized": "a recall over streams.max_candidates",
    "unknown_items": "item ids the catalogue does not know (streams.unknown_items=dlq)",
    "duplicate": "a request_id seen before",
    "processing_error": "the stage failed on a valid record (a bug or an outage: redrive once fixed)",
    "no_vector": "a sample whose item got no vector within the trainer's wait",
    "abstained": "every candidate of a batch abstained",
    "no_anchors": "no anchor set arrived within labeler.wait_for_anchors_s",
    "label_error": "the labeler failed on the batch",
    "redrive_exhausted": "a redriven record (gpl dlq redrive) that failed again: not redriven automatically",
}
# A header on every record ``gpl dlq redrive`` sends: how many times the original has been redriven. A stage
# that fails on such a record dead-letters it as ``redrive_exhausted`` with that count (DeadLetter.redrives),
# so a still-broken message does not go round DLQ → topic → DLQ for ever.
REDRIVE_HEADER = "gpl-redrive-count"


class DeadLetter(Contract):
    """An input that could not be processed: the original bytes, why, and where it came from."""

    topic: str
    partition: int
    offset: int
    key: str | None = None  # a message without a key (encode() leaves None out)
    value: str = Field(description="original bytes, base64")
    error: str
    reason: str = Field(description="short machine-readable class: malformed_json, schema, unknown_items, ...")
    stage: str
    ts: EpochMs
    # set only when the original was too large to fit a DLQ record under the producer's message limit:
    # ``value`` then holds its first bytes, and these identify the whole original
    original_size: int | None = Field(default=None, ge=0, description="bytes of the original, when truncated")
    sha256: str | None = Field(default=None, description="hex sha256 of the whole original, when truncated")
    redrives: int | None = Field(default=None, ge=1, description="times the original had been redriven when it "
                                 "failed again (reason redrive_exhausted); absent: never redriven")
