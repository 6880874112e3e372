"""`token-refresher local` against a real OAuth2 server (Canaille) with rotation, on loopback."""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agents.token_refresher.cli import main
from agents.token_refresher.oauth import Token
from hack.autofs_world import wait_for
from tests.support.agent import AgentThread
from tests.support.idp import IDP_LOGGERS, TestIdP

EOS = "oauth2:$(ACCESS_TOKEN):auth.cern.ch/auth/realms/cern/protocol/openid-connect/userinfo"


@pytest.fixture
def idp(tmp_path: Path) -> Iterator[TestIdP]:
    with TestIdP(tls=True, workdir=tmp_path / "idp") as server:
        yield server


def seed(idp: TestIdP, tmp_path: Path, *, expires_in: float) -> Path:
    """A token file as a user leaves it, its access token due for refresh soon."""
    data = json.loads(idp.issue())
    data.pop("expires_in", None)
    data["expires_at"] = time.time() + expires_in
    # Issued a minute ago: past the minimum interval between refreshes.
    data["issued_at"] = time.time() - 60
    path = tmp_path / "token.json"
    path.write_text(json.dumps(data))
    path.chmod(0o600)
    return path


def argv(idp: TestIdP, tmp_path: Path, token: Path, *extra: str) -> list[str]:
    secret = tmp_path / "client-secret"
    secret.write_text(idp.client_secret + "\n")
    return [
        "local",
        "--token-file",
        str(token),
        "--token-url",
        idp.token_url,
        "--client-id",
        idp.client_id,
        "--client-secret-file",
        str(secret),
        "--out",
        str(tmp_path / "out" / "oauthtk_1000"),
        "--owner",
        "1000",
        "--ca-bundle",
        str(idp.ca_bundle),
        "--metrics-address",
        "off",
        *extra,
    ]


def no_idp_argv(tmp_path: Path, token: Path, out: Path) -> list[str]:
    """Local mode with a token URL nothing listens on (port 9: connection refused)."""
    secret = tmp_path / "secret"
    secret.write_text("s")
    return [
        "local",
        "--token-file",
        str(token),
        "--token-url",
        "http://127.0.0.1:9/token",
        "--allow-http",
        "--client-id",
        "c",
        "--client-secret-file",
        str(secret),
        "--out",
        str(out),
        "--interval",
        "0.05",
        "--metrics-address",
        "off",
    ]


def test_a_chain_of_refreshes_never_breaks_and_each_rotation_is_persisted(
    idp: TestIdP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "out").mkdir()
    token_file = seed(idp, tmp_path, expires_in=1)
    seen_refresh_tokens = {json.loads(token_file.read_text())["refresh_token"]}
    out = tmp_path / "out" / "oauthtk_1000"
    caplog.set_level(logging.DEBUG)
    with AgentThread(
        main,
        argv(
            idp,
            tmp_path,
            token_file,
            "--interval",
            "0.1",
            "--template",
            EOS,
            "--log-level",
            "debug",
        ),
    ) as agent:
        for n in range(1, 7):
            wait_for(lambda n=n: idp.token_calls("refresh_token") >= n, 15)  # type: ignore[misc]
            wait_for(
                lambda n=n: (
                    agent.value(
                        "token_refresher_refreshes_total",  # type: ignore[misc]
                        {"result": "ok"},
                    )
                    >= n
                ),
                5,
            )
            stored = json.loads(token_file.read_text())
            # Every rotated refresh token reached the file before anything used it.
            assert stored["refresh_token"] not in seen_refresh_tokens
            seen_refresh_tokens.add(stored["refresh_token"])
            assert stored["expires_at"] > time.time() - 5
            # Keep the chain going fast: make the stored token due again.
            stored["expires_at"] = time.time() + 1
            stored["issued_at"] = time.time() - 10
            token_file.write_text(json.dumps(stored))
        assert agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 0
    final = Token.from_json(token_file.read_text(), time.time())
    wait_for(out.exists, 5)
    assert out.read_bytes().startswith(b"oauth2:") and b"userinfo" in out.read_bytes()
    info = out.stat()
    assert stat.S_IMODE(info.st_mode) == 0o400 and (info.st_uid, info.st_gid) == (1000, 1000)
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    # Never log a token (the IdP's own loggers are the other side of the wire).
    ours = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(IDP_LOGGERS))
    for secret in (final.access_token, final.refresh_token, idp.client_secret):
        assert secret not in ours
    for refresh_token in seen_refresh_tokens:
        assert refresh_token not in ours


def test_invalid_grant_stops_refreshing_until_the_token_file_changes(
    idp: TestIdP, tmp_path: Path
) -> None:
    (tmp_path / "out").mkdir()
    token_file = seed(idp, tmp_path, expires_in=0)
    stored = json.loads(token_file.read_text())
    stored["refresh_token"] = "revoked-or-never-issued"
    token_file.write_text(json.dumps(stored))
    with AgentThread(main, argv(idp, tmp_path, token_file, "--interval", "0.1")) as agent:
        wait_for(
            lambda: (
                agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 1
            ),
            10,
        )
        calls = idp.token_calls("refresh_token")
        time.sleep(1.0)
        assert idp.token_calls("refresh_token") == calls  # no retry storm
        # A user drops in a fresh token: refreshing resumes.
        seed(idp, tmp_path, expires_in=0)
        wait_for(lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 1, 10)


def test_idp_down_keeps_the_current_token_and_backs_off(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    token_file = tmp_path / "token.json"
    token_file.write_text(
        json.dumps({"access_token": "still-good", "refresh_token": "rt", "expires_in": 0})
    )
    out = tmp_path / "out" / "tok"
    args = no_idp_argv(tmp_path, token_file, out)
    with AgentThread(main, args) as agent:
        wait_for(
            lambda: agent.value("token_refresher_refreshes_total", {"result": "connection"}) >= 2,
            15,
        )
        ticks = agent.value("token_refresher_ticks_total")
        assert ticks > agent.value("token_refresher_refreshes_total", {"result": "connection"})
        assert out.read_bytes() == b"still-good"
        assert json.loads(token_file.read_text())["access_token"] == "still-good"
        # The IdP is down, not the agent's source: the token file is readable.
        assert agent.value("token_refresher_up") == 1
        token_file.unlink()
        wait_for(lambda: agent.value("token_refresher_up") == 0, 5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--token-url", "http://idp.example/token"], "http"),
        (["--client-secret-file", "/nonexistent"], "client-secret-file"),
        (["--mode", "0666"], "others write"),
    ],
)
def test_bad_configuration_exits_2(
    tmp_path: Path, extra: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    base = [
        "local",
        "--token-file",
        "t",
        "--token-url",
        "https://idp.example/token",
        "--client-id",
        "c",
        "--client-secret-file",
        str(secret),
        "--out",
        "o",
        "--once",
    ]
    assert main([*base, *extra], environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("token-refresher")


def test_once_refreshes_and_writes(idp: TestIdP, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    token_file = seed(idp, tmp_path, expires_in=0)
    before = json.loads(token_file.read_text())["access_token"]
    assert main(argv(idp, tmp_path, token_file, "--once"), environ={}) == 0
    after = json.loads(token_file.read_text())
    assert after["access_token"] != before
    assert (tmp_path / "out" / "oauthtk_1000").read_bytes() == after["access_token"].encode()
    assert os.stat(tmp_path / "out" / "oauthtk_1000").st_uid == 1000


def test_a_token_shorter_lived_than_the_interval_is_refreshed_when_due_not_at_the_next_pass(
    tmp_path: Path,
) -> None:
    """Issue 9: passes every 30 s (the default) and 4 s tokens. The wait ends
    at the refresh's due time; before, no refresh came in 14 s."""
    with TestIdP(tls=True, lifetime=4, workdir=tmp_path / "idp") as idp:
        (tmp_path / "out").mkdir()
        token_file = tmp_path / "token.json"
        token_file.write_text(idp.issue())  # the IdP's answer as it came: expires_in 4
        args = argv(idp, tmp_path, token_file, "--min-refresh-interval", "1")
        assert "--interval" not in args
        with AgentThread(main, args) as agent:
            wait_for(
                lambda: agent.value("token_refresher_refreshes_total", {"result": "ok"}) >= 3, 14
            )
            assert agent.value("token_refresher_refreshes_total", {"result": "invalid_grant"}) == 0
            left = agent.value("token_refresher_time_to_expiry_seconds", {"token": "token.json"})
            assert left > 0


def test_a_stray_brace_after_the_token_file_is_ignored_with_a_warning_and_dropped(
    idp: TestIdP, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "out").mkdir()
    token_file = seed(idp, tmp_path, expires_in=0)
    seeded = json.loads(token_file.read_text())
    token_file.write_text(token_file.read_text() + "}\n")  # the CERN blog's copy-paste slip
    caplog.set_level(logging.INFO)
    assert main(argv(idp, tmp_path, token_file, "--once"), environ={}) == 0
    after = json.loads(token_file.read_text())  # rewritten clean
    assert after["refresh_token"] != seeded["refresh_token"]
    assert (tmp_path / "out" / "oauthtk_1000").read_bytes() == after["access_token"].encode()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert [w for w in warnings if "ignored 1 stray '}'" in w and str(token_file) in w]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_out_in_a_missing_directory_is_one_clear_error_and_nothing_is_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_file = tmp_path / "token.json"
    token_file.write_text(json.dumps({"access_token": "a", "refresh_token": "rt"}))
    secret = tmp_path / "secret"
    secret.write_text("s")
    out = tmp_path / "typo" / "oauthtk_1000"
    args = [
        "local",
        "--token-file",
        str(token_file),
        "--token-url",
        "https://idp.example/token",
        "--client-id",
        "c",
        "--client-secret-file",
        str(secret),
        "--out",
        str(out),
        "--once",
    ]
    assert main(args, environ={}) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"token-refresher: error: --out {out}: directory {out.parent} does not exist "
        "(create it first)"
    ]
    # Reported, not created: a root-owned directory from a typo helps no one.
    assert not out.parent.exists()


def test_out_directory_removed_while_running_is_reported_in_local_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "out").mkdir()
    token_file = tmp_path / "token.json"
    now = time.time()
    # Fresh for an hour: no IdP call, only the output file is at stake.
    token_file.write_text(
        json.dumps(
            {"access_token": "a", "refresh_token": "rt", "expires_at": now + 3600, "issued_at": now}
        )
    )
    out = tmp_path / "out" / "tok"
    args = no_idp_argv(tmp_path, token_file, out)
    caplog.set_level(logging.INFO)
    with AgentThread(main, args) as agent:
        wait_for(out.exists, 5)
        out.unlink()
        out.parent.rmdir()
        wait_for(
            lambda: (
                agent.value("token_refresher_injection_failures_total", {"reason": "no_directory"})
                >= 1
            ),
            5,
        )
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors
    assert (
        errors[0]
        == f"cannot write --out {out}: directory {out.parent} does not exist (create it first)"
    )
    assert not any("container" in line for line in errors)
    assert not out.parent.exists()
