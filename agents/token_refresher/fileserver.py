"""The controller's file server: each node's injector gets the token files of its pods.

`POST /v1/files` over HTTPS (HTTP/1.1), wire protocol in the issue 10 contract:
the injector names its node's pods (claims), the controller authenticates
the caller (nodeauth.py: TokenReview, injector pod, node), verifies each
claim (claims.py: GET, same UID, same node) and answers with a stream of
NDJSON lines, chunked: a snapshot of every file at once, another whenever
the result changes, a heartbeat after 10 s of silence; the server ends the
stream after about 300 s.

Framing, versioned: the request body's `protocol` (absent: 1) asks, the
answer is in the newest both speak (header `X-Token-Files-Protocol`).
1: one `snapshot` line holds the node. 2: a `pod` line per pod whose line
changed since the last on this stream, then a `commit` line naming the
snapshot's pods by UID (the others as last sent), with its revision and the
refused claims. A line then holds one pod (16 files of 64 KiB at most), not
the node: neither side ever holds a node's files as one string.

What a tenant writes is capped (spec.py: the annotation, entries, templates,
expansions, the file, all sized before anything is expanded) and so is what
a node gets: `max_node_bytes` (16 MiB) per stream, shared max-min fairly
between the namespaces of its pods, the files over a namespace's share
refused as `node_limit`; rendered bytes not yet sent, over all streams, wait
for room in a `RenderBudget` (32 MiB), so that many streams re-rendering at
once (a tenant's Secret used on every node) cannot add up.

Rendering is the injector's of old, moved here: the pod's `to-inject`
annotation as read from the API, the token Secret from the controller's own
Secret watch (the pod's namespace only; a Secret the controller does not
watch, outside `--namespace` or without the selector's labels, is
`no_secret`), the template ConfigMap read by name (re-read every 30 s while a
stream uses it), `spec.render`. Only rendered contents leave: the template
language has no variable for the refresh token or client secret, and a file
that would contain either anyway (a template holding a copy) is refused as
`bad_template`.

Push: each stream subscribes to the (namespace, Secret) pairs and templates
its pods use; the Secret watch's `on_change` and a changed template mark
exactly those streams, which render again and send only if their snapshot
changed. Each stream has a thread of its own and every write a timeout, so a
slow injector holds nobody else's stream.

An open stream's caller is re-checked when the injector pod watch
(nodeauth.py) reports a change of its pod, at once: a deleted, relabelled,
finished or terminating injector pod loses its streams within a second. The
periodic re-check (every `recheck` s) is left with the token: it costs a
TokenReview only once the cached review has lapsed.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import logging
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from agents.common.kube import api_error_text
from agents.token_refresher.claims import Claim, ClaimVerifier, Refusal, VerifiedPod
from agents.token_refresher.config import FilesConfig
from agents.token_refresher.metrics import FilesMetrics
from agents.token_refresher.nodeauth import (
    AuthError,
    AuthUnavailable,
    Caller,
    NodeAuthenticator,
)
from agents.token_refresher.oauth import Token, TokenFormatError
from agents.token_refresher.spec import (
    MAX_FILE_BYTES,
    MAX_TEMPLATE_BYTES,
    Injection,
    SpecError,
    TooLarge,
    parse_to_inject,
    parse_token_secret,
    render,
    rendered_size,
    template_of,
)

if TYPE_CHECKING:  # tls imports cryptography: only the service needs it
    from agents.token_refresher.tls import TlsKeeper

log = logging.getLogger(__name__)

PATH = "/v1/files"
NOT_FOUND = 404
RETRY_AFTER = 5
_DONE_PHASES = ("Succeeded", "Failed")
# Secret values shorter than this are not searched for in rendered files: they
# would match by chance (and give away little).
MIN_SCANNED_SECRET = 8
# How often the template re-reader looks for due templates, at most.
TEMPLATE_POLL = 1.0
MAX_TEMPLATES_PER_NAMESPACE = 64
"""Template ConfigMaps one namespace may use at once (each is re-read every 30 s
while used: 64 are about 2 GETs a second)."""
# Render failures logged with their traceback, remembered so each is logged once.
LOGGED_INTERNAL = 4096
MAX_NODE_BYTES = 16 << 20
"""Rendered bytes per node (one stream), shared fairly between the namespaces
of its pods: the injector keeps every file of its node in memory (192Mi)."""
RENDER_BUDGET_BYTES = 32 << 20
"""Rendered bytes in flight over all streams at once (a pod is rendered, sent
and dropped, one at a time per stream): a tenant with a pod at the caps on
every node, changing its Secret, must not make every stream render at once."""
PROTOCOL = 2
"""The newest wire protocol spoken: 1, one line per snapshot; 2, one line per pod."""
PROTOCOL_HEADER = "X-Token-Files-Protocol"

Key = tuple[str, str]
"""(namespace, name) of a Secret or ConfigMap."""


class SecretSource(Protocol):
    """The token Secrets the controller watches."""

    @property
    def synced(self) -> bool: ...

    def named(self, namespace: str, name: str) -> dict[str, Any] | None: ...


class WatchedSecrets:
    """The controller's Secret WatchCaches as one `SecretSource`.

    A namespace no cache covers has no token Secrets here, whatever the API holds.
    """

    def __init__(self, caches: Sequence[Any]) -> None:
        self.caches = list(caches)

    @property
    def synced(self) -> bool:
        return all(cache.synced for cache in self.caches)

    def named(self, namespace: str, name: str) -> dict[str, Any] | None:
        for cache in self.caches:
            if cache.namespace in (None, namespace):
                found: dict[str, Any] | None = cache.named(namespace, name)
                if found is not None:
                    return found
        return None


class FileProblem(Exception):
    """A file that cannot be rendered now; `reason` as the injector reports it."""

    def __init__(self, reason: str, message: str, *, waiting: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.waiting = waiting

    def wire(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": str(self), "waiting": self.waiting}


# -- templates


@dataclass
class _Template:
    loaded: threading.Event = field(default_factory=threading.Event)
    outcome: tuple[bool, str] = (False, "")
    """(True, the template) or (False, why there is none)."""
    read_at: float = 0.0
    users: set[Hashable] = field(default_factory=set)


class TemplateCache:
    """Template ConfigMaps by name, re-read while in use; thread-safe.

    No ConfigMap watch: a cluster-wide one would hold every ConfigMap of the
    cluster for the few that are templates.
    """

    def __init__(
        self,
        api_client: Any,
        *,
        refresh: float = 30.0,
        request_timeout: float = 10.0,
        max_template_bytes: int = MAX_TEMPLATE_BYTES,
        max_per_namespace: int = MAX_TEMPLATES_PER_NAMESPACE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)
        self.max_template_bytes = max_template_bytes
        """Longer templates are refused (the template text is kept here while in use)."""
        self.max_per_namespace = max_per_namespace
        """Templates read for one namespace at most: each in use is read again every
        `refresh` s, and one tenant's many names must not flood the API server."""
        self._per_namespace: dict[str, int] = {}
        self._refresh = refresh
        self._timeout = request_timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Key, _Template] = {}
        self.reads = 0
        """ConfigMap GETs made so far."""

    def template(self, namespace: str, name: str) -> str:
        """The template text; FileProblem("bad_template") when there is none, or
        when the namespace already has `max_per_namespace` templates here."""
        key = (namespace, name)
        with self._lock:
            entry = self._entries.get(key)
            reader = entry is None
            if entry is None:
                if self._per_namespace.get(namespace, 0) >= self.max_per_namespace:
                    raise FileProblem(
                        "bad_template",
                        f"namespace {namespace} uses more than {self.max_per_namespace} "
                        f"template ConfigMaps (the limit): {name} is not read",
                    )
                self._per_namespace[namespace] = self._per_namespace.get(namespace, 0) + 1
                entry = self._entries[key] = _Template()
        if reader:
            try:
                entry.outcome = self._read(key, None)
            except Exception:
                # Our bug, not the tenant's: the others waiting on this read must
                # not wait out their timeout (nor every later render, forever).
                log.exception("reading template ConfigMap %s/%s failed", namespace, name)
                entry.outcome = (False, f"template ConfigMap {name} could not be read (internal)")
            finally:
                entry.read_at = self._clock()
                entry.loaded.set()
        elif not entry.loaded.wait(self._timeout + 1.0):
            raise FileProblem("bad_template", f"template ConfigMap {name} is still being read")
        ok, text = entry.outcome
        if not ok:
            raise FileProblem("bad_template", text)
        return text

    def use(self, user: Hashable, keys: Iterable[Key]) -> None:
        """`user` (a stream) renders with these templates: keep them fresh for it."""
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None:
                    entry.users.add(user)

    def release(self, user: Hashable) -> None:
        """`user` is gone; templates nobody uses are dropped by `refresh_due`
        (not here: another stream may have just read one it is about to use)."""
        with self._lock:
            for entry in self._entries.values():
                entry.users.discard(user)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def refresh_due(self) -> set[Hashable]:
        """Re-read the templates in use that are due; the users of those that changed."""
        now = self._clock()
        with self._lock:
            for key in [
                k
                for k, e in self._entries.items()
                if not e.users and e.loaded.is_set() and now - e.read_at >= self._refresh
            ]:
                del self._entries[key]  # read for a stream that never used it
                self._per_namespace[key[0]] -= 1
                if not self._per_namespace[key[0]]:
                    del self._per_namespace[key[0]]
            due = [
                (k, e)
                for k, e in self._entries.items()
                if e.users and e.loaded.is_set() and now - e.read_at >= self._refresh
            ]
        changed: set[Hashable] = set()
        for key, entry in due:
            outcome = self._read(key, entry.outcome)
            entry.read_at = self._clock()
            if outcome != entry.outcome:
                entry.outcome = outcome
                with self._lock:
                    changed |= entry.users
        return changed

    def _read(self, key: Key, previous: tuple[bool, str] | None) -> tuple[bool, str]:
        namespace, name = key
        with self._lock:
            self.reads += 1
        try:
            response = self._core.read_namespaced_config_map(
                name, namespace, _preload_content=False, _request_timeout=self._timeout
            )
            config_map: dict[str, Any] | None = json.loads(response.data)
        except Exception as err:
            if getattr(err, "status", None) != NOT_FOUND:
                if previous is not None:
                    # A passing API error must not turn good files into problems.
                    log.warning(
                        "cannot re-read template ConfigMap %s/%s: %s", *key, api_error_text(err)
                    )
                    return previous
                return False, f"cannot read template ConfigMap {name}: {api_error_text(err)}"
            config_map = None
        try:
            return True, template_of(config_map, name, max_bytes=self.max_template_bytes)
        except SpecError as err:
            return False, str(err)


# -- rendering


@dataclass(frozen=True)
class _Parsed:
    """A token Secret as parsed once per resourceVersion (tokens never leave it but rendered)."""

    uid: str
    resource_version: str
    token: Token | None
    problem: FileProblem | None
    secrets: tuple[bytes, ...] = ()
    """The refresh token and client secret: no rendered file may contain them."""

    @property
    def stamp(self) -> list[float | int]:
        expires = self.token.expires_at if self.token is not None else None
        try:
            version = int(self.resource_version)
        except ValueError:
            version = 0
        return [float(expires or 0.0), version]


@dataclass
class _File:
    """One file of a pod, checked and sized, not rendered yet."""

    injection: Injection
    wire: dict[str, Any]
    """The wire entry, without its content."""
    parsed: _Parsed | None = None
    template: str | None = None
    size: int = 0


@dataclass
class PlannedPod:
    """A pod's files before rendering: what they use and what each will weigh."""

    pod: VerifiedPod
    wire: dict[str, Any]
    """The wire entry, without its files."""
    files: list[_File] = field(default_factory=list)
    secrets: set[Key] = field(default_factory=set)
    templates: set[Key] = field(default_factory=set)

    def inputs(self) -> Hashable:
        """Everything the rendered pod depends on: equal inputs, equal line. A
        neighbour's change then costs this pod no render (16 files of 64 KiB)."""
        return (
            self.pod.resource_version,
            self.pod.phase,
            json.dumps(self.wire["problem"], sort_keys=True),
            tuple(
                (
                    json.dumps(f.wire, sort_keys=True),
                    None if f.parsed is None else (f.parsed.uid, f.parsed.resource_version),
                    f.template,
                )
                for f in self.files
            ),
        )


class Renderer:
    """Renders the files of verified pods, one file at a time; thread-safe.

    Whatever goes wrong with one pod or file (a tenant's input we did not
    foresee, our own bug) is that pod's or file's problem (reason `internal`,
    logged once with its traceback), never the stream's nor another pod's.
    """

    def __init__(
        self,
        secrets: SecretSource,
        templates: TemplateCache,
        *,
        secret_selector: str = "",
        max_file_bytes: int = MAX_FILE_BYTES,
        max_node_bytes: int = MAX_NODE_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.secrets = secrets
        self.templates = templates
        self.secret_selector = secret_selector
        self.max_file_bytes = max_file_bytes
        self.max_node_bytes = max_node_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._parsed: dict[Key, _Parsed] = {}
        self._logged: OrderedDict[tuple[str, ...], None] = OrderedDict()

    def forget(self, namespace: str, name: str) -> None:
        """The Secret changed or went: parse it again when next used."""
        with self._lock:
            self._parsed.pop((namespace, name), None)

    def pod(self, pod: VerifiedPod) -> tuple[dict[str, Any], set[Key], set[Key]]:
        """The pod as the wire has it, the Secrets and the templates it uses (no node share)."""
        planned = self.plan(pod)
        return self.render(planned), planned.secrets, planned.templates

    def plan(self, pod: VerifiedPod) -> PlannedPod:
        """The pod's files, sized before anything is expanded."""
        wire: dict[str, Any] = {
            "uid": pod.uid,
            "namespace": pod.namespace,
            "name": pod.name,
            "resourceVersion": pod.resource_version,
            "problem": None,
            "files": [],
        }
        planned = PlannedPod(pod, wire)
        if pod.phase in _DONE_PHASES:
            return planned
        try:
            injections = parse_to_inject(pod.annotations)
        except SpecError as err:
            wire["problem"] = {"reason": "bad_annotation", "message": str(err)}
            return planned
        except Exception:
            self._internal(f"pod {pod.namespace}/{pod.name}", pod.uid, pod.resource_version)
            wire["problem"] = {
                "reason": "internal",
                "message": "the to-inject annotation could not be read (internal error; "
                "the controller's log has it)",
            }
            return planned
        planned.secrets = {(pod.namespace, i.secret_name) for i in injections}
        planned.templates = {
            (pod.namespace, i.template_config_map) for i in injections if i.template_config_map
        }
        planned.files = [self._plan_file(pod, i) for i in injections]
        return planned

    def share(self, pods: Sequence[PlannedPod], node: str) -> None:
        """Refuse the files over each namespace's fair share of the node's limit
        (`max_node_bytes`): max-min fair, so a namespace using less than an even
        share keeps all of it and one tenant's bulk never crowds out another's."""
        demands: dict[str, int] = {}
        for planned in pods:
            for file in planned.files:
                if file.wire["problem"] is None:
                    namespace = planned.pod.namespace
                    demands[namespace] = demands.get(namespace, 0) + file.size
        if sum(demands.values()) <= self.max_node_bytes:
            return
        shares = fair_shares(demands, self.max_node_bytes)
        used: dict[str, int] = {}
        for planned in sorted(pods, key=lambda p: (p.pod.namespace, p.pod.name)):
            namespace = planned.pod.namespace
            for file in planned.files:
                if file.wire["problem"] is not None:
                    continue
                if used.get(namespace, 0) + file.size <= shares[namespace]:
                    used[namespace] = used.get(namespace, 0) + file.size
                    continue
                file.wire["problem"] = FileProblem(
                    "node_limit",
                    f"the token files of namespace {namespace} on node {node} would be over "
                    f"its share ({shares[namespace]} bytes) of the node's limit of "
                    f"{self.max_node_bytes} bytes",
                ).wire()
                file.parsed = None

    def render(self, planned: PlannedPod) -> dict[str, Any]:
        """The pod as the wire has it, its files rendered one after the other."""
        wire = dict(planned.wire)
        wire["files"] = [self._render_file(planned.pod, file) for file in planned.files]
        return wire

    def _plan_file(self, pod: VerifiedPod, injection: Injection) -> _File:
        file = _File(
            injection,
            {
                "container": injection.container,
                "path": injection.path,
                "mode": injection.mode,
                "owner": injection.owner,
                "group": injection.group,
                "secret": injection.secret_name,
                "content": None,
                "stamp": [0.0, 0],
                "problem": None,
            },
        )
        namespace = pod.namespace
        try:
            parsed = self._secret(namespace, injection.secret_name)
            file.wire["stamp"] = parsed.stamp
            if parsed.problem is not None:
                raise parsed.problem
            assert parsed.token is not None
            if injection.template_config_map:
                file.template = self.templates.template(namespace, injection.template_config_map)
            try:
                file.size = rendered_size(
                    file.template, parsed.token, max_bytes=self.max_file_bytes
                )
            except TooLarge as err:
                raise FileProblem("too_large", str(err)) from None
            except SpecError as err:
                raise FileProblem("bad_template", str(err)) from None
            file.parsed = parsed
        except FileProblem as problem:
            file.wire["problem"] = problem.wire()
        except Exception:
            file.wire["problem"] = self._file_internal(pod, injection)
        return file

    def _render_file(self, pod: VerifiedPod, file: _File) -> dict[str, Any]:
        parsed = file.parsed
        if parsed is None or parsed.token is None or file.wire["problem"] is not None:
            return file.wire
        entry = dict(file.wire)
        try:
            try:
                content = render(file.template, parsed.token, max_bytes=self.max_file_bytes)
            except TooLarge as err:
                raise FileProblem("too_large", str(err)) from None
            except SpecError as err:
                raise FileProblem("bad_template", str(err)) from None
            scanned = content.replace(parsed.token.access_token.encode(), b"")
            if any(secret in scanned for secret in parsed.secrets):
                raise FileProblem(
                    "bad_template",
                    f"the file would hold the refresh token or client secret of Secret "
                    f"{file.injection.secret_name}; nodes never get those",
                )
            entry["content"] = base64.b64encode(content).decode()
        except FileProblem as problem:
            entry["problem"] = problem.wire()
        except Exception:
            entry["problem"] = self._file_internal(pod, file.injection)
        return entry

    def _file_internal(self, pod: VerifiedPod, injection: Injection) -> dict[str, Any]:
        self._internal(
            f"pod {pod.namespace}/{pod.name}: {injection.path} in container {injection.container}",
            pod.uid,
            pod.resource_version,
            injection.container,
            injection.path,
        )
        return FileProblem(
            "internal",
            "the file could not be rendered (internal error; the controller's log has it)",
        ).wire()

    def _internal(self, what: str, *key: str) -> None:
        """Log the exception being handled, once per object and version: a bug that
        hits a pod on every render must not flood the log either."""
        with self._lock:
            first = key not in self._logged
            self._logged[key] = None
            self._logged.move_to_end(key)
            while len(self._logged) > LOGGED_INTERNAL:
                self._logged.popitem(last=False)
        if first:
            log.exception("%s: rendering failed; only this is affected", what)
        else:
            log.debug("%s: rendering failed again", what)

    def _secret(self, namespace: str, name: str) -> _Parsed:
        secret = self.secrets.named(namespace, name)
        if secret is None:
            selector = self.secret_selector
            raise FileProblem(
                "no_secret",
                f"no token Secret {name} in namespace {namespace} "
                '(a Secret annotated is-token: "true"'
                + (f" with labels {selector}" if selector else "")
                + ")",
            )
        meta = secret.get("metadata") or {}
        uid, version = str(meta.get("uid") or ""), str(meta.get("resourceVersion") or "")
        key = (namespace, name)
        with self._lock:
            parsed = self._parsed.get(key)
        if parsed is not None and (parsed.uid, parsed.resource_version) == (uid, version):
            return parsed
        # Parsed once per resourceVersion, at one `now`: a token JSON with only a
        # relative expires_in keeps one expiry, so its files do not change per render.
        try:
            content = parse_token_secret(secret)
            token = Token.from_json(content.token_json, self._clock())
            scanned = tuple(
                s.encode()
                for s in (token.refresh_token, content.client_secret)
                if len(s) >= MIN_SCANNED_SECRET
            )
            parsed = _Parsed(uid, version, token, None, scanned)
        except (SpecError, TokenFormatError) as err:
            parsed = _Parsed(
                uid, version, None, FileProblem("bad_secret", f"token Secret {name}: {err}")
            )
        except Exception:
            self._internal(f"token Secret {namespace}/{name}", namespace, name, version)
            parsed = _Parsed(
                uid,
                version,
                None,
                FileProblem(
                    "internal",
                    f"token Secret {name} could not be read (internal error; the "
                    "controller's log has it)",
                ),
            )
        with self._lock:
            self._parsed[key] = parsed
        return parsed


def fair_shares(demands: Mapping[str, int], budget: int) -> dict[str, int]:
    """Max-min fair shares of `budget` (water-filling): a demand under an even share
    is met in full, what it leaves is shared among the others."""
    shares: dict[str, int] = {}
    left = budget
    pending = sorted(demands, key=lambda k: (demands[k], k))
    while pending:
        even = left // len(pending)
        smallest = pending[0]
        if demands[smallest] > even:
            shares.update(dict.fromkeys(pending, even))
            break
        shares[smallest] = demands[smallest]
        left -= demands[smallest]
        pending.pop(0)
    return shares


class RenderBudget:
    """Bytes rendered and not yet sent, over all streams: `hold(n)` waits for room.

    A pod bigger than the whole budget still goes alone (it is bounded by the
    per-file and per-pod caps).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, size: int) -> Iterator[None]:
        size = min(max(size, 1), self.capacity)
        with self._cond:
            self._cond.wait_for(lambda: self._used + size <= self.capacity)
            self._used += size
        try:
            yield
        finally:
            with self._cond:
                self._used -= size
                self._cond.notify_all()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used


# -- streams


@dataclass(eq=False)
class _Stream:
    """One open stream: one injector, its verified pods, what they use."""

    caller: Caller
    token: str
    """Kept to re-check the caller; never logged, never sent."""
    pods: list[VerifiedPod]
    refused: list[Refusal]
    dirty: threading.Event = field(default_factory=threading.Event)
    caller_changed: threading.Event = field(default_factory=threading.Event)
    """The watch saw the caller's pod change: re-check it before anything else."""
    protocol: int = 1
    secrets: set[Key] = field(default_factory=set)
    templates: set[Key] = field(default_factory=set)
    revision: int = 0
    digest: bytes = b""
    pod_digests: dict[str, bytes] = field(default_factory=dict)
    """Protocol 2: the digest of each pod's line as last sent on this stream."""
    pod_inputs: dict[str, Hashable] = field(default_factory=dict)
    """Protocol 2: what each pod's line was rendered from (`PlannedPod.inputs`)."""


class _RequestError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _outcome(status: int) -> str:
    return {
        400: "bad_request",
        401: "unauthenticated",
        403: "forbidden",
        413: "too_many_pods",
        503: "unavailable",
    }.get(status, "bad_request")


def parse_claims(body: bytes, max_pods: int) -> list[Claim]:
    """The claims of a request body; _RequestError 400 or 413."""
    return parse_request(body, max_pods)[0]


def parse_request(body: bytes, max_pods: int) -> tuple[list[Claim], int]:
    """The claims of a request body and the protocol to answer in (the newest both
    speak: a body without `protocol` is 1); _RequestError 400 or 413."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _RequestError(400, "bad_request", "the body is not JSON") from None
    asked = data.get("protocol", 1) if isinstance(data, dict) else 1
    if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        raise _RequestError(400, "bad_request", "protocol must be a number from 1")
    pods = data.get("pods") if isinstance(data, dict) else None
    if not isinstance(pods, list):
        raise _RequestError(400, "bad_request", 'the body must be {"pods": [...]}')
    if len(pods) > max_pods:
        raise _RequestError(
            413, "too_many_pods", f"{len(pods)} pods claimed, at most {max_pods} per request"
        )
    claims: dict[Key, Claim] = {}
    for i, entry in enumerate(pods):
        fields = (
            [entry.get(k) for k in ("namespace", "name", "uid", "resourceVersion")]
            if isinstance(entry, dict)
            else []
        )
        if len(fields) != 4 or not all(isinstance(f, str) and f for f in fields):
            raise _RequestError(
                400,
                "bad_request",
                f"pods[{i}] must have namespace, name, uid and resourceVersion (strings)",
            )
        claim = Claim(*(str(f) for f in fields))
        claims[(claim.namespace, claim.name)] = claim
    return list(claims.values()), min(asked, PROTOCOL)


class _Server(ThreadingHTTPServer):
    # Handler threads are joined by server_close(): no stream outlives the server.
    daemon_threads = False
    block_on_close = True
    allow_reuse_address = True
    # listen()'s backlog (socketserver's default is 5): after a controller
    # restart thousands of injectors reconnect at once, and connections beyond
    # the backlog wait for the kernel's SYN retries (1, 2, 4... s). The kernel
    # caps it at net.core.somaxconn (4096 since Linux 5.4).
    request_queue_size = 4096
    files: FileServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        """The TLS handshake in the connection's own thread, not in the accept loop:
        a client that stalls it holds only itself."""
        context = self.files.ssl_context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.files.config.send_timeout)
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as err:
            log.debug("TLS handshake with %s failed: %s", client_address, err)
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            with contextlib.suppress(OSError):
                tls.shutdown(socket.SHUT_RDWR)
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.exception("file server: unexpected error serving %s", client_address)


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class FileServer:
    """Serves `POST /v1/files`; `start()`, then `close()`. Thread-safe."""

    def __init__(
        self,
        config: FilesConfig,
        *,
        authenticator: NodeAuthenticator,
        verifier: ClaimVerifier,
        renderer: Renderer,
        metrics: FilesMetrics,
        ssl_context: ssl.SSLContext | None,
        rng: random.Random | None = None,
        render_budget: int = RENDER_BUDGET_BYTES,
    ) -> None:
        self.config = config
        self.ssl_context = ssl_context
        self.budget = RenderBudget(render_budget)
        self.authenticator = authenticator
        self.verifier = verifier
        self.renderer = renderer
        self.templates = renderer.templates
        self.metrics = metrics
        self._rng = rng or random.Random()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._streams: set[_Stream] = set()
        self._by_secret: dict[Key, set[_Stream]] = {}
        server_class = _IPv6Server if ":" in config.host else _Server
        self._server = server_class((config.host, config.port), _handler(self))
        self._server.files = self
        authenticator.add_listener(self.injector_changed)
        self._threads = [
            threading.Thread(
                target=self._server.serve_forever, args=(0.1,), name="files-http", daemon=True
            ),
            threading.Thread(target=self._refresh_templates, name="files-templates", daemon=True),
        ]

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> FileServer:
        self.authenticator.start()
        for thread in self._threads:
            thread.start()
        log.info(
            "serving token files on port %d (%s)",
            self.port,
            "TLS" if self.ssl_context is not None else "plain HTTP: tests only",
        )
        return self

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            streams = list(self._streams)
        for stream in streams:
            stream.dirty.set()
        self._server.shutdown()
        self._server.server_close()  # joins the stream threads
        for thread in self._threads:
            thread.join(5)
        self.verifier.close()
        self.authenticator.close()

    @property
    def streams(self) -> int:
        with self._lock:
            return len(self._streams)

    # -- push

    def secret_changed(self, type_: str, secret: dict[str, Any]) -> None:
        """The Secret watch's listener: mark the streams using this Secret (a watch thread)."""
        meta = secret.get("metadata") or {}
        key = (str(meta.get("namespace") or ""), str(meta.get("name") or ""))
        self.renderer.forget(*key)
        with self._lock:
            streams = list(self._by_secret.get(key, ()))
        for stream in streams:
            stream.dirty.set()

    def injector_changed(self, type_: str, pod: dict[str, Any]) -> None:
        """The injector pod watch's listener: re-check that pod's open streams now."""
        uid = (pod.get("metadata") or {}).get("uid")
        with self._lock:
            streams = [s for s in self._streams if s.caller.pod_uid == uid]
        for stream in streams:
            stream.caller_changed.set()
            stream.dirty.set()

    def _refresh_templates(self) -> None:
        poll = min(TEMPLATE_POLL, self.config.template_refresh / 4)
        while not self._stopping.wait(poll):
            try:
                changed = self.templates.refresh_due()
            except Exception:
                log.exception("re-reading templates failed")
                continue
            for stream in changed:
                if isinstance(stream, _Stream):
                    stream.dirty.set()

    def _subscribe(self, stream: _Stream, secrets: set[Key], templates: set[Key]) -> None:
        with self._lock:
            for key in stream.secrets - secrets:
                users = self._by_secret.get(key)
                if users is not None:
                    users.discard(stream)
                    if not users:
                        del self._by_secret[key]
            for key in secrets:
                self._by_secret.setdefault(key, set()).add(stream)
        stream.secrets = secrets
        stream.templates = templates
        self.templates.use(stream, templates)

    def _open(self, stream: _Stream) -> bool:
        with self._lock:
            if len(self._streams) >= self.config.max_streams:
                return False
            self._streams.add(stream)
        self.metrics.streams.inc()
        return True

    def _closed(self, stream: _Stream) -> None:
        self._subscribe(stream, set(), set())
        self.templates.release(stream)
        with self._lock:
            self._streams.discard(stream)
        self.metrics.streams.dec()

    # -- a request

    def _admit(self, handler: BaseHTTPRequestHandler) -> _Stream:
        """Check the request; the stream to serve, or _RequestError."""
        if self._stopping.is_set():
            raise _RequestError(503, "unavailable", "the controller is stopping")
        if not self.renderer.secrets.synced:
            raise _RequestError(503, "unavailable", "the token Secrets are not listed yet")
        length_text = handler.headers.get("Content-Length")
        if length_text is None or not length_text.isdigit():
            raise _RequestError(400, "bad_request", "a Content-Length is required")
        length = int(length_text)
        if length > self.config.max_body_bytes:
            raise _RequestError(
                413, "too_many_pods", f"the body is over {self.config.max_body_bytes} bytes"
            )
        scheme, _, token = (handler.headers.get("Authorization") or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _RequestError(401, "unauthenticated", "a bearer token is required")
        token = token.strip()
        try:
            caller = self.authenticator.authenticate(token)
        except AuthError as err:
            log.info("token files refused (%s): %s", err.reason, err)
            raise _RequestError(err.status, _outcome(err.status), str(err)) from None
        claims, protocol = parse_request(handler.rfile.read(length), self.config.max_pods)
        try:
            pods, refused = self.verifier.verify(caller.node, claims)
        except AuthUnavailable as err:
            raise _RequestError(503, "unavailable", str(err)) from None
        for refusal in refused:
            log.info("%s: claim refused: %s", caller.who, refusal.message)
        return _Stream(caller, token, pods, refused, protocol=protocol)

    def serve(self, handler: BaseHTTPRequestHandler) -> None:
        try:
            stream = self._admit(handler)
        except _RequestError as err:
            self.metrics.requests.labels(_outcome(err.status)).inc()
            headers = [("Retry-After", str(RETRY_AFTER))] if err.status == 503 else []
            _send_json(handler, err.status, {"reason": err.reason, "message": str(err)}, headers)
            return
        if not self._open(stream):
            self.metrics.requests.labels("unavailable").inc()
            _send_json(
                handler,
                503,
                {"reason": "unavailable", "message": "this replica serves enough streams"},
                [("Retry-After", str(RETRY_AFTER))],
            )
            return
        self.metrics.requests.labels("ok").inc()
        try:
            self._stream(handler, stream)
        except OSError as err:
            # A timeout or a reset: this injector is gone or stuck, the others go on.
            log.debug("%s: stream broken: %s", stream.caller.who, err)
        finally:
            self._closed(stream)
            handler.close_connection = True

    def _stream(self, handler: BaseHTTPRequestHandler, stream: _Stream) -> None:
        config = self.config
        handler.send_response(200)
        handler.send_header("Content-Type", "application/x-ndjson")
        handler.send_header(PROTOCOL_HEADER, str(stream.protocol))
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Cache-Control", "no-store")
        handler.end_headers()
        started = time.monotonic()
        end = started + config.stream_lifetime * self._rng.uniform(0.9, 1.1)
        recheck = started + config.recheck
        self._send_snapshot(handler, stream)
        last_sent = time.monotonic()
        while not self._stopping.is_set():
            wait = min(end, recheck, last_sent + config.heartbeat) - time.monotonic()
            if wait > 0 and stream.dirty.wait(wait):
                stream.dirty.clear()
                if self._stopping.is_set():
                    break
                if stream.caller_changed.is_set():
                    stream.caller_changed.clear()
                    if not self._recheck(stream):
                        break
                if self._send_snapshot(handler, stream):
                    last_sent = time.monotonic()
            now = time.monotonic()
            if now >= end:
                break
            if now >= recheck:
                recheck = now + config.recheck
                if not self._recheck(stream):
                    break
            if now >= last_sent + config.heartbeat:
                _chunk(handler, b'{"type":"heartbeat"}\n')
                last_sent = time.monotonic()
        _chunk(handler, b"")  # the last chunk: a clean end, the injector reconnects at once

    def _recheck(self, stream: _Stream) -> bool:
        """Whether the caller may keep its stream (a pod the watch does not hold is read again)."""
        try:
            self.authenticator.authenticate(stream.token, fresh_pod=True)
        except AuthUnavailable as err:
            # The API server's trouble is not the caller's: keep serving.
            log.info("%s: no re-check now (%s); the stream stays", stream.caller.who, err)
        except AuthError as err:
            log.info("%s: loses its stream (%s): %s", stream.caller.who, err.reason, err)
            return False
        return True

    def _send_snapshot(self, handler: BaseHTTPRequestHandler, stream: _Stream) -> bool:
        """Render the stream's pods; send a snapshot if anything changed. True if sent.

        Each pod is planned (its files sized) first, the node's limit shared out,
        then rendered and, in protocol 2, sent and dropped one after the other.
        """
        planned = [self.renderer.plan(pod) for pod in stream.pods]
        self.renderer.share(planned, stream.caller.node)
        secrets: set[Key] = set().union(*(p.secrets for p in planned))
        templates: set[Key] = set().union(*(p.templates for p in planned))
        if secrets != stream.secrets or templates != stream.templates:
            self._subscribe(stream, secrets, templates)
            # A change between the render and the subscription would be missed:
            # render once more (the digest keeps it from being sent twice).
            stream.dirty.set()
        if stream.protocol >= 2:
            return self._send_pods(handler, stream, planned)
        pods = []
        with self.budget.hold(sum(f.size for p in planned for f in p.files)):
            pods = [self.renderer.render(p) for p in planned]
            body = {
                "node": stream.caller.node,
                "pods": pods,
                "refused": [r.wire() for r in stream.refused],
            }
            text = json.dumps(body, separators=(",", ":"), sort_keys=True)
            digest = hashlib.sha256(text.encode()).digest()
            if digest == stream.digest:
                return False
            stream.digest = digest
            stream.revision += 1
            line = json.dumps(
                {"type": "snapshot", "revision": stream.revision, **body}, separators=(",", ":")
            )
            _chunk(handler, line.encode() + b"\n")
        self.metrics.snapshots_sent.inc()
        return True

    def _send_pods(
        self, handler: BaseHTTPRequestHandler, stream: _Stream, planned: Sequence[PlannedPod]
    ) -> bool:
        """Protocol 2: a `pod` line for each pod whose line changed, then a `commit` line
        naming the snapshot's pods. No line holds more than one pod (at most 16 files
        of 64 KiB), so neither side ever holds a node's files as one string."""
        sent = False
        digests: dict[str, bytes] = {}
        inputs: dict[str, Hashable] = {}
        for pod in planned:
            uid = pod.pod.uid
            inputs[uid] = pod.inputs()
            if stream.pod_inputs.get(uid) == inputs[uid] and uid in stream.pod_digests:
                # Rendering is a function of these: the line would be the one sent.
                digests[uid] = stream.pod_digests[uid]
                continue
            with self.budget.hold(sum(f.size for f in pod.files)):
                line = json.dumps(
                    {"type": "pod", "pod": self.renderer.render(pod)},
                    separators=(",", ":"),
                    sort_keys=True,
                ).encode()
                digest = hashlib.sha256(line).digest()
                digests[pod.pod.uid] = digest
                if stream.pod_digests.get(pod.pod.uid) != digest:
                    _chunk(handler, line + b"\n")
                    sent = True
                del line
        commit = {
            "type": "commit",
            "node": stream.caller.node,
            "pods": [pod.pod.uid for pod in planned],
            "refused": [r.wire() for r in stream.refused],
        }
        digest = hashlib.sha256(json.dumps(commit, sort_keys=True).encode()).digest()
        stream.pod_digests, stream.pod_inputs = digests, inputs
        if not sent and digest == stream.digest:
            return False
        stream.digest = digest
        stream.revision += 1
        text = json.dumps({**commit, "revision": stream.revision}, separators=(",", ":"))
        _chunk(handler, text.encode() + b"\n")
        self.metrics.snapshots_sent.inc()
        return True


def _chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
    """One HTTP/1.1 chunk (empty: the last one); the socket's timeout bounds the write.

    Size line, data and CRLF are written apart: a pod's line is not copied once more.
    """
    handler.wfile.write(b"%x\r\n" % len(data))
    if data:
        handler.wfile.write(data)
    handler.wfile.write(b"\r\n")


def _send_json(
    handler: BaseHTTPRequestHandler,
    status: int,
    body: dict[str, Any],
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    data = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.send_header("Connection", "close")
    for name, value in headers:
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(data)
    handler.close_connection = True


def _handler(files: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # The socket timeout: every read and write, so also each chunk sent.
        timeout = files.config.send_timeout

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != PATH:
                _send_json(self, 404, {"reason": "not_found", "message": f"only POST {PATH}"})
                return
            files.serve(self)

        def do_GET(self) -> None:
            _send_json(self, 405, {"reason": "bad_request", "message": f"only POST {PATH}"})

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("files http: " + format, *args)

    return Handler


def build_file_server(
    api_client: Any,
    config: FilesConfig,
    *,
    namespace: str,
    secrets: SecretSource,
    secret_selector: str,
    metrics: FilesMetrics,
    ssl_context: ssl.SSLContext | None,
) -> FileServer:
    """The file server and its parts, as the controller runs it (not started)."""
    return FileServer(
        config,
        authenticator=NodeAuthenticator(
            api_client,
            namespace=namespace,
            metrics=metrics,
            audience=config.audience,
            service_account=config.injector_service_account,
            selector=config.injector_selector,
            review_ttl=config.review_ttl,
            pod_ttl=config.pod_check_ttl,
            max_reviews=config.max_reviews,
            request_timeout=config.request_timeout,
        ),
        verifier=ClaimVerifier(
            api_client,
            metrics=metrics,
            max_entries=config.max_verified_pods,
            request_timeout=config.request_timeout,
        ),
        renderer=Renderer(
            secrets,
            TemplateCache(
                api_client, refresh=config.template_refresh, request_timeout=config.request_timeout
            ),
            secret_selector=secret_selector,
        ),
        metrics=metrics,
        ssl_context=ssl_context,
    )


class FileService:
    """The file server as a controller replica runs it: waits for its TLS material
    (tls.py: made, or read with `--tls-external`), serves, and swaps in a renewed
    certificate for the next handshakes. Without TLS material the replica still
    refreshes tokens; it is only not ready (the headless Service leaves it out)."""

    def __init__(
        self,
        api_client: Any,
        config: FilesConfig,
        *,
        namespace: str,
        secrets: SecretSource,
        secret_selector: str,
        metrics: FilesMetrics,
        keeper: TlsKeeper,
        tls_interval: float = 3600.0,
        tls_retry: float = 60.0,
        sync_wait: float = 30.0,
    ) -> None:
        self.api_client = api_client
        self.sync_wait = sync_wait
        self.config = config
        self.namespace = namespace
        self.secrets = secrets
        self.secret_selector = secret_selector
        self.metrics = metrics
        self.keeper = keeper
        self.tls_interval = tls_interval
        self.tls_retry = tls_retry
        self.server: FileServer | None = None
        self.serving = threading.Event()
        """Set once the server listens (readiness waits for it)."""

    def secret_changed(self, type_: str, secret: dict[str, Any]) -> None:
        """The Controller's listener: forwarded once the server runs (no stream before)."""
        server = self.server
        if server is not None:
            server.secret_changed(type_, secret)

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` (a thread's body)."""
        from agents.token_refresher.tls import ServingContext, TlsError

        material = None
        while material is None and not stop.is_set():
            try:
                material = self.keeper.ensure()
            except TlsError as err:
                log.error(
                    "no TLS material for the file server: %s; retrying in %.0fs",
                    err,
                    self.tls_retry,
                )
                stop.wait(self.tls_retry)
        if material is None:
            return
        context = ServingContext(material)
        try:
            server = build_file_server(
                self.api_client,
                self.config,
                namespace=self.namespace,
                secrets=self.secrets,
                secret_selector=self.secret_selector,
                metrics=self.metrics,
                ssl_context=context.context,
            )
        except OSError as err:
            log.error("cannot serve token files on port %d: %s", self.config.port, err)
            return
        self.server = server.start()
        # Ready once the injector pods are listed, so that the injectors that come
        # then cost no GET each; not forever: without the watch, GETs still serve.
        deadline = time.monotonic() + self.sync_wait
        while not stop.is_set() and time.monotonic() < deadline:
            if server.authenticator.wait_synced(0.2):
                break
        else:
            if not stop.is_set():
                log.warning(
                    "the injector pods are not listed after %.0fs: serving, with a GET "
                    "of each caller's pod",
                    self.sync_wait,
                )
        self.serving.set()
        try:
            self.keeper.maintain(
                stop,
                interval=self.tls_interval,
                retry=self.tls_retry,
                on_change=context.update,
            )
        finally:
            self.server = None
            server.close()
