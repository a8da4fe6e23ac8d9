"""Dead letters: the record every stage writes to ``<topic>.dlq``, the reasons it may give, the redrive header.

Why a module of its own: a dead letter is not an event of the stream but the stages' record of one
they could not process; ``gpl dlq`` reads and redrives them, and the codec (``schemas/codec.py``) builds
them, so the reasons are declared once, next to the record that carries them.
"""

from __future__ import annotations

from pydantic import Field

from schemas.contract import Contract, EpochMs

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
