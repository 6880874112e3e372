"""Log output as a person or a log shipper sees it, and secrets that must never show."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator

import pytest

from agents.common.logs import mask_known_secrets, mask_secrets, setup_logging

LOGGER = "agents.demo"

# (message, the secret inside it): shapes a token endpoint or an HTTP library prints.
SECRET_MESSAGES = [
    pytest.param(
        "GET /apis Authorization: Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_~+/=",
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln-_~+/=",
        id="bearer",
    ),
    pytest.param(
        "token endpoint answered access_token=AT-s3cr3t-0123&expires_in=3600",
        "AT-s3cr3t-0123",
        id="access_token",
    ),
    pytest.param(
        'token endpoint answered {"refresh_token": "RT-s3cr3t-4567", "expires_in": 3600}',
        "RT-s3cr3t-4567",
        id="refresh_token-json",
    ),
    pytest.param(
        "posting grant_type=refresh_token&client_secret=CS-s3cr3t-89ab to the endpoint",
        "CS-s3cr3t-89ab",
        id="client_secret",
    ),
]


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers; put the test runner's back afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quieted = {name: logging.getLogger(name).level for name in ("kubernetes", "urllib3")}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, old in quieted.items():
        logging.getLogger(name).setLevel(old)


def capture(fmt: str, level: str = "info") -> io.StringIO:
    stream = io.StringIO()
    setup_logging(level, fmt, stream)
    return stream


def log_exception(message: str) -> None:
    """Log an exception whose text (not its source line) carries `message`."""
    try:
        raise RuntimeError(message)
    except RuntimeError:
        logging.getLogger(LOGGER).exception("token refresh failed")


# --- JSON ---------------------------------------------------------------------


def test_json_line_has_time_level_logger_message_and_extras() -> None:
    stream = capture("json")
    logging.getLogger(LOGGER).info("swept %d roots", 2, extra={"root": "/cvmfs", "healed": 1})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"])
    assert entry["level"] == "info"
    assert entry["logger"] == LOGGER
    assert entry["message"] == "swept 2 roots"
    assert entry["root"] == "/cvmfs"
    assert entry["healed"] == 1


def test_json_one_valid_object_per_record_even_with_newlines() -> None:
    stream = capture("json")
    log = logging.getLogger(LOGGER)
    log.warning("first\nsecond line")
    log.error("other", extra={"path": "/cvmfs/a b"})
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["message"] for line in lines] == ["first\nsecond line", "other"]
    assert [json.loads(line)["level"] for line in lines] == ["warning", "error"]


def test_json_exception_field() -> None:
    stream = capture("json")
    log_exception("mount is severed")
    entry = json.loads(stream.getvalue())
    assert entry["message"] == "token refresh failed"
    assert "RuntimeError: mount is severed" in entry["exception"]
    assert "Traceback" in entry["exception"]


def test_json_extra_that_json_cannot_encode_is_stringified() -> None:
    stream = capture("json")
    logging.getLogger(LOGGER).info("state", extra={"roots": {"/cvmfs"}})
    assert json.loads(stream.getvalue())["roots"] == "{'/cvmfs'}"


# --- text ---------------------------------------------------------------------


def test_text_line_appends_extras() -> None:
    stream = capture("text")
    logging.getLogger(LOGGER).info("swept %d roots", 2, extra={"root": "/cvmfs", "healed": 1})
    line = stream.getvalue().rstrip("\n")
    assert "\n" not in line
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO agents\.demo: ", line)
    assert line.endswith("agents.demo: swept 2 roots root=/cvmfs healed=1")


def test_text_extras_go_on_the_first_line_before_the_traceback() -> None:
    stream = capture("text")
    try:
        raise RuntimeError("mount is severed")
    except RuntimeError:
        logging.getLogger(LOGGER).exception("sweep failed", extra={"root": "/cvmfs"})
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR agents.demo: sweep failed root=/cvmfs")
    assert rest[0].startswith("Traceback")
    assert rest[-1] == "RuntimeError: mount is severed"


# --- levels and set-up ----------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_level_filters(fmt: str) -> None:
    stream = capture(fmt, level="warning")
    log = logging.getLogger(LOGGER)
    log.info("hidden")
    log.warning("shown")
    assert "hidden" not in stream.getvalue()
    assert "shown" in stream.getvalue()


def test_debug_level_shows_debug() -> None:
    stream = capture("text", level="debug")
    logging.getLogger(LOGGER).debug("probe detail")
    assert "DEBUG agents.demo: probe detail" in stream.getvalue()


def test_debug_level_keeps_kubernetes_client_quiet() -> None:
    stream = capture("text", level="debug")
    logging.getLogger("kubernetes.client.rest").debug("response body: {...}")
    logging.getLogger("urllib3.connectionpool").info("connection pool detail")
    assert stream.getvalue() == ""


def test_setup_again_replaces_the_handler() -> None:
    first = capture("text")
    second = capture("json")
    logging.getLogger(LOGGER).info("once")
    assert first.getvalue() == ""
    assert len(second.getvalue().splitlines()) == 1


# --- secrets --------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(("message", "secret"), SECRET_MESSAGES)
def test_secret_in_message_is_masked(fmt: str, message: str, secret: str) -> None:
    stream = capture(fmt)
    logging.getLogger(LOGGER).info(message)
    output = stream.getvalue()
    assert secret not in output
    assert "<redacted>" in output


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(("message", "secret"), SECRET_MESSAGES)
def test_secret_in_message_argument_is_masked(fmt: str, message: str, secret: str) -> None:
    stream = capture(fmt)
    logging.getLogger(LOGGER).warning("response: %s", message)
    output = stream.getvalue()
    assert secret not in output
    assert "<redacted>" in output


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize(("message", "secret"), SECRET_MESSAGES)
def test_secret_in_exception_traceback_is_masked(fmt: str, message: str, secret: str) -> None:
    stream = capture(fmt)
    log_exception(message)
    output = stream.getvalue()
    assert "RuntimeError" in output
    assert secret not in output
    assert "<redacted>" in output


def test_masking_keeps_the_key_and_the_rest_of_the_line() -> None:
    masked = mask_secrets("POST client_secret=CS-1 grant_type=x; Authorization: Bearer abc.def")
    assert masked == "POST client_secret=<redacted> grant_type=x; Authorization: Bearer <redacted>"


def test_words_that_only_contain_token_are_not_masked() -> None:
    text = "token_expiry_seconds=3600 refreshed tokens: 2"
    assert mask_secrets(text) == text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_secret_in_extra_field_is_masked(fmt: str) -> None:
    stream = capture(fmt)
    logging.getLogger(LOGGER).info(
        "calling the API", extra={"authorization": "Bearer eyJhbGciOiJSUzI1NiJ9.c2ln"}
    )
    assert "eyJhbGciOiJSUzI1NiJ9.c2ln" not in stream.getvalue()


# -- known secrets: every piece of them, in any case ---------------------------

KNOWN = "Rt-6aB1cD4eF7gH0iJ3kL5mN8oPqR"


@pytest.mark.parametrize(
    "text",
    [
        f"the token {KNOWN} is revoked",
        f"refresh token starting {KNOWN[:8]}",
        f"refresh token ending {KNOWN[-9:]}.",
        f"your token {KNOWN.upper()} and {KNOWN.lower()}",
        f"twice: {KNOWN[2:14]} {KNOWN[10:30]}",
    ],
)
def test_every_8_character_piece_of_a_known_secret_is_masked_in_any_case(text: str) -> None:
    masked = mask_known_secrets(text, [KNOWN, "other-secret-value"])
    folded = masked.lower()
    assert "<redacted>" in masked
    assert not [i for i in range(len(KNOWN) - 7) if KNOWN[i : i + 8].lower() in folded], masked


def test_known_secret_masking_keeps_everything_else() -> None:
    text = "invalid_grant: the refresh token was refused for client tenant-client"
    assert mask_known_secrets(text, [KNOWN, "s3cr3t"]) == text
    assert mask_known_secrets("client secret s3cr3t! S3CR3T", ["s3cr3t"]) == (
        "client secret <redacted>! <redacted>"
    )
    assert mask_known_secrets("abc abc", ["abc"]) == "abc abc"  # too short to be a secret


def test_known_secret_masking_is_linear_not_a_pattern_per_piece() -> None:
    """A 600 kB token (a tenant's) and a 2 KB echo: well under a second."""
    huge = "".join(f"{i:07x}Z" for i in range(75_000))
    text = "echo: " + huge[300_000:301_000] + " and " + huge[-900:].upper()
    started = time.monotonic()
    masked = mask_known_secrets(text, [huge, KNOWN])
    assert time.monotonic() - started < 1.0
    assert masked == "echo: <redacted> and <redacted>"


@pytest.mark.parametrize(
    "text",
    [
        "Authorization: Basic dGVuYW50LWNsaWVudDpDcy05ZksyeFE3bVo0cEw4dk4zdFI2d1kx",
        "authorization: basic dGVuYW50LWNsaWVudDpDcy05ZksyeFE3bVo0cEw4dk4zdFI2d1kx",
        "AUTHORIZATION: BASIC DGVUYW50LWNSAWVUDDPDCY05ZKSYEFE3BVO0CEW4DK4ZDFI2D1KX",
        "Basic%20dGVuYW50LWNsaWVudDpDcy05ZksyeFE3bVo0cEw4dk4zdFI2d1kx%3D",
    ],
)
def test_http_basic_credentials_are_masked_in_any_case(text: str) -> None:
    masked = mask_secrets(text.replace("%20", " "))
    assert masked.lower().endswith("basic <redacted>"), masked


def test_the_word_basic_alone_is_kept() -> None:
    assert mask_secrets("falling back to basic authentication") == (
        "falling back to basic authentication"
    )
