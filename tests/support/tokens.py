"""Token Secrets as users create them, and reading them back (token refresher tests)."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any

from agents.token_refresher.spec import CERN_PREFIX


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def token_secret_object(
    name: str,
    values: Mapping[str, str | None],
    *,
    namespace: str = "default",
    prefix: str = CERN_PREFIX,
) -> dict[str, Any]:
    """A Secret annotated `<prefix>/is-token: "true"` holding `values` base64-encoded
    (a None value leaves its key out)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {f"{prefix}/is-token": "true"},
        },
        "type": "Opaque",
        "data": {key: b64(value) for key, value in values.items() if value is not None},
    }


def token_of(secret: Mapping[str, Any]) -> Any:
    """The token JSON a Secret holds (key `oauth`, else `oauth2`), decoded."""
    data = secret["data"]
    key = "oauth" if "oauth" in data else "oauth2"
    return json.loads(base64.b64decode(data[key]))
