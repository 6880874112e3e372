"""Local mode: one token file on one node, refreshed in place, rendered to one output file.

The debug path for an operator and the demo. The same rules as the
controller: the rotated refresh token is persisted to the token file before
anything uses it, an absolute expiry is stored, refresh happens at about 80%
of the lifetime, `invalid_grant` / `invalid_client` stop refreshing until the
token file changes, and network errors back off while the output keeps the
current token.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agents.token_refresher.config import OFFLINE_IDLE
from agents.token_refresher.inject import InjectError, NoSuchDirectory, write_file
from agents.token_refresher.metrics import RefresherMetrics
from agents.token_refresher.oauth import (
    Backoff,
    FinalError,
    RetryableError,
    Token,
    TokenFormatError,
    decode_token_json,
    refresh,
)
from agents.token_refresher.spec import SpecError, render

log = logging.getLogger(__name__)

Refresh = Callable[[Token], Token]


@dataclass(frozen=True)
class LocalConfig:
    token_file: str
    """The token JSON (`access_token`, `refresh_token`, `expires_in` or `expires_at`)."""
    out: str
    """The rendered file, e.g. /tmp/oauthtk_1000 for eosxd."""
    template: str | None = None
    """`$(ACCESS_TOKEN)` and friends (spec.py); None: the token alone."""
    owner: int = 0
    group: int = 0
    mode: int = 0o400
    refresh_fraction: float = 0.8
    """Refresh at this share of the token's lifetime (with 10% jitter)."""
    idle_window: float = 3600.0
    """Refresh a token without expiry at least this often, so offline refresh
    tokens do not idle out."""
    min_refresh_interval: float = 10.0
    offline_idle: float = OFFLINE_IDLE
    """Keycloak's Offline Session Idle: for the offline token's metric."""


@dataclass
class _State:
    digest: bytes = b""
    token: Token | None = None
    due: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    final_digest: bytes = b""
    """The token file content a final error was seen with: no IdP call until it changes."""


class LocalRefresher:
    """One pass: read the token file, refresh it when due, keep the output file rendered."""

    def __init__(
        self,
        config: LocalConfig,
        *,
        refresh_fn: Refresh,
        metrics: RefresherMetrics,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._refresh = refresh_fn
        self._metrics = metrics
        self._backoff = backoff or Backoff()
        self._clock = clock
        self._state = _State()
        self.name = Path(config.token_file).name
        self.token_file_readable = False
        """Whether the last pass could read the token file (the agent's `up`)."""

    @property
    def token(self) -> Token | None:
        return self._state.token

    def next_due(self) -> float | None:
        """Seconds until the next refresh (or retry) is due; None: none is.

        The run loop wakes then: a pass every --interval (30 s) alone let a
        token that lives less than that lapse before its refresh.
        """
        state = self._state
        if state.token is None or state.digest == state.final_digest:
            return None
        return max(state.due, state.retry_at) - self._clock()

    def tick(self) -> None:
        state, now = self._state, self._clock()
        try:
            text = Path(self.config.token_file).read_bytes()
        except OSError as err:
            self.token_file_readable = False
            self._metrics.refreshes.labels("token_file").inc()
            log.error("cannot read token file %s: %s", self.config.token_file, err.strerror)
            return
        self.token_file_readable = True
        digest = hashlib.sha256(text).digest()
        if digest == state.final_digest:
            return  # refreshing failed for good with this content; wait for a new one
        if digest != state.digest:
            try:
                data, stray = decode_token_json(text)
                self._adopt(Token.from_object(data, now), digest, now)
            except TokenFormatError as err:
                state.final_digest = digest
                self._metrics.refreshes.labels("bad_token").inc()
                log.error("token file %s: %s", self.config.token_file, err)
                return
            if stray:
                log.warning(
                    "token file %s: ignored %d stray '}' after the token JSON object; "
                    "the next refresh rewrites the file without them",
                    self.config.token_file,
                    stray,
                )
        current = state.token
        assert current is not None
        if now >= state.due and now >= state.retry_at:
            current = self._refresh_now(current, digest, now) or current
        self._write_output(current)
        self._metrics.expiries.set(self.name, current, now)

    def _adopt(self, token: Token, digest: bytes, now: float) -> None:
        state = self._state
        state.token, state.digest = token, digest
        state.due = token.refresh_due(
            now,
            fraction=self.config.refresh_fraction,
            idle_window=self.config.idle_window,
            min_interval=self.config.min_refresh_interval,
        )
        state.failures, state.retry_at = 0, 0.0

    def _refresh_now(self, token: Token, digest: bytes, now: float) -> Token | None:
        """The new token, persisted; None when refreshing failed (the old one stays)."""
        state = self._state
        try:
            new = self._refresh(token)
        except FinalError as err:
            state.final_digest = digest
            self._metrics.refreshes.labels(err.kind).inc()
            log.error(
                "refresh failed for good (%s): %s; waiting for a new token file", err.kind, err
            )
            return None
        except RetryableError as err:
            state.failures += 1
            delay = self._backoff.next_delay(state.failures, err.retry_after)
            state.retry_at = now + delay
            self._metrics.refreshes.labels(err.kind).inc()
            log.warning(
                "refresh failed (%s): %s; retrying in %.0fs, keeping the current token",
                err.kind,
                err,
                delay,
            )
            return None
        # Persist first: a rotated refresh token works once, and the old one
        # is dead now. Losing the new one would end the chain.
        text = new.to_json(now).encode()
        stat = os.stat(self.config.token_file)
        write_file(
            "/",
            os.path.abspath(self.config.token_file),
            text,
            mode=0o600,
            uid=stat.st_uid,
            gid=stat.st_gid,
            durable=True,  # the rotated refresh token must survive a crash
        )
        self._adopt(new, hashlib.sha256(text).digest(), now)
        self._metrics.refreshes.labels("ok").inc()
        log.info(
            "refreshed %s; expires in %s",
            self.name,
            "unknown" if new.expires_at is None else f"{new.expires_at - now:.0f}s",
        )
        return new

    def _write_output(self, token: Token) -> None:
        cfg = self.config
        try:
            content = render(cfg.template, token)
            result = write_file(
                "/", os.path.abspath(cfg.out), content, mode=cfg.mode, uid=cfg.owner, gid=cfg.group
            )
        except SpecError as err:
            self._metrics.injection_failures.labels("bad_template").inc()
            log.error("cannot render %s: %s", cfg.out, err)
            return
        except NoSuchDirectory as err:
            # The injector's wording ("in the container") means nothing here.
            self._metrics.injection_failures.labels(err.reason).inc()
            log.error("cannot write %s", out_directory_problem(cfg.out) or err)
            return
        except InjectError as err:
            self._metrics.injection_failures.labels(err.reason).inc()
            log.error("cannot write %s: %s", cfg.out, err)
            return
        if result.written:
            self._metrics.files_written.inc()


def out_directory_problem(out: str) -> str | None:
    """Why `--out` cannot be written for want of its directory, in local-mode words; else None.

    Reported, never created: an operator running this by hand as root would
    otherwise get a root-owned directory from a typo, and the consumer (eosxd
    looks for one fixed path) would never see the file.
    """
    parent = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(parent):
        return None
    if os.path.lexists(parent):
        return f"--out {out}: {parent} is not a directory"
    return f"--out {out}: directory {parent} does not exist (create it first)"


def refresher_for(
    token_url: str,
    client_id: str,
    client_secret: str,
    *,
    auth_method: str,
    verify: bool | str,
    allow_http: bool,
    timeout: float,
) -> Refresh:
    """The production refresh call with this endpoint's settings bound."""

    def do_refresh(token: Token) -> Token:
        return refresh(
            token_url,
            token,
            client_id,
            client_secret,
            auth_method=auth_method,
            verify=verify,
            allow_http=allow_http,
            timeout=timeout,
        )

    return do_refresh
