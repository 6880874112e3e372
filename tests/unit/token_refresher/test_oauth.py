"""Token JSON, the refresh-token grant against a real OAuth2 server (Canaille
through pytest-iam, on loopback, over TLS with a throwaway CA), and failures
at the protocol boundary: a stub token endpoint, a refused port, a silent one.

Every test runs with DEBUG logging captured; afterwards no token, client
secret or password may appear in a record of the client side (ours, requests,
urllib3, oauthlib). The IdP's own loggers are left out: in production it is
another process, and authlib does log the tokens it issues.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import random
import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

import pytest
import requests

from agents.token_refresher.oauth import (
    FINAL_KINDS,
    RETRYABLE_KINDS,
    TOKEN_LOGGERS,
    Backoff,
    FinalError,
    InsecureURLError,
    RefreshError,
    RetryableError,
    Token,
    TokenFormatError,
    check_token_url,
    decode_token_json,
    quiet_token_loggers,
    refresh,
)
from tests.support.idp import IDP_LOGGERS, TestIdP, closed_port, silent_port

NOW = 1_700_000_000.0

# The seed text's example Secret (a Keycloak token response), with made-up
# values and without the stray "}" the blog post has after the object.
KEYCLOAK_SEED = json.dumps(
    {
        "access_token": "eyJhb-AT-SEED-0001",
        "expires_in": 1199,
        "refresh_expires_in": 0,
        "refresh_token": "eyJhbG-RT-SEED-0002",
        "token_type": "Bearer",
        "not-before-policy": 1643110683,
        "session_state": "5d5e8bc2-6557-4453-9ba2-8ed99be6c898",
        "scope": "offline_access profile email",
    }
)
STUB_ACCESS = "AT-STUB-s3cr3t-0003"
STUB_REFRESH = "RT-STUB-s3cr3t-0004"
STUB_NEW_ACCESS = "AT-STUB-s3cr3t-0005"
STUB_NEW_REFRESH = "RT-STUB-s3cr3t-0006"
STUB_CLIENT_SECRET = "CS-STUB s3cr3t+/:%-0007"
# Every secret a stub test handles: none may reach a log record.
STUB_SECRETS = {
    "eyJhb-AT-SEED-0001",
    "eyJhbG-RT-SEED-0002",
    STUB_ACCESS,
    STUB_REFRESH,
    STUB_NEW_ACCESS,
    STUB_NEW_REFRESH,
    STUB_CLIENT_SECRET,
}
STUB_TOKEN = Token(STUB_ACCESS, STUB_REFRESH, expires_at=NOW + 60, issued_at=NOW - 240)


# -- fixtures ---------------------------------------------------------------


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy or CA bundle from the developer's or CI's environment."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture(scope="module")
def idp_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestIdP]:
    """One IdP for the module (Canaille takes about a second to start)."""
    with TestIdP(tls=True, workdir=tmp_path_factory.mktemp("idp")) as idp:
        assert idp.ca_bundle and idp.token_url.startswith("https://")
        yield idp


@pytest.fixture
def idp(idp_server: TestIdP) -> Iterator[TestIdP]:
    """The module's IdP, rotating refresh tokens, one-hour tokens."""
    idp_server.rotate = True
    idp_server.lifetime = 3600
    idp_server.refresh_lifetime = None
    yield idp_server
    idp_server.rotate = True
    idp_server.lifetime = 3600
    idp_server.refresh_lifetime = None


@pytest.fixture(autouse=True)
def token_free_logs(
    caplog: pytest.LogCaptureFixture, request: pytest.FixtureRequest
) -> Iterator[None]:
    """Everything at DEBUG is captured; no secret may show in a client-side record."""
    saved = {name: logging.getLogger(name).level for name in TOKEN_LOGGERS}
    caplog.set_level(logging.DEBUG)
    quiet_token_loggers()
    try:
        yield
        secrets = set(STUB_SECRETS)
        if "idp_server" in request.fixturenames:
            secrets |= request.getfixturevalue("idp_server").known_secrets()
        # In teardown `caplog.records` holds the teardown's records only.
        records = caplog.get_records("setup") + caplog.get_records("call")
        leaks = [
            f"{record.name}: {record.levelname}"
            for record in records
            if not record.name.startswith(IDP_LOGGERS)
            for text in [_rendered(record)]
            if any(secret in text for secret in secrets)
        ]
        assert not leaks, f"secrets in log records: {leaks}"
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _rendered(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info:
        text += logging.Formatter().formatException(record.exc_info)
    return text


class StubTokenEndpoint:
    """A token endpoint that answers what the test sets, and records what it got."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: dict[str, str] = {"Content-Type": "application/json"}
        self.body = b"{}"
        self.received: list[tuple[dict[str, str], bytes]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                stub.received.append((dict(self.headers), self.rfile.read(length)))
                self.send_response(stub.status)
                for name, value in stub.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(stub.body)))
                self.end_headers()
                self.wfile.write(stub.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/token"

    def answer(
        self, status: int, body: bytes | str | dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        if isinstance(body, dict):
            body = json.dumps(body)
        self.body = body.encode() if isinstance(body, str) else body
        self.headers = headers if headers is not None else {"Content-Type": "application/json"}

    def form(self, index: int = -1) -> dict[str, list[str]]:
        return parse_qs(self.received[index][1].decode())


@pytest.fixture
def stub() -> Iterator[StubTokenEndpoint]:
    endpoint = StubTokenEndpoint()
    thread = threading.Thread(
        target=endpoint._server.serve_forever, kwargs={"poll_interval": 0.05}, name="stub-idp"
    )
    thread.start()
    try:
        yield endpoint
    finally:
        endpoint._server.shutdown()
        thread.join(timeout=5)
        endpoint._server.server_close()


def stub_refresh(stub: StubTokenEndpoint, **kwargs: Any) -> Token:
    options: dict[str, Any] = {"allow_http": True, "timeout": 5.0, "now": NOW}
    options.update(kwargs)
    return refresh(stub.url, STUB_TOKEN, "stub-client", STUB_CLIENT_SECRET, **options)


def assert_no_secret(err: BaseException, secrets: set[str]) -> None:
    texts = [str(err), repr(err)]
    assert not [s for s in secrets for text in texts if s in text], texts


# -- Token JSON ---------------------------------------------------------------


def test_the_seed_tools_keycloak_json_parses() -> None:
    token = Token.from_json(KEYCLOAK_SEED, NOW)

    assert token.access_token == "eyJhb-AT-SEED-0001"
    assert token.refresh_token == "eyJhbG-RT-SEED-0002"
    assert token.token_type == "Bearer"
    assert token.scope == "offline_access profile email"
    assert token.expires_at == NOW + 1199
    assert token.issued_at == NOW
    assert token.lifetime(NOW + 199) == 1000
    assert not token.expired(NOW + 1198)
    assert token.expired(NOW + 1199)
    # refresh_expires_in 0: Keycloak's offline token, no fixed refresh expiry.
    assert token.offline and token.refresh_expires_at is None
    assert token.extra == {
        "not-before-policy": 1643110683,
        "session_state": "5d5e8bc2-6557-4453-9ba2-8ed99be6c898",
    }


def test_stored_json_keeps_absolute_expiry_and_a_consistent_expires_in() -> None:
    token = Token.from_json(KEYCLOAK_SEED, NOW)

    stored = json.loads(token.to_json(now=NOW + 100.5))

    assert stored["expires_at"] == int(NOW + 1199)
    assert stored["expires_in"] == 1098  # rounded down: never a longer life
    assert stored["issued_at"] == int(NOW)
    assert stored["session_state"] == "5d5e8bc2-6557-4453-9ba2-8ed99be6c898"
    assert stored["refresh_expires_in"] == 0
    # Read back later: the absolute time wins over the (now stale) expires_in.
    again = Token.from_json(json.dumps(stored), NOW + 5000)
    assert again == token
    assert json.loads(Token.from_json('{"access_token": "a"}', NOW).to_json(NOW)) == {
        "access_token": "a",
        "token_type": "Bearer",
    }


def test_keycloaks_refresh_expiry_is_stored_absolute_and_read_back() -> None:
    answer = (
        '{"access_token": "a", "refresh_token": "r", "expires_in": 300, "refresh_expires_in": 1800}'
    )
    token = Token.from_json(answer, NOW)
    assert token.refresh_expires_at == NOW + 1800 and not token.offline

    stored = json.loads(token.to_json(now=NOW + 100.5))

    assert stored["refresh_expires_at"] == int(NOW + 1800)
    assert stored["refresh_expires_in"] == 1699  # rounded down, as expires_in
    # Read back much later: the absolute time wins over the stale relative one.
    again = Token.from_json(json.dumps(stored), NOW + 5000)
    assert again.refresh_expires_at == int(NOW + 1800) and not again.offline
    assert again.refresh_lifetime(NOW + 1000, offline_idle=99) == int(NOW + 1800) - NOW - 1000
    # An offline token stays one, and its chain ends once unused for the idle time.
    offline = Token.from_json(Token.from_json(KEYCLOAK_SEED, NOW).to_json(NOW), NOW + 60)
    assert offline.offline and offline.refresh_lifetime(NOW + 10, offline_idle=1000) == 990
    assert Token("a", "r").refresh_lifetime(NOW, offline_idle=1000) is None


def test_refresh_is_due_before_the_earlier_of_the_two_expiries() -> None:
    # The access token lives 30 s, its refresh token 3 s: refresh at ~80 % of 3 s.
    token = Token("a", "r", expires_at=NOW + 30, issued_at=NOW, refresh_expires_at=NOW + 3)
    assert token.refresh_due(NOW, jitter_fraction=0, min_interval=0) == NOW + 2.4
    # A refresh token that outlives the access token changes nothing.
    longer = Token("a", "r", expires_at=NOW + 1000, issued_at=NOW, refresh_expires_at=NOW + 1800)
    assert longer.refresh_due(NOW, jitter_fraction=0) == NOW + 800
    # Only a refresh expiry known: that is the lifetime.
    only = Token("a", "r", issued_at=NOW, refresh_expires_at=NOW + 100)
    assert only.refresh_due(NOW, jitter_fraction=0) == NOW + 80


def test_expires_at_wins_over_expires_in_in_stored_json() -> None:
    text = '{"access_token": "a", "expires_in": 10, "expires_at": "1700000500.5"}'

    assert Token.from_json(text, NOW).expires_at == NOW + 500.5


def test_optional_fields_default() -> None:
    token = Token.from_json(b'{"access_token": "a", "scope": ["openid", "email"]}', NOW)

    assert token.refresh_token == ""
    assert token.token_type == "Bearer"
    assert token.scope == "openid email"
    assert token.expires_at is None
    assert token.lifetime(NOW) is None
    assert not token.expired(NOW + 10**9)


@pytest.mark.parametrize(
    ("tail", "stray"),
    [
        pytest.param("}", 1, id="blog-post-typo"),
        pytest.param(" }\n}\t\r\n", 2, id="braces-and-whitespace"),
        pytest.param("\n", 0, id="whitespace-only"),
    ],
)
def test_stray_closing_braces_after_the_object_are_ignored_and_counted(
    tail: str, stray: int
) -> None:
    """The CERN blog's example Secret, copied as printed, ends in `}}`."""
    data, ignored = decode_token_json(" " + KEYCLOAK_SEED + tail)

    assert data == json.loads(KEYCLOAK_SEED) and ignored == stray
    assert decode_token_json((KEYCLOAK_SEED + tail).encode()) == (data, stray)
    assert Token.from_json(KEYCLOAK_SEED + tail, NOW) == Token.from_json(KEYCLOAK_SEED, NOW)


GARBAGE = [
    pytest.param("", "not valid JSON", id="empty"),
    pytest.param('{"access_token": "AT-SECRET-GARBAGE", ', "not valid JSON", id="truncated"),
    pytest.param(KEYCLOAK_SEED + "}]", "not valid JSON (Extra data)", id="brace-then-bracket"),
    pytest.param(KEYCLOAK_SEED + '} "AT-SECRET-GARBAGE"', "(Extra data)", id="brace-then-more"),
    pytest.param(KEYCLOAK_SEED + "{}", "not valid JSON (Extra data)", id="two-objects"),
    pytest.param("}", "not valid JSON (Expecting value)", id="only-a-brace"),
    pytest.param(b"\xff\xfe\x00garbage", "not valid JSON", id="binary"),
    pytest.param('["AT-SECRET-GARBAGE"]', "must be an object, not an array", id="array"),
    pytest.param("null", "must be an object, not null", id="null"),
    pytest.param('"AT-SECRET-GARBAGE"', "must be an object, not a string", id="string"),
    pytest.param('{"refresh_token": "RT-SECRET-GARBAGE"}', "has no access_token", id="no-access"),
    pytest.param('{"access_token": ""}', "has no access_token", id="empty-access"),
    pytest.param('{"access_token": 12345}', "access_token must be a string", id="number-access"),
    pytest.param(
        '{"access_token": "AT-SECRET-GARBAGE", "refresh_token": 7}',
        "refresh_token must be a string",
        id="number-refresh",
    ),
    pytest.param(
        '{"access_token": "AT-SECRET-GARBAGE", "expires_in": "soon"}',
        "expires_in must be a number of seconds",
        id="expires-in-word",
    ),
    pytest.param(
        '{"access_token": "AT-SECRET-GARBAGE", "expires_in": true}',
        "expires_in must be a number",
        id="expires-in-bool",
    ),
    pytest.param(
        '{"access_token": "AT-SECRET-GARBAGE", "expires_at": NaN}',
        "expires_at must be a number",
        id="expires-at-nan",
    ),
    pytest.param(
        '{"access_token": "AT-SECRET-GARBAGE", "scope": {"a": 1}}',
        "scope must be a string",
        id="scope-object",
    ),
]


@pytest.mark.parametrize(("text", "message"), GARBAGE)
def test_unusable_json_is_a_clear_error_without_the_tokens(text: str | bytes, message: str) -> None:
    with pytest.raises(
        TokenFormatError, match=message.replace("(", r"\(").replace(")", r"\)")
    ) as caught:
        Token.from_json(text, NOW)

    assert isinstance(caught.value, ValueError)
    secrets = {"AT-SECRET-GARBAGE", "RT-SECRET-GARBAGE", "eyJhb-AT-SEED-0001", "eyJhbG-RT-SEED"}
    assert_no_secret(caught.value, secrets)
    # The JSON decoder keeps the whole document on its exception: not chained.
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_tokens_never_show_in_repr_or_str(caplog: pytest.LogCaptureFixture) -> None:
    token = Token.from_json(
        json.dumps({**json.loads(KEYCLOAK_SEED), "id_token": "ID-SECRET-0008"}), NOW
    )

    for text in (repr(token), str(token), f"{token!s} {token!r}", repr([token])):
        assert "eyJhb-AT-SEED-0001" not in text
        assert "eyJhbG-RT-SEED-0002" not in text
        assert "ID-SECRET-0008" not in text
    assert "refresh_token=<redacted>" in repr(token)
    assert "'id_token'" in repr(token)  # which fields there are is not a secret
    assert "refresh_token=<none>" in repr(Token("a"))
    logging.getLogger("agents.test").debug("token %s %r", token, token)
    assert "ID-SECRET-0008" not in caplog.text


# -- when to refresh ------------------------------------------------------------


def test_refresh_is_due_at_about_80_percent_of_the_lifetime() -> None:
    token = Token("a", "r", expires_at=NOW + 1000, issued_at=NOW)
    rng = random.Random(7)

    dues = [token.refresh_due(NOW + 500, rng=rng) for _ in range(500)]

    assert all(NOW + 700 <= due <= NOW + 900 for due in dues)
    assert max(dues) - min(dues) > 150  # jitter spreads Secrets seeded together
    assert token.refresh_due(NOW, jitter_fraction=0) == NOW + 800
    assert token.refresh_due(NOW, fraction=0.5, jitter_fraction=0) == NOW + 500


def test_refresh_due_without_issue_time_counts_from_now() -> None:
    token = Token("a", "r", expires_at=NOW + 1000)

    assert token.refresh_due(NOW + 500, jitter_fraction=0) == NOW + 900
    # Expired: due at once (a time not after now).
    assert token.refresh_due(NOW + 2000) == NOW + 2000


def test_a_token_without_expiry_is_refreshed_after_the_idle_window() -> None:
    token = Token("a", "r", issued_at=NOW)
    rng = random.Random(3)

    dues = [token.refresh_due(NOW + 10, rng=rng, idle_window=600) for _ in range(200)]

    assert all(NOW + 540 <= due <= NOW + 660 for due in dues)
    assert Token("a", "r").refresh_due(NOW, jitter_fraction=0, idle_window=60) == NOW + 60


def test_a_zero_lifetime_does_not_make_a_refresh_loop() -> None:
    token = Token("a", "r", expires_at=NOW, issued_at=NOW)

    assert token.refresh_due(NOW) == NOW + 10
    assert token.refresh_due(NOW, min_interval=0) == NOW


@pytest.mark.parametrize(
    ("fraction", "jitter"), [(0.0, 0.0), (1.0, 0.0), (0.8, 0.2), (0.1, 0.1), (0.5, -0.1)]
)
def test_refresh_fractions_outside_the_lifetime_are_refused(fraction: float, jitter: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        Token("a", "r", expires_at=NOW).refresh_due(NOW, fraction=fraction, jitter_fraction=jitter)


def test_backoff_doubles_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(base=2.0, cap=60.0, rng=random.Random(1))

    assert backoff.next_delay(0) == 0.0
    for failures, ceiling in [(1, 2.0), (2, 4.0), (3, 8.0), (5, 32.0), (6, 60.0), (50, 60.0)]:
        delays = [backoff.next_delay(failures) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays), failures
        assert max(delays) - min(delays) > ceiling / 4
    assert backoff.next_delay(10**6) <= 60.0  # no overflow


def test_backoff_honours_a_longer_retry_after_up_to_its_cap() -> None:
    backoff = Backoff(base=1.0, cap=10.0, retry_after_cap=120.0, rng=random.Random(1))

    assert backoff.next_delay(1, retry_after=30.0) == 30.0
    assert backoff.next_delay(1, retry_after=0.1) <= 1.0
    assert 5.0 <= backoff.next_delay(20, retry_after=2.0) <= 10.0
    assert backoff.next_delay(1, retry_after=86400.0) == 120.0
    assert backoff.next_delay(0, retry_after=5.0) == 5.0
    with pytest.raises(ValueError):
        Backoff(base=10.0, cap=1.0)


# -- against the real IdP -------------------------------------------------------


def test_a_chain_of_six_refreshes_rotates_and_never_breaks(idp: TestIdP) -> None:
    token = Token.from_json(idp.issue(), time.time())
    calls_before = idp.token_calls("refresh_token")

    for _ in range(6):
        sent = time.time()
        new = refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=idp.verify)

        assert new.refresh_token and new.refresh_token != token.refresh_token
        assert new.access_token != token.access_token
        assert idp.access_token_works(new.access_token)
        assert new.issued_at == pytest.approx(sent, abs=0.01)
        assert new.expires_at == pytest.approx(sent + 3600, abs=0.01)
        assert new.scope == "openid profile"
        # The old refresh token was used once: the IdP refuses it now, for good.
        with pytest.raises(FinalError) as caught:
            refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=idp.verify)
        assert caught.value.kind == "invalid_grant"
        assert caught.value.status == 400
        assert_no_secret(caught.value, idp.known_secrets())
        # Stored and read back, as the controller keeps it in the Secret.
        token = Token.from_json(new.to_json(), time.time())

    assert idp.token_calls("refresh_token") - calls_before == 12
    assert {c.client_auth for c in idp.calls} == {"basic"}
    assert {c.scheme for c in idp.calls} == {"https"}


def test_client_secret_post_sends_the_credentials_in_the_body(idp: TestIdP) -> None:
    client = idp.add_client(auth_method="client_secret_post")
    token = Token.from_json(idp.issue(client), time.time())
    calls_before = len(idp.calls)

    new = refresh(
        idp.token_url,
        token,
        client.client_id,
        client.client_secret,
        auth_method="client_secret_post",
        verify=idp.verify,
    )

    assert new.refresh_token != token.refresh_token
    assert [c.client_auth for c in idp.calls[calls_before:]] == ["post"]
    # This client is registered for client_secret_post: HTTP Basic is refused.
    with pytest.raises(FinalError) as caught:
        refresh(idp.token_url, new, client.client_id, client.client_secret, verify=idp.verify)
    assert caught.value.kind == "invalid_client"
    assert "client_secret_basic" in str(caught.value)


def test_a_wrong_client_secret_is_final_invalid_client(idp: TestIdP) -> None:
    token = Token.from_json(idp.issue(), time.time())

    with pytest.raises(FinalError) as caught:
        refresh(idp.token_url, token, idp.client_id, "wrong-secret-0009", verify=idp.verify)

    assert caught.value.kind == "invalid_client"
    assert caught.value.status == 401
    assert "check clientID, clientSecret" in str(caught.value)
    assert_no_secret(caught.value, idp.known_secrets() | {"wrong-secret-0009"})
    # The refresh token was not used up: the right secret still works.
    refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=idp.verify)


def test_without_rotation_the_old_refresh_token_is_kept(idp: TestIdP) -> None:
    idp.rotate = False
    token = Token.from_json(idp.issue(), time.time())
    # On the wire: the answer has no refresh_token at all.
    raw = requests.post(
        idp.token_url,
        data={"grant_type": "refresh_token", "refresh_token": token.refresh_token},
        auth=(quote(idp.client_id, safe=""), quote(idp.client_secret, safe="")),
        verify=idp.verify,
        timeout=10,
    )
    assert raw.status_code == 200
    assert "refresh_token" not in raw.json()

    first = refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=idp.verify)
    second = refresh(idp.token_url, first, idp.client_id, idp.client_secret, verify=idp.verify)

    assert first.refresh_token == second.refresh_token == token.refresh_token
    assert first.access_token != second.access_token
    assert idp.access_token_works(second.access_token)


def test_a_keycloak_like_answer_gives_the_refresh_tokens_expiry(idp: TestIdP) -> None:
    idp.refresh_lifetime = 1800
    token = Token.from_json(idp.issue(), time.time())
    sent = time.time()

    new = refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=idp.verify)

    assert new.refresh_expires_at is not None and not new.offline
    assert sent + 1800 <= new.refresh_expires_at <= time.time() + 1800
    idp.refresh_lifetime = 0  # offline_access
    offline = refresh(idp.token_url, new, idp.client_id, idp.client_secret, verify=idp.verify)
    assert offline.offline and offline.refresh_expires_at is None


def test_without_rotation_or_a_new_expiry_the_refresh_tokens_expiry_is_kept(
    stub: StubTokenEndpoint,
) -> None:
    stub.answer(200, {"access_token": "new-at", "expires_in": 60})
    old = Token("old-at", "old-rt", expires_at=NOW, refresh_expires_at=NOW + 500)

    new = refresh(stub.url, old, "c", "s", allow_http=True)

    assert new.refresh_token == "old-rt" and new.refresh_expires_at == NOW + 500


def test_a_token_without_refresh_token_is_final_without_a_request(idp: TestIdP) -> None:
    calls_before = len(idp.calls)

    with pytest.raises(FinalError) as caught:
        refresh(idp.token_url, Token("a"), idp.client_id, idp.client_secret, verify=idp.verify)

    assert caught.value.kind == "no_refresh_token"
    assert len(idp.calls) == calls_before


def test_plain_http_is_refused_unless_allowed(idp: TestIdP) -> None:
    token = Token.from_json(idp.issue(), time.time())
    calls_before = len(idp.calls)

    with pytest.raises(InsecureURLError, match="refusing plain http token URL"):
        refresh(idp.http_token_url, token, idp.client_id, idp.client_secret)
    assert len(idp.calls) == calls_before

    new = refresh(idp.http_token_url, token, idp.client_id, idp.client_secret, allow_http=True)
    assert new.refresh_token != token.refresh_token
    assert idp.calls[-1].scheme == "http"


@pytest.mark.parametrize(
    "url",
    ["ftp://idp.example/token", "https:///token", "idp.example/token", "https://[::1/token"],
)
def test_token_urls_that_are_not_https_urls_are_refused(url: str) -> None:
    with pytest.raises(InsecureURLError):
        check_token_url(url, allow_http=True)
    with pytest.raises(InsecureURLError):
        refresh(url, STUB_TOKEN, "c", STUB_CLIENT_SECRET, allow_http=True)


def test_tls_is_verified_against_the_given_ca_bundle_only(idp: TestIdP) -> None:
    token = Token.from_json(idp.issue(), time.time())
    calls_before = len(idp.calls)

    # The system trust store does not know the throwaway CA.
    with pytest.raises(RetryableError) as caught:
        refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=True)
    assert caught.value.kind == "tls"
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert len(idp.calls) == calls_before  # nothing was sent

    assert refresh(
        idp.token_url, token, idp.client_id, idp.client_secret, verify=idp.verify
    ).refresh_token


def test_requests_ca_bundle_is_honoured_with_verify_true(
    idp: TestIdP, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert idp.ca_bundle
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", idp.ca_bundle)
    token = Token.from_json(idp.issue(), time.time())

    new = refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=True)

    assert new.refresh_token != token.refresh_token


def test_a_given_ca_bundle_wins_over_requests_ca_bundle(
    idp: TestIdP, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert idp.ca_bundle
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", idp.ca_bundle)
    from tests.support.idp import ThrowawayCA

    other = ThrowawayCA(tmp_path / "other")
    token = Token.from_json(idp.issue(), time.time())

    with pytest.raises(RetryableError) as caught:
        refresh(idp.token_url, token, idp.client_id, idp.client_secret, verify=str(other.ca_path))
    assert caught.value.kind == "tls"


def test_requests_oauthlib_logs_tokens_at_debug_until_quietened(
    idp: TestIdP, caplog: pytest.LogCaptureFixture
) -> None:
    """Why `quiet_token_loggers` exists: requests-oauthlib 2.0 (which the
    kubernetes client uses for kubeconfig OIDC) logs token bodies at DEBUG."""
    requests_oauthlib = pytest.importorskip("requests_oauthlib")
    token = Token.from_json(idp.issue(), time.time())
    auth = requests.auth.HTTPBasicAuth(
        quote(idp.client_id, safe=""), quote(idp.client_secret, safe="")
    )

    def session_refresh(refresh_token: str) -> str:
        session = requests_oauthlib.OAuth2Session(idp.client_id)
        try:
            answer = session.refresh_token(
                idp.token_url, refresh_token=refresh_token, auth=auth, verify=idp.verify
            )
        finally:
            session.close()
        return str(answer["refresh_token"])

    logging.getLogger("requests_oauthlib").setLevel(logging.DEBUG)
    second = session_refresh(token.refresh_token)
    assert token.refresh_token in client_side_text(caplog)  # the request body
    assert second in client_side_text(caplog)  # the answer
    caplog.clear()

    quiet_token_loggers()
    third = session_refresh(second)
    assert second not in client_side_text(caplog)
    assert third not in client_side_text(caplog)
    assert "urllib3.connectionpool" in {r.name for r in caplog.records}  # DEBUG is captured


def client_side_text(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(_rendered(r) for r in caplog.records if not r.name.startswith(IDP_LOGGERS))


# -- failures at the protocol boundary --------------------------------------------


def test_a_new_token_from_the_stub_keeps_the_old_refresh_token(stub: StubTokenEndpoint) -> None:
    stub.answer(200, {"access_token": STUB_NEW_ACCESS, "token_type": "bearer", "expires_in": "300"})

    new = stub_refresh(stub)

    assert new.access_token == STUB_NEW_ACCESS
    assert new.refresh_token == STUB_REFRESH
    assert new.expires_at == NOW + 300
    assert new.token_type == "bearer"


def test_http_basic_carries_form_encoded_credentials(stub: StubTokenEndpoint) -> None:
    stub.answer(200, {"access_token": STUB_NEW_ACCESS, "refresh_token": STUB_NEW_REFRESH})

    stub_refresh(stub)

    headers, _ = stub.received[-1]
    scheme, _, encoded = headers["Authorization"].partition(" ")
    assert scheme == "Basic"
    # RFC 6749 section 2.3.1: client id and secret form-encoded, then Basic.
    user, _, password = base64.b64decode(encoded).decode().partition(":")
    assert (user, password) == ("stub-client", quote(STUB_CLIENT_SECRET, safe=""))
    assert stub.form() == {"grant_type": ["refresh_token"], "refresh_token": [STUB_REFRESH]}
    assert headers["Accept"] == "application/json"
    assert headers["Content-Type"] == "application/x-www-form-urlencoded"


@pytest.mark.parametrize(
    ("method", "form"),
    [
        (
            "client_secret_post",
            {"client_id": ["stub-client"], "client_secret": [STUB_CLIENT_SECRET]},
        ),
        ("none", {"client_id": ["stub-client"]}),
    ],
)
def test_body_credentials(stub: StubTokenEndpoint, method: str, form: dict[str, list[str]]) -> None:
    stub.answer(200, {"access_token": STUB_NEW_ACCESS, "refresh_token": STUB_NEW_REFRESH})

    stub_refresh(stub, auth_method=method)

    headers, _ = stub.received[-1]
    assert "Authorization" not in headers
    assert stub.form() == {
        "grant_type": ["refresh_token"],
        "refresh_token": [STUB_REFRESH],
        **form,
    }


def test_an_unknown_auth_method_is_a_value_error(stub: StubTokenEndpoint) -> None:
    with pytest.raises(ValueError, match="unknown auth method"):
        stub_refresh(stub, auth_method="private_key_jwt")
    assert not stub.received


HTTP_DATE = email.utils.formatdate(NOW + 120, usegmt=True)

ANSWERS = [
    pytest.param((500, "<html>oops</html>", {}), (RetryableError, "http_5xx", None), id="500"),
    pytest.param((503, "", {"Retry-After": "7"}), (RetryableError, "http_5xx", 7.0), id="503"),
    pytest.param(
        (429, "", {"Retry-After": "30"}), (RetryableError, "rate_limited", 30.0), id="429"
    ),
    pytest.param(
        (429, "", {"Retry-After": HTTP_DATE}),
        (RetryableError, "rate_limited", 120.0),
        id="429-http-date",
    ),
    pytest.param((429, "", {}), (RetryableError, "rate_limited", None), id="429-bare"),
    pytest.param(
        (400, {"error": "invalid_grant"}, None), (FinalError, "invalid_grant", None), id="grant"
    ),
    pytest.param(
        (401, {"error": "invalid_client"}, None), (FinalError, "invalid_client", None), id="client"
    ),
    pytest.param(
        (400, {"error": "unauthorized_client"}, None),
        (FinalError, "unauthorized_client", None),
        id="unauthorized_client",
    ),
    pytest.param(
        (400, {"error": "unsupported_grant_type"}, None),
        (FinalError, "unsupported_grant_type", None),
        id="unsupported_grant_type",
    ),
    pytest.param(
        (400, {"error": "temporarily_unavailable"}, None),
        (RetryableError, "server_error", None),
        id="temporarily_unavailable",
    ),
    pytest.param(
        (400, {"error": "slow_down"}, None), (RetryableError, "oauth_error", None), id="unknown"
    ),
    pytest.param(
        (200, {"error": "invalid_grant"}, None), (FinalError, "invalid_grant", None), id="200-err"
    ),
    pytest.param((404, "<html>no</html>", {}), (RetryableError, "http_4xx", None), id="404"),
    pytest.param((200, "<html>x</html>", {}), (RetryableError, "bad_response", None), id="html"),
    pytest.param(
        (200, {"token_type": "Bearer"}, None),
        (RetryableError, "bad_response", None),
        id="no-access-token",
    ),
    pytest.param(
        (200, {"access_token": STUB_NEW_ACCESS, "expires_in": "later"}, None),
        (RetryableError, "bad_response", None),
        id="bad-expires-in",
    ),
    pytest.param(
        (200, '["not", "an", "object"]', None),
        (RetryableError, "bad_response", None),
        id="array",
    ),
]


@pytest.mark.parametrize(("answer", "expected"), ANSWERS)
def test_answers_are_classified(
    stub: StubTokenEndpoint,
    answer: tuple[int, str | dict[str, Any], dict[str, str] | None],
    expected: tuple[type[RefreshError], str, float | None],
) -> None:
    status, body, headers = answer
    error, kind, retry_after = expected
    stub.answer(status, body, headers)

    with pytest.raises(error) as caught:
        stub_refresh(stub)

    assert caught.value.kind == kind
    assert caught.value.kind in (FINAL_KINDS if error is FinalError else RETRYABLE_KINDS)
    assert caught.value.status == status
    if isinstance(caught.value, RetryableError):
        assert caught.value.retry_after == (
            pytest.approx(retry_after, abs=1) if retry_after else retry_after
        )
    assert_no_secret(caught.value, STUB_SECRETS)


def test_an_idp_echoing_secrets_in_its_error_is_redacted(stub: StubTokenEndpoint) -> None:
    stub.answer(
        400,
        {
            "error": "invalid_grant",
            "error_description": f"refresh token {STUB_REFRESH} is not valid for client "
            f"secret {quote(STUB_CLIENT_SECRET, safe='')}, access_token={STUB_ACCESS}",
        },
    )

    with pytest.raises(FinalError) as caught:
        stub_refresh(stub)

    assert "is not valid for client" in str(caught.value)
    assert "<redacted>" in str(caught.value)
    assert_no_secret(caught.value, STUB_SECRETS)


def test_an_oversized_answer_is_a_bad_response(stub: StubTokenEndpoint) -> None:
    stub.answer(200, b"{" + b" " * (2 << 20) + b"}")

    with pytest.raises(RetryableError) as caught:
        stub_refresh(stub)

    assert caught.value.kind == "bad_response"
    assert "more than" in str(caught.value)


def test_redirects_are_not_followed(stub: StubTokenEndpoint) -> None:
    with closed_port() as port:
        stub.answer(307, "", {"Location": f"http://127.0.0.1:{port}/elsewhere"})

        with pytest.raises(RetryableError) as caught:
            stub_refresh(stub)

    assert caught.value.kind == "bad_response"
    assert "not followed" in str(caught.value)
    assert len(stub.received) == 1


def test_a_refused_connection_is_retryable() -> None:
    with closed_port() as port, pytest.raises(RetryableError) as caught:
        refresh(
            f"http://127.0.0.1:{port}/token",
            STUB_TOKEN,
            "c",
            STUB_CLIENT_SECRET,
            allow_http=True,
            timeout=5,
        )

    assert caught.value.kind == "connection"
    assert "Connection refused" in str(caught.value)
    assert caught.value.status is None
    assert_no_secret(caught.value, STUB_SECRETS)


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_an_endpoint_that_never_answers_times_out_in_bounded_time(scheme: str) -> None:
    with silent_port() as port, pytest.raises(RetryableError) as caught:
        started = time.monotonic()
        refresh(
            f"{scheme}://127.0.0.1:{port}/token",
            STUB_TOKEN,
            "c",
            STUB_CLIENT_SECRET,
            allow_http=True,
            timeout=0.5,
        )
    elapsed = time.monotonic() - started

    assert caught.value.kind == "timeout"
    assert 0.4 < elapsed < 5
    assert_no_secret(caught.value, STUB_SECRETS)


def test_a_shared_session_is_used_and_left_open(stub: StubTokenEndpoint) -> None:
    stub.answer(200, {"access_token": STUB_NEW_ACCESS, "refresh_token": STUB_NEW_REFRESH})
    session = requests.Session()
    session.headers["User-Agent"] = "token-refresher-test"
    try:
        stub_refresh(stub, session=session)
        stub_refresh(stub, session=session)
    finally:
        session.close()

    assert [h["User-Agent"] for h, _ in stub.received] == ["token-refresher-test"] * 2


def test_quiet_token_loggers_keeps_a_quieter_level() -> None:
    logging.getLogger("oauthlib").setLevel(logging.WARNING)
    logging.getLogger("requests_oauthlib").setLevel(logging.NOTSET)

    quiet_token_loggers()

    assert logging.getLogger("oauthlib").level == logging.WARNING
    assert logging.getLogger("requests_oauthlib").level == logging.INFO
    assert not logging.getLogger("requests_oauthlib").isEnabledFor(logging.DEBUG)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('{"access_token": "at\\ud800"}', "'access_token'"),
        ('{"access_token": "at", "refresh_token": "\\udfffrt"}', "'refresh_token'"),
        ('{"access_token": "at", "extra": {"deep": [1, "\\ud800"]}}', "'extra.deep[1]'"),
        ('{"access_token": "at", "\\ud800": 1}', r"'\ud800'"),
    ],
)
def test_a_lone_surrogate_anywhere_in_the_token_json_is_refused_naming_the_field(
    text: str, field: str
) -> None:
    """`\\ud800` is plain ASCII JSON but no text: it would raise UnicodeEncodeError
    wherever the token is rendered or written back."""
    with pytest.raises(TokenFormatError, match=f"field {re.escape(field)} holds a lone surrogate"):
        Token.from_json(text, 0.0)
    with pytest.raises(TokenFormatError, match="lone surrogate"):
        Token.from_json(text.encode(), 0.0)


def test_token_json_nested_past_the_recursion_limit_is_a_format_error() -> None:
    with pytest.raises(TokenFormatError, match="RecursionError"):
        Token.from_json('{"a": ' + "[" * 100_000, 0.0)
