"""Offline tokens: the node answers `/token` itself while the auth service is unreachable.

What the node learns, from every successful answer of the central auth service
it relays (and from background questions it asks with credentials in hand):

* who the user is: the token's ``sub``;
* a verifier for the credentials: scrypt (salted, slow) of ``user:password``
  or of the refresh token; the plaintext is never written anywhere;
* what the user may pull: the token's ``access`` claim, verified against the
  keys the node trusts (``auth.token.rootcertbundle``), per repository asked.

While the link is down, credentials matching a verifier learned within
``mirror.auth.offline_grace`` get a short-lived token signed with the node's
own key (:mod:`.nodekey`), granting the requested pulls intersected with what
was recorded; anything else is refused as the auth service refuses it.

Trade-off: a user removed, a password changed or a grant withdrawn at the
central service keeps pull access to this zone's cache until the link returns
or ``offline_grace`` runs out, whichever is first. Online, the central service
decides: a refusal of credentials the node knew forgets them at once.

Everything lives in its own SQLite file in the metadata directory (local disk,
mode 0600), so a node restarted during a cut still serves its users.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirror import errors

from .access import Access
from .nodekey import NodeKey
from .token import Claims, InvalidToken, TokenVerifier
from .tokenrequest import BASIC, PASSWORD, REFRESH, TokenRequest, refresh_key

log = logging.getLogger(__name__)

DB_FILE = "offline-auth.sqlite"
#: A node-issued token lives this long at most (and never past the user's grace).
TOKEN_LIFETIME = 300.0
#: Background learning of a user's grants on the cached repositories, at most this often.
LEARN_INTERVAL = 600.0
#: Repositories asked per background token request, and in all per round.
LEARN_BATCH, LEARN_MAX = 25, 1000
#: Refresh-token verifiers kept per user (newest first).
MAX_REFRESH_PER_USER = 8
#: Learning tasks (each may hash and ask the auth service) pending at most; beyond, answers
#: are relayed without being learned.
MAX_PENDING = 256
#: Credentials remembered as recently confirmed (memory only), before the map is reset.
MAX_CONFIRMED = 10_000
#: Offline credential checks (scrypt) running at once.
CONCURRENT_CHECKS = 2
#: The only action a node-issued token ever grants: the node serves reads.
OFFLINE_ACTIONS = frozenset({"pull"})
_SCRYPT = {"n": 2**14, "r": 8, "p": 1, "dklen": 32}

SCHEMA = """
CREATE TABLE IF NOT EXISTS credentials (
    key TEXT PRIMARY KEY, subject TEXT NOT NULL, verifier TEXT NOT NULL, learned_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS credentials_by_subject ON credentials (subject);
CREATE TABLE IF NOT EXISTS grants (
    subject TEXT NOT NULL, repo TEXT NOT NULL, actions TEXT NOT NULL, learned_at REAL NOT NULL,
    PRIMARY KEY (subject, repo));
"""


def make_verifier(secret: str) -> str:
    """``scrypt$salt$hash`` (base64) of ``secret``; slow on purpose."""
    salt = secrets.token_bytes(16)
    encoded = (base64.b64encode(part).decode() for part in (salt, _scrypt(secret, salt)))
    return "scrypt$" + "$".join(encoded)


def _scrypt(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, **_SCRYPT)  # type: ignore[arg-type]


def check_verifier(verifier: str, secret: str) -> bool:
    """True when ``secret`` is what ``verifier`` was made from."""
    try:
        scheme, salt, expected = verifier.split("$")
        if scheme != "scrypt":
            return False
        digest = _scrypt(secret, base64.b64decode(salt))
        return hmac.compare_digest(digest, base64.b64decode(expected))
    except ValueError:
        return False


def _material(request: TokenRequest) -> str:
    """What the verifier is made of: bound to the user name for passwords."""
    if request.flow in (BASIC, PASSWORD):
        return f"{request.username}:{request.secret}"
    return request.secret


@dataclass(frozen=True, slots=True)
class LearnedUser:
    """A user the node can serve offline (for the admin API)."""

    subject: str
    credentials: int
    learned_at: float
    repositories: tuple[str, ...]


class OfflineStore:
    """The SQLite file of verifiers and grants; calls are blocking (run them in a thread)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / DB_FILE
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # private before SQLite opens it
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(query, params).fetchall()

    def verifier(self, key: str) -> tuple[str, str, float] | None:
        """(subject, verifier, learned_at) filed under ``key``."""
        rows = self._sql("SELECT subject, verifier, learned_at FROM credentials WHERE key = ?",
                         (key,))
        return rows[0] if rows else None

    def put_verifier(self, key: str, subject: str, verifier: str, now: float) -> None:
        self._sql("INSERT OR REPLACE INTO credentials VALUES (?, ?, ?, ?)",
                  (key, subject, verifier, now))
        self._sql("DELETE FROM credentials WHERE key LIKE 'refresh:%' AND subject = ? "
                  "AND key NOT IN (SELECT key FROM credentials WHERE key LIKE 'refresh:%' "
                  "AND subject = ? ORDER BY learned_at DESC LIMIT ?)",
                  (subject, subject, MAX_REFRESH_PER_USER))

    def touch_verifier(self, key: str, subject: str, now: float) -> bool:
        """Mark a verifier confirmed now; False when there is none for ``subject`` under ``key``."""
        with self._lock:
            cursor = self._db.execute("UPDATE credentials SET learned_at = ? "
                                      "WHERE key = ? AND subject = ?", (now, key, subject))
            return cursor.rowcount > 0

    def drop_verifier(self, key: str) -> None:
        self._sql("DELETE FROM credentials WHERE key = ?", (key,))

    def record_grants(self, subject: str, asked: dict[str, frozenset[str]], now: float) -> None:
        """What the auth service answered for each repository asked; nothing granted = no row."""
        for repo, actions in asked.items():
            if actions:
                self._sql("INSERT OR REPLACE INTO grants VALUES (?, ?, ?, ?)",
                          (subject, repo, ",".join(sorted(actions)), now))
            else:
                self._sql("DELETE FROM grants WHERE subject = ? AND repo = ?", (subject, repo))

    def grants(self, subject: str, since: float) -> dict[str, frozenset[str]]:
        rows = self._sql("SELECT repo, actions FROM grants WHERE subject = ? AND learned_at >= ?",
                         (subject, since))
        return {repo: frozenset(actions.split(",")) for repo, actions in rows}

    def users(self) -> list[LearnedUser]:
        rows = self._sql("SELECT subject, COUNT(*), MAX(learned_at) FROM credentials "
                         "GROUP BY subject ORDER BY subject")
        return [LearnedUser(subject, count, learned_at, tuple(sorted(self.grants(subject, 0.0))))
                for subject, count, learned_at in rows]

    def forget(self, subject: str) -> bool:
        """Drop a user's verifiers and grants; True when there was anything."""
        known = bool(self._sql("SELECT 1 FROM credentials WHERE subject = ? UNION "
                               "SELECT 1 FROM grants WHERE subject = ?", (subject, subject)))
        self._sql("DELETE FROM credentials WHERE subject = ?", (subject,))
        self._sql("DELETE FROM grants WHERE subject = ?", (subject,))
        return known


Forward = Callable[[TokenRequest], Awaitable[Any]]  # -> httpx.Response


class OfflineAuthority:
    """Learns from the auth service's answers; answers for it while it is unreachable.

    Args:
        store: the verifiers and grants on disk.
        key: the node's signing key.
        central: verifies the central service's tokens (the node's trusted keys).
        service: the ``aud`` of node tokens (``auth.token.service``).
        grace: ``mirror.auth.offline_grace`` in seconds (> 0).
        repositories: the repositories the node caches (for background learning).
        issued: called once per token issued offline (the metric).
    """

    def __init__(self, store: OfflineStore, key: NodeKey, central: TokenVerifier, service: str,
                 grace: float, repositories: Callable[[], Awaitable[list[str]]],
                 issued: Callable[[], None]) -> None:
        self.store = store
        self.key = key
        self.central = central
        self.service = service
        self.grace = grace
        self.repositories = repositories
        self.issued = issued
        self._learned_at: dict[str, float] = {}  # subject -> last background round (this process)
        self._tasks: set[asyncio.Task[None]] = set()
        self._checking = asyncio.Semaphore(CONCURRENT_CHECKS)
        self._process_key = secrets.token_bytes(32)
        self._confirmed: dict[bytes, float] = {}  # keyed hash of credentials -> confirmed at

    @property
    def pending(self) -> int:
        """Learning tasks still running (tests wait for 0 before cutting the link)."""
        return len(self._tasks)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.store.close)

    # -- online: learning ---------------------------------------------------------

    def learned(self, request: TokenRequest, body: bytes, forward: Forward) -> None:
        """A successful central answer: learn from it in the background."""
        self._spawn(self._learn(request, body, forward))

    def refused(self, request: TokenRequest) -> None:
        """The auth service refused these credentials: if they were known, forget them."""
        if request.credentials_key:
            self._spawn(self._forget_if_known(request))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, unless too much learning is already pending."""
        if len(self._tasks) >= MAX_PENDING:
            work.close()
            log.warning("offline auth: %d learning tasks pending, not learning this answer",
                        len(self._tasks))
            return
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("offline auth: learning failed: %r", task.exception())

    async def _learn(self, request: TokenRequest, body: bytes, forward: Forward) -> None:
        claims = self._claims(body)
        if claims is None or not claims.subject or not request.credentials_key:
            return
        await asyncio.to_thread(self._remember_credentials, request, claims.subject)
        handed_out = _refresh_token_in(body)
        if handed_out:  # docker and containerd log in with it later: learn it now
            await asyncio.to_thread(self._remember, refresh_key(handed_out), handed_out,
                                    claims.subject)
        await self._record(claims, request.scopes or ())
        last = self._learned_at.get(claims.subject, 0.0)
        if time.monotonic() - last >= LEARN_INTERVAL or not last:
            self._learned_at[claims.subject] = time.monotonic()
            await self._learn_cached_repositories(request, claims.subject, forward)

    def _claims(self, body: bytes) -> Claims | None:
        """The verified claims of the token in a central answer (None if unusable)."""
        try:
            answer = json.loads(body)
            raw = answer.get("access_token") or answer.get("token")
            return self.central.verify(raw)
        except (ValueError, AttributeError, InvalidToken) as exc:
            log.info("offline auth: central answer not learned: %s", getattr(exc, "reason", exc))
            return None

    def _remember_credentials(self, request: TokenRequest, subject: str) -> None:
        self._remember(request.credentials_key, _material(request), subject)

    def _remember(self, key: str, material: str, subject: str) -> None:
        """File a verifier for credentials the auth service just accepted.

        The slow hash is skipped for credentials this process confirmed
        recently (a keyed fast hash, in memory only): the same user pulling
        all day costs one scrypt per :data:`LEARN_INTERVAL`, not one per token.
        """
        now = time.time()
        seen = hmac.new(self._process_key, f"{key}\n{material}".encode(), "sha256").digest()
        if now - self._confirmed.get(seen, -LEARN_INTERVAL) < LEARN_INTERVAL and \
                self.store.touch_verifier(key, subject, now):
            return
        known = self.store.verifier(key)
        if known is not None and known[0] == subject and check_verifier(known[1], material):
            self.store.touch_verifier(key, subject, now)
        else:
            self.store.put_verifier(key, subject, make_verifier(material), now)
        if len(self._confirmed) >= MAX_CONFIRMED:
            self._confirmed.clear()
        self._confirmed[seen] = now

    async def _record(self, claims: Claims, asked: tuple[Access, ...]) -> None:
        answered = {a.name: _actions_on(claims, a.name)
                    for a in asked if a.type == "repository" and "pull" in a.actions}
        if answered:
            await asyncio.to_thread(self.store.record_grants, claims.subject, answered, time.time())

    async def _learn_cached_repositories(self, request: TokenRequest, subject: str,
                                         forward: Forward) -> None:
        """Ask what ``subject`` may pull among the cached repositories; hand nothing out."""
        repos = sorted(await self.repositories())[:LEARN_MAX]
        for start in range(0, len(repos), LEARN_BATCH):
            batch = repos[start:start + LEARN_BATCH]
            scopes = tuple(Access.of("repository", repo, "pull") for repo in batch)
            response = await forward(request.asking_for(scopes))
            if response.status_code != 200:
                return
            claims = self._claims(response.content)
            if claims is None or claims.subject != subject:
                return
            await self._record(claims, scopes)

    async def _forget_if_known(self, request: TokenRequest) -> None:
        def forget() -> None:
            known = self.store.verifier(request.credentials_key)
            if known is not None and check_verifier(known[1], _material(request)):
                self.store.drop_verifier(request.credentials_key)
                log.info("offline auth: credentials of %r refused centrally, forgotten", known[0])

        await asyncio.to_thread(forget)

    # -- offline: answering ---------------------------------------------------------

    async def answer(self, request: TokenRequest) -> dict[str, Any]:
        """A token response body for ``request``, signed by the node.

        Raises:
            errors.Unauthorized: unknown user, wrong or unlearned credentials,
                credentials learned longer than ``offline_grace`` ago.
        """
        if request.flow not in (BASIC, PASSWORD, REFRESH) or request.scopes is None:
            raise errors.Unauthorized("authentication service unreachable; "
                                      "only known users' credentials are checked offline")
        now = time.time()
        subject, learned_at = await self._check(request, now)
        recorded = await asyncio.to_thread(self.store.grants, subject, now - self.grace)
        granted = _granted(request.scopes, recorded)
        lifetime = max(1.0, min(TOKEN_LIFETIME, learned_at + self.grace - now))
        token = self.key.sign(subject, self.service, granted, lifetime)
        self.issued()
        log.info("offline token for %r: %s", subject,
                 " ".join(a.scope for a in granted) or "no access")
        issued_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))
        return {"token": token, "access_token": token, "expires_in": int(lifetime),
                "issued_at": issued_at}

    async def _check(self, request: TokenRequest, now: float) -> tuple[str, float]:
        """(subject, learned_at) of credentials learned within the grace, else Unauthorized.

        Checks run a few at a time: each is a deliberately slow hash, and a
        flood of wrong passwords must not take every core while the link is down.
        """
        known = await asyncio.to_thread(self.store.verifier, request.credentials_key)
        if known is None or known[2] < now - self.grace:
            raise errors.Unauthorized("incorrect username or password")
        async with self._checking:
            valid = await asyncio.to_thread(check_verifier, known[1], _material(request))
        if not valid:
            raise errors.Unauthorized("incorrect username or password")
        return known[0], known[2]


def _granted(asked: tuple[Access, ...], recorded: dict[str, frozenset[str]]) -> list[Access]:
    """Requested ∩ recorded ∩ pull, per repository; repositories left with nothing dropped."""
    granted = []
    for access in asked:
        if access.type != "repository":
            continue
        actions = access.actions & recorded.get(access.name, frozenset()) & OFFLINE_ACTIONS
        if actions:
            granted.append(Access("repository", access.name, actions))
    return granted


def _actions_on(claims: Claims, repo: str) -> frozenset[str]:
    """The actions a verified token grants on one repository."""
    return frozenset(action for access in claims.access
                     if access.type == "repository" and access.name == repo
                     for action in access.actions)


def _refresh_token_in(body: bytes) -> str | None:
    """The refresh token a central answer handed out (``offline_token`` / ``access_type``)."""
    try:
        value = json.loads(body).get("refresh_token")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None
