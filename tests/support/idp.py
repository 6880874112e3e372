"""A real OAuth2/OIDC server on loopback for the token refresher's tests.

`TestIdP` runs Canaille (the IdP that pytest-iam wraps; Flask + authlib, an
in-memory database) through `pytest_iam.Server`, in threads of this process,
over plain http and, with `tls=True`, also over https with a certificate from
a throwaway CA made for the run (`ca_bundle`). Clients and a user are created
in its models; `issue()` obtains an initial token pair from the real token
endpoint (resource owner password grant), standing in for the seed tool's
login.

Refresh tokens ROTATE, as Canaille does out of the box: every refresh answers
with a new refresh token and revokes the old record, so the old refresh token
then gets `invalid_grant`. Set `rotate = False` to get the other RFC 6749
behaviour: no new refresh token in the answer, and the old one stays valid.

Changed from stock Canaille, and why:
- the refresh-token grant is replaced by a subclass that reads `rotate`;
- access tokens are opaque random strings: Canaille signs JWTs whose claims
  have one-second resolution, so two refreshes within a second got the same
  access token (and userinfo then found the revoked record first);
- `expires_in` is `lifetime` for every grant. Canaille keeps a refresh token
  only as long as the access token issued with it (`is_refresh_token_active`
  checks the access token's lifetime): a short `lifetime` also kills the chain;
- with `refresh_lifetime` set, answers carry Keycloak's `refresh_expires_in`
  and a refresh token older than that is refused (0: an offline token, no
  fixed expiry; it still dies with its access token, as above);
- the Host header is set to SERVER_NAME, as a reverse proxy would: Canaille
  refuses POSTs addressed to another host, and two listeners have two ports.

The https listener can sit elsewhere than 127.0.0.1 (`listen`: a socket
factory, e.g. inside a network namespace of tests/support/netns.py), can go
down and come back on its port (`refuse_connections`, `accept_connections`),
and the token endpoint can answer errors as an overloaded IdP or its proxy does
(`fail_token_endpoint`).

Canaille keeps its OAuth server and database in module globals, so one
`TestIdP` runs per process at a time (a second `start()` raises). Its
loggers (authlib, canaille) log tokens at DEBUG: that is the IdP's side, in
production another process; log checks must leave them out (`IDP_LOGGERS`).

    with TestIdP(tls=True) as idp:
        seed = Token.from_json(idp.issue(), time.time())
        new = refresh(idp.token_url, seed, idp.client_id, idp.client_secret,
                      verify=idp.verify)
        assert idp.token_calls("refresh_token") == 1
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import secrets
import socket
import ssl
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar
from urllib.parse import parse_qsl, quote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

IDP_LOGGERS = ("authlib", "canaille", "flask", "werkzeug", "tests.support.idp")
"""Loggers of the IdP side; they log tokens at DEBUG, as IdPs may."""

# Seconds a connection may sit idle before the (single-threaded) server drops
# it: a test client that connects and never speaks must not block the IdP.
IO_TIMEOUT = 10.0

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _unhook_root_logging() -> None:
    """Take back what Canaille's `setup_logging` puts on the root logger.

    It adds a filter that sets `record.ip` on every record of the process, so
    the agents' log lines in later tests would grow an `ip=` field; the IdP
    keeps it on its own Flask logger.
    """
    root = logging.getLogger()
    for owner in (root, *root.handlers):
        for flt in [f for f in owner.filters if type(f).__name__ == "IPFilter"]:
            owner.removeFilter(flt)


class ThrowawayCA:
    """A CA made for one test run and a server certificate it signed for
    127.0.0.1, localhost and `ip_addresses`: tests verify TLS for real without
    the system store."""

    def __init__(self, directory: Path, ip_addresses: Iterable[str] = ()) -> None:
        # Made as the token refresher's controller makes its own (tls.py).
        from agents.token_refresher.tls import issue_serving_cert, make_ca

        now = time.time()
        ca = make_ca(now, validity=timedelta(days=2))
        names = ["127.0.0.1", "localhost", *ip_addresses]
        served = issue_serving_cert(ca, names, now, validity=timedelta(days=1))
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_path = directory / "ca.pem"
        self.cert_path = directory / "server.pem"
        self.key_path = directory / "server.key"
        self.ca_path.write_text(ca.cert_pem)
        self.cert_path.write_text(served.cert_pem)
        self.key_path.write_text(served.key_pem)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


class _Handler(WSGIRequestHandler):
    """wsgiref's handler without the access log on stderr, with an idle timeout."""

    timeout = IO_TIMEOUT
    https = False

    def get_environ(self) -> dict[str, str]:
        environ = super().get_environ()
        if self.https:
            # wsgiref derives wsgi.url_scheme from HTTPS (wsgiref.util.guess_scheme).
            environ["HTTPS"] = "on"
        return environ

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass


class _HTTPSHandler(_Handler):
    https = True


class _TLSServer(WSGIServer):
    """wsgiref's server over TLS; the handshake runs per connection, under the
    idle timeout, so a client that fails it (or never speaks) costs nothing.
    It listens on `sock`, bound by the caller (see `TestIdP.listen`)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self._context = context
        host, port = sock.getsockname()[:2]
        super().__init__((host, port), _HTTPSHandler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.server_address = (host, port)
        # What HTTPServer.server_bind sets, without its getfqdn(): a reverse
        # DNS lookup of the address would leave loopback and the namespaces.
        self.server_name, self.server_port = host, port
        self.setup_environ()
        try:
            self.server_activate()
        except BaseException:
            self.server_close()
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(IO_TIMEOUT)
        with self._context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Failed handshakes are what the TLS tests provoke; nothing to print.
        pass


@dataclass(frozen=True)
class IdPClient:
    """An OAuth2 client registered at the IdP."""

    client_id: str
    client_secret: str
    auth_method: str = "client_secret_basic"

    def __repr__(self) -> str:
        return f"IdPClient({self.client_id!r}, auth_method={self.auth_method!r})"


@dataclass(frozen=True)
class TokenCall:
    """One request that reached the token endpoint over the network."""

    grant_type: str
    client_auth: str  # "basic" (Authorization header), "post" (form body) or "none"
    scheme: str  # "http" or "https"
    # The refresh token presented (refresh_token grant), to check chains; never shown.
    refresh_token: str = field(default="", repr=False)
    status: int = 0
    """The HTTP status it was answered with."""


def loopback_listener(port: int = 0) -> socket.socket:
    """A TCP socket bound to 127.0.0.1:`port`, not listening yet, with SO_REUSEADDR
    (the https listener comes back on its port after `refuse_connections`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


class TestIdP:
    """Canaille on 127.0.0.1 with one user and one client (HTTP Basic auth)."""

    __test__ = False  # not a test class, whatever its name

    _running: ClassVar[TestIdP | None] = None
    _running_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self,
        *,
        tls: bool = False,
        lifetime: int = 3600,
        workdir: Path | None = None,
        listen: Callable[[int], socket.socket] | None = None,
    ):
        if listen is not None and not tls:
            raise ValueError("listen places the https listener: it needs tls=True")
        self.tls = tls
        self.listen = listen or loopback_listener
        """Makes the https listener's socket: bound to the given port (0: any),
        not listening yet, SO_REUSEADDR set. Its address is where `url` points
        and an IP address of the server certificate."""
        self.lifetime = lifetime
        """expires_in of every token issued from now on (also how long its refresh
        token lives, see the module docstring)."""
        self.rotate = True
        """True: a new refresh token per refresh, the old one revoked."""
        self.refresh_lifetime: int | None = None
        """None: no `refresh_expires_in` (Canaille's own answers). Else every
        answer says `refresh_expires_in: <this>`, as Keycloak does, and a
        refresh token older than that gets invalid_grant; keep it below
        `lifetime` (0: offline, no fixed expiry)."""
        self.calls: list[TokenCall] = []
        self.ca: ThrowawayCA | None = None
        self.client_id = "node-agents-test"
        self.client_secret = f"s3cret {secrets.token_urlsafe(12)}+%:"
        """Has a space, '+', '%' and ':' so that HTTP Basic encoding is exercised."""
        self.username = "alice"
        self._password = secrets.token_urlsafe(16)
        self._workdir = workdir
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._lock = threading.Lock()  # guards `calls` and `_failing`
        self._failing: tuple[int | None, int, int | None] = (0, 503, None)
        """(answers left (None: all), status, Retry-After) of `fail_token_endpoint`."""
        self._wsgi: WSGIApp | None = None
        # Canaille's in-memory database is shared by both listeners and the test.
        self._db_lock = threading.RLock()
        self._threads: list[threading.Thread] = []
        self._servers: list[WSGIServer] = []
        self._app: Any = None
        self._iam: Any = None
        self.http_url = ""
        """The plain-http listener, always there: `http://127.0.0.1:<port>`."""
        self.url = ""
        """Where clients should go: the https listener when `tls`, else `http_url`."""

    # -- life cycle ---------------------------------------------------------

    def start(self) -> TestIdP:
        with TestIdP._running_lock:
            if TestIdP._running is not None:
                raise RuntimeError("Canaille keeps global state: one TestIdP per process")
            TestIdP._running = self
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        import portpicker  # type: ignore[import-untyped]
        from canaille import create_app  # type: ignore[import-untyped]
        from canaille.backends import Backend  # type: ignore[import-untyped]
        from joserfc.jwk import JWKRegistry
        from pytest_iam import Server

        if self.tls:
            if self._workdir is None:
                self._tempdir = tempfile.TemporaryDirectory(prefix="test-idp-")
                self._workdir = Path(self._tempdir.name)
            sock = self.listen(0)
            try:
                self.ca = ThrowawayCA(self._workdir, ip_addresses=[sock.getsockname()[0]])
                tls_server = _TLSServer(sock, self.ca.server_context())
            except BaseException:
                sock.close()
                raise
            self._servers.append(tls_server)
        # pytest-iam picks its port the same way.
        http_port = portpicker.pick_unused_port()
        self.http_url = f"http://127.0.0.1:{http_port}"
        self.url = self.http_url
        if self.tls:
            host, port = self._servers[0].socket.getsockname()[:2]
            self.url = f"https://{host}:{port}"

        jwk = JWKRegistry.generate_key("RSA", 2048)
        jwk.ensure_kid()
        # pytest-iam's `iam_configuration`, without registration and with no
        # env file or env prefix that a developer's machine could feed.
        config = {
            "TESTING": True,
            "ENV_FILE": None,
            "SECRET_KEY": secrets.token_hex(16),
            "WTF_CSRF_ENABLED": False,
            "PREFERRED_URL_SCHEME": "https" if self.tls else "http",
            "SERVER_NAME": self.url.split("://", 1)[1],
            "CANAILLE": {
                "DATABASE": "memory",
                "JAVASCRIPT": False,
                "ACL": {"DEFAULT": {"PERMISSIONS": ["use_oidc"]}},
                "LOGGING": {
                    "version": 1,
                    "disable_existing_loggers": False,
                    "handlers": {"null": {"class": "logging.NullHandler"}},
                    "loggers": {"canaille": {"level": "WARNING", "handlers": ["null"]}},
                },
            },
            "CANAILLE_OIDC": {"ACTIVE_JWKS": [jwk.as_dict(private=True)]},
        }
        self._app = create_app(config=config, env_file=None, env_prefix="NODE_AGENTS_TEST_IDP_")
        _unhook_root_logging()
        self._patch_oauth_server()
        self._iam = Server(self._app, http_port, Backend.instance)
        self._iam.httpd.RequestHandlerClass = _Handler
        self._servers.append(self._iam.httpd)
        self._wsgi = self._recording(self._app, host=str(config["SERVER_NAME"]))
        for server in self._servers:
            server.set_app(self._wsgi)
        with self._db_lock, self._app.app_context():
            models, backend = self._iam.models, self._iam.backend
            user = models.User(
                user_name=self.username, emails=["alice@example.org"], password=self._password
            )
            backend.save(user)
        self.add_client(self.client_id, self.client_secret)
        for server in self._servers:
            self._threads.append(self._serve(server))

    @staticmethod
    def _serve(server: WSGIServer) -> threading.Thread:
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="test-idp"
        )
        thread.start()
        return thread

    def _patch_oauth_server(self) -> None:
        """Rotation switch, unique access tokens, `lifetime` (module docstring)."""
        from canaille.oidc.provider import (  # type: ignore[import-untyped]
            RefreshTokenGrant,
            authorization,
        )

        idp = self

        class SwitchableRefreshTokenGrant(RefreshTokenGrant):  # type: ignore[misc]
            @property
            def INCLUDE_NEW_REFRESH_TOKEN(self) -> bool:  # authlib reads this attribute
                return idp.rotate

            def revoke_old_credential(self, credential: Any) -> None:
                if idp.rotate:
                    super().revoke_old_credential(credential)

            def authenticate_refresh_token(self, refresh_token: str) -> Any:
                credential = super().authenticate_refresh_token(refresh_token)
                if credential is not None and idp.refresh_lifetime:
                    ends = credential.issue_date + timedelta(seconds=idp.refresh_lifetime)
                    if ends < datetime.now(UTC):
                        return None  # authlib answers invalid_grant
                return credential

        authorization._token_grants = [
            (SwitchableRefreshTokenGrant if cls is RefreshTokenGrant else cls, extensions)
            for cls, extensions in authorization._token_grants
        ]
        generator = authorization._token_generators["default"]
        generator.access_token_generator = lambda **_: secrets.token_urlsafe(32)
        generator.expires_generator = lambda client, grant_type: idp.lifetime
        generate = type(generator).generate.__get__(generator)  # the class's, not a wrapper

        def keycloak_like(*args: Any, **kwargs: Any) -> dict[str, Any]:
            token: dict[str, Any] = generate(*args, **kwargs)
            if idp.refresh_lifetime is not None and "refresh_token" in token:
                token["refresh_expires_in"] = idp.refresh_lifetime
            return token

        generator.generate = keycloak_like

    def stop(self) -> None:
        # Servers and the threads serving them were started in the same order;
        # shutdown() would wait forever for a loop that never ran.
        for server, thread in zip(self._servers, self._threads, strict=False):
            server.shutdown()
            thread.join(timeout=10)
        for server in self._servers:
            server.server_close()
        self._servers.clear()
        self._threads.clear()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None
        with TestIdP._running_lock:
            if TestIdP._running is self:
                TestIdP._running = None

    def __enter__(self) -> TestIdP:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- faults -------------------------------------------------------------

    def refuse_connections(self) -> None:
        """Close the https listener: connecting is refused (the kernel answers
        RST) until `accept_connections()`. The plain-http listener stays."""
        if not self.tls or not self._servers or not isinstance(self._servers[0], _TLSServer):
            raise RuntimeError("refuse_connections needs a started TestIdP with tls, listening")
        server, thread = self._servers.pop(0), self._threads.pop(0)
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()

    def accept_connections(self) -> None:
        """Listen again on the https port `refuse_connections()` closed."""
        if not self.tls or self.ca is None or self._wsgi is None:
            raise RuntimeError("accept_connections needs a started TestIdP with tls")
        if self._servers and isinstance(self._servers[0], _TLSServer):
            return
        sock = self.listen(int(self.url.rsplit(":", 1)[1]))
        try:
            server = _TLSServer(sock, self.ca.server_context())
        except BaseException:
            sock.close()
            raise
        server.set_app(self._wsgi)
        self._servers.insert(0, server)
        self._threads.insert(0, self._serve(server))

    def fail_token_endpoint(
        self, status: int = 503, times: int | None = 1, *, retry_after: int | None = None
    ) -> None:
        """Answer the next `times` token requests (None: all, 0: none from now)
        with `status` and a plain-text body, as an overloaded IdP or the proxy
        in front of it does, with `Retry-After: <retry_after>` if given. The
        database is not touched: the refresh token sent stays valid."""
        with self._lock:
            self._failing = (times, status, retry_after)

    # -- what tests use -----------------------------------------------------

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    @property
    def http_token_url(self) -> str:
        """The token endpoint on the plain-http listener (same accounts and tokens)."""
        return f"{self.http_url}/oauth/token"

    @property
    def userinfo_url(self) -> str:
        return f"{self.url}/oauth/userinfo"

    @property
    def ca_bundle(self) -> str | None:
        """PEM file of the throwaway CA (tls only)."""
        return str(self.ca.ca_path) if self.ca else None

    @property
    def verify(self) -> bool | str:
        """What clients pass as `verify`: the CA bundle with tls, else True."""
        return self.ca_bundle or True

    @property
    def client(self) -> IdPClient:
        return IdPClient(self.client_id, self.client_secret)

    def add_client(
        self,
        client_id: str | None = None,
        client_secret: str | None = None,
        auth_method: str = "client_secret_basic",
    ) -> IdPClient:
        """Register a client allowed the password and refresh_token grants;
        the token endpoint accepts only `auth_method` from it, as the
        client's registered token_endpoint_auth_method."""
        client = IdPClient(
            client_id or f"client-{uuid.uuid4().hex[:8]}",
            secrets.token_urlsafe(16) if client_secret is None else client_secret,
            auth_method,
        )
        with self._db_lock, self._app.app_context():
            models, backend = self._iam.models, self._iam.backend
            record = models.Client(
                client_id=client.client_id,
                client_secret=client.client_secret,
                client_name=client.client_id,
                redirect_uris=[f"{self.url}/callback"],
                grant_types=["password", "refresh_token"],
                response_types=["token"],
                token_endpoint_auth_method=auth_method,
                scope=["openid", "profile", "email"],
            )
            backend.save(record)
            record.audience = [record]
            backend.save(record)
        return client

    def issue(self, client: IdPClient | None = None, scope: str = "openid profile") -> str:
        """A fresh token pair for the user: the token endpoint's JSON answer,
        as a seed tool would store it. Not counted in `calls`."""
        client = client or self.client
        form = {
            "grant_type": "password",
            "username": self.username,
            "password": self._password,
            "scope": scope,
        }
        headers = {}
        if client.auth_method == "client_secret_basic":
            pair = f"{quote(client.client_id, safe='')}:{quote(client.client_secret, safe='')}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        else:
            form["client_id"] = client.client_id
            if client.auth_method == "client_secret_post":
                form["client_secret"] = client.client_secret
        with self._db_lock:
            response = self._app.test_client().post("/oauth/token", data=form, headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"the IdP refused to issue a token: {response.status_code}")
        return str(response.get_data(as_text=True))

    def access_token_works(self, access_token: str) -> bool:
        """Whether the IdP's userinfo endpoint accepts `access_token` now."""
        with self._db_lock:
            response = self._app.test_client().get(
                "/oauth/userinfo", headers={"Authorization": f"Bearer {access_token}"}
            )
        return bool(response.status_code == 200)

    def known_secrets(self) -> set[str]:
        """Every token the IdP ever issued, the client secrets and the user's
        password: what a log check looks for."""
        found = {self._password}
        with self._db_lock, self._app.app_context():
            models, backend = self._iam.models, self._iam.backend
            for token in backend.query(models.Token):
                found.update(filter(None, (token.access_token, token.refresh_token)))
            for client in backend.query(models.Client):
                found.update(filter(None, (client.client_secret,)))
        return found

    def token_calls(self, grant_type: str | None = None, status: int | None = None) -> int:
        """Requests that reached the token endpoint over the network (and were
        answered `status`, if given)."""
        with self._lock:
            return sum(
                1
                for c in self.calls
                if grant_type in (None, c.grant_type) and status in (None, c.status)
            )

    # -- plumbing -----------------------------------------------------------

    def _recording(self, app: WSGIApp, host: str) -> WSGIApp:
        """Records token-endpoint calls (once answered) and serialises requests:
        the two listeners share Canaille's in-memory database. Sets Host to
        SERVER_NAME, as a reverse proxy would: Canaille refuses POSTs to any
        other host. Answers `fail_token_endpoint`'s errors instead of Canaille."""

        def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            environ["HTTP_HOST"] = host
            if environ.get("PATH_INFO") != "/oauth/token" or environ["REQUEST_METHOD"] != "POST":
                return answer(environ, start_response)
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length)
            environ["wsgi.input"] = io.BytesIO(body)
            form = dict(parse_qsl(body.decode("latin-1")))
            authorization = environ.get("HTTP_AUTHORIZATION", "")
            client_auth = "none"
            if authorization.lower().startswith("basic "):
                client_auth = "basic"
            elif "client_secret" in form:
                client_auth = "post"
            answered: list[int] = []

            def recording_start_response(status: str, *args: Any) -> Any:
                answered.append(int(status.split(" ", 1)[0]))
                return start_response(status, *args)

            try:
                return self._failure(recording_start_response) or answer(
                    environ, recording_start_response
                )
            finally:
                call = TokenCall(
                    form.get("grant_type", ""),
                    client_auth,
                    environ["wsgi.url_scheme"],
                    form.get("refresh_token", ""),
                    answered[-1] if answered else 0,
                )
                with self._lock:
                    self.calls.append(call)

        def answer(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
            with self._db_lock:
                result = app(environ, start_response)
                try:
                    return [b"".join(result)]
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()

        return wsgi

    def _failure(self, start_response: Callable[..., Any]) -> list[bytes] | None:
        """`fail_token_endpoint`'s answer, if one is due."""
        with self._lock:
            left, status, retry_after = self._failing
            if left == 0:
                return None
            if left is not None:
                self._failing = (left - 1, status, retry_after)
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
        body = f"{status} {reason}\n".encode()
        headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
        if retry_after is not None:
            headers.append(("Retry-After", str(retry_after)))
        start_response(f"{status} {reason}", headers)
        return [body]


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connecting to it is refused
    (the kernel answers RST), and nobody else can take it meanwhile."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@contextlib.contextmanager
def silent_port() -> Iterator[int]:
    """A loopback port that listens and never accepts: the kernel completes the
    TCP handshake, the request is sent, and no answer ever comes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]
