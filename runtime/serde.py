"""A stage's reader and writer of values: each topic's bound format, and for JSON the Confluent one too.

The format of a topic is the :class:`~schemas.serde.Serde` the topic registry binds to it
(``schemas/topics.py``: JSON for every topic unless a process binds another); :class:`Wire` asks the
registry per topic and never assumes JSON. What follows is about JSON topics, where both wire formats
are read: plain JSON and the Confluent Schema Registry format. A topic bound to another format is read
and written by that format alone (Confluent framing and the registry are JSON's here).

Reading: plain JSON passes through; a framed message (magic byte 0 + schema id, ``schemas/wire.py``)
is checked against the registry when one is configured — the id must be a version of the topic's
subject ``<topic>-value``, and with ``validate_payloads`` the JSON must also satisfy that writer schema
(confluent-kafka's own ``JSONDeserializer``) — and then unframed; without a registry the framing is
only stripped. Either way the pydantic contract validates the JSON afterwards
(:func:`schemas.codec.decode`), so a framed message is never trusted more than a plain one. Writing:
plain JSON, or with ``schema_registry.output_format = "confluent"`` confluent-kafka's
``JSONSerializer`` with the exported schema of the topic (``schemas/export.py``).

Why ``validate_payloads`` is off by default: ``jsonschema`` needs 0.07-0.25 s to read or write one
1,000-candidate recall (``gpl bench wire`` on a shared 2-core VM; ~0.6 ms to read and ~0.4 ms to write
without it), and the exported schema says nothing the pydantic contract does not check anyway.

One :class:`Wire` per stage; registry clients are shared per URL within a process, so caches are
shared and a ``mock://`` registry is one registry for every stage of the embedded stack.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

import orjson
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.schema_registry.json_schema import JSONDeserializer, JSONSerializer
from confluent_kafka.serialization import MessageField, SerializationContext, SerializationError
from pydantic import BaseModel

from runtime.settings import SchemaRegistrySettings
from schemas.codec import DecodeError, decode
from schemas.export import schema_text
from schemas.serde import JSON
from schemas.topics import serde_of
from schemas.wire import FrameError, is_framed, subject, unframe

M = TypeVar("M", bound=BaseModel)

_clients: dict[tuple[str, str], SchemaRegistryClient] = {}
_clients_lock = threading.Lock()


def registry_client(cfg: SchemaRegistrySettings) -> SchemaRegistryClient:
    """The process's client for this registry (``mock://`` URLs give confluent-kafka's in-memory one)."""
    if not cfg.url:
        raise ValueError("no schema registry configured (schema_registry.url)")
    key = (cfg.url, cfg.basic_auth_user)
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            conf: dict[str, Any] = {"url": cfg.url}
            if cfg.basic_auth_user:
                conf["basic.auth.user.info"] = f"{cfg.basic_auth_user}:{cfg.basic_auth_password.get_secret_value()}"
            client = _clients[key] = SchemaRegistryClient.new_client(conf)
        return client


def registry_schema(topic: str) -> Schema:
    """The exported schema of a topic as the registry stores it."""
    return Schema(schema_text(topic), "JSON")


def _to_dict(obj: object, ctx: SerializationContext | None) -> dict[str, Any]:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json", exclude_none=True)
    if isinstance(obj, bytes | bytearray | memoryview):
        return orjson.loads(obj)  # already-encoded JSON (the fast paths)
    raise TypeError(f"cannot serialize {type(obj).__name__}")


class Wire:
    """A stage's reader and writer of message values (see the module docstring)."""

    def __init__(self, cfg: SchemaRegistrySettings | None = None, client: SchemaRegistryClient | None = None) -> None:
        self.cfg = cfg or SchemaRegistrySettings()
        self.client = client if client is not None else (registry_client(self.cfg) if self.cfg.url else None)
        self._deserializer = (JSONDeserializer(None, schema_registry_client=self.client)
                              if self.client is not None and self.cfg.validate_payloads else None)
        self._serializers: dict[str, JSONSerializer] = {}
        self._known: set[tuple[str, int]] = set()  # (topic, schema id) pairs the registry confirmed
        self._lock = threading.Lock()

    @property
    def framed_output(self) -> bool:
        return self.cfg.output_format == "confluent"

    # ------------------------------------------------------------------------------------ reading

    def payload(self, topic: str, raw: bytes | None) -> bytes | None:
        """The value as contract JSON, for the fast decoders: a JSON topic's value in either format (a framed
        one checked by the registry, if any), another format's converted by it.

        Raises :class:`DecodeError` (``bad_frame``, ``schema_registry``, the format's) for what must be
        dead-lettered.
        """
        serde = serde_of(topic)
        if serde is not JSON:
            return serde.to_json(raw)
        if raw is None or not is_framed(raw):
            return raw
        try:
            schema_id, body = unframe(raw)
        except FrameError as e:
            raise DecodeError("bad_frame", str(e)) from None
        if self.client is None:
            return body
        self._check_subject(topic, schema_id)
        if self._deserializer is None:
            return body
        try:
            self._deserializer(raw, SerializationContext(topic, MessageField.VALUE))
        except (SerializationError, SchemaRegistryError, ValueError) as e:
            raise DecodeError("schema_registry", f"schema id {schema_id}: {e}") from None
        return body

    def decode(self, topic: str, raw: bytes | None, model: type[M]) -> M:
        """The topic's format reads the value; for JSON :meth:`payload`, then the pydantic contract
        (:func:`schemas.codec.decode`)."""
        serde = serde_of(topic)
        if serde is not JSON:
            return serde.deserialize(raw, model)
        return decode(self.payload(topic, raw), model)

    def _check_subject(self, topic: str, schema_id: int) -> None:
        """The id must be a version of ``<topic>-value``: a valid id of another topic is refused."""
        if (topic, schema_id) in self._known:
            return
        assert self.client is not None
        subj = subject(topic)
        try:
            schema = self.client.get_schema(schema_id)
            self.client.lookup_schema(subj, schema)
        except SchemaRegistryError as e:
            raise DecodeError("schema_registry", f"schema id {schema_id} is not a version of {subj}: {e}") from None
        with self._lock:
            self._known.add((topic, schema_id))

    # ------------------------------------------------------------------------------------ writing

    def encode(self, topic: str, msg: BaseModel) -> bytes:
        """A contract in the topic's format (JSON: plain, or Confluent-framed as configured)."""
        serde = serde_of(topic)
        if serde is not JSON or not self.framed_output:
            return serde.serialize(msg)
        return self._serialize(topic, msg)

    def encode_json(self, topic: str, body: bytes) -> bytes:
        """Already-encoded contract JSON (a fast path's output) in the topic's format."""
        serde = serde_of(topic)
        if serde is not JSON or not self.framed_output:
            return serde.from_json(body)
        return self._serialize(topic, body)

    def _serialize(self, topic: str, obj: object) -> bytes:
        ser = self._serializers.get(topic)
        if ser is None:
            assert self.client is not None  # output_format=confluent requires a url (settings check it)
            ser = JSONSerializer(schema_text(topic), self.client, to_dict=_to_dict,
                                 conf={"auto.register.schemas": self.cfg.auto_register,
                                       "validate": self.cfg.validate_payloads})
            with self._lock:
                ser = self._serializers.setdefault(topic, ser)
        out = ser(obj, SerializationContext(topic, MessageField.VALUE))
        assert out is not None
        return out
