"""The ``recall`` contract: one request's candidates as parallel arrays, and the version 1 list it still reads.

Why a module of its own: the recall is the only contract with two wire forms (version 2 columns, version 1
candidate objects), and the conversions between them (on validation, and ``recall_as_v2`` for ``gpl
replay``) belong with it. The fast decoding path (``schemas.fast_codec.decode_recall``) accepts exactly what
this contract accepts.
"""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationError,
    field_validator,
    model_validator,
)

from schemas.contract import Contract, EpochMs, ItemId, RequestId, UserId


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
