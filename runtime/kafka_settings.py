"""The Kafka section of the settings, and the base every section shares.

Apart from runtime/settings.py by concern and size: the client properties, security, partitioning
and topic-naming rules of every Kafka client (the librdkafka workers and the faust streams stage) live
here; settings.py imports and re-exports :class:`KafkaSettings` and :class:`Section`, so
``from runtime.settings import KafkaSettings`` keeps working.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from runtime.client_props import refuse_security_extras


class Section(BaseModel):
    # hide_input_in_errors: a mistyped or invalid setting must not echo its value (it may be a password)
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)


# librdkafka property values as they come from TOML or a JSON environment value
KafkaProps = dict[str, str | int | float | bool]
# the partitioners that place a key where the Java client, faust/aiokafka and GplProducer place it
_MURMUR2 = ("murmur2_random", "murmur2")


class KafkaSettings(Section):
    bootstrap_servers: str = Field(
        default="", description="empty: start the local broker (broker.kind); else a Kafka bootstrap list"
    )
    partitions: int = Field(default=4, ge=1, description="partition count of every user-keyed topic")
    replication_factor: int = Field(default=1, ge=1)
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: str = Field(default="", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (SASL_*)")
    sasl_username: str = ""
    sasl_password: SecretStr = SecretStr("")
    ssl_ca_location: str = Field(default="", description="CA bundle (PEM) that signed the brokers' certificates")
    ssl_certificate_location: str = Field(default="", description="mutual TLS: this client's certificate (PEM)")
    ssl_key_location: str = Field(default="", description="mutual TLS: this client's private key (PEM)")
    ssl_key_password: SecretStr = Field(default=SecretStr(""), description="mutual TLS: the key's passphrase")
    extra: KafkaProps = Field(
        default_factory=dict, description="any librdkafka property for every client (producer, consumer, admin), "
        'e.g. {"client.id": "gpl", "socket.keepalive.enable": true}; env: a JSON object')
    producer_extra: KafkaProps = Field(
        default_factory=dict, description='librdkafka properties for producers only, e.g. {"compression.type": '
        '"zstd"}; also mapped to faust where it has an equivalent (runtime/faust_config.py)')
    consumer_extra: KafkaProps = Field(default_factory=dict, description="librdkafka properties for consumers only")
    faust_extra: dict[str, Any] = Field(
        default_factory=dict, description="faust App settings for the streams stage, applied last "
        '(e.g. {"producer_compression_type": "zstd"})')
    group_prefix: str = "gpl"
    topic_prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$", description="before every topic name, "
                              "DLQs and the streams app id included (a shared cluster's namespace, e.g. team-a.)")
    topic_names: dict[str, str] = Field(default_factory=dict, description='rename topics by logical name, e.g. '
                                        '{"recall": "search.recall.v2"} (as is: no prefix); schemas/topics.py')
    # Apache Kafka's defaults. The embedded broker's remedies (one record per batch, a short fetch wait, gap
    # re-reads, checked time look-ups) are applied by its profile alone: EmbeddedBroker.profile()
    producer_batch_messages: int = Field(default=10_000, ge=1, description="records per produce batch "
                                         "(librdkafka batch.num.messages; 1 also makes faust send one per batch)")
    linger_ms: int = Field(default=5, ge=0, description="how long a producer waits to fill a batch")
    max_message_bytes: int = Field(default=4_000_000, ge=1024)
    fetch_wait_max_ms: int | None = Field(
        default=None, ge=1, description="longest a fetch waits for data; unset: the clients' own (librdkafka 500 "
        "ms, faust 1,500 ms: a Kafka broker answers as soon as data comes)")
    refetch_gaps: bool = Field(
        default=False, description="re-read an offset a consumer skipped (the embedded Tansu broker can hand a "
        "live reader the record after one that another producer appends at the same time; runtime/kafka.py "
        "GapGuard). The embedded profile turns it on; a real Kafka leaves gaps only on purpose (compaction, "
        "transaction markers)")
    check_time_lookup: bool = Field(
        default=False, description="check the broker's offsets_for_times answer before a time-range replay "
        "starts there, else scan the partition (the embedded Tansu broker answers 0 whatever the time; its "
        "profile turns this on)")
    transactional: bool = Field(
        default=False, description="exactly-once for the labeler and the trainer: each commit point writes the "
        "stage's outputs, dead letters and consumer offsets in one Kafka transaction (runtime/transactions.py). "
        "Costs a transaction commit (~3 broker round trips) per commit point, and outputs become visible only "
        "when it commits; every consumer of their topics must read with isolation.level=read_committed (the "
        "librdkafka default our stages keep). The transactional.id is <group_prefix>-<stage>-<instance>: set "
        "consumer_extra group.instance.id per replica where several run on one host (default: the host name). "
        "Apache Kafka only: the embedded broker (refetch_gaps) refuses it")
    lag_interval_s: float = Field(
        default=10.0, ge=0, description="how often each stage measures its consumer lag (gauge "
        "gpl_consumer_lag_messages; a broker round trip per owned partition); 0: never")

    @field_validator("extra", "producer_extra", "consumer_extra", "faust_extra", "topic_names", mode="before")
    @classmethod
    def _json_object(cls, v: Any) -> Any:
        """``GPL_KAFKA__EXTRA='{"client.id": "x"}'`` and ``--set`` give a string: read it as a JSON object."""
        if isinstance(v, str):
            try:
                v = json.loads(v) if v.strip() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"expected a JSON object: {e.msg} at position {e.pos}") from None
        return v

    @model_validator(mode="after")
    def _coherent(self) -> KafkaSettings:
        """Refuse what would silently misroute or half-configure a client (see docs/producers.md)."""
        for name, props in (("extra", self.extra), ("producer_extra", self.producer_extra),
                            ("consumer_extra", self.consumer_extra)):
            refuse_security_extras(name, props)  # they have fields of their own, which faust reads too
            part = props.get("partitioner")
            if part is not None and part not in _MURMUR2:
                raise ValueError(f"kafka.{name}: partitioner {part!r} would place a user's events on other "
                                 f"partitions than faust and Java clients do; use one of {_MURMUR2}")
        if self.transactional and self.refetch_gaps:
            raise ValueError("kafka.transactional needs Apache Kafka: the embedded broker's profile (refetch_gaps) "
                             "would re-read every transaction marker; start the stack with --broker kafka")
        isolation = str((self.extra | self.consumer_extra).get("isolation.level", "read_committed"))
        if self.transactional and isolation != "read_committed":
            raise ValueError("kafka.transactional: consumers must read committed records; remove isolation.level "
                             f"{isolation!r} from kafka.extra / kafka.consumer_extra")
        if self.security_protocol.startswith("SASL_") and not self.sasl_mechanism:
            raise ValueError(f"kafka.security_protocol {self.security_protocol} needs kafka.sasl_mechanism")
        if bool(self.ssl_certificate_location) != bool(self.ssl_key_location):
            raise ValueError("mutual TLS needs both kafka.ssl_certificate_location and kafka.ssl_key_location")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by producers, consumers and the admin client (``extra`` included)."""
        # a closed idle connection is routine (the broker drops them); not worth a log line each time
        conf: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers, "log.connection.close": False}
        if self.security_protocol != "PLAINTEXT":
            conf["security.protocol"] = self.security_protocol
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location:
            conf["ssl.ca.location"] = self.ssl_ca_location
        if self.ssl_certificate_location:
            conf["ssl.certificate.location"] = self.ssl_certificate_location
            conf["ssl.key.location"] = self.ssl_key_location
        if self.ssl_key_password.get_secret_value():
            conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
        return conf | self.extra
