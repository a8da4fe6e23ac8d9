"""The Kafka settings as faust (aiokafka) App settings, so the streams stage joins the cluster the workers join.

The workers' librdkafka clients read :meth:`KafkaSettings.client_config`; faust takes none of those
properties. Here the same settings become faust's: the security protocol, SASL and (mutual) TLS become
``broker_credentials`` with an ``ssl.SSLContext``, and the librdkafka properties of ``kafka.extra``,
``kafka.producer_extra`` and ``kafka.consumer_extra`` that have an aiokafka equivalent become the
corresponding faust setting. ``kafka.faust_extra`` is applied last, for anything else faust has.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from typing import Any

from faust.auth import SASLCredentials, SSLCredentials
from faust.types.auth import CredentialsT

from runtime.settings import KafkaSettings

log = logging.getLogger(__name__)

# mechanisms faust can use with a username and password (GSSAPI and OAUTHBEARER need other inputs)
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


def _ms_to_s(v: Any) -> float:
    return float(v) / 1000.0


def _acks(v: Any) -> int:
    return -1 if str(v).lower() == "all" else int(v)


def _codec(v: Any) -> str | None:
    return None if str(v).lower() in ("none", "") else str(v).lower()


def _bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).lower() in ("true", "1", "yes")


# librdkafka property -> (faust settings, conversion); properties without an equivalent are logged
_PRODUCER: dict[str, tuple[tuple[str, ...], Callable[[Any], Any]]] = {
    "compression.type": (("producer_compression_type",), _codec),
    "compression.codec": (("producer_compression_type",), _codec),
    "acks": (("producer_acks",), _acks),
    "request.required.acks": (("producer_acks",), _acks),
    "linger.ms": (("producer_linger",), _ms_to_s),
    "queue.buffering.max.ms": (("producer_linger",), _ms_to_s),
    "message.max.bytes": (("producer_max_request_size",), int),
    "request.timeout.ms": (("producer_request_timeout",), _ms_to_s),
}
_CONSUMER: dict[str, tuple[tuple[str, ...], Callable[[Any], Any]]] = {
    "fetch.max.bytes": (("consumer_max_fetch_size",), int),
    "auto.offset.reset": (("consumer_auto_offset_reset",), str),
    "session.timeout.ms": (("broker_session_timeout",), _ms_to_s),
    "heartbeat.interval.ms": (("broker_heartbeat_interval",), _ms_to_s),
    "max.poll.interval.ms": (("broker_max_poll_interval",), _ms_to_s),
    "group.instance.id": (("consumer_group_instance_id",), str),
    "check.crcs": (("broker_check_crcs",), _bool),
}
_COMMON: dict[str, tuple[tuple[str, ...], Callable[[Any], Any]]] = {
    "client.id": (("broker_client_id",), str),
    "metadata.max.age.ms": (("consumer_metadata_max_age_ms", "producer_metadata_max_age_ms"), int),
    "connections.max.idle.ms": (("consumer_connections_max_idle_ms", "producer_connections_max_idle_ms"), int),
    # librdkafka's partitioner names are checked in KafkaSettings; faust/aiokafka hash keys with murmur2 already
    "partitioner": ((), str),
}
# handled through the credentials (ssl_context) or meaningless for faust: never reported as unmapped. The
# other security properties never get here: the settings refuse them in the extras (runtime/client_props.py)
_HANDLED = {"bootstrap.servers", "ssl.endpoint.identification.algorithm", "log.connection.close"}


def ssl_context(kafka: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context of ``SSL``/``SASL_SSL``: the CA bundle (else the system's), and the client
    certificate and key for mutual TLS. ``ssl.endpoint.identification.algorithm=none`` in ``kafka.extra``
    turns host name checking off, as it does for librdkafka."""
    if not kafka.uses_tls:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=kafka.ssl_ca_location or None)
    if kafka.ssl_certificate_location:
        ctx.load_cert_chain(kafka.ssl_certificate_location, kafka.ssl_key_location,
                            password=kafka.ssl_key_password.get_secret_value() or None)
    if str(kafka.extra.get("ssl.endpoint.identification.algorithm", "https")).lower() == "none":
        ctx.check_hostname = False
    return ctx


def credentials(kafka: KafkaSettings) -> CredentialsT | None:
    """faust's ``broker_credentials`` for the security protocol; None for PLAINTEXT."""
    protocol = kafka.security_protocol
    if protocol == "PLAINTEXT":
        return None
    context = ssl_context(kafka)
    if protocol == "SSL":
        return SSLCredentials(context)
    mechanism = kafka.sasl_mechanism.upper()
    if mechanism not in SASL_MECHANISMS:
        raise ValueError(f"kafka.sasl_mechanism {kafka.sasl_mechanism!r}: the streams stage (faust) supports "
                         f"{', '.join(SASL_MECHANISMS)}")
    # SASL_SSL: faust picks the protocol from the presence of the context
    return SASLCredentials(username=kafka.sasl_username, password=kafka.sasl_password.get_secret_value(),
                           ssl_context=context, mechanism=mechanism)


def mapped_properties(kafka: KafkaSettings) -> tuple[dict[str, Any], list[str]]:
    """faust settings for the librdkafka properties in the extras, and the properties with no equivalent."""
    out: dict[str, Any] = {}
    unmapped: list[str] = []
    for props, table in ((kafka.extra, _COMMON | _PRODUCER | _CONSUMER), (kafka.producer_extra, _COMMON | _PRODUCER),
                         (kafka.consumer_extra, _COMMON | _CONSUMER)):
        for prop, value in props.items():
            if prop in table:
                names, convert = table[prop]
                out |= dict.fromkeys(names, convert(value))
            elif prop not in _HANDLED:
                unmapped.append(prop)
    return out, unmapped


class BackpressureToMetric(logging.Filter):
    """faust's "producer buffer full size N" warning, one per stall of its table-changelog buffer, as a
    count (``gpl_streams_producer_backpressure_total``) and a DEBUG line: it is flow control doing its
    job (processing waits until the buffer drains), and ~15 of them drowned a demo's output. mode's
    "Timer commit is overlapping" (a periodic commit that took longer than its interval on a busy
    host) goes to DEBUG too: the commit still ran, and the lag metrics show a stage that falls behind."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        text = str(record.msg)
        if text.startswith("producer buffer full"):
            from runtime.metrics import PRODUCER_BACKPRESSURE

            PRODUCER_BACKPRESSURE.inc()
        elif not (text.startswith("Timer ") and "is overlapping" in text):
            return True
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


FAUST_PRODUCER_LOGGER = "faust.transport.producer"
FAUST_NOISY_LOGGERS = (FAUST_PRODUCER_LOGGER, "mode.timers")


def count_backpressure() -> None:
    """Install :class:`BackpressureToMetric` on faust's producer and mode's timer loggers, once per process."""
    for name in FAUST_NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, BackpressureToMetric) for f in logger.filters):
            logger.addFilter(BackpressureToMetric())


def faust_settings(kafka: KafkaSettings, base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The keyword settings of ``faust.App``: ``base`` (the stage's own), then what the Kafka settings ask.

    The user's settings win over the stage's defaults: they are explicit and per deployment. Building
    them also routes faust's back-pressure warnings to a metric (:func:`count_backpressure`).
    """
    count_backpressure()
    conf = dict(base or {})
    creds = credentials(kafka)
    if creds is not None:
        conf["broker_credentials"] = creds
    mapped, unmapped = mapped_properties(kafka)
    if unmapped:
        log.info("streams (faust): no aiokafka equivalent of %s; set it in kafka.faust_extra if faust has one",
                 ", ".join(sorted(set(unmapped))))
    return conf | mapped | kafka.faust_extra
