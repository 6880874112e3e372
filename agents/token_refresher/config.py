"""Settings of the cluster roles, as documented frozen dataclasses (cli.py fills them)."""

from __future__ import annotations

from dataclasses import dataclass, field

OFFLINE_IDLE = 30 * 86400.0
"""Keycloak's default Offline Session Idle: an offline token unused this long ends."""


@dataclass(frozen=True)
class IdPConfig:
    """How the controller talks to identity providers."""

    token_url: str = ""
    """Default token endpoint; a Secret may name its own with `<prefix>/token-url`."""
    allowed_token_urls: tuple[str, ...] = ()
    """URL prefixes a Secret's own token URL must start with; empty: any https URL.
    The controller sends the Secret's refresh token and client secret there,
    from inside the cluster network: sites that let many users create Secrets
    should list their IdPs."""
    ca_bundle: str = ""
    """CA bundle for the IdP's TLS; empty: the system store (or REQUESTS_CA_BUNDLE)."""
    allow_http: bool = False
    auth_method: str = "client_secret_basic"
    request_timeout: float = 10.0
    refresh_fraction: float = 0.8
    """Refresh at this share of the lifetime, with 10% jitter."""
    idle_window: float = 3600.0
    """Tokens without an expiry are refreshed at least this often, so that an
    offline refresh token never idles out."""
    min_refresh_interval: float = 10.0
    """Never sooner than this after a token was issued: an IdP answering
    `expires_in: 0` must not get a refresh loop."""
    offline_idle: float = OFFLINE_IDLE
    """An offline token (`refresh_expires_in: 0`) ends once unused this long:
    Keycloak's Offline Session Idle, 30 days by default. Only its metric (and
    so the alert) uses it."""


@dataclass(frozen=True)
class LeaseConfig:
    """Leader election through a coordination.k8s.io/v1 Lease (client-go's rules)."""

    name: str = "token-refresher"
    namespace: str = "default"
    identity: str = ""
    duration: float = 30.0
    """A leader that stops renewing is replaced after this long."""
    renew_interval: float = 5.0
    """How often the leader renews, and candidates retry."""


@dataclass(frozen=True)
class ControllerConfig:
    idp: IdPConfig = field(default_factory=IdPConfig)
    lease: LeaseConfig = field(default_factory=LeaseConfig)
    namespaces: tuple[str, ...] = ()
    """Namespaces whose token Secrets are refreshed; empty: all."""
    secret_selector: str = ""
    """Label selector the Secrets are listed with; empty: every Secret."""
    interval: float = 5.0
    """Longest sleep between passes over the Secrets (a Secret change wakes it)."""
    dry_run: bool = False
    """Decide and report, but call no IdP and write no Secret."""
    conflict_retries: int = 5
    """Re-reads after a 409 on the Secret write, within one pass."""
    backoff_cap: float = 60.0


@dataclass(frozen=True)
class InjectorConfig:
    node_name: str
    proc_root: str = "/proc"
    """Where the host's processes are seen (hostPID: /proc)."""
    interval: float = 60.0
    """Every file is checked (and rewritten if changed or gone) at least this often;
    Secret and pod changes are handled at once."""
    dry_run: bool = False
    workers: int = 8
    """Files written in parallel (fsync dominates a write)."""
    secret_selector: str = ""
    """Label selector the Secrets are listed with; empty: every Secret."""
