"""The serializer seam: how a topic's values become bytes and back, bound per topic in the registry.

A topic's format is an object that is both a :class:`Serializer` and a :class:`Deserializer` (a
:class:`Serde`); ``schemas/topics.py`` declares one per topic (JSON for all of ours) and lets a process
bind another (:func:`schemas.topics.bind_serde`). Every reader and writer goes through the binding:
``runtime/serde.py``'s ``Wire`` in the stages, the event producer of ``gpl replay``. So Avro or
Protobuf would be one module implementing these four methods, bound to its topics.

Why the two JSON methods: the two largest messages are read and written by fast codecs that go
straight between contract JSON and numpy arrays (``schemas/fast_codec.py``). A format other than JSON
meets them at that JSON: :meth:`Serializer.from_json` turns what a fast encoder wrote into the format,
:meth:`Deserializer.to_json` turns a record into the JSON a fast decoder reads. For JSON both are the
identity, so the fast paths cost what they did; another format pays one conversion, and is correct.
"""

from __future__ import annotations

from typing import Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from schemas.codec import decode, encode

M = TypeVar("M", bound=BaseModel)


@runtime_checkable
class Serializer(Protocol):
    """Writes a topic's values."""

    name: str  # the format, for logs and errors ("json")

    def serialize(self, msg: BaseModel) -> bytes:
        """One contract as the bytes of a record value."""
        ...

    def from_json(self, body: bytes) -> bytes:
        """Contract JSON (what a fast encoder wrote) as the bytes of a record value."""
        ...


@runtime_checkable
class Deserializer(Protocol):
    """Reads a topic's values; bad input raises :class:`schemas.codec.DecodeError` with a DLQ reason."""

    name: str

    def deserialize(self, raw: bytes | None, model: type[M]) -> M:
        """A record value as its contract, validated by the pydantic model."""
        ...

    def to_json(self, raw: bytes | None) -> bytes | None:
        """A record value as contract JSON for a fast decoder (None stays None: the contract calls it empty)."""
        ...


class Serde(Serializer, Deserializer, Protocol):
    """One topic's format: both directions, so a topic binds one object."""


class JsonSerde:
    """Our JSON (orjson, ``exclude_none``), the format of every topic as declared. Reading also accepts
    the Confluent wire format (:mod:`schemas.wire`), whose framing :func:`schemas.codec.decode` strips;
    the registry's checks of a framed record are the runtime's (``runtime/serde.py``)."""

    name = "json"

    def serialize(self, msg: BaseModel) -> bytes:
        return encode(msg)

    def from_json(self, body: bytes) -> bytes:
        return body

    def deserialize(self, raw: bytes | None, model: type[M]) -> M:
        return decode(raw, model)

    def to_json(self, raw: bytes | None) -> bytes | None:
        return raw


JSON = JsonSerde()
