"""The security properties of a Kafka client have fields of their own; the free-form extras refuse them.

Why: ``kafka.extra`` and its producer/consumer variants go to the librdkafka clients as they are, while
the streams stage (faust over aiokafka) builds its TLS context and SASL credentials from the dedicated
fields only (runtime/faust_config.py). A SASL password or a CA bundle given as an extra property
would secure the workers and leave the streams stage connecting without it; so it is refused, in one
line that names the field to use. ``ssl.endpoint.identification.algorithm`` is the one TLS property
faust reads from the extras (host name checking), so it stays allowed.
"""

from __future__ import annotations

from collections.abc import Mapping

DEDICATED = {
    "security.protocol": "security_protocol", "sasl.mechanism": "sasl_mechanism", "sasl.mechanisms": "sasl_mechanism",
    "sasl.username": "sasl_username", "sasl.password": "sasl_password", "ssl.ca.location": "ssl_ca_location",
    "ssl.certificate.location": "ssl_certificate_location", "ssl.key.location": "ssl_key_location",
    "ssl.key.password": "ssl_key_password",
}
READ_BY_FAUST = ("ssl.endpoint.identification.algorithm",)


def refuse_security_extras(section: str, props: Mapping[str, object]) -> None:
    """Raise ValueError (one line) for a security property in ``kafka.<section>``."""
    for prop in props:
        if prop in DEDICATED:
            raise ValueError(f"kafka.{section}: {prop} would not reach the streams stage (faust); set "
                             f"kafka.{DEDICATED[prop]} instead (GPL_KAFKA__{DEDICATED[prop].upper()})")
        if prop.startswith(("sasl.", "ssl.")) and prop not in READ_BY_FAUST:
            raise ValueError(f"kafka.{section}: {prop} has no equivalent in the streams stage (faust), which would "
                             "connect without it; use the dedicated fields kafka.security_protocol, kafka.sasl_* "
                             "and kafka.ssl_*")
