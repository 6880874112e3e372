"""Settings of the cluster roles, as documented frozen dataclasses (cli.py fills them)."""

from __future__ import annotations

from dataclasses import dataclass, field

OFFLINE_IDLE = 30 * 86400.0
"""Keycloak's default Offline Session Idle: an offline token unused this long ends."""


@dataclass(frozen=True)
class IdPConfig:
    """How the controller talks to identity providers."""

    token_url: str = ""
    """Default token endpoint; a Secret may name its own with `<prefix>/token-url`,
    which must then be covered by this one or by `allowed_token_urls`."""
    allowed_token_urls: tuple[str, ...] = ()
    """Further URLs a Secret's own token URL may be at or below (same scheme, host
    and port, normalised; the path equal or under theirs on a segment boundary).
    Empty: only `token_url`. The controller sends the Secret's refresh token and
    client secret there, from inside the cluster network: a tenant must not pick
    an internal host."""
    ca_bundle: str = ""
    """CA bundle for the IdP's TLS; empty: the system store (or REQUESTS_CA_BUNDLE)."""
    allow_http: bool = False
    auth_method: str = "client_secret_basic"
    request_timeout: float = 10.0
    """Seconds for a whole IdP request (connect, TLS, headers and body): a server
    that trickles its answer is cut off then, not after each silent interval."""
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
class FilesConfig:
    """The controller's file server: each injector's node gets its pods' token files."""

    enabled: bool = True
    """False with `--files-address off`: this replica only refreshes (injectors must
    then reach another replica)."""
    host: str = ""
    """Address to listen on; empty: every address (IPv4)."""
    port: int = 8443
    """The headless Service's `files` port."""
    namespace: str = "default"
    """The controller's own namespace (its ServiceAccount mount): the injector pods,
    the TLS Secret and the CA ConfigMap are there."""
    audience: str = "node-agents.io/token-files"
    """Audience of the injectors' projected tokens: a token made for the API server
    or anyone else is refused by the TokenReview."""
    tls_secret: str = "token-refresher-tls"
    """Secret (type kubernetes.io/tls, this namespace) with the serving certificate and CA."""
    ca_configmap: str = "token-refresher-ca"
    """ConfigMap (this namespace) publishing the CA bundle the injectors trust."""
    tls_names: tuple[str, ...] = ()
    """DNS names / IPs of the serving certificate; empty: the Service's names."""
    tls_external: bool = False
    """The Secret and ConfigMap are managed by someone else (cert-manager,
    trust-manager): read only, never created or rotated."""
    injector_service_account: str = "token-refresher-injector"
    """Only this ServiceAccount's tokens (in this namespace) are accepted."""
    injector_selector: str = (
        "app.kubernetes.io/name=token-refresher,app.kubernetes.io/component=injector"
    )
    """Labels the caller's pod must carry: a pod that merely borrows the
    ServiceAccount is no injector."""
    max_pods: int = 1024
    """Claims per request; more is answered 413. Kubernetes runs at most 110 pods
    a node by default and some distributions allow 500 (`--max-pods`); only the
    pods that ask for tokens are claimed."""
    max_body_bytes: int = 1 << 20
    """Request bodies larger than this are refused unread (1024 claims take ~150 KB)."""
    max_streams: int = 10_000
    """Open streams at most (one thread each); beyond, 503: the injector tries
    another replica. 5,000 nodes fit in one replica."""
    heartbeat: float = 10.0
    """Seconds of silence after which a heartbeat line is sent (the injector
    gives up on a stream after 30 s of silence)."""
    stream_lifetime: float = 300.0
    """A stream ends after this (±10 % jitter): its token is reviewed again at
    the reconnection, and the injectors spread over the replicas."""
    recheck: float = 30.0
    """An open stream re-checks its caller this often: its token once the review
    cached for it lapsed (its pod comes from the watch, whose changes re-check
    the pod's streams at once)."""
    review_ttl: float = 300.0
    """A TokenReview answer is reused this long at most (never past the token's
    expiry). The injector pod watch sees a deleted pod, which is what invalidates
    a pod-bound token; what is left to the review is rarer (nodeauth.py)."""
    max_reviews: int = 10_000
    """Cached TokenReview answers at most (two per node while tokens rotate)."""
    pod_check_ttl: float = 30.0
    """An injector pod read with a GET (not in the watch yet, or the watch not
    listed yet) is reused this long when a stream opens."""
    max_verified_pods: int = 20_000
    """Claimed pods remembered (LRU), reused while the claimed resourceVersion
    is the one read: a reconnection costs no GET for pods that did not change."""
    template_refresh: float = 30.0
    """A template ConfigMap in use is read again this often (no ConfigMap watch:
    few are used, and a cluster-wide watch would hold every ConfigMap)."""
    send_timeout: float = 10.0
    """Seconds one write to an injector may take: a stuck client loses its stream,
    it does not hold anyone else's."""
    request_timeout: float = 10.0
    """Seconds for each API request (TokenReview, pod and ConfigMap reads)."""


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
    refresh_workers: int = 8
    """IdP requests in flight at once: refreshes are spread over the token
    lifetimes, so a few workers keep thousands of Secrets fresh, and a slow IdP
    holds at most `refresh_per_host` of them."""
    refresh_per_host: int = 2
    """IdP requests in flight to one host:port at once: a slow or hostile token
    endpoint delays only its own Secrets, never every worker."""
    stall_limit: float = 30.0
    """Seconds the pass or a worker may go without progress (each of their steps
    is bounded by `request_timeout` or an API timeout of 10 s) before this replica
    stops renewing its Lease, so that a standby takes over."""
    files: FilesConfig = field(default_factory=FilesConfig)
    """The file server every replica runs (leader and standbys)."""


@dataclass(frozen=True)
class ControllerLinkConfig:
    """How an injector reaches the controller replicas that serve its files."""

    urls: tuple[str, ...] = ("https://token-refresher-controller:8443",)
    """Each URL's host is resolved to all its addresses (a headless Service gives
    one per ready replica); they are tried in turn, the next after an error."""
    server_name: str = ""
    """Name the serving certificate must carry; empty: each URL's host."""
    token_file: str = "/var/run/secrets/node-agents.io/token-files/token"
    """The projected ServiceAccount token (audience node-agents.io/token-files);
    re-read at every connection, since the kubelet rotates it."""
    ca_configmap: str = "token-refresher-ca"
    """ConfigMap (key ca.crt) in the injector's own namespace holding the CA bundle
    the controller's certificate must chain to; read by name, nothing else."""
    ca_file: str = ""
    """A mounted CA bundle instead of the ConfigMap (cert-manager, trust-manager)."""
    namespace: str = "default"
    """The injector's own namespace, where the CA ConfigMap lives."""
    state_file: str = "/var/lib/token-injector/files.json"
    """The last files received, so that a restarted injector container rewrites
    them while the controller is unreachable (an emptyDir survives restarts)."""
    read_timeout: float = 30.0
    """Silence that ends a stream: the server sends a heartbeat every 10 s."""
    connect_timeout: float = 10.0
    backoff_base: float = 0.5
    """First retry delay after a failure; doubles per failure, with jitter."""
    backoff_cap: float = 10.0
    """Longest delay between attempts: a controller back up is found within this.
    Short, since an attempt on a replica that is down costs it nothing (a refused
    connect); the jitter (half to all of the delay) spreads the reconnects of
    every node after a restart over about 5 s."""
    debounce: float = 0.2
    """A change of this node's pods waits this long for more before the stream is
    reopened: a burst of pod events costs one reconnection, not one each."""
    ready_grace: float = 60.0
    """With pods to serve, not ready once this long without a live stream (a
    state file loaded at start counts as one, once)."""


@dataclass(frozen=True)
class InjectorConfig:
    node_name: str
    proc_root: str = "/proc"
    """Where the host's processes are seen (hostPID: /proc)."""
    interval: float = 60.0
    """Every file is checked (and rewritten if changed or gone) at least this often;
    new files from the controller and pod changes are handled at once."""
    dry_run: bool = False
    workers: int = 8
    """Files written in parallel (fsync dominates a write)."""
    allowed_path_prefixes: tuple[str, ...] = ("/tmp/",)
    """Where in a container a pod may have its token file written, matched on path
    components after `.`, `..` and `//` are folded: `/tmp/` allows `/tmp/x` and
    `/tmp/a/b`, not `/tmpx`. `/tmp/` holds the default path (`/tmp/oauthtk_<owner>`)
    and is private to the container in most pods; admins add volumes' paths
    knowingly (a volume shared with other users is reached with the rights of
    whichever owner a pod names)."""
    write_timeout: float = 10.0
    """Seconds one file's write may take once started (a healthy one takes
    milliseconds; fsync on a busy disk, seconds). A write past it is reported
    and its thread left behind: a filesystem that stops answering (overlayfs
    over a hung FUSE mount, as CVMFS-backed images are) holds only that file."""
    max_stuck_writes: int = 16
    """Write threads left blocked in the kernel at most; each is replaced while
    fewer are stuck. At the limit the injector is not ready, and the files of a
    container with a stuck write wait until it returns."""
    controller: ControllerLinkConfig = field(default_factory=ControllerLinkConfig)
    """Where the files come from: the controller's file stream (no Secret is read)."""
