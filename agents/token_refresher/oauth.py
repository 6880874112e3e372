"""OAuth2 tokens and the refresh-token grant (RFC 6749 section 6), isolated here.

`Token` is the token JSON a Secret holds (the `oauth` key: an IdP's token
response, Keycloak's in the seed text) with an absolute expiry. `refresh()`
runs the grant and sorts failures into `FinalError` (the IdP refused the
refresh token or the client: retrying cannot help until the Secret changes)
and `RetryableError` (back off with `Backoff`, keep serving the old token).

The grant is built by oauthlib and sent with `requests`, not through
requests-oauthlib's `OAuth2Session.refresh_token`: in requests-oauthlib 2.0
that call refuses http:// unless the process-wide OAUTHLIB_INSECURE_TRANSPORT
is set, parses the body without looking at the HTTP status, and logs the
request body (refresh token, client secret) and the new tokens at DEBUG.

No token or client secret ever reaches a log line or an exception message.
"""

from __future__ import annotations

import base64
import http.client
import io
import ipaddress
import json
import logging
import math
import random
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any, Final
from urllib.parse import quote, quote_plus, urlsplit

import requests
import requests.adapters
from oauthlib.oauth2 import Client as OAuthClient
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError

from agents.common.logs import mask_known_secrets, mask_secrets

log = logging.getLogger(__name__)

AUTH_METHODS: Final = ("client_secret_basic", "client_secret_post", "none")
"""How the client authenticates at the token endpoint (RFC 6749 section 2.3.1;
the names are the `token_endpoint_auth_method` values of RFC 7591)."""

FINAL_KINDS: Final = frozenset(
    {
        "invalid_grant",
        "invalid_client",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_request",
        "no_refresh_token",
    }
)
RETRYABLE_KINDS: Final = frozenset(
    {
        "timeout",
        "connection",
        "tls",
        "http_5xx",
        "rate_limited",
        "server_error",
        "http_4xx",
        "oauth_error",
        "bad_response",
    }
)
"""Every `RefreshError.kind`: a closed set, so it can be a metric label."""

TOKEN_LOGGERS: Final = ("requests_oauthlib", "oauthlib")
"""Libraries that log token values at DEBUG: requests-oauthlib 2.0 logs request
bodies and token responses (oauth2_session.py; the kubernetes client uses it to
refresh kubeconfig OIDC tokens), oauthlib's server side logs request objects."""

MAX_RESPONSE_BYTES: Final = 1 << 20
"""A token response is a few KiB; anything larger is not one."""

# Keys `Token` owns; every other key of the token JSON is kept in `extra`.
_OWN_KEYS: Final = frozenset(
    {
        "access_token",
        "refresh_token",
        "token_type",
        "scope",
        "expires_in",
        "expires_at",
        "issued_at",
        "refresh_expires_in",
        "refresh_expires_at",
    }
)
_HEADERS: Final = {
    "Accept": "application/json",
    "Content-Type": "application/x-www-form-urlencoded",
}
_RNG = random.Random()


class TokenFormatError(ValueError):
    """Token JSON that cannot be used. The message never quotes the JSON."""


class InsecureURLError(ValueError):
    """A token URL that is not https:// (plain http only when allowed explicitly)."""


class RefreshError(Exception):
    """A refresh failed. `kind` is a short label from a closed set (metrics,
    Events); `status` the HTTP status when the IdP answered."""

    def __init__(self, kind: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


class FinalError(RefreshError):
    """The IdP refused the refresh token or the client: retrying cannot help
    until the Secret changes (a retry storm would only get the client blocked)."""


class RetryableError(RefreshError):
    """A transient failure: back off and retry, keep serving the old token until
    it expires. `retry_after`: seconds the IdP asked to wait (Retry-After)."""

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(kind, message, status=status)
        self.retry_after = retry_after


@dataclass(frozen=True, repr=False)
class Token:
    """An access token with its refresh token and absolute expiry (unix time).

    `repr` and `str` never show the tokens, nor the values in `extra` (which
    may hold an `id_token`).
    """

    access_token: str
    refresh_token: str = ""
    expires_at: float | None = None
    """None: the IdP did not say (RFC 6749 makes expires_in only RECOMMENDED)."""
    issued_at: float | None = None
    """When the IdP issued it, as far as we know; anchors `refresh_due` so that
    a restarted controller lands on the same share of the lifetime."""
    refresh_expires_at: float | None = None
    """When the refresh token expires (Keycloak's `refresh_expires_in`); None:
    unknown, or no fixed expiry (`offline`)."""
    offline: bool = False
    """The IdP said `refresh_expires_in: 0`: Keycloak's offline token, with no
    fixed expiry; it still ends once unused for the realm's Offline Session
    Idle (30 days by default)."""
    token_type: str = "Bearer"
    scope: str = ""
    extra: dict[str, Any] = field(default_factory=dict, hash=False)
    """Every other field of the token JSON, written back unchanged."""

    @classmethod
    def from_json(cls, text: str | bytes, now: float) -> Token:
        """Parse the token JSON a Secret holds.

        An absolute `expires_at` (what `to_json` writes) wins over
        `expires_in`, which is relative to when the JSON was written: for JSON
        from elsewhere (the seed tool stores the IdP's response as it came),
        pass that time as `now` when known (the Secret's creationTimestamp),
        else the JSON is taken as written just now.
        """
        return cls.from_object(decode_token_json(text)[0], now)

    @classmethod
    def from_object(cls, data: Mapping[str, Any], now: float) -> Token:
        """`from_json` for an object `decode_token_json` returned."""
        return cls._from_mapping(data, now, stored=True)

    @classmethod
    def _from_mapping(cls, data: Mapping[str, Any], now: float, *, stored: bool) -> Token:
        unencodable = _unencodable(data)
        if unencodable is not None:
            # JSON's "\ud800" escape is plain ASCII but no text: it would raise
            # UnicodeEncodeError wherever the token is rendered or written back.
            raise TokenFormatError(f"token JSON field {unencodable} holds a lone surrogate")
        access_token = data.get("access_token")
        if access_token is None or access_token == "":
            raise TokenFormatError("token JSON has no access_token")
        if not isinstance(access_token, str):
            raise TokenFormatError("access_token must be a string")
        refresh_token = data.get("refresh_token") or ""
        if not isinstance(refresh_token, str):
            raise TokenFormatError("refresh_token must be a string")
        token_type = data.get("token_type") or "Bearer"
        if not isinstance(token_type, str):
            raise TokenFormatError("token_type must be a string")
        expires_in = _seconds(data, "expires_in")
        expires_at = _seconds(data, "expires_at")
        issued_at = _seconds(data, "issued_at")
        refresh_expires_in = _seconds(data, "refresh_expires_in")
        refresh_expires_at = _seconds(data, "refresh_expires_at")
        if not stored:
            # A token response: issued now; expires_in is the standard field,
            # a non-standard expires_at counts only when it is all there is.
            issued_at = now
            if expires_in is not None:
                expires_at = now + expires_in
            if refresh_expires_in is not None:
                refresh_expires_at = None
        elif expires_at is None and expires_in is not None:
            expires_at, issued_at = now + expires_in, now
        # The absolute refresh expiry (what to_json writes) wins; else Keycloak's
        # relative one, where 0 means an offline token with no fixed expiry.
        offline = refresh_expires_at is None and refresh_expires_in == 0
        if refresh_expires_at is None and refresh_expires_in:
            refresh_expires_at = now + refresh_expires_in
        return cls(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at=expires_at,
            issued_at=issued_at,
            refresh_expires_at=refresh_expires_at,
            offline=offline,
            token_type=token_type,
            scope=_scope(data.get("scope")),
            extra={k: v for k, v in data.items() if k not in _OWN_KEYS},
        )

    def to_json(self, now: float | None = None) -> str:
        """The token JSON to store: `expires_at` absolute, and `expires_in`
        kept consistent with it (seconds left at `now`) for readers that only
        know the standard field."""
        now = time.time() if now is None else now
        data: dict[str, Any] = {"access_token": self.access_token}
        if self.expires_at is not None:
            # Rounded down: a reader must never believe in a longer life.
            data["expires_in"] = max(0, math.floor(self.expires_at - now))
            data["expires_at"] = math.floor(self.expires_at)
        if self.refresh_token:
            data["refresh_token"] = self.refresh_token
        data["token_type"] = self.token_type
        if self.scope:
            data["scope"] = self.scope
        if self.issued_at is not None:
            data["issued_at"] = math.floor(self.issued_at)
        if self.refresh_expires_at is not None:
            data["refresh_expires_in"] = max(0, math.floor(self.refresh_expires_at - now))
            data["refresh_expires_at"] = math.floor(self.refresh_expires_at)
        elif self.offline:
            data["refresh_expires_in"] = 0
        data.update((k, v) for k, v in self.extra.items() if k not in _OWN_KEYS)
        return json.dumps(data, separators=(",", ":"))

    def lifetime(self, now: float) -> float | None:
        """Seconds until the access token expires (negative: expired); None: unknown."""
        return None if self.expires_at is None else self.expires_at - now

    def refresh_lifetime(self, now: float, offline_idle: float) -> float | None:
        """Seconds until the refresh token, and so the chain, expires; None:
        unknown. An offline token ends once unused for `offline_idle` seconds
        (Keycloak's Offline Session Idle): counted from its last refresh."""
        if self.refresh_expires_at is not None:
            return self.refresh_expires_at - now
        if self.offline and self.issued_at is not None:
            return self.issued_at + offline_idle - now
        return None

    def expired(self, now: float) -> bool:
        """True once the access token is past its expiry (unknown expiry: never)."""
        return self.expires_at is not None and now >= self.expires_at

    def refresh_due(
        self,
        now: float,
        *,
        fraction: float = 0.8,
        jitter_fraction: float = 0.1,
        rng: random.Random | None = None,
        idle_window: float = 3600.0,
        min_interval: float = 10.0,
    ) -> float:
        """When to refresh (unix time; a time in the past means now).

        At `fraction` of the lifetime, give or take `jitter_fraction` of it, so
        that Secrets seeded together do not hit the IdP together. The lifetime
        runs from `issued_at`, else from `now`: compute this once per token,
        not on every tick. A token without an expiry is refreshed after about
        `idle_window` seconds anyway, so its refresh token never idles out
        (Keycloak ends idle sessions, offline ones after 30 days by default).
        The lifetime ends at the earlier of the two expiries, the access
        token's and the refresh token's: a refresh token that dies first (a
        Keycloak session's idle or max end) would break the chain.
        Never sooner than `min_interval` after `issued_at`: an IdP answering
        `expires_in: 0` must not get a refresh loop.
        """
        if (
            jitter_fraction < 0
            or fraction - jitter_fraction <= 0
            or fraction + jitter_fraction >= 1
        ):
            raise ValueError(
                "refresh fraction +- jitter must stay within (0, 1), "
                f"got {fraction} +- {jitter_fraction}"
            )
        if idle_window <= 0:
            raise ValueError(f"idle_window must be > 0, got {idle_window}")
        jitter = (rng or _RNG).uniform(-jitter_fraction, jitter_fraction)
        ends = [t for t in (self.expires_at, self.refresh_expires_at) if t is not None]
        if not ends:
            start = now if self.issued_at is None else self.issued_at
            return start + idle_window * (1.0 + jitter)
        end = min(ends)
        if self.issued_at is None or self.issued_at > end:
            return now + max(0.0, end - now) * (fraction + jitter)
        due = self.issued_at + (end - self.issued_at) * (fraction + jitter)
        return max(due, self.issued_at + min_interval)

    def __repr__(self) -> str:
        return (
            f"Token(access_token=<redacted>, "
            f"refresh_token={'<redacted>' if self.refresh_token else '<none>'}, "
            f"expires_at={self.expires_at!r}, issued_at={self.issued_at!r}, "
            f"refresh_expires_at={self.refresh_expires_at!r}, offline={self.offline!r}, "
            f"token_type={self.token_type!r}, scope={self.scope!r}, "
            f"extra_keys={sorted(self.extra)!r})"
        )

    __str__ = __repr__


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with jitter for retryable refresh failures.

    Half of each delay is fixed and half random ("equal jitter"): controllers
    that failed together spread out, and none retries at once after a failure.
    """

    base: float = 2.0
    """Delay ceiling after the first failure; doubles with each further one."""
    cap: float = 60.0
    """Largest ceiling. Keycloak's access tokens live 5-20 minutes and are
    refreshed at 80%: a minute leaves several attempts before expiry."""
    retry_after_cap: float = 600.0
    """A server's Retry-After is honoured up to this: a broken header must not
    stall refreshes for hours."""
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError(f"backoff needs 0 < base <= cap, got {self.base} and {self.cap}")

    def next_delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after `failures` consecutive failures (0: none), or
        the server's `retry_after` when that is longer."""
        delay = 0.0
        if failures > 0:
            ceiling = min(self.cap, self.base * 2.0 ** min(failures - 1, 64))
            delay = ceiling / 2 + self.rng.uniform(0.0, ceiling / 2)
        if retry_after is not None and retry_after > delay:
            delay = max(delay, min(retry_after, self.retry_after_cap))
        return delay


# JSON's whitespace (RFC 8259 section 2) and stray closing braces: the CERN
# blog's example Secret, copied as printed, ends its token object with `}}`.
_IGNORABLE_TAIL: Final = " \t\n\r}"


def decode_token_json(text: str | bytes) -> tuple[dict[str, Any], int]:
    """The one parser of token JSON: the object, and how many stray `}` followed it.

    One object followed only by whitespace and closing braces is accepted
    (callers warn about the braces); anything else after it is an error. The
    tail is tenant input but bounded: it is inside a size-capped Secret or file.
    """
    try:
        if isinstance(text, bytes):
            # What json.loads does with bytes (UTF-8, -16 or -32, BOM included).
            text = text.decode(json.detect_encoding(text), "surrogatepass")
        start = len(text) - len(text.lstrip(" \t\n\r"))  # raw_decode skips none
        data, end = json.JSONDecoder().raw_decode(text, start)
        tail = text[end:]
        if tail.strip(_IGNORABLE_TAIL):
            raise json.JSONDecodeError("Extra data", text, end)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        # JSONDecodeError's message has a position, never the document; a document
        # nested deeper than the interpreter's recursion limit is a RecursionError.
        reason = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
        raise TokenFormatError(f"token JSON is not valid JSON ({reason})") from None
    if not isinstance(data, dict):
        raise TokenFormatError(f"token JSON must be an object, not {_json_type_name(data)}")
    return data, tail.count("}")


def _unencodable(data: Mapping[str, Any]) -> str | None:
    """The first field (a dotted path) whose key or string value is not UTF-8 text.

    Iterative: a deeply nested document must not exhaust the stack here.
    """
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return ascii(where) if where else "(the document)"
        elif isinstance(value, Mapping):
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                stack.append((name, key))
                stack.append((name, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def quiet_token_loggers() -> None:
    """Keep the loggers in `TOKEN_LOGGERS` at INFO or above whatever the
    agent's log level: at DEBUG they print tokens and client secrets."""
    for name in TOKEN_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.INFO:  # NOTSET inherits the root's DEBUG
            logger.setLevel(logging.INFO)


MAX_URL_LENGTH: Final = 2048
"""Longer token URLs are refused: real ones are a few dozen characters."""
_DEFAULT_PORTS: Final = {"https": 443, "http": 80}
_HOST_LABEL: Final = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# Percent-encoded '.', '/' and '\': a path that decodes to another one (a dot
# segment, a separator) on the IdP's side must not pass a prefix check here.
_ENCODED_SEPARATOR: Final = re.compile(r"%(2e|2f|5c)", re.IGNORECASE)


@dataclass(frozen=True)
class TokenURL:
    """A token URL taken apart and normalised: what requests are sent to and
    what the allowed URLs are compared with (never the text as written)."""

    scheme: str
    host: str
    """Lower case, IDNA-encoded (punycode), without a trailing dot; an IPv6
    address without its brackets."""
    port: int
    """The default port of the scheme when the URL names none."""
    path: str
    """At least "/"; never with dot segments or encoded separators."""

    @property
    def url(self) -> str:
        """The canonical text: the one URL every request is sent to."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if _DEFAULT_PORTS.get(self.scheme) == self.port else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"

    def covers(self, other: TokenURL) -> bool:
        """Whether `other` is this URL or below it: same scheme, host and port,
        and a path equal to this one or under it on a segment boundary
        (`/realms/cern` covers `/realms/cern/token`, not `/realms/cernevil`)."""
        if (self.scheme, self.host, self.port) != (other.scheme, other.host, other.port):
            return False
        base = self.path.rstrip("/")
        return other.path == self.path or other.path.startswith(base + "/")

    def __str__(self) -> str:
        return self.url


def parse_token_url(url: str, *, allow_http: bool = False, what: str = "token URL") -> TokenURL:
    """`url` taken apart and normalised, or InsecureURLError saying why not.

    Only https:// (http:// if `allow_http`: the refresh token and the client
    secret travel in the request), a host, no user info (`https://idp@evil/`
    sends to evil), no query or fragment (a token endpoint takes a POSTed
    form), no characters that parsers read differently (spaces, controls,
    backslashes, percent-encoded dots and slashes, dot segments).
    """
    if not isinstance(url, str) or not url:
        raise InsecureURLError(f"{what} is empty")
    if len(url) > MAX_URL_LENGTH:
        raise InsecureURLError(f"{what} is longer than {MAX_URL_LENGTH} characters")
    shown = _where(url)
    if any(c <= " " or c in "\\\x7f" for c in url):
        raise InsecureURLError(f"{what} {shown!r} has spaces, control characters or backslashes")
    try:
        parts = urlsplit(url)
        port = parts.port
        hostname = parts.hostname or ""
    except ValueError as err:
        raise InsecureURLError(f"{what} is not a URL: {err}") from None
    scheme = parts.scheme.lower()
    if scheme == "http" and not allow_http:
        raise InsecureURLError(
            f"refusing plain http {what} {shown}: the refresh token and the "
            "client secret would cross the network in clear; use https (plain http "
            "only when explicitly allowed, for development)"
        )
    if scheme not in _DEFAULT_PORTS or not hostname:
        raise InsecureURLError(f"{what} must be https://<host>/..., got {shown!r}")
    if "@" in parts.netloc:
        raise InsecureURLError(
            f"{what} {shown!r} has user info before '@': refused (the request would "
            "go to the host after it)"
        )
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise InsecureURLError(f"{what} {shown!r} must have no query or fragment")
    path = parts.path or "/"
    if not path.isascii() or _ENCODED_SEPARATOR.search(path):
        raise InsecureURLError(
            f"{what} {shown!r}: the path must be ASCII without encoded '.', '/' or '\\'"
        )
    if any(segment in (".", "..") for segment in path.split("/")):
        raise InsecureURLError(f"{what} {shown!r}: the path must have no '.' or '..' segments")
    return TokenURL(scheme, _normal_host(hostname, what), port or _DEFAULT_PORTS[scheme], path)


def _normal_host(hostname: str, what: str) -> str:
    """The host as DNS and TLS see it: IDNA-encoded, lower case, no trailing dot."""
    try:
        return str(ipaddress.ip_address(hostname))
    except ValueError:
        pass
    host = hostname[:-1] if hostname.endswith(".") else hostname
    try:
        # Python's codec is IDNA 2003 with nameprep: it folds case as well.
        host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise InsecureURLError(f"{what} has a host that is not a valid name") from None
    labels = host.split(".")
    if len(host) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise InsecureURLError(f"{what} has a host that is not a valid name")
    return host


def check_token_url(url: str, *, allow_http: bool = False, what: str = "token URL") -> str:
    """The canonical form of `url` (see `parse_token_url`), else InsecureURLError."""
    return parse_token_url(url, allow_http=allow_http, what=what).url


def allowed_token_url(url: TokenURL, allowed: Iterable[TokenURL]) -> bool:
    """Whether one of `allowed` covers `url` (`TokenURL.covers`)."""
    return any(entry.covers(url) for entry in allowed)


# -- the request, under one deadline

_request_deadline = threading.local()
"""`at`: the monotonic time the IdP request in this thread must end by.

requests' timeout bounds the connect and each wait for data, not the
request: a server that sends a byte every few seconds would hold a refresh
forever. The connection classes below read this and give every socket
operation at most the time left."""


@contextmanager
def _deadline(at: float) -> Iterator[None]:
    _request_deadline.at = at
    try:
        yield
    finally:
        _request_deadline.at = None


def _time_left() -> float | None:
    at: float | None = getattr(_request_deadline, "at", None)
    return None if at is None else at - time.monotonic()


class _DeadlineReader(io.RawIOBase):
    """The response's socket file, each read given at most the time left."""

    def __init__(self, sock: socket.socket, raw: Any) -> None:
        super().__init__()
        self._sock = sock
        self._raw = raw
        """socket.makefile's SocketIO: while it is open the socket's descriptor
        stays open, even after http.client closes the connection."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = _time_left()
        if left is not None:
            if left <= 0:
                raise TimeoutError("the request's deadline passed")
            self._sock.settimeout(left)
        count: int = self._raw.readinto(buffer)
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    """http.client's response reading through `_DeadlineReader`: the status
    line, the headers and the body all count against the deadline."""

    def __init__(self, sock: socket.socket, *args: Any, **kwargs: Any) -> None:
        super().__init__(sock, *args, **kwargs)
        if _time_left() is not None:
            raw = self.fp.detach()  # the buffer http.client made, not its SocketIO
            self.fp = io.BufferedReader(_DeadlineReader(sock, raw))


class _DeadlineConnect:
    """Connect, then the TLS handshake, within the time left (CPython bounds a
    whole handshake by the socket's timeout, not each read of it)."""

    timeout: Any
    response_class: Any = _DeadlineResponse

    def _new_conn(self) -> socket.socket:
        left = _time_left()
        if left is not None:
            if left <= 0:
                raise ConnectTimeoutError(self, "the request's deadline passed before connecting")
            self.timeout = left if self.timeout is None else min(self.timeout, left)
        sock: socket.socket = super()._new_conn()  # type: ignore[misc]
        left = _time_left()
        if left is not None:
            sock.settimeout(max(left, 0.001))
        return sock


class _DeadlineHTTPConnection(_DeadlineConnect, HTTPConnection):
    pass


class _DeadlineHTTPSConnection(_DeadlineConnect, HTTPSConnection):
    pass


class _DeadlineHTTPPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_DEADLINE_POOLS: Final = {"http": _DeadlineHTTPPool, "https": _DeadlineHTTPSPool}


class DeadlineAdapter(requests.adapters.HTTPAdapter):
    """requests' adapter whose connections keep to the deadline `refresh` sets
    (proxied connections too); without one they behave as usual."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _DEADLINE_POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        manager.pool_classes_by_scheme = _DEADLINE_POOLS
        return manager


def _with_deadlines(session: requests.Session) -> requests.Session:
    """`session` with `DeadlineAdapter` mounted (once) for http and https."""
    for prefix in ("https://", "http://"):
        if not isinstance(session.adapters.get(prefix), DeadlineAdapter):
            session.mount(prefix, DeadlineAdapter())
    return session


def refresh(
    token_url: str,
    token: Token,
    client_id: str,
    client_secret: str,
    *,
    auth_method: str = "client_secret_basic",
    verify: bool | str = True,
    timeout: float = 10.0,
    allow_http: bool = False,
    session: requests.Session | None = None,
    now: float | None = None,
) -> Token:
    """Trade `token`'s refresh token for a new token (RFC 6749 section 6).

    The new token keeps the old refresh token when the IdP sends none (it
    does not rotate), and its expiry is absolute, counted from `now` (the time
    the request is sent; default: the clock). `verify`: True checks the IdP's
    certificate against the system trust store, or the bundle named by
    REQUESTS_CA_BUNDLE when the session trusts the environment (requests'
    default); a path checks it against that CA bundle. `timeout` bounds the
    connection and each wait for data. Redirects are not followed: they would
    carry the credentials elsewhere.

    Raises FinalError or RetryableError (see their `kind`), InsecureURLError
    for a token URL that is not https:// (unless `allow_http`), ValueError for
    an unknown `auth_method`.
    """
    url = check_token_url(token_url, allow_http=allow_http)
    if auth_method not in AUTH_METHODS:
        raise ValueError(f"unknown auth method {auth_method!r}, expected one of {AUTH_METHODS}")
    if not token.refresh_token:
        raise FinalError("no_refresh_token", "the token has no refresh_token to refresh it with")
    sent = time.time() if now is None else now
    where = _where(url)
    secrets = credential_forms(client_id, client_secret, token.refresh_token, token.access_token)

    auth: requests.auth.HTTPBasicAuth | None = None
    credentials: dict[str, str] = {}
    if auth_method == "client_secret_basic":
        # RFC 6749 section 2.3.1: both form-encoded, then HTTP Basic. quote()
        # rather than quote_plus(): some servers (authlib) decode with a plain
        # unquote and would keep the '+' of an encoded space.
        auth = requests.auth.HTTPBasicAuth(quote(client_id, safe=""), quote(client_secret, safe=""))
    elif auth_method == "client_secret_post":
        credentials = {"client_id": client_id, "client_secret": client_secret}
    else:
        credentials = {"client_id": client_id}
    body = OAuthClient(client_id).prepare_refresh_body(
        refresh_token=token.refresh_token, **credentials
    )

    log.debug("refreshing a token at %s (%s)", where, auth_method)
    http = _with_deadlines(requests.Session() if session is None else session)
    deadline = time.monotonic() + timeout
    late = RetryableError(
        "timeout",
        f"{where} did not send its whole answer within {timeout:g} s (the deadline for "
        "the request: connect, TLS, headers and body)",
    )
    try:
        with _deadline(deadline):
            response = http.post(
                url,
                data=body,
                headers=_HEADERS,
                auth=auth,
                timeout=(timeout, timeout),
                verify=verify,
                allow_redirects=False,
                stream=True,
            )
            try:
                content = _read_body(response, where, deadline)
            finally:
                response.close()
    except requests.exceptions.RequestException as err:
        if time.monotonic() >= deadline:
            # However it surfaced (urllib3 turns a read timeout in the body into
            # a ConnectionError): the deadline passed.
            raise late from err
        _raise_request_error(err, where, timeout, secrets)
    except TimeoutError as err:
        raise late from err
    finally:
        if session is None:
            http.close()

    status = response.status_code
    log.debug("%s answered %d (%d bytes)", where, status, len(content))
    retry_after = _retry_after(response.headers.get("Retry-After"), sent)
    if status == 429:
        raise RetryableError(
            "rate_limited",
            f"{where} is rate limiting (429)"
            + (f", retry after {retry_after:g} s" if retry_after is not None else ""),
            status=status,
            retry_after=retry_after,
        )
    if status >= 500:
        raise RetryableError(
            "http_5xx", f"{where} answered {status}", status=status, retry_after=retry_after
        )
    data = _json_object(content)
    if data is not None and data.get("error"):
        raise _oauth_error(
            data, status, where, auth_method=auth_method, secrets=secrets, retry_after=retry_after
        )
    if 200 <= status < 300:
        # An unusable answer (or a timeout) after the IdP rotated loses the
        # chain: the retry gets invalid_grant. Nothing on this side can tell.
        if data is None:
            raise RetryableError(
                "bad_response", f"{where} answered {status} without a JSON object", status=status
            )
        try:
            new = Token._from_mapping(data, sent, stored=False)
        except TokenFormatError as err:
            raise RetryableError(
                "bad_response",
                f"{where} answered {status} with an unusable token: {err}",
                status=status,
            ) from err
        if not new.refresh_token:
            # RFC 6749 section 6: the server MAY issue a new refresh token;
            # without one the old one stays valid (and keeps its expiry,
            # unless the answer gave one).
            new = replace(new, refresh_token=token.refresh_token)
            if "refresh_expires_in" not in data and "refresh_expires_at" not in data:
                new = replace(
                    new, refresh_expires_at=token.refresh_expires_at, offline=token.offline
                )
        return new
    if 400 <= status < 500:
        raise RetryableError(
            "http_4xx", f"{where} answered {status} without an OAuth2 error", status=status
        )
    raise RetryableError(
        "bad_response",
        f"{where} answered {status}"
        + (
            " (a redirect, not followed: point the token URL at the final address)"
            if 300 <= status < 400
            else ""
        ),
        status=status,
    )


def _raise_request_error(
    err: requests.exceptions.RequestException,
    where: str,
    timeout: float,
    secrets: Iterable[str],
) -> None:
    """requests' failure before the deadline as a RetryableError."""
    if isinstance(err, requests.exceptions.SSLError):
        kind = "timeout" if "timed out" in str(err) else "tls"
        raise RetryableError(kind, f"TLS with {where} failed: {_reason(err, secrets)}") from err
    if isinstance(err, requests.exceptions.Timeout):
        raise RetryableError(
            "timeout", f"{where} did not answer within {timeout:g} s: {_reason(err, secrets)}"
        ) from err
    if isinstance(
        err, requests.exceptions.ConnectionError | requests.exceptions.ChunkedEncodingError
    ):
        raise RetryableError(
            "connection", f"cannot reach {where}: {_reason(err, secrets)}"
        ) from err
    raise RetryableError(
        "bad_response", f"request to {where} failed: {_reason(err, secrets)}"
    ) from err


_ERROR_HINTS: Final = {
    "invalid_grant": "the refresh token was refused (expired, revoked or already used); "
    "a new token must be put into the Secret",
    "invalid_client": "client authentication failed: check clientID, clientSecret "
    "and the auth method ({auth_method})",
    "unauthorized_client": "this client may not use the refresh_token grant",
    "unsupported_grant_type": "the IdP does not support the refresh_token grant",
    "invalid_scope": "the IdP refused the scope",
    "invalid_request": "the IdP refused the request as malformed",
}
# RFC 6749 section 4.1.2.1 codes that some IdPs also return from the token endpoint.
_TRANSIENT_ERRORS: Final = frozenset({"server_error", "temporarily_unavailable"})


def _oauth_error(
    data: Mapping[str, Any],
    status: int,
    where: str,
    *,
    auth_method: str,
    secrets: Iterable[str],
    retry_after: float | None,
) -> RefreshError:
    """The RFC 6749 section 5.2 error response as FinalError or RetryableError."""
    code = str(data["error"])
    description = data.get("error_description")
    detail = f": {_sanitise(description, secrets)}" if description else ""
    if code in _ERROR_HINTS:
        hint = _ERROR_HINTS[code].format(auth_method=auth_method)
        return FinalError(code, f"{where}: {code}: {hint}{detail}", status=status)
    kind = "server_error" if code in _TRANSIENT_ERRORS else "oauth_error"
    return RetryableError(
        kind,
        f"{where} answered {status} with error {_sanitise(code, secrets, 40)!r}{detail}",
        status=status,
        retry_after=retry_after,
    )


def _read_body(response: requests.Response, where: str, deadline: float) -> bytes:
    """The body, at most MAX_RESPONSE_BYTES, read by `deadline` (monotonic): each
    read of the socket waits at most the time left (`_DeadlineReader`)."""
    chunks = []
    size = 0
    for chunk in response.iter_content(16384):
        if time.monotonic() >= deadline:
            raise TimeoutError("the request's deadline passed")
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise RetryableError(
                "bad_response",
                f"{where} sent more than {MAX_RESPONSE_BYTES} bytes: not a token response",
                status=response.status_code,
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _json_object(content: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _seconds(data: Mapping[str, Any], key: str) -> float | None:
    """A number of seconds (JSON number or numeric string) or None if absent."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise TokenFormatError(f"{key} must be a number of seconds") from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise TokenFormatError(f"{key} must be a number of seconds")
    return float(value)


def _scope(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return " ".join(value)
    raise TokenFormatError("scope must be a string")


def _json_type_name(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _retry_after(value: str | None, now: float) -> float | None:
    """Retry-After (RFC 9110 section 10.2.3): delay-seconds or an HTTP-date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


def _where(url: str) -> str:
    """The URL without credentials, query or fragment, printable and at most
    about 120 characters: safe to log and to put in an Event."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<unparsable URL>"
    if ":" in host:
        host = f"[{host}]"
    path = parts.path if len(parts.path) <= 80 else parts.path[:77] + "..."
    text = f"{parts.scheme}://{host[:40]}{port}{path}"
    return "".join(c if c.isprintable() and c != " " else "?" for c in text)


def _reason(err: BaseException, secrets: Iterable[str]) -> str:
    """The innermost error behind requests' and urllib3's wrappers (ConnectionError
    around MaxRetryError around NewConnectionError...): the one that says why."""
    inner = err
    for _ in range(10):
        reason = getattr(inner, "reason", None)
        if not isinstance(reason, BaseException):
            args = getattr(inner, "args", ())
            reason = args[0] if args and isinstance(args[0], BaseException) else None
        if reason is None:
            break
        inner = reason
    return _sanitise(inner, secrets, 300)


def credential_forms(client_id: str, client_secret: str, *tokens: str) -> tuple[str, ...]:
    """Every form in which the request carries a secret, for masking what an
    IdP echoes: each secret as is and URL-encoded (the form body), and the
    HTTP Basic credentials `base64(id:secret)` as sent (both parts
    form-encoded first, RFC 6749 section 2.3.1) and of the plain pair, each
    also URL-encoded."""
    forms: list[str] = []
    for secret in (client_secret, *tokens):
        if secret:
            forms += (secret, quote(secret, safe=""), quote_plus(secret))
    if client_secret:
        for pair in (
            f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}",
            f"{client_id}:{client_secret}",
        ):
            # Not the pair itself: its secret part is masked as the secret, and
            # the client ID alone is no secret (messages name it).
            for b64 in (
                base64.b64encode(pair.encode()).decode(),
                base64.urlsafe_b64encode(pair.encode()).decode(),
            ):
                forms += (b64, b64.rstrip("="), quote(b64, safe=""), quote_plus(b64))
    return tuple(dict.fromkeys(forms))


def _sanitise(text: object, secrets: Iterable[str], limit: int = 200) -> str:
    """One line of at most `limit` printable characters, with every substring
    of 8+ characters of a known secret (any case) and anything token-like
    masked: IdPs and libraries may echo what was sent. For Events and logs."""
    # Cut first (the masking is linear in the text; an IdP may send a MiB),
    # with room for the masks to grow the text.
    result = str(text)[: 4 * limit]
    result = "".join(c if c.isprintable() else " " for c in result)
    result = mask_secrets(mask_known_secrets(" ".join(result.split()), secrets))
    return result if len(result) <= limit else result[: limit - 3] + "..."
