"""The controller's TLS: its CA and serving certificate in a Secret, the CA bundle in a ConfigMap.

The file server (every controller replica) serves over TLS; injectors trust
only the CA bundle published in the ConfigMap `token-refresher-ca` (key
`ca.crt`). By default the controller is its own CA, made with
`cryptography` (no new dependency, no cert-manager needed):

- The Secret `token-refresher-tls` (type `kubernetes.io/tls`, keys `tls.crt`,
  `tls.key`, `ca.crt`, `ca.key`) holds the CA and the serving certificate.
  The first replica to find it missing creates it; a replica that loses the
  race (409 AlreadyExists) reads the winner's. Every write is conditional on
  the resourceVersion read; on 409 the keeper reads again and decides again.
- The serving certificate (EC P-256, serverAuth, the `names` as SANs, 30 days)
  is reissued when less than a third of its validity is left or when a name
  is missing from its SANs.
- The CA (EC P-256, pathlen 0, 365 days) is rotated when less than a third of
  its validity is left, in this order, so that no injector ever sees a serving
  certificate from a CA it does not trust yet:
    1. a new CA is made and written to the Secret (`ca.crt`, `ca.key`); the
       serving certificate stays the one the old CA issued. The key is stored
       before anyone is asked to trust its certificate.
    2. the ConfigMap bundle becomes new CA + old CA (the old one stays until
       it expires), and the time of that change is written in its annotation
       `token-refresher.node-agents.io/ca-bundle-since`.
    3. only once the bundle has held the new CA for `trust_delay` (1 h) is
       the serving certificate reissued by the new CA. Injectors re-read the
       bundle at every connection (streams end every ~300 s) or through a
       ConfigMap volume (the kubelet refreshes it within about a minute):
       by then they all trust both, and the switch breaks no one. Connections
       already open are not affected by any of this.
  A serving certificate that cannot be used at all (expired, unparsable) is
  replaced at once, whatever the delay: waiting would help no one.
- Bad material in the Secret: the CA is what injectors trust, so it is never
  replaced while it can be parsed. A broken serving pair beside a good CA is
  reissued (it is derived material). A broken CA beside a working serving
  pair is an error, and nothing is written: the serving certificate may be
  someone's deliberate choice and the CA cannot be renewed without its key;
  delete the Secret to start again. When nothing in it parses, it is
  replaced (logged). A Secret marked as cert-manager's is never written.

Using cert-manager instead (`--tls-external`): the controller only reads the
Secret and the ConfigMap, never creates, renews or rotates anything, and
reports a missing ConfigMap as an error (publishing it is the operator's job).
For example, with cert-manager and trust-manager installed::

    apiVersion: cert-manager.io/v1
    kind: Issuer            # a CA issuer, itself from a self-signed bootstrap
    metadata: {name: token-refresher-ca, namespace: node-agents}
    spec: {ca: {secretName: token-refresher-root}}
    ---
    apiVersion: cert-manager.io/v1
    kind: Certificate
    metadata: {name: token-refresher-tls, namespace: node-agents}
    spec:
      secretName: token-refresher-tls          # tls.crt, tls.key, ca.crt
      issuerRef: {name: token-refresher-ca, kind: Issuer}
      privateKey: {algorithm: ECDSA, size: 256, rotationPolicy: Always}
      usages: [server auth, digital signature]
      dnsNames:
        - token-refresher-controller
        - token-refresher-controller.node-agents
        - token-refresher-controller.node-agents.svc
        - token-refresher-controller.node-agents.svc.cluster.local
    ---
    apiVersion: trust.cert-manager.io/v1alpha1
    kind: Bundle
    metadata: {name: token-refresher-ca}       # the ConfigMap's name
    spec:
      sources: [{secret: {name: token-refresher-root, key: ca.crt}}]
      target:
        configMap: {key: ca.crt}
        namespaceSelector:
          matchLabels: {kubernetes.io/metadata.name: node-agents}

and the controller runs with `--tls-external` (TOKEN_REFRESHER_TLS_EXTERNAL=true).
When rotating the CA there, keep the old one in the Bundle's sources until
every serving certificate it issued has been replaced.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import ipaddress
import json
import logging
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agents.token_refresher.spec import OUR_PREFIX

# cryptography is imported where it is used: the injector imports this module
# for `client_context` alone (pure `ssl`), and cryptography costs ~12 MB of RSS
# on every node.
if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

log = logging.getLogger(__name__)

SECRET_NAME = "token-refresher-tls"
CONFIGMAP_NAME = "token-refresher-ca"
SERVICE_NAME = "token-refresher-controller"
TLS_CRT, TLS_KEY, CA_CRT, CA_KEY = "tls.crt", "tls.key", "ca.crt", "ca.key"
SECRET_TYPE = "kubernetes.io/tls"
BUNDLE_SINCE = f"{OUR_PREFIX}/ca-bundle-since"
"""ConfigMap annotation: when the bundle last changed (RFC 3339), for the trust delay."""

CA_VALIDITY = timedelta(days=365)
CERT_VALIDITY = timedelta(days=30)
CLOCK_SKEW = timedelta(minutes=5)
"""Certificates start this much in the past: a node whose clock is a little
behind must not see a certificate that is not valid yet."""
RENEW_FRACTION = 1 / 3
TRUST_DELAY = timedelta(hours=1)
CONFLICT_RETRIES = 5
CA_COMMON_NAME = "node-agents token-refresher CA"
# cert-manager marks the Secrets it writes (cert-manager.io/v1 Certificate docs).
CERT_MANAGER_ANNOTATION = "cert-manager.io/certificate-name"
CONFLICT, NOT_FOUND = 409, 404
REQUEST_TIMEOUT = 10


class TlsError(RuntimeError):
    """The TLS material cannot be had (API errors, missing objects, conflicts that do not end)."""


class TlsMaterialError(TlsError):
    """The Secret or ConfigMap holds material that cannot be used as it is."""


# -- pure functions: certificates -------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    """A certificate (PEM, possibly followed by its chain) and its private key (PEM)."""

    cert_pem: str
    key_pem: str


def _utc(when: float) -> datetime:
    return datetime.fromtimestamp(when, UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: PrivateKeyTypes) -> str:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    from cryptography import x509

    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(now: float, validity: timedelta = CA_VALIDITY) -> KeyPair:
    """A new self-signed CA (EC P-256, CA:true pathlen 0, keyCertSign)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _new_key()
    start = _utc(now)
    # The full time in the name: two CAs made the same day must differ, since
    # verifiers look issuers up by subject (the key identifiers then decide).
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, f"{CA_COMMON_NAME} {start:%Y-%m-%dT%H:%M:%SZ}")]
    )
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return KeyPair(_cert_pem(cert), _key_pem(key))


def _general_name(name: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def normalize_name(name: str) -> str:
    """A SAN as compared: DNS names lower-cased, IP addresses in their canonical form."""
    name = name.strip()
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name.lower().rstrip(".")


def issue_serving_cert(
    ca: KeyPair, names: Sequence[str], now: float, validity: timedelta = CERT_VALIDITY
) -> KeyPair:
    """A serving certificate for `names` (DNS names and IPs), signed by `ca`.

    It ends no later than the CA: a chain is only as valid as its shortest link.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    wanted = [normalize_name(n) for n in names if n.strip()]
    if not wanted:
        raise ValueError("a serving certificate needs at least one name")
    ca_cert = parse_certificates(ca.cert_pem)[0]
    ca_key = parse_private_key(ca.key_pem)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TlsMaterialError("the CA key is not an EC key")
    key = _new_key()
    start = _utc(now)
    end = min(start + validity, ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        # Verifiers match the SANs only (RFC 6125); the CN is for people.
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, wanted[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(n) for n in dict.fromkeys(wanted)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    return KeyPair(_cert_pem(cert), _key_pem(key))


def parse_certificates(pem: str) -> list[x509.Certificate]:
    """Every certificate of a PEM text, in order; TlsMaterialError when there is none."""
    from cryptography import x509

    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as err:
        raise TlsMaterialError(f"not a PEM certificate: {err}") from err
    if not certs:  # pragma: no cover - cryptography raises on no certificate
        raise TlsMaterialError("no certificate in the PEM text")
    return certs


def parse_private_key(pem: str) -> PrivateKeyTypes:
    """A private key from PEM (unencrypted); TlsMaterialError when it is not one."""
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError) as err:
        raise TlsMaterialError(f"not a PEM private key: {err}") from err


def seconds_left(cert: x509.Certificate, now: float) -> float:
    """Seconds until `cert` expires (negative once it has)."""
    return cert.not_valid_after_utc.timestamp() - now


def is_due(cert: x509.Certificate, now: float, fraction: float = RENEW_FRACTION) -> bool:
    """True when less than `fraction` of the certificate's validity is left."""
    start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
    return end - now < (end - start) * fraction


def is_current(cert: x509.Certificate, now: float) -> bool:
    """True while `now` is within the certificate's validity."""
    return cert.not_valid_before_utc.timestamp() <= now < cert.not_valid_after_utc.timestamp()


def san_names(cert: x509.Certificate) -> frozenset[str]:
    """The DNS names and IP addresses of the certificate's SANs, normalized."""
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return frozenset()
    found = [normalize_name(n) for n in san.get_values_for_type(x509.DNSName)]
    found += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    return frozenset(found)


def signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when `issuer` signed `cert` (names and signature checked, not validity)."""
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _matches(cert: x509.Certificate, key: PrivateKeyTypes) -> bool:
    return cert.public_key() == key.public_key()


def default_names(namespace: str, service: str = SERVICE_NAME) -> tuple[str, ...]:
    """The Service's names a client may use: short, namespaced, .svc and the full DNS name."""
    return (
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.cluster.local",
    )


def bundle_pem(certs: Iterable[x509.Certificate]) -> str:
    """Certificates as one PEM bundle (each once, in order)."""
    from cryptography.hazmat.primitives import hashes

    seen: dict[bytes, x509.Certificate] = {}
    for cert in certs:
        seen.setdefault(cert.fingerprint(hashes.SHA256()), cert)
    return "".join(_cert_pem(c) for c in seen.values())


# -- what the server uses ----------------------------------------------------------------


@dataclass(frozen=True)
class TlsMaterial:
    """What one `ensure()` found: the serving pair, its CA and the published bundle."""

    cert_pem: str
    """tls.crt: the serving certificate (and its chain, if the Secret has one)."""
    key_pem: str
    """tls.key."""
    ca_pem: str
    """The CA that issued the serving certificate, when known ("" otherwise)."""
    bundle_pem: str
    """The ConfigMap's ca.crt: every CA injectors trust (two during a rotation)."""
    serving_not_after: float
    ca_not_after: float | None
    secret_version: str = ""

    def seconds_left(self, now: float) -> dict[str, float]:
        """{"serving": s, "ca": s}: seconds until each expires, for
        token_refresher_tls_certificate_expiry_seconds{certificate}."""
        left = {"serving": self.serving_not_after - now}
        if self.ca_not_after is not None:
            left["ca"] = self.ca_not_after - now
        return left

    def same_serving(self, other: TlsMaterial | None) -> bool:
        return other is not None and (other.cert_pem, other.key_pem) == (
            self.cert_pem,
            self.key_pem,
        )


@contextlib.contextmanager
def _pem_path(text: str) -> Iterator[str]:
    """A path to read `text` from, for `load_cert_chain`, which takes only file names.

    A memfd (Linux) keeps the private key off every filesystem; elsewhere a
    private temporary directory.
    """
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("token-refresher-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, text.encode())
            path = f"/proc/self/fd/{fd}"
            if os.path.exists(path):  # /proc may be missing in odd sandboxes
                yield path
                return
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="token-refresher-tls-") as tmp:
        path = str(Path(tmp) / "pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as file:
            file.write(text)
        yield path


def _load_chain(context: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    with _pem_path(cert_pem) as cert_path, _pem_path(key_pem) as key_path:
        try:
            context.load_cert_chain(cert_path, key_path)
        except ssl.SSLError as err:
            raise TlsMaterialError(f"OpenSSL refuses the serving pair: {err}") from err


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    """A server SSLContext for the serving pair: TLS 1.2 or later, no client certificates
    (injectors authenticate with a ServiceAccount token)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_NONE
    _load_chain(context, material.cert_pem, material.key_pem)
    return context


def client_context(ca_bundle_pem: str) -> ssl.SSLContext:
    """A client SSLContext trusting only `ca_bundle_pem` (not the system store), with
    host name checking (DNS names and IP addresses against the SANs)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED, check_hostname
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cadata=ca_bundle_pem)
    except (ssl.SSLError, ValueError) as err:
        raise TlsMaterialError(f"the CA bundle cannot be loaded: {err}") from err
    return context


class ServingContext:
    """A server SSLContext whose certificate can be replaced while it serves.

    Give `context` to the server once; `update(material)` makes every later
    handshake use the new pair, and connections already open keep theirs.
    How: `context.sni_callback` runs for every ClientHello (with a server
    name or None: Python ssl docs, SSLContext.sni_callback) and switches the
    connection to the newest context (`SSLSocket.context` setter, OpenSSL's
    SSL_set_SSL_CTX), which is built whole before it is swapped in.
    Calling `load_cert_chain` again on a context that is serving would work
    too (OpenSSL copies the certificate into each connection at SSL_new), but
    it swaps the certificate and then the key in two steps, both without the
    GIL: a handshake in between finds no usable key.
    """

    def __init__(self, material: TlsMaterial) -> None:
        self._current = server_context(material)
        self.material = material
        self.context = server_context(material)
        self.context.sni_callback = self._select

    def update(self, material: TlsMaterial) -> None:
        """Serve `material` from the next handshake on (no-op when the pair is the same)."""
        if material.same_serving(self.material):
            return
        fresh = server_context(material)  # raises before anything changes
        self._current, self.material = fresh, material

    def _select(
        self,
        connection: ssl.SSLSocket | ssl.SSLObject,
        server_name: str | None,
        _: ssl.SSLContext,
    ) -> None:
        connection.context = self._current


# -- the keeper: the Secret and the ConfigMap ----------------------------------------------


@dataclass
class _Found:
    """The Secret's material, each pair only when it parses and its key matches."""

    ca: KeyPair | None = None
    ca_cert: x509.Certificate | None = None
    serving: KeyPair | None = None
    serving_cert: x509.Certificate | None = None
    problems: tuple[str, ...] = ()


def _decode(data: dict[str, Any], key: str) -> str:
    raw = data.get(key)
    if not raw:
        raise TlsMaterialError(f"{key} is missing")
    try:
        return base64.b64decode(raw, validate=True).decode()
    except (ValueError, UnicodeDecodeError) as err:
        raise TlsMaterialError(f"{key} is not base64 PEM text") from err


def _pair(data: dict[str, Any], cert_key: str, key_key: str) -> tuple[KeyPair, x509.Certificate]:
    cert_pem, key_pem = _decode(data, cert_key), _decode(data, key_key)
    try:
        cert = parse_certificates(cert_pem)[0]
    except TlsMaterialError as err:
        raise TlsMaterialError(f"{cert_key}: {err}") from err
    try:
        key = parse_private_key(key_pem)
    except TlsMaterialError as err:
        raise TlsMaterialError(f"{key_key}: {err}") from err
    if not _matches(cert, key):
        raise TlsMaterialError(f"{key_key} is not the key of {cert_key}")
    return KeyPair(cert_pem, key_pem), cert


def _examine(secret: dict[str, Any], *, need_ca: bool) -> _Found:
    from cryptography import x509

    data = secret.get("data") or {}
    found = _Found()
    problems: list[str] = []
    try:
        found.serving, found.serving_cert = _pair(data, TLS_CRT, TLS_KEY)
    except TlsMaterialError as err:
        problems.append(str(err))
    if need_ca:
        try:
            ca, ca_cert = _pair(data, CA_CRT, CA_KEY)
            constraints = ca_cert.extensions.get_extension_for_class(x509.BasicConstraints)
            if not constraints.value.ca:
                raise TlsMaterialError(f"{CA_CRT} is not a CA certificate")
            found.ca, found.ca_cert = ca, ca_cert
        except x509.ExtensionNotFound:
            problems.append(f"{CA_CRT} is not a CA certificate")
        except TlsMaterialError as err:
            problems.append(str(err))
    found.problems = tuple(problems)
    return found


def _rfc3339(when: float) -> str:
    return _utc(when).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_rfc3339(text: str) -> float | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    except (TypeError, ValueError):
        return None


class _Conflict(Exception):
    """A write lost to another writer (409): read again and decide again."""


class TlsKeeper:
    """Keeps the TLS Secret and the CA ConfigMap right, and says what to serve.

    Every replica runs one; they agree through the API (resourceVersions),
    not with each other. `external=True`: read only (cert-manager, trust-manager).
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        *,
        secret_name: str = SECRET_NAME,
        configmap_name: str = CONFIGMAP_NAME,
        names: Sequence[str] = (),
        external: bool = False,
        clock: Callable[[], float] = time.time,
        ca_validity: timedelta = CA_VALIDITY,
        cert_validity: timedelta = CERT_VALIDITY,
        trust_delay: timedelta = TRUST_DELAY,
    ) -> None:
        from kubernetes import client

        self._core: Any = client.CoreV1Api(api_client)  # dict bodies; its hints say models
        self.namespace = namespace
        self.secret_name = secret_name
        self.configmap_name = configmap_name
        self.names = tuple(normalize_name(n) for n in (names or default_names(namespace)))
        self.external = external
        self._clock = clock
        self.ca_validity = ca_validity
        self.cert_validity = cert_validity
        self.trust_delay = trust_delay
        self.material: TlsMaterial | None = None
        """What the last successful `ensure()` returned."""
        self.failures = 0
        """`maintain` passes that failed since the last one that did not."""
        self._waiting_logged: bytes = b""

    @property
    def _secret_ref(self) -> str:
        return f"Secret {self.namespace}/{self.secret_name}"

    @property
    def _configmap_ref(self) -> str:
        return f"ConfigMap {self.namespace}/{self.configmap_name}"

    # -- public

    def ensure(self) -> TlsMaterial:
        """Read (and unless external, create, renew or rotate) the material; what to serve now.

        Raises TlsError (TlsMaterialError for unusable content); nothing is
        written when it does, except the steps that completed before.
        """
        if self.external:
            material = self._read_external()
        else:
            for _ in range(CONFLICT_RETRIES + 1):
                try:
                    material = self._converge()
                    break
                except _Conflict as why:
                    log.info("%s; reading again", why)
            else:
                raise TlsError(
                    f"{self._secret_ref}: still conflicting after {CONFLICT_RETRIES} re-reads"
                )
        self.material = material
        return material

    def seconds_left(self) -> dict[str, float]:
        """{"serving": s, "ca": s} for the material last ensured ({} before the first)."""
        if self.material is None:
            return {}
        return self.material.seconds_left(self._clock())

    def maintain(
        self,
        stop: threading.Event,
        *,
        interval: float = 3600.0,
        retry: float = 60.0,
        on_change: Callable[[TlsMaterial], None] | None = None,
        iterations: int | None = None,
    ) -> None:
        """Run `ensure()` every `interval` s (every `retry` s after a failure) until `stop`;
        `on_change(material)` when the serving pair changed (e.g. `ServingContext.update`).

        Run it in a thread; it returns after `iterations` passes when given (tests).
        A failing pass is logged and counted; the server keeps its current pair.
        """
        done = 0
        while not stop.is_set():
            before = self.material
            wait = interval
            try:
                material = self.ensure()
                if on_change is not None and not material.same_serving(before):
                    on_change(material)
                self.failures = 0
            except TlsError as err:
                self.failures += 1
                wait = retry
                log.error("TLS material: %s; retrying in %.0fs", err, retry)
            except Exception:
                self.failures += 1
                wait = retry
                log.exception("TLS material: unexpected error; retrying in %.0fs", retry)
            done += 1
            if iterations is not None and done >= iterations:
                return
            stop.wait(wait)

    # -- reading

    def _get(self, kind: str) -> dict[str, Any] | None:
        read = (
            self._core.read_namespaced_secret
            if kind == "secret"
            else self._core.read_namespaced_config_map
        )
        name = self.secret_name if kind == "secret" else self.configmap_name
        try:
            response = read(
                name, self.namespace, _preload_content=False, _request_timeout=REQUEST_TIMEOUT
            )
        except Exception as err:
            if getattr(err, "status", None) == NOT_FOUND:
                return None
            raise TlsError(f"cannot read {kind} {self.namespace}/{name}: {_why(err)}") from err
        found: dict[str, Any] = json.loads(response.data)
        return found

    def _bundle_certs(self, configmap: dict[str, Any] | None) -> list[x509.Certificate]:
        text = ((configmap or {}).get("data") or {}).get(CA_CRT) or ""
        if not text.strip():
            return []
        return parse_certificates(text)

    # -- external: read only

    def _read_external(self) -> TlsMaterial:
        secret = self._get("secret")
        if secret is None:
            raise TlsError(
                f"{self._secret_ref} not found: with --tls-external it is written by "
                "cert-manager (a Certificate with this secretName), not by the controller"
            )
        found = _examine(secret, need_ca=False)
        if found.serving is None or found.serving_cert is None:
            raise TlsMaterialError(f"{self._secret_ref}: {'; '.join(found.problems)}")
        configmap = self._get("configmap")
        if configmap is None:
            raise TlsError(
                f"{self._configmap_ref} not found: with --tls-external publishing the CA "
                f"bundle (key {CA_CRT}) is the operator's job, e.g. a trust-manager Bundle"
            )
        try:
            bundle = self._bundle_certs(configmap)
        except TlsMaterialError as err:
            raise TlsMaterialError(f"{self._configmap_ref} key {CA_CRT}: {err}") from err
        if not bundle:
            raise TlsMaterialError(f"{self._configmap_ref} has no {CA_CRT}")
        extra: list[x509.Certificate] = []
        with contextlib.suppress(TlsMaterialError):
            extra = parse_certificates(_decode(secret.get("data") or {}, CA_CRT))
        chain = parse_certificates(found.serving.cert_pem)
        issuer = _issuer_of(chain, [*bundle, *extra])
        now = self._clock()
        if issuer is None or not any(_same_cert(issuer, b) for b in bundle):
            log.warning(
                "%s: its serving certificate does not chain to a CA in %s: injectors will "
                "refuse it",
                self._secret_ref,
                self._configmap_ref,
            )
        missing = set(self.names) - san_names(found.serving_cert)
        if missing:
            log.warning(
                "%s: the serving certificate lacks names %s (add them to the Certificate)",
                self._secret_ref,
                ", ".join(sorted(missing)),
            )
        if not is_current(found.serving_cert, now):
            log.warning("%s: the serving certificate is not valid now", self._secret_ref)
        return self._material(secret, found.serving, found.serving_cert, issuer, bundle)

    # -- ours: create, renew, rotate

    def _converge(self) -> TlsMaterial:
        now = self._clock()
        secret = self._get("secret")
        configmap = self._get("configmap")
        if secret is None:
            ca = make_ca(now, self.ca_validity)
            serving = issue_serving_cert(ca, self.names, now, self.cert_validity)
            log.info("%s not found: creating a new CA and serving certificate", self._secret_ref)
            secret = self._write_secret(None, ca, serving)
        else:
            secret = self._renew(secret, configmap, now)
        found = _examine(secret, need_ca=True)
        if found.ca_cert is None or found.serving is None or found.serving_cert is None:
            # Only if the API server gave back something other than what was written.
            raise TlsMaterialError(f"{self._secret_ref}: {'; '.join(found.problems)}")
        old_bundle = self._published(configmap)
        # The current CA first; earlier ones stay until they expire (injectors
        # that have not re-read yet may still be served by them).
        keep = [found.ca_cert, *(c for c in old_bundle if is_current(c, now))]
        wanted = bundle_pem(keep)
        if configmap is None or bundle_pem(old_bundle) != wanted:
            configmap = self._write_configmap(configmap, wanted, now)
        bundle = parse_certificates(wanted)
        issuer = _issuer_of(parse_certificates(found.serving.cert_pem), bundle)
        return self._material(secret, found.serving, found.serving_cert, issuer, bundle)

    def _published(self, configmap: dict[str, Any] | None) -> list[x509.Certificate]:
        try:
            return self._bundle_certs(configmap)
        except TlsMaterialError as err:
            # Ours: rewritten from the Secret below. Injectors reading it now fail anyway.
            log.warning("%s: %s; publishing it again", self._configmap_ref, err)
            return []

    def _renew(
        self, secret: dict[str, Any], configmap: dict[str, Any] | None, now: float
    ) -> dict[str, Any]:
        """The Secret as it should be now: written (and returned) when it was not."""
        annotations = secret.get("metadata", {}).get("annotations") or {}
        if CERT_MANAGER_ANNOTATION in annotations or secret.get("type") not in (
            SECRET_TYPE,
            None,
        ):
            raise TlsError(
                f"{self._secret_ref} is not the controller's (type {secret.get('type')!r}"
                f"{', written by cert-manager' if CERT_MANAGER_ANNOTATION in annotations else ''}"
                "): run with --tls-external to use it, or delete it"
            )
        found = _examine(secret, need_ca=True)
        ca, ca_cert = found.ca, found.ca_cert
        serving, serving_cert = found.serving, found.serving_cert
        if ca is None or ca_cert is None:
            if serving is not None:
                raise TlsMaterialError(
                    f"{self._secret_ref}: the CA is unusable ({'; '.join(found.problems)}) "
                    "beside a working serving certificate: not replacing what may be "
                    "relied on; delete the Secret to have a new CA made"
                )
            log.warning(
                "%s holds nothing usable (%s): replacing it with a new CA and serving certificate",
                self._secret_ref,
                "; ".join(found.problems),
            )
            ca = make_ca(now, self.ca_validity)
            return self._write_secret(
                secret, ca, issue_serving_cert(ca, self.names, now, self.cert_validity)
            )
        if found.problems:
            log.warning(
                "%s: %s; issuing a new serving certificate",
                self._secret_ref,
                "; ".join(found.problems),
            )
        if is_due(ca_cert, now):
            # Step 1 of a rotation: the new CA into the Secret, the serving pair
            # kept unless it is unusable; the bundle follows in this pass, the
            # serving certificate after the trust delay (module docstring).
            log.info(
                "%s: the CA expires in %.0f days: rotating it",
                self._secret_ref,
                seconds_left(ca_cert, now) / 86400,
            )
            ca = make_ca(now, self.ca_validity)
            if serving is None or serving_cert is None or not is_current(serving_cert, now):
                serving = issue_serving_cert(ca, self.names, now, self.cert_validity)
            return self._write_secret(secret, ca, serving)
        why = self._reissue_reason(serving_cert, ca_cert, now)
        if why is None:
            return secret
        if (
            serving_cert is not None
            and is_current(serving_cert, now)
            and not signed_by(serving_cert, ca_cert)
        ):
            # Step 3 of a rotation: only once injectors had time to trust the CA.
            trusted_at = self._trusted_since(configmap, ca_cert)
            if trusted_at is None or now < trusted_at + self.trust_delay.total_seconds():
                self._log_waiting(ca_cert, trusted_at)
                return secret
        log.info("%s: issuing a new serving certificate (%s)", self._secret_ref, why)
        return self._write_secret(
            secret, ca, issue_serving_cert(ca, self.names, now, self.cert_validity)
        )

    def _reissue_reason(
        self, serving_cert: x509.Certificate | None, ca_cert: x509.Certificate, now: float
    ) -> str | None:
        if serving_cert is None:
            return "unusable"
        if not is_current(serving_cert, now):
            return "expired"
        if not signed_by(serving_cert, ca_cert):
            return "the CA was rotated"
        if is_due(serving_cert, now):
            return f"{seconds_left(serving_cert, now) / 86400:.1f} days left"
        missing = set(self.names) - san_names(serving_cert)
        if missing:
            return f"names added: {', '.join(sorted(missing))}"
        return None

    def _trusted_since(
        self, configmap: dict[str, Any] | None, ca_cert: x509.Certificate
    ) -> float | None:
        """When the published bundle took its current content, if it holds `ca_cert`."""
        if not any(_same_cert(ca_cert, c) for c in self._published(configmap)):
            return None
        annotations = (configmap or {}).get("metadata", {}).get("annotations") or {}
        since = _parse_rfc3339(annotations.get(BUNDLE_SINCE, ""))
        # No mark (edited by hand): from the new CA's birth, a lower bound of the bundle's.
        return since if since is not None else ca_cert.not_valid_before_utc.timestamp()

    def _log_waiting(self, ca_cert: x509.Certificate, trusted_at: float | None) -> None:
        from cryptography.hazmat.primitives import hashes

        mark = ca_cert.fingerprint(hashes.SHA256())
        if mark == self._waiting_logged:
            return
        self._waiting_logged = mark
        log.info(
            "%s: the serving certificate moves to the new CA %s after %s has held it for %s",
            self._secret_ref,
            "(bundle not yet published)" if trusted_at is None else f"at {_rfc3339(trusted_at)}",
            self._configmap_ref,
            self.trust_delay,
        )

    # -- writing

    def _write_secret(
        self, current: dict[str, Any] | None, ca: KeyPair, serving: KeyPair
    ) -> dict[str, Any]:
        data = {
            TLS_CRT: serving.cert_pem,
            TLS_KEY: serving.key_pem,
            CA_CRT: ca.cert_pem,
            CA_KEY: ca.key_pem,
        }
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        if current is None:
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {
                    "name": self.secret_name,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/name": "token-refresher"},
                },
                "type": SECRET_TYPE,
                "data": encoded,
            }
            return self._write("create", "secret", body)
        body = copy.deepcopy(current)
        body.setdefault("data", {}).update(encoded)
        # The resourceVersion read stays in the body: the PUT is conditional on it.
        return self._write("replace", "secret", body)

    def _write_configmap(
        self, current: dict[str, Any] | None, bundle: str, now: float
    ) -> dict[str, Any]:
        if current is None:
            body: dict[str, Any] = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {
                    "name": self.configmap_name,
                    "namespace": self.namespace,
                    "labels": {"app.kubernetes.io/name": "token-refresher"},
                },
            }
            verb = "create"
        else:
            body, verb = copy.deepcopy(current), "replace"
        body.setdefault("data", {})[CA_CRT] = bundle
        body["metadata"].setdefault("annotations", {})[BUNDLE_SINCE] = _rfc3339(now)
        log.info("%s: publishing %d CA certificate(s)", self._configmap_ref, bundle.count("BEGIN"))
        return self._write(verb, "configmap", body)

    def _write(self, verb: str, kind: str, body: dict[str, Any]) -> dict[str, Any]:
        api = "namespaced_secret" if kind == "secret" else "namespaced_config_map"
        name = body["metadata"]["name"]
        try:
            if verb == "create":
                call = getattr(self._core, f"create_{api}")
                response = call(
                    self.namespace,
                    body,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
            else:
                call = getattr(self._core, f"replace_{api}")
                response = call(
                    name,
                    self.namespace,
                    body,
                    _preload_content=False,
                    _request_timeout=REQUEST_TIMEOUT,
                )
        except Exception as err:
            status = getattr(err, "status", None)
            if status == CONFLICT:
                # Create: another replica made it first (AlreadyExists). Replace:
                # someone wrote since our read. Either way theirs is the truth.
                raise _Conflict(
                    f"{kind} {self.namespace}/{name} changed under us (409 on {verb})"
                ) from err
            if status == NOT_FOUND and verb == "replace":
                raise _Conflict(f"{kind} {self.namespace}/{name} was deleted meanwhile") from err
            raise TlsError(f"cannot {verb} {kind} {self.namespace}/{name}: {_why(err)}") from err
        written: dict[str, Any] = json.loads(response.data)
        return written

    def _material(
        self,
        secret: dict[str, Any],
        serving: KeyPair,
        serving_cert: x509.Certificate,
        issuer: x509.Certificate | None,
        bundle: list[x509.Certificate],
    ) -> TlsMaterial:
        return TlsMaterial(
            cert_pem=serving.cert_pem,
            key_pem=serving.key_pem,
            ca_pem=_cert_pem(issuer) if issuer is not None else "",
            bundle_pem=bundle_pem(bundle),
            serving_not_after=serving_cert.not_valid_after_utc.timestamp(),
            ca_not_after=issuer.not_valid_after_utc.timestamp() if issuer is not None else None,
            secret_version=str(secret.get("metadata", {}).get("resourceVersion", "")),
        )


def _same_cert(a: x509.Certificate, b: x509.Certificate) -> bool:
    from cryptography.hazmat.primitives import hashes

    return a.fingerprint(hashes.SHA256()) == b.fingerprint(hashes.SHA256())


def _issuer_of(
    chain: Sequence[x509.Certificate], candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    """The candidate CA that signed a certificate of the chain, the chain's end first."""
    for cert in reversed(chain):
        for ca in candidates:
            if signed_by(cert, ca):
                return ca
    return None


def _why(err: BaseException) -> str:
    status = getattr(err, "status", None)
    if status is not None:
        return f"HTTP {status} {getattr(err, 'reason', '')}".strip()
    return f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
