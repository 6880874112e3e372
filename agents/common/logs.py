"""Logging set-up shared by the agents: text for people, JSON for log shippers.

Secrets never reach a log line: config is logged through `settings.redacted`,
and `SecretFilter` masks anything that looks like a bearer token, HTTP Basic
credentials or a `key=value` secret that a library might print. Where the
secrets are known (an IdP's answer to a request that carried them),
`mask_known_secrets` masks every piece of them an echo could show.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import IO, Any, Final

_SECRET_PATTERNS = (
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+"),
    re.compile(
        # Not after "-", "/" or ".": "hello-token: cannot" and ".../oauth/token: 400"
        # name a Secret or a URL, not a value.
        r"(?i)((?<![\w./-])(?:access_token|refresh_token|client_secret|password|token)"
        r"[\"']?\s*[:=]\s*[\"']?)"
        r"[^\s\"',}]+"
    ),
)

# Attributes every LogRecord has; anything else was passed through `extra=`.
_STANDARD_ATTRS = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


# HTTP Basic credentials (RFC 7617): base64 of "id:secret", in any case, maybe
# URL-encoded ("%3D" padding). A lower-case word ("basic authentication") stays.
_BASIC: Final = re.compile(r"(?i)\b(basic\s+)([A-Za-z0-9+/_.~%-]{6,}=*)")

REDACTED: Final = "<redacted>"
SECRET_WINDOW: Final = 8
"""Any run of this many characters of a known secret is masked: a prefix of a
refresh token, or the token upper-cased, tells as much as the token."""
SHORT_SECRET: Final = 6
"""Known secrets shorter than the window are masked whole from this length;
masking every "abc" would garble the text, and so short a value is no secret
worth the name."""


def mask_secrets(text: str) -> str:
    """Replace token-looking values in `text` by '<redacted>'."""
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1<redacted>", text)
    return _BASIC.sub(_mask_basic, text)


def _mask_basic(match: re.Match[str]) -> str:
    value = match.group(2)
    if value.isalpha() and value.islower():
        return match.group(0)
    return f"{match.group(1)}{REDACTED}"


def _fold(text: str) -> str:
    """Lower case, one character for one (str.lower() turns some into two)."""
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c if len(c.lower()) != 1 else c.lower() for c in text)


def mask_known_secrets(text: str, secrets: Iterable[str]) -> str:
    """`text` with every run that shares SECRET_WINDOW characters with one of
    `secrets`, in any case, replaced by '<redacted>' (shorter secrets of
    SHORT_SECRET characters or more: their whole occurrences).

    One set of the text's windows, and one look-up per window of each secret:
    linear in the text plus the secrets, however many secrets, and no pattern
    is built from them.
    """
    folded = _fold(text)
    hidden = bytearray(len(text))
    windows: dict[str, list[int]] = {}
    for i in range(len(folded) - SECRET_WINDOW + 1):
        windows.setdefault(folded[i : i + SECRET_WINDOW], []).append(i)
    for secret in secrets:
        key = _fold(secret)
        if len(key) < SECRET_WINDOW:
            if len(key) >= SHORT_SECRET:
                at = folded.find(key)
                while at >= 0:
                    hidden[at : at + len(key)] = b"\x01" * len(key)
                    at = folded.find(key, at + 1)
            continue
        if not windows:
            continue
        for j in range(len(key) - SECRET_WINDOW + 1):
            found = windows.pop(key[j : j + SECRET_WINDOW], None)
            if found is not None:
                for i in found:
                    hidden[i : i + SECRET_WINDOW] = b"\x01" * SECRET_WINDOW
    if not any(hidden):
        return text
    parts: list[str] = []
    i = 0
    while i < len(text):
        if hidden[i]:
            while i < len(text) and hidden[i]:
                i += 1
            parts.append(REDACTED)
        else:
            start = i
            while i < len(text) and not hidden[i]:
                i += 1
            parts.append(text[start:i])
    return "".join(parts)


class SecretFilter(logging.Filter):
    """Masks secrets in the rendered message before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = mask_secrets(message)
        if masked != message:
            record.msg, record.args = masked, None
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and isinstance(value, str):
                setattr(record, key, mask_secrets(value))
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = mask_secrets(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` with extra fields appended."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD_ATTRS and not key.startswith("_")
        ]
        if extras:
            first, nl, rest = text.partition("\n")
            text = f"{first} {' '.join(extras)}{nl}{rest}"
        return mask_secrets(text) if record.exc_info else text


_HANDLER_NAME = "node-agents"


def setup_logging(level: str = "info", fmt: str = "text", stream: IO[str] | None = None) -> None:
    """Configure the root logger once per process (later calls replace it)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(SecretFilter())
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    # Replace only our own handler: others (a test runner's capture) stay.
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The kubernetes client logs request bodies at debug level.
    logging.getLogger("kubernetes").setLevel(max(root.level, logging.INFO))
    logging.getLogger("urllib3").setLevel(max(root.level, logging.WARNING))
