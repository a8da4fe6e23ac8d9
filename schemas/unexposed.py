"""The ``unexposed`` contract: recall − exposure of one request, its ids as a list or packed.

Why a module of its own: the batch the streams stage writes for the labeler has three id forms (a JSON
list, and from schema_version 2 base64 of packed little-endian ints), and the packed forms' layout
(``PACKED_IDS``) is shared by the contract, the streams stage that writes it and the labeler's fast
decoder (``schemas/fast_codec.py``); here it is declared once, with ``unpack_ids`` that reads it.
"""

from __future__ import annotations

import binascii
import struct

from pydantic import ConfigDict, Field, field_validator, model_validator

from schemas.contract import Contract, EpochMs, ItemId, RequestId, UserId

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
