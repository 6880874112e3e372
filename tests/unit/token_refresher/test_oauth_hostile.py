"""oauth against what a tenant can choose: its token URL and the server behind it.

A slow server must cost one deadline, not forever; a URL must go where it
reads to a person (the host after '@' is the one connected to); an IdP that
echoes the request must not get a secret into an error message.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest

from agents.token_refresher.oauth import (
    FinalError,
    InsecureURLError,
    RetryableError,
    Token,
    allowed_token_url,
    check_token_url,
    parse_token_url,
    refresh,
)
from tests.support.hostile_idp import CountingListener, HostileTokenEndpoint
from tests.support.idp import ThrowawayCA

CLIENT_ID = "tenant-client"
CLIENT_SECRET = "Cs-9fK2xQ7mZ4pL8vN3tR6wY1"
ACCESS = "At-3hJ8kL2mN5pQ9rS4tU7vW0xYz"
REFRESH = "Rt-6aB1cD4eF7gH0iJ3kL5mN8oPqR"
TOKEN = Token(access_token=ACCESS, refresh_token=REFRESH)


def secret_pieces(*secrets: str, window: int = 8) -> set[str]:
    """Every secret and each of its `window`-character substrings, lower case."""
    pieces = set()
    for secret in secrets:
        folded = secret.lower()
        pieces.add(folded)
        pieces.update(folded[i : i + window] for i in range(len(folded) - window + 1))
    return pieces


def leaked(text: str, pieces: set[str]) -> list[str]:
    folded = text.lower()
    return sorted(p for p in pieces if p in folded)


# -- token URLs ---------------------------------------------------------------

ALLOWED = [parse_token_url("https://auth.example.org/realms/cern")]


@pytest.mark.parametrize(
    "url",
    [
        # The three: each passed the old startswith check.
        "https://auth.example.org@evil.net/",
        "https://auth.example.org.evil.net/realms/cern",
        "https://auth.example.org:443@10.0.0.5:6443/api",
        "https://auth.example.org/realms/cern@evil.net/",
        "https://auth.example.org\\@evil.net/realms/cern",
        "https://auth.example.org/realms/cern/../../admin",
        "https://auth.example.org/realms/cern/%2e%2e/%2E%2E/admin",
        "https://auth.example.org/realms/cern%2f..%2fadmin",
        "https://auth.example.org/realms/cern?next=https://evil.net/",
        "https://auth.example.org/realms/cern#frag",
        "https://auth.example.org /realms/cern",
        "https://auth.example.org/realms/cern\r\nHost: evil.net",
        "http://auth.example.org/realms/cern",
        "https://auth.example.org:8443/realms/cern",
        "ftp://auth.example.org/realms/cern",
    ],
)
def test_a_url_the_old_prefix_check_let_through_is_refused_or_not_covered(url: str) -> None:
    try:
        parsed = parse_token_url(url, allow_http=True)
    except InsecureURLError as err:
        assert "secret" not in str(err).lower() or "client secret" in str(err)
        return
    assert not allowed_token_url(parsed, ALLOWED), parsed


@pytest.mark.parametrize(
    ("url", "covered"),
    [
        ("https://auth.example.org/realms/cern", True),
        ("https://auth.example.org/realms/cern/protocol/openid-connect/token", True),
        ("https://AUTH.Example.ORG./realms/cern/token", True),
        ("https://auth.example.org:443/realms/cern/token", True),
        ("HTTPS://auth.example.org/realms/cern/token", True),
        ("https://auth.example.org/realms/cernevil/token", False),
        ("https://auth.example.org/realms/CERN/token", False),
        ("https://auth.example.org/realms", False),
    ],
)
def test_scheme_host_port_and_path_prefix_are_compared_normalised(url: str, covered: bool) -> None:
    assert allowed_token_url(parse_token_url(url), ALLOWED) is covered


def test_hosts_are_idna_encoded_and_requests_go_to_the_canonical_url() -> None:
    parsed = parse_token_url("https://Bücher.Example./token")
    assert parsed.host == "xn--bcher-kva.example"
    assert parsed.url == "https://xn--bcher-kva.example/token"
    assert parse_token_url("https://[::1]:8443/t").url == "https://[::1]:8443/t"
    assert check_token_url("https://idp.example:443") == "https://idp.example/"


def test_a_url_with_user_info_is_never_connected_to() -> None:
    with CountingListener() as listener:
        url = f"https://auth.example.org@127.0.0.1:{listener.port}/token"
        with pytest.raises(InsecureURLError, match="user info"):
            refresh(url, TOKEN, CLIENT_ID, CLIENT_SECRET, timeout=1)
        time.sleep(0.2)
    assert listener.connections == 0


# -- one deadline for the whole request ----------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    return ThrowawayCA(Path(tmp_path_factory.mktemp("ca")))


@pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])
@pytest.mark.parametrize("mode", ["slowloris", "slow_headers"])
def test_a_server_that_trickles_its_answer_times_out_at_the_deadline(
    mode: str, tls: bool, ca: ThrowawayCA
) -> None:
    """A byte every 0.3 s: requests' per-read timeout (1 s) never fires; the
    request's deadline (1 s) does, however the bytes come."""
    context = ca.server_context() if tls else None
    with HostileTokenEndpoint(mode, context=context, drip=0.3) as server:
        started = time.monotonic()
        with pytest.raises(RetryableError) as caught:
            refresh(
                server.url,
                TOKEN,
                CLIENT_ID,
                CLIENT_SECRET,
                timeout=1.0,
                allow_http=True,
                verify=str(ca.ca_path),
            )
        elapsed = time.monotonic() - started
    assert caught.value.kind == "timeout"
    assert "within 1 s" in str(caught.value)
    assert elapsed < 1.6, f"the request took {elapsed:.2f} s for a 1 s deadline"
    assert server.requests == 1


# -- what an echoing IdP sends back --------------------------------------------


def echo_everything(headers: dict[str, str], body: bytes, count: int) -> tuple[int, dict[str, str]]:
    echoed = (
        f"client {CLIENT_ID}, you sent Authorization: {headers.get('Authorization')} "
        f"and {body.decode()}; "
        f"AUTHORIZATION: {str(headers.get('Authorization')).upper()}; "
        f"refresh token starting {REFRESH[:12]}, your token {ACCESS.upper()}, "
        f"secret {CLIENT_SECRET.upper()} / {quote(CLIENT_SECRET.lower())}"
    )
    code = ["invalid_grant", "temporarily_unavailable", REFRESH[3:15]][count % 3]
    return 400, {"error": code, "error_description": echoed}


def test_an_echoing_idp_gets_no_piece_of_a_secret_into_an_error() -> None:
    basic = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
    pieces = secret_pieces(
        CLIENT_SECRET, ACCESS, REFRESH, basic, quote_plus(REFRESH), quote(basic, safe="")
    )
    messages = []
    with HostileTokenEndpoint("echo", answer=echo_everything) as server:
        for auth_method in ("client_secret_basic", "client_secret_post", "client_secret_basic"):
            with pytest.raises((FinalError, RetryableError)) as caught:
                refresh(
                    server.url,
                    TOKEN,
                    CLIENT_ID,
                    CLIENT_SECRET,
                    auth_method=auth_method,
                    allow_http=True,
                    timeout=5,
                )
            messages.append(str(caught.value))
    assert {m.split(":")[0] for m in messages}  # three answers were classified
    for message in messages:
        assert len(message) < 400, message
        assert message.isprintable()
        assert not leaked(message, pieces), message
    assert any("Authorization: Basic <redacted>" in m for m in messages), messages
    # What is no secret stays readable.
    assert all("client tenant-client, you sent" in m for m in messages), messages
