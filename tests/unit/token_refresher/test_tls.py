"""The controller's TLS material against the fake API, and real handshakes on loopback."""

from __future__ import annotations

import base64
import contextlib
import logging
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agents.token_refresher.tls import (
    BUNDLE_SINCE,
    CA_COMMON_NAME,
    ServingContext,
    TlsError,
    TlsKeeper,
    TlsMaterial,
    TlsMaterialError,
    client_context,
    default_names,
    issue_serving_cert,
    make_ca,
    parse_certificates,
    san_names,
    server_context,
    signed_by,
)
from tests.support.fake_kube import FakeKube

NS = "node-agents"
DAY = 86400.0
SECRET_PATH = f"/api/v1/namespaces/{NS}/secrets/token-refresher-tls"
CONFIGMAP_PATH = f"/api/v1/namespaces/{NS}/configmaps/token-refresher-ca"
SERVICE = f"token-refresher-controller.{NS}.svc"


class Clock:
    """Wall time that tests move by hand."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    # Real time at the start: certificates made now verify in real handshakes.
    return Clock(time.time())


def keeper(api: Any, clock: Clock, **options: Any) -> TlsKeeper:
    return TlsKeeper(api, NS, clock=clock, **options)


def secret_data(kube: FakeKube) -> dict[str, str]:
    secret = kube.get("secrets", NS, "token-refresher-tls")
    assert secret is not None
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def bundle(kube: FakeKube) -> list[x509.Certificate]:
    configmap = kube.get("configmaps", NS, "token-refresher-ca")
    assert configmap is not None
    return parse_certificates(configmap["data"]["ca.crt"])


def leaf(material: TlsMaterial) -> x509.Certificate:
    return parse_certificates(material.cert_pem)[0]


def writes(kube: FakeKube) -> int:
    return kube.count("POST") + kube.count("PUT") + kube.count("PATCH") + kube.count("DELETE")


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- creation and sharing --------------------------------------------------------------


def test_the_first_replica_creates_the_ca_the_serving_certificate_and_the_bundle(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    material = keeper(api, clock).ensure()

    secret = kube.get("secrets", NS, "token-refresher-tls")
    assert secret is not None and secret["type"] == "kubernetes.io/tls"
    data = secret_data(kube)
    assert set(data) == {"tls.crt", "tls.key", "ca.crt", "ca.key"}
    ca = parse_certificates(data["ca.crt"])[0]
    assert bundle(kube) == [ca]
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    assert ca.subject.rfc4514_string().startswith(f"CN={CA_COMMON_NAME} ")
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    assert ca.not_valid_after_utc.timestamp() == pytest.approx(clock.now + 365 * DAY, abs=1)

    cert = leaf(material)
    assert signed_by(cert, ca)
    assert san_names(cert) == set(default_names(NS))
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # Backdated for clock skew, 30 days ahead.
    assert cert.not_valid_before_utc.timestamp() == pytest.approx(clock.now - 300, abs=1)
    assert material.seconds_left(clock.now) == pytest.approx(
        {"serving": 30 * DAY, "ca": 365 * DAY}, abs=1
    )
    assert material.bundle_pem == data["ca.crt"]
    assert material.cert_pem == data["tls.crt"] and material.key_pem == data["tls.key"]


def test_a_second_replica_reuses_what_the_first_made(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    first = keeper(api, clock).ensure()
    kube.clear_calls()

    second = keeper(api, clock).ensure()

    assert second.same_serving(first) and second.bundle_pem == first.bundle_pem
    assert writes(kube) == 0


def test_a_replica_that_loses_the_creation_race_serves_the_winners_certificate(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    winner = keeper(api, clock).ensure()
    # The loser read before the winner wrote: its create meets 409 AlreadyExists.
    kube.inject_error("GET", SECRET_PATH, 404, reason="NotFound")
    kube.clear_calls()

    loser = keeper(api, clock).ensure()

    assert kube.count("POST", f"/api/v1/namespaces/{NS}/secrets") == 1
    assert loser.same_serving(winner) and loser.bundle_pem == winner.bundle_pem
    assert len(kube.objects("secrets", NS)) == 1


def test_two_replicas_starting_together_agree_on_one_ca(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    start = threading.Barrier(2)
    found: list[TlsMaterial] = []

    def run() -> None:
        start.wait()
        found.append(keeper(api, clock).ensure())

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(found) == 2
    assert found[0].same_serving(found[1]) and found[0].bundle_pem == found[1].bundle_pem
    assert len(bundle(kube)) == 1


# -- renewal -----------------------------------------------------------------------------


def test_the_serving_certificate_is_renewed_when_a_third_of_it_is_left(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    tls = keeper(api, clock)
    first = tls.ensure()
    kube.clear_calls()

    clock.advance(19 * DAY)  # 11 days left of 30
    assert tls.ensure().same_serving(first)
    assert writes(kube) == 0

    clock.advance(2 * DAY)  # 9 days left
    renewed = tls.ensure()
    assert not renewed.same_serving(first)
    assert renewed.seconds_left(clock.now)["serving"] == pytest.approx(30 * DAY, abs=1)
    assert renewed.bundle_pem == first.bundle_pem  # same CA, nothing to re-trust
    assert kube.count("PUT", SECRET_PATH) == 1 and kube.count("PUT", CONFIGMAP_PATH) == 0
    # Another replica at the same moment decides on what it reads: no second renewal.
    assert keeper(api, clock).ensure().same_serving(renewed)
    assert kube.count("PUT", SECRET_PATH) == 1


def test_a_conflicting_write_is_read_again_and_decided_again(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    tls = keeper(api, clock)
    first = tls.ensure()
    clock.advance(21 * DAY)
    kube.inject_error("PUT", SECRET_PATH, 409, reason="Conflict")
    kube.clear_calls()

    renewed = tls.ensure()

    assert kube.count("PUT", SECRET_PATH) == 2 and kube.count("GET", SECRET_PATH) == 2
    assert not renewed.same_serving(first)
    assert secret_data(kube)["tls.crt"] == renewed.cert_pem


def test_conflicts_that_do_not_end_are_an_error(kube: FakeKube, api: Any, clock: Clock) -> None:
    tls = keeper(api, clock)
    tls.ensure()
    clock.advance(21 * DAY)
    kube.inject_error("PUT", SECRET_PATH, 409, times=None, reason="Conflict")

    with pytest.raises(TlsError, match="still conflicting"):
        tls.ensure()


def test_a_new_name_gets_a_new_serving_certificate_from_the_same_ca(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    first = keeper(api, clock).ensure()
    names = (*default_names(NS), "10.0.0.7", "Files.Example.")

    grown = keeper(api, clock, names=names).ensure()

    assert not grown.same_serving(first)
    assert san_names(leaf(grown)) == {*default_names(NS), "10.0.0.7", "files.example"}
    assert grown.bundle_pem == first.bundle_pem
    assert signed_by(leaf(grown), parse_certificates(first.bundle_pem)[0])


# -- CA rotation -------------------------------------------------------------------------


def test_ca_rotation_publishes_the_new_ca_before_serving_from_it(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    tls = keeper(api, clock)
    old_ca = parse_certificates(tls.ensure().bundle_pem)[0]
    # Hourly passes would do the same; every 10 days keeps the serving cert fresh.
    while len(bundle(kube)) == 1:
        clock.advance(10 * DAY)
        material = tls.ensure()
    days = (clock.now - old_ca.not_valid_before_utc.timestamp()) / DAY
    assert 365 * 2 / 3 - 10 <= days <= 365 * 2 / 3 + 10

    # Step 1 and 2 done: the bundle holds new + old; still served by the old CA.
    new_ca, kept = bundle(kube)
    assert kept == old_ca
    assert parse_certificates(secret_data(kube)["ca.crt"])[0] == new_ca
    assert signed_by(leaf(material), old_ca)
    assert material.seconds_left(clock.now)["ca"] == pytest.approx(
        old_ca.not_valid_after_utc.timestamp() - clock.now
    )
    configmap = kube.get("configmaps", NS, "token-refresher-ca")
    assert configmap is not None and BUNDLE_SINCE in configmap["metadata"]["annotations"]

    clock.advance(30 * 60)  # not long enough for every injector to re-read
    assert tls.ensure().same_serving(material)

    clock.advance(31 * 60)
    switched = tls.ensure()
    assert signed_by(leaf(switched), new_ca)
    assert bundle(kube) == [new_ca, old_ca]
    assert switched.seconds_left(clock.now)["ca"] == pytest.approx(
        new_ca.not_valid_after_utc.timestamp() - clock.now
    )

    # The old CA stays trusted until it expires, then leaves the bundle.
    clock.now = old_ca.not_valid_after_utc.timestamp() + 1
    tls.ensure()
    assert bundle(kube) == [new_ca]


def test_a_bundle_write_lost_after_the_ca_write_delays_the_switch(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    tls = keeper(api, clock, ca_validity=timedelta(days=60), cert_validity=timedelta(days=9))
    old_ca = parse_certificates(tls.ensure().bundle_pem)[0]
    # As if the replica died between the Secret write and the ConfigMap write
    # (the bundle is written only when the CA rotates).
    kube.inject_error("PUT", CONFIGMAP_PATH, 500)
    while parse_certificates(secret_data(kube)["ca.crt"])[0] == old_ca:
        clock.advance(3 * DAY)
        with contextlib.suppress(TlsError):
            tls.ensure()
    assert kube.count("PUT", CONFIGMAP_PATH) == 1
    assert bundle(kube) == [old_ca]

    material = tls.ensure()  # publishes the bundle now; serves the old CA's cert on
    assert len(bundle(kube)) == 2 and signed_by(leaf(material), old_ca)
    clock.advance(59 * 60)
    assert tls.ensure().same_serving(material)
    clock.advance(2 * 60)
    assert signed_by(leaf(tls.ensure()), bundle(kube)[0])


# -- external mode -----------------------------------------------------------------------


def cert_manager_secret(names: tuple[str, ...], now: float) -> tuple[dict[str, Any], str]:
    """A Secret as cert-manager writes it (no ca.key) and the CA trust-manager would publish."""
    ca = make_ca(now)
    serving = issue_serving_cert(ca, names, now)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": "token-refresher-tls",
            "namespace": NS,
            "annotations": {"cert-manager.io/certificate-name": "token-refresher-tls"},
        },
        "data": {
            "tls.crt": b64(serving.cert_pem),
            "tls.key": b64(serving.key_pem),
            "ca.crt": b64(ca.cert_pem),
        },
    }
    return secret, ca.cert_pem


def ca_configmap(pem: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "token-refresher-ca", "namespace": NS},
        "data": {"ca.crt": pem},
    }


def test_external_mode_reads_and_never_writes(kube: FakeKube, api: Any, clock: Clock) -> None:
    secret, ca_pem = cert_manager_secret(default_names(NS), clock.now)
    kube.put(secret)
    tls = keeper(api, clock, external=True)
    kube.clear_calls()

    with pytest.raises(TlsError, match="trust-manager"):
        tls.ensure()
    kube.put(ca_configmap(ca_pem))
    material = tls.ensure()
    clock.advance(29 * DAY)  # due, but not ours to renew
    assert tls.ensure().same_serving(material)

    assert writes(kube) == 0
    assert material.bundle_pem == ca_pem and material.ca_pem == ca_pem
    assert material.cert_pem == base64.b64decode(secret["data"]["tls.crt"]).decode()


def test_external_mode_without_the_secret_says_who_should_write_it(api: Any, clock: Clock) -> None:
    with pytest.raises(TlsError, match="cert-manager"):
        keeper(api, clock, external=True).ensure()


def test_external_mode_refuses_unusable_material(kube: FakeKube, api: Any, clock: Clock) -> None:
    secret, ca_pem = cert_manager_secret(default_names(NS), clock.now)
    secret["data"]["tls.key"] = b64(make_ca(clock.now).key_pem)  # not the cert's key
    kube.put(secret)
    kube.put(ca_configmap(ca_pem))

    with pytest.raises(TlsMaterialError, match=r"tls\.key is not the key of tls\.crt"):
        keeper(api, clock, external=True).ensure()


def test_a_cert_manager_secret_is_never_written_by_the_controller(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    secret, _ = cert_manager_secret(default_names(NS), clock.now)
    kube.put(secret)
    kube.clear_calls()

    with pytest.raises(TlsError, match="--tls-external"):
        keeper(api, clock).ensure()
    assert writes(kube) == 0


# -- bad material ------------------------------------------------------------------------


def put_secret(kube: FakeKube, data: dict[str, str]) -> None:
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "token-refresher-tls", "namespace": NS},
            "data": {k: b64(v) for k, v in data.items()},
        }
    )


def test_a_secret_where_nothing_parses_is_replaced(
    kube: FakeKube, api: Any, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    put_secret(kube, {"tls.crt": "garbage", "tls.key": "", "ca.crt": "-----BEGIN", "ca.key": "x"})

    with caplog.at_level(logging.WARNING, "agents.token_refresher.tls"):
        material = keeper(api, clock).ensure()

    assert "holds nothing usable" in caplog.text
    assert secret_data(kube)["tls.crt"] == material.cert_pem
    assert signed_by(leaf(material), bundle(kube)[0])


def test_a_broken_serving_pair_beside_a_good_ca_is_reissued_from_that_ca(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    first = keeper(api, clock).ensure()
    data = secret_data(kube)
    put_secret(kube, {**data, "tls.key": "not a key"})

    material = keeper(api, clock).ensure()

    assert not material.same_serving(first)
    assert material.bundle_pem == first.bundle_pem  # the CA injectors trust is kept
    assert secret_data(kube)["ca.key"] == data["ca.key"]


def test_a_broken_ca_beside_a_working_serving_pair_is_an_error_and_nothing_is_written(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    keeper(api, clock).ensure()
    data = secret_data(kube)
    put_secret(kube, {**data, "ca.key": "lost"})
    kube.clear_calls()

    with pytest.raises(TlsMaterialError, match=r"ca\.key.*delete the Secret"):
        keeper(api, clock).ensure()
    assert writes(kube) == 0


def test_an_unreadable_bundle_of_ours_is_published_again(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    first = keeper(api, clock).ensure()
    kube.put(ca_configmap("not PEM"))

    assert keeper(api, clock).ensure().bundle_pem == first.bundle_pem
    assert [c.subject for c in bundle(kube)] == [
        c.subject for c in parse_certificates(first.bundle_pem)
    ]


# -- maintain ----------------------------------------------------------------------------


def test_maintain_hands_a_renewed_pair_over_and_survives_api_errors(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    tls = keeper(api, clock)
    first = tls.ensure()
    changes: list[TlsMaterial] = []
    stop = threading.Event()

    tls.maintain(stop, on_change=changes.append, iterations=1)
    assert changes == []

    kube.inject_error("GET", SECRET_PATH, 500)
    tls.maintain(stop, retry=0.0, on_change=changes.append, iterations=1)
    assert tls.failures == 1 and tls.material == first

    clock.advance(21 * DAY)
    tls.maintain(stop, interval=0.0, on_change=changes.append, iterations=2)
    assert len(changes) == 1 and not changes[0].same_serving(first)
    assert tls.failures == 0
    assert tls.seconds_left()["serving"] == pytest.approx(30 * DAY, abs=1)


# -- handshakes on loopback --------------------------------------------------------------


@contextlib.contextmanager
def tls_server(context: ssl.SSLContext) -> Iterator[int]:
    """Accept TLS connections on loopback, say "ok" on each, until the block ends."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    tls.sendall(b"ok")
            except (ssl.SSLError, OSError):
                conn.close()  # the client refused our certificate: expected in some tests

    thread = threading.Thread(target=serve, name="tls-server")
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def handshake(port: int, bundle_pem: str, server_hostname: str) -> bytes:
    """The server certificate (DER) after a verified handshake."""
    context = client_context(bundle_pem)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_hostname) as tls,
    ):
        assert tls.recv(2) == b"ok"
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return der


def test_a_real_handshake_verifies_the_ca_and_the_name(api: Any, clock: Clock) -> None:
    material = keeper(api, clock, names=(*default_names(NS), "127.0.0.1")).ensure()
    context = server_context(material)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_NONE  # injectors prove themselves with a token

    with tls_server(context) as port:
        assert handshake(port, material.bundle_pem, SERVICE)
        assert handshake(port, material.bundle_pem, "127.0.0.1")
        with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
            handshake(port, material.bundle_pem, "token-refresher-controller.other.svc")
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            handshake(port, make_ca(clock.now).cert_pem, SERVICE)


def test_the_client_trusts_only_the_bundle_it_is_given() -> None:
    context = client_context(make_ca(time.time()).cert_pem)
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    assert len(context.get_ca_certs()) == 1  # no system store
    with pytest.raises(TlsMaterialError):
        client_context("not PEM")


def test_the_client_side_does_not_load_cryptography() -> None:
    """The injector imports this module on every node for client_context alone."""
    bundle_pem = make_ca(time.time()).cert_pem
    code = (
        "import sys; from agents.token_refresher.tls import client_context; "
        f"client_context({bundle_pem!r}); print('cryptography' in sys.modules)"
    )
    found = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "False"


def test_during_a_rotation_certificates_of_both_cas_verify(clock: Clock) -> None:
    old, new = make_ca(clock.now), make_ca(clock.now + 1)
    both = new.cert_pem + old.cert_pem
    for ca in (old, new):
        pair = issue_serving_cert(ca, [SERVICE], clock.now)
        material = TlsMaterial(pair.cert_pem, pair.key_pem, ca.cert_pem, both, 0.0, None)
        with tls_server(server_context(material)) as port:
            assert handshake(port, both, SERVICE)


def test_a_serving_context_hands_new_handshakes_the_new_certificate(
    kube: FakeKube, api: Any, clock: Clock
) -> None:
    tls = keeper(api, clock)
    first = tls.ensure()
    serving = ServingContext(first)
    renewed = keeper(api, clock, names=(*default_names(NS), "127.0.0.1")).ensure()

    with tls_server(serving.context) as port:
        before = handshake(port, first.bundle_pem, SERVICE)
        serving.update(renewed)
        after = handshake(port, first.bundle_pem, SERVICE)
        # No SNI is sent to an IP address: the callback runs all the same.
        by_ip = handshake(port, first.bundle_pem, "127.0.0.1")

    assert x509.load_der_x509_certificate(before) == leaf(first)
    assert x509.load_der_x509_certificate(after) == leaf(renewed)
    assert x509.load_der_x509_certificate(by_ip) == leaf(renewed)


def test_loading_a_chain_again_into_a_serving_context_takes_effect_too(
    clock: Clock, tmp_path: Path
) -> None:
    """What ServingContext avoids relying on, checked anyway: OpenSSL copies the
    certificate into each connection when it is made (SSL_new)."""
    ca = make_ca(clock.now)
    one, two = (issue_serving_cert(ca, [SERVICE], clock.now) for _ in range(2))
    context = server_context(
        TlsMaterial(one.cert_pem, one.key_pem, ca.cert_pem, ca.cert_pem, 0.0, None)
    )
    (tmp_path / "tls.crt").write_text(two.cert_pem)
    (tmp_path / "tls.key").write_text(two.key_pem)
    with tls_server(context) as port:
        before = handshake(port, ca.cert_pem, SERVICE)
        context.load_cert_chain(tmp_path / "tls.crt", tmp_path / "tls.key")
        after = handshake(port, ca.cert_pem, SERVICE)
    assert x509.load_der_x509_certificate(before) == parse_certificates(one.cert_pem)[0]
    assert x509.load_der_x509_certificate(after) == parse_certificates(two.cert_pem)[0]
