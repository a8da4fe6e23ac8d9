"""The Kafka settings reach faust: credentials (SASL, TLS, mutual TLS) and client properties.

The embedded broker has no SASL or TLS, so the mapping is checked where it ends: faust's own
``credentials_to_aiokafka_auth`` (what aiokafka's clients are built with), the ``faust.App`` that the
streams stage builds, and a real TLS handshake with the ``ssl.SSLContext`` against a server that
requires a client certificate.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from gpl.parser import explain
from runtime.faust_config import credentials, faust_settings, mapped_properties, ssl_context
from runtime.kafka import reader_config
from runtime.settings import KafkaSettings, SettingsError, load
from runtime.vectors.memory import MemoryIndex
from streams.app import StreamsProcessor

KEY_PASSWORD = "client-key-pass"


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
          *, ca: bool = False, san: str | None = None) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA, a server certificate for localhost and a client certificate with an encrypted key."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("gpl-test-ca", ca_key, None, ca=True)
    files = {"ca": d / "ca.pem", "server": d / "server.pem", "server_key": d / "server.key",
             "client": d / "client.pem", "client_key": d / "client.key"}
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["server"].write_bytes(_cert("localhost", srv_key, ("gpl-test-ca", ca_key), san="localhost")
                                .public_bytes(serialization.Encoding.PEM))
    files["server_key"].write_bytes(srv_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    files["client"].write_bytes(_cert("gpl-streams", cli_key, ("gpl-test-ca", ca_key))
                                .public_bytes(serialization.Encoding.PEM))
    files["client_key"].write_bytes(cli_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(KEY_PASSWORD.encode())))
    return files


def mtls(pki: dict[str, Path], protocol: str = "SSL", **more: object) -> KafkaSettings:
    return load(env={}, kafka={
        "bootstrap_servers": "kafka:9093", "security_protocol": protocol, "ssl_ca_location": str(pki["ca"]),
        "ssl_certificate_location": str(pki["client"]), "ssl_key_location": str(pki["client_key"]),
        "ssl_key_password": KEY_PASSWORD, **more}).kafka


def test_plaintext_gives_faust_no_credentials() -> None:
    kafka = load(env={}).kafka
    assert credentials(kafka) is None and ssl_context(kafka) is None
    assert "broker_credentials" not in faust_settings(kafka)
    assert credentials_to_aiokafka_auth(None) == {"security_protocol": "PLAINTEXT"}


def test_sasl_plaintext_maps_to_aiokafka_sasl() -> None:
    kafka = load(env={"GPL_KAFKA__SECURITY_PROTOCOL": "SASL_PLAINTEXT", "GPL_KAFKA__SASL_MECHANISM": "SCRAM-SHA-512",
                      "GPL_KAFKA__SASL_USERNAME": "gpl", "GPL_KAFKA__SASL_PASSWORD": "pw"}).kafka
    creds = credentials(kafka)
    assert isinstance(creds, SASLCredentials)
    auth = credentials_to_aiokafka_auth(creds)
    assert auth == {"security_protocol": "SASL_PLAINTEXT", "sasl_mechanism": "SCRAM-SHA-512",
                    "sasl_plain_username": "gpl", "sasl_plain_password": "pw", "ssl_context": None}


def test_sasl_ssl_carries_the_tls_context(pki: dict[str, Path]) -> None:
    kafka = mtls(pki, "SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u", sasl_password="p")
    auth = credentials_to_aiokafka_auth(credentials(kafka))
    assert auth["security_protocol"] == "SASL_SSL" and auth["sasl_mechanism"] == "PLAIN"
    ctx = auth["ssl_context"]
    assert isinstance(ctx, ssl.SSLContext) and ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert [c["subject"] for c in ctx.get_ca_certs()] == [((("commonName", "gpl-test-ca"),),)]


def test_unsupported_mechanism_is_refused_with_a_clear_error() -> None:
    kafka = load(env={}, kafka={"security_protocol": "SASL_SSL", "sasl_mechanism": "GSSAPI"}).kafka
    with pytest.raises(ValueError, match="supports PLAIN, SCRAM-SHA-256, SCRAM-SHA-512"):
        credentials(kafka)


def test_settings_refuse_half_configurations() -> None:
    with pytest.raises(ValueError, match="needs kafka.sasl_mechanism"):
        load(env={"GPL_KAFKA__SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(ValueError, match="ssl_key_location"):
        load(env={"GPL_KAFKA__SSL_CERTIFICATE_LOCATION": "/c.pem"})
    with pytest.raises(ValueError, match="partitioner"):
        load(env={"GPL_KAFKA__PRODUCER_EXTRA": '{"partitioner": "consistent_random"}'})


def test_librdkafka_gets_mutual_tls(pki: dict[str, Path]) -> None:
    conf = mtls(pki).client_config()
    assert conf["security.protocol"] == "SSL" and conf["ssl.ca.location"] == str(pki["ca"])
    assert conf["ssl.certificate.location"] == str(pki["client"]) and conf["ssl.key.location"] == str(pki["client_key"])
    assert conf["ssl.key.password"] == KEY_PASSWORD


def test_mutual_tls_handshake_with_the_faust_context(pki: dict[str, Path]) -> None:
    """A server that requires a client certificate from our CA accepts the context faust is given."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
    server_ctx.load_cert_chain(str(pki["server"]), str(pki["server_key"]))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    seen: list[object] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def accept() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen.append(tls.getpeercert()["subject"])  # type: ignore[index]
                    tls.sendall(b"ok")
            except ssl.SSLError as e:
                seen.append(e)

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        creds = credentials(mtls(pki))
        assert isinstance(creds, SSLCredentials)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
                creds.context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.recv(2) == b"ok"
        t.join(10)
    assert seen == [((("commonName", "gpl-streams"),),)]


def test_wrong_key_password_fails_loudly(pki: dict[str, Path]) -> None:
    with pytest.raises(ssl.SSLError):
        ssl_context(mtls(pki, ssl_key_password="wrong"))


def test_client_properties_map_to_faust_settings() -> None:
    kafka = load(env={
        "GPL_KAFKA__EXTRA": '{"client.id": "gpl-eu", "metadata.max.age.ms": 60000, "socket.keepalive.enable": true}',
        "GPL_KAFKA__PRODUCER_EXTRA": '{"compression.type": "zstd", "linger.ms": 5, "acks": "all"}',
        "GPL_KAFKA__CONSUMER_EXTRA": '{"session.timeout.ms": 10000, "fetch.max.bytes": 1048576}',
        "GPL_KAFKA__FAUST_EXTRA": '{"producer_max_request_size": 2000000}',
    }).kafka
    mapped, unmapped = mapped_properties(kafka)
    assert mapped == {"broker_client_id": "gpl-eu", "consumer_metadata_max_age_ms": 60000,
                      "producer_metadata_max_age_ms": 60000, "producer_compression_type": "zstd",
                      "producer_linger": 0.005, "producer_acks": -1, "broker_session_timeout": 10.0,
                      "consumer_max_fetch_size": 1048576}
    assert unmapped == ["socket.keepalive.enable"]
    out = faust_settings(kafka, {"broker_session_timeout": 6, "web_enabled": False})
    assert out["broker_session_timeout"] == 10.0 and out["web_enabled"] is False  # the deployment wins
    assert out["producer_max_request_size"] == 2_000_000


def test_the_streams_app_is_built_with_credentials_and_properties(pki: dict[str, Path], tmp_path: Path) -> None:
    """What streams/app.py hands faust.App: the credentials and the mapped client properties."""
    s = load(env={}, data_dir=str(tmp_path), kafka={
        "bootstrap_servers": "kafka:9093", "security_protocol": "SASL_SSL", "sasl_mechanism": "SCRAM-SHA-256",
        "sasl_username": "streams", "sasl_password": "pw", "ssl_ca_location": str(pki["ca"]),
        "extra": {"client.id": "gpl-streams-eu"}, "producer_extra": {"compression.type": "lz4"}})
    conf = StreamsProcessor(s, MemoryIndex()).app.conf
    auth = credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context)
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["sasl_plain_username"],
            auth["sasl_plain_password"]) == ("SASL_SSL", "SCRAM-SHA-256", "streams", "pw")
    assert isinstance(auth["ssl_context"], ssl.SSLContext)
    assert conf.broker_client_id == "gpl-streams-eu" and conf.producer_compression_type == "lz4"
    assert conf.broker_session_timeout == 6  # the stage's own choice stays where the deployment is silent


@pytest.mark.parametrize("section", ["extra", "producer_extra", "consumer_extra"])
@pytest.mark.parametrize(("prop", "field"), [("sasl.password", "kafka.sasl_password"),
                                             ("security.protocol", "kafka.security_protocol"),
                                             ("ssl.ca.location", "kafka.ssl_ca_location"),
                                             ("sasl.oauthbearer.config", "kafka.sasl_*")])
def test_security_properties_in_the_extras_are_refused_in_one_line(section: str, prop: str, field: str) -> None:
    """They reached the librdkafka clients but not faust, silently: the streams stage connected without them."""
    with pytest.raises(SettingsError) as e:
        load(env={}, kafka={section: {prop: "s3cr3t-value"}})
    lines = explain(e.value)
    assert len(lines) == 1 and f"kafka.{section}: {prop}" in lines[0] and field in lines[0], lines
    assert "s3cr3t-value" not in lines[0]


def test_every_extra_that_faust_can_take_reaches_it_and_the_lag_reader_gets_consumer_extra() -> None:
    kafka = load(env={}, kafka={"extra": {"ssl.endpoint.identification.algorithm": "none", "client.id": "x"},
                                "consumer_extra": {"session.timeout.ms": 9000, "fetch.max.bytes": 1 << 20}}).kafka
    assert faust_settings(kafka)["broker_session_timeout"] == 9.0 and mapped_properties(kafka)[1] == []
    reader = reader_config(kafka, "gpl-streams")
    assert reader["session.timeout.ms"] == 9000 and reader["client.id"] == "x" and reader["group.id"] == "gpl-streams"
