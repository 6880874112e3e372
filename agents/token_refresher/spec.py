"""What users write: token Secrets, the pods' `to-inject` annotation, templates.

Compatible with oauth2-refresh-controller (CERN): the same Secret keys
(`oauth`, `clientID`, `clientSecret`), the same annotation keys under its
prefix `oauth2-refresh-controller.cern.ch/` or ours, the same default file
`/tmp/oauthtk_<owner>` and the `$(ACCESS_TOKEN)` template variable, so that
existing Secrets and Pods work without edits.

Fields of a `to-inject` entry beyond the original ones (all optional):
`path` (absolute path in the container, default `/tmp/oauthtk_<owner>`),
`mode` (octal string such as "0440" or a number, default 0400), `group` (gid,
default `owner`). Template variables: `$(ACCESS_TOKEN)`, `$(TOKEN_TYPE)`,
`$(EXPIRES_AT)` (unix seconds) and `$(EXPIRES_AT_RFC3339)`.

Everything here is tenant input, so each is capped (the `MAX_*` constants
below; a refusal names the cap and its value) and every string must be
encodable as UTF-8: JSON allows a lone surrogate escape (`"\\ud800"`), which
Python decodes into a str that raises UnicodeEncodeError wherever it is
written out.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

OUR_PREFIX = "token-refresher.node-agents.io"
CERN_PREFIX = "oauth2-refresh-controller.cern.ch"
PREFIXES = (OUR_PREFIX, CERN_PREFIX)  # ours wins when both are set

IS_TOKEN = "is-token"
TO_INJECT = "to-inject"
TOKEN_URL = "token-url"  # per-Secret override of the controller's token endpoint
STATUS = "status"  # written by the controller: ok, or why refreshing stopped

SECRET_TOKEN_KEYS = ("oauth", "oauth2")
DEFAULT_TEMPLATE = "$(ACCESS_TOKEN)"
DEFAULT_MODE = 0o400

_VARIABLE = re.compile(r"\$\(([A-Z0-9_]+)\)")
_BYTES_VARIABLE = re.compile(rb"\$\(([A-Z0-9_]+)\)")

MAX_ANNOTATION_BYTES = 16 << 10
"""A `to-inject` annotation longer than this is refused unparsed: 16 entries
take about 3 KiB (Kubernetes allows 256 KiB for all of a pod's annotations)."""
MAX_ENTRIES = 16
"""`to-inject` entries per pod: each is a file, a Secret and a template read."""
MAX_TEMPLATE_BYTES = 16 << 10
"""A template ConfigMap's `template` text (the EOS one is about 100 bytes)."""
MAX_EXPANSIONS = 16
"""Variables expanded per template: a 600 kB token times 400 would be 240 MB."""
MAX_FILE_BYTES = 64 << 10
"""A rendered file, computed before expanding (real access tokens are 1-4 KiB)."""


class SpecError(ValueError):
    """A Secret, annotation or template that cannot be used; the message says why.

    Messages never contain token values.
    """


class TooLarge(SpecError):
    """Tenant input over one of the caps; the message names the cap and its value."""


def encodable(where: str, text: str) -> str:
    """`text` if it can be written as UTF-8; SpecError naming `where` if not (a lone
    surrogate: JSON's `"\\ud800"` escape is valid ASCII and decodes to one)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise SpecError(
            f"{where} holds a lone surrogate (a \\ud800-style escape): not text"
        ) from None
    return text


class TokenLike(Protocol):
    @property
    def access_token(self) -> str: ...

    @property
    def token_type(self) -> str: ...

    @property
    def expires_at(self) -> float | None: ...


def annotation(annotations: Mapping[str, str] | None, key: str) -> str | None:
    """The value of `<prefix>/<key>` under our prefix, else under CERN's."""
    for prefix in PREFIXES:
        value = (annotations or {}).get(f"{prefix}/{key}")
        if value is not None:
            return value
    return None


def is_token_secret(secret: Mapping[str, Any]) -> bool:
    value = annotation(secret.get("metadata", {}).get("annotations"), IS_TOKEN)
    return value is not None and value.strip().lower() == "true"


@dataclass(frozen=True)
class Injection:
    """One file to keep in one container of a pod."""

    secret_name: str
    container: str
    owner: int
    group: int
    path: str
    mode: int = DEFAULT_MODE
    template_config_map: str = ""


def parse_to_inject(
    annotations: Mapping[str, str] | None,
    *,
    max_bytes: int = MAX_ANNOTATION_BYTES,
    max_entries: int = MAX_ENTRIES,
) -> list[Injection]:
    """The pod's `to-inject` list; [] when the pod has none, SpecError when malformed
    (TooLarge over a cap): the whole list or nothing, so a pod never gets half its files."""
    raw = annotation(annotations, TO_INJECT)
    if raw is None:
        return []
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise TooLarge(f"{TO_INJECT} is {size} bytes, over the limit of {max_bytes} bytes")
    try:
        entries = json.loads(raw)
    except json.JSONDecodeError as err:
        raise SpecError(f"{TO_INJECT} is not valid JSON: {err.msg} at {err.pos}") from None
    except RecursionError:
        raise SpecError(f"{TO_INJECT} is nested too deeply to be a list of objects") from None
    if not isinstance(entries, list):
        raise SpecError(f"{TO_INJECT} must be a JSON list of objects")
    if len(entries) > max_entries:
        raise TooLarge(
            f"{TO_INJECT} has {len(entries)} entries, over the limit of {max_entries} per pod"
        )
    injections = [_injection(i, entry) for i, entry in enumerate(entries)]
    seen: dict[tuple[str, str], int] = {}
    for i, injection in enumerate(injections):
        first = seen.setdefault((injection.container, injection.path), i)
        if first != i:
            raise SpecError(
                f"{TO_INJECT}[{i}] writes {injection.path} in container "
                f"{injection.container} again ({TO_INJECT}[{first}] does): one file, one entry"
            )
    return injections


def _injection(index: int, entry: Any) -> Injection:
    where = f"{TO_INJECT}[{index}]"
    if not isinstance(entry, dict):
        raise SpecError(f"{where} must be an object")
    unknown = set(entry) - {
        "secretName",
        "container",
        "owner",
        "group",
        "path",
        "mode",
        "templateConfigMapName",
    }
    if unknown:
        raise SpecError(f"{where}: unknown fields {sorted(unknown)}")
    secret = entry.get("secretName")
    container = entry.get("container")
    if not isinstance(secret, str) or not secret:
        raise SpecError(f"{where}: secretName must be a non-empty string")
    encodable(f"{where}.secretName", secret)
    if not isinstance(container, str) or not container:
        raise SpecError(f"{where}: container must be a non-empty string")
    encodable(f"{where}.container", container)
    owner = _id(where, "owner", entry.get("owner", 0))
    group = _id(where, "group", entry.get("group", owner))
    path = entry.get("path", f"/tmp/oauthtk_{owner}")
    if not isinstance(path, str):
        raise SpecError(f"{where}: path must be an absolute file path, got {path!r}")
    encodable(f"{where}.path", path)
    if not posixpath.isabs(path) or path.endswith("/"):
        raise SpecError(f"{where}: path must be an absolute file path, got {path!r}")
    template = entry.get("templateConfigMapName", "")
    if not isinstance(template, str):
        raise SpecError(f"{where}: templateConfigMapName must be a string")
    encodable(f"{where}.templateConfigMapName", template)
    return Injection(
        secret_name=secret,
        container=container,
        owner=owner,
        group=group,
        path=posixpath.normpath(path),
        mode=parse_mode(where, entry.get("mode", DEFAULT_MODE)),
        template_config_map=template,
    )


def _id(where: str, name: str, value: Any) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32 - 1:
        raise SpecError(f"{where}: {name} must be a uid/gid number, got {value!r}")
    return value


def parse_mode(where: str, value: Any) -> int:
    """A file mode from an octal string or a number; no group/other write."""
    if isinstance(value, str):
        try:
            value = int(value, 8)
        except ValueError:
            raise SpecError(f"{where}: mode must be octal such as '0400', got {value!r}") from None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0o777:
        raise SpecError(f"{where}: mode must be between 0 and 0777, got {value!r}")
    if value & 0o022:
        raise SpecError(f"{where}: mode {value:04o} lets others write a credential")
    return value


@dataclass(frozen=True)
class TokenSecret:
    """The decoded content of a token Secret (tokens are never shown by repr)."""

    token_json: str
    token_key: str  # "oauth" or "oauth2": written back under the same key
    client_id: str
    client_secret: str
    token_url: str  # "" when the controller's default applies

    def __repr__(self) -> str:
        return f"TokenSecret(key={self.token_key!r}, client_id={self.client_id!r}, <redacted>)"


def parse_token_secret(secret: Mapping[str, Any]) -> TokenSecret:
    """Decode a token Secret; SpecError naming the missing or broken key."""
    data = _decoded(secret)
    key = next((k for k in SECRET_TOKEN_KEYS if k in data), None)
    if key is None:
        raise SpecError(f"Secret has no {' or '.join(SECRET_TOKEN_KEYS)} key")
    missing = [k for k in ("clientID", "clientSecret") if not data.get(k)]
    if missing:
        raise SpecError(f"Secret is missing {', '.join(missing)}")
    for used in (key, "clientID", "clientSecret"):
        encodable(f"Secret key {used}", data[used])
    annotations = secret.get("metadata", {}).get("annotations")
    token_url = (annotation(annotations, TOKEN_URL) or "").strip()
    return TokenSecret(
        token_json=data[key],
        token_key=key,
        client_id=data["clientID"].strip(),
        client_secret=data["clientSecret"].strip(),
        token_url=encodable(f"annotation {TOKEN_URL}", token_url),
    )


def _decoded(secret: Mapping[str, Any]) -> dict[str, str]:
    """Secret data (base64) and stringData, as text."""
    out: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            out[key] = base64.b64decode(value, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, TypeError):
            raise SpecError(f"Secret key {key} is not base64-encoded UTF-8") from None
    for key, value in (secret.get("stringData") or {}).items():
        out[key] = str(value)
    return out


def _values(token: TokenLike) -> dict[str, bytes]:
    expires = token.expires_at
    texts = {
        "ACCESS_TOKEN": token.access_token,
        "TOKEN_TYPE": token.token_type or "Bearer",
        "EXPIRES_AT": "" if expires is None else str(int(expires)),
        "EXPIRES_AT_RFC3339": ""
        if expires is None
        else datetime.fromtimestamp(expires, UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return {name: encodable(f"token {name}", text).encode() for name, text in texts.items()}


def rendered_size(
    template: str | None,
    token: TokenLike,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_expansions: int = MAX_EXPANSIONS,
) -> int:
    """The size `render` would produce, computed without expanding anything.

    SpecError for an unknown variable, TooLarge over `max_expansions` variables
    or `max_bytes` bytes: checked before any string is built, so a huge token
    times many variables costs nothing.
    """
    text = encodable("template", DEFAULT_TEMPLATE if template is None else template)
    values = _values(token)
    found = list(_VARIABLE.finditer(text))
    unknown = sorted({m.group(1) for m in found} - set(values))
    if unknown:
        raise SpecError(f"template uses unknown variables {unknown}; known: {sorted(values)}")
    if len(found) > max_expansions:
        raise TooLarge(
            f"template expands {len(found)} variables, over the limit of {max_expansions}"
        )
    size = len(text.encode()) + sum(
        len(values[m.group(1)]) - len(m.group(0).encode()) for m in found
    )
    if size > max_bytes:
        raise TooLarge(f"the file would be {size} bytes, over the limit of {max_bytes} bytes")
    return size


def render(
    template: str | None,
    token: TokenLike,
    *,
    max_bytes: int = MAX_FILE_BYTES,
    max_expansions: int = MAX_EXPANSIONS,
) -> bytes:
    """The file content: the template with its variables expanded.

    An unknown `$(NAME)` is an error, not left in place: a typo would
    otherwise write a broken credential that fails far from here. The caps
    are checked first (`rendered_size`).
    """
    rendered_size(template, token, max_bytes=max_bytes, max_expansions=max_expansions)
    text = (DEFAULT_TEMPLATE if template is None else template).encode()
    values = _values(token)
    return _BYTES_VARIABLE.sub(lambda m: values[m.group(1).decode()], text)


def template_of(
    config_map: Mapping[str, Any] | None, name: str, *, max_bytes: int = MAX_TEMPLATE_BYTES
) -> str:
    """The `template` key of the named ConfigMap; SpecError when it is not there,
    is not text or is over `max_bytes` (TooLarge)."""
    if config_map is None:
        raise SpecError(f"template ConfigMap {name} not found")
    template = (config_map.get("data") or {}).get("template")
    if not isinstance(template, str):
        raise SpecError(f"template ConfigMap {name} has no 'template' key")
    encodable(f"template ConfigMap {name}", template)
    size = len(template.encode())
    if size > max_bytes:
        raise TooLarge(
            f"template ConfigMap {name} is {size} bytes, over the limit of {max_bytes} bytes"
        )
    return template
