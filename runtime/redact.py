"""Keep secrets out of what the system prints, logs and writes.

Settings hold secrets as ``SecretStr`` (their ``repr`` and JSON dump are ``**********``), but two kinds
of secret travel in plain strings: credentials inside a URL (``http://user:pass@qdrant:6333``, an
``?api_key=`` query) and a secret a library echoes in its own message. :func:`public_settings` is the
one way settings leave the process (``gpl config show``, ``results.json`` of ``gpl eval``), and
:class:`RedactingFilter` masks both kinds in every log record.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, SecretStr

MASK = "***"
# field names whose values are secrets even when typed as plain str (an identity is half a credential)
SECRET_NAMES = ("password", "api_key", "apikey", "secret", "token", "sasl_username")
_SECRET_QUERY = re.compile(r"(key|token|secret|password|passwd|pwd|auth|signature|sig)", re.IGNORECASE)
# scheme://userinfo@ anywhere in a text; userinfo stops at the first character a host cannot follow
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/\s@]+)@")
_QUERY_SECRET = re.compile(
    r"(?P<name>[?&][^=&\s]*(?:key|token|secret|password|passwd|pwd|signature)[^=&\s]*=)(?P<value>[^&\s#]+)",
    re.IGNORECASE)


def mask_url(url: str) -> str:
    """``url`` with its user info and secret-looking query values replaced by ``***``; else unchanged."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return mask_text(url)
    netloc = parts.netloc
    if "@" in netloc:
        netloc = f"{MASK}@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, MASK if _SECRET_QUERY.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def mask_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Free text (a log message, an error) with URL credentials and the given secret values masked."""
    out = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    out = _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", out)
    for s in secrets:
        if s:
            out = out.replace(s, MASK)
    return out


_WALKED = (SecretStr, BaseModel, dict, list, tuple, str)


def _public(key: str, value: Any) -> Any:
    if isinstance(value, SecretStr):
        return MASK if value.get_secret_value() else ""
    if isinstance(value, BaseModel):
        return public_settings(value)
    if isinstance(value, dict):
        return {k: _public(str(k), v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_public(key, v) for v in value]
    if isinstance(value, str):
        if value and any(n in key.lower() for n in SECRET_NAMES):
            return MASK
        return mask_url(value)
    return value


def public_settings(model: BaseModel) -> dict[str, Any]:
    """A JSON-ready dump of a settings object (or section) with every secret masked.

    Secrets (``SecretStr`` fields, fields named like one, URL user info, secret query values, secret keys
    inside the free-form ``extra`` dicts) show as ``***`` when set and as ``""`` when unset, so a reader
    still sees *whether* a credential is configured.
    """
    plain = model.model_dump(mode="json")  # other values (paths, numbers, None) as JSON types
    out: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        out[name] = _public(name, value) if isinstance(value, _WALKED) else plain[name]
    return out


def secret_values(model: BaseModel) -> list[str]:
    """Every non-empty secret in a settings object, for :class:`RedactingFilter`."""
    out: list[str] = []
    for name in type(model).model_fields:
        v = getattr(model, name)
        if isinstance(v, SecretStr) and v.get_secret_value():
            out.append(v.get_secret_value())
        elif isinstance(v, BaseModel):
            out += secret_values(v)
        elif isinstance(v, dict):
            out += [str(x) for k, x in v.items() if any(n in str(k).lower() for n in SECRET_NAMES) and x]
    return out


class RedactingFilter(logging.Filter):
    """Masks URL credentials and the configured secrets in every record a handler emits.

    Installed on the root handlers by ``gpl`` (``install``): libraries log URLs and errors we do not
    format ourselves (an HTTP client's "connecting to http://user:pass@..."), so masking at our own call
    sites alone would miss them. The record is rewritten once into its final message.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        # longest first: a secret that contains another is masked whole
        self.secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to the handler to report
            return True
        masked = mask_text(message, self.secrets)
        if masked != message:
            record.msg, record.args = masked, None
        if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
            record.exc_text = mask_text(logging.Formatter().formatException(record.exc_info), self.secrets)
        elif record.exc_text:
            record.exc_text = mask_text(record.exc_text, self.secrets)
        return True


def install(settings: BaseModel, logger: logging.Logger | None = None) -> RedactingFilter:
    """Put a :class:`RedactingFilter` with the settings' secrets on every handler of ``logger`` (root)."""
    flt = RedactingFilter(secret_values(settings))
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(flt)
    return flt
