"""HTTP Basic auth against an Apache htpasswd file: distribution's ``auth.htpasswd``.

Like distribution, only bcrypt entries can authenticate, and the file is
re-read when its modification time changes.  Two additions: a user that does
not exist still costs one bcrypt comparison (no user enumeration by timing),
and successful checks are cached briefly because bcrypt is deliberately slow
and a docker pull sends credentials on every request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import bcrypt

from .access import Unauthorized

log = logging.getLogger(__name__)

_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
#: bcrypt only ever reads the first 72 password bytes (Go's and OpenBSD's too).
_BCRYPT_MAX_PASSWORD = 72


class HtpasswdError(Exception):
    """The htpasswd file cannot be used; one line naming the file."""


def parse_htpasswd(text: str, source: str = "htpasswd") -> Mapping[str, str]:
    """``user:hash`` lines to a mapping; blank and ``#`` lines skipped.

    A line without ``:`` makes the whole file invalid (as in distribution).
    Non-bcrypt entries are dropped with a warning: distribution keeps them but
    they can never authenticate, so the result is the same.
    """
    entries: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep:
            raise HtpasswdError(f"{source}: invalid entry at line {lineno}")
        if not hashed.startswith(_BCRYPT_PREFIXES):
            log.warning("%s: line %d: user %r has a non-bcrypt hash; ignored", source, lineno, user)
            continue
        entries[user] = hashed
    return MappingProxyType(entries)


def load_htpasswd(path: Path | str) -> Mapping[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise HtpasswdError(f"cannot read htpasswd file {path}: {exc.strerror or exc}") from None
    return parse_htpasswd(text, str(path))


def parse_basic(authorization: str | None) -> tuple[str, bytes] | None:
    """``Basic base64(user:password)`` to (user, password) or None, like Go's BasicAuth."""
    if not authorization or len(authorization) < 6 or authorization[:6].lower() != "basic ":
        return None
    try:
        decoded = base64.b64decode(authorization[6:], validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user.decode("utf-8", errors="surrogateescape"), password


def _go_quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class HtpasswdAuth:
    """Basic-auth checker for one realm and htpasswd file."""

    def __init__(
        self,
        realm: str,
        path: Path | str,
        cache_ttl: float = 60.0,
        cache_size: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.realm = realm
        self.path = Path(path)
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.clock = clock
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, tuple[str, str, float]] = OrderedDict()
        self._cache_key = secrets.token_bytes(32)
        self._dummy_hash: bytes | None = None
        self._mtime = self._stat_mtime()
        self._entries = load_htpasswd(self.path)

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._entries)

    def challenge(self) -> str:
        """The ``WWW-Authenticate`` value distribution sends: ``Basic realm="..."``."""
        return f"Basic realm={_go_quote(self.realm)}"

    def check(self, authorization: str | None) -> str:
        """Return the authenticated user name or raise ``Unauthorized``.

        ``error`` is None when no Basic credentials were sent and
        ``"invalid_credentials"`` when they were wrong.  Blocking (bcrypt):
        from a coroutine use ``check_async``.
        """
        self._maybe_reload()
        cached = self._cached_user(authorization)
        if cached is not None:
            return cached
        creds = parse_basic(authorization)
        if creds is None:
            raise self._deny(None, "basic credentials required")
        user, password = creds
        hashed = self._entries.get(user)
        if not self._password_matches(password, hashed):
            raise self._deny("invalid_credentials", f"authentication failure for {user!r}")
        self._remember(authorization, user, hashed)  # type: ignore[arg-type]
        return user

    async def check_async(self, authorization: str | None) -> str:
        """``check`` with the bcrypt work off the event loop (cache hits stay inline)."""
        cached = self._cached_user(authorization)
        if cached is not None and not self._file_changed():
            return cached
        return await asyncio.to_thread(self.check, authorization)

    def reload(self) -> None:
        """Re-read the file now (SIGHUP); raises ``HtpasswdError`` and keeps the old entries."""
        mtime = self._stat_mtime()
        entries = load_htpasswd(self.path)
        with self._lock:
            self._entries, self._mtime = entries, mtime
            self._cache.clear()

    # -- internals ---------------------------------------------------------------

    def _deny(self, error: str | None, reason: str) -> Unauthorized:
        return Unauthorized(error, reason, self.challenge())

    def _password_matches(self, password: bytes, hashed: str | None) -> bool:
        """bcrypt check; an unknown user is compared against a dummy hash."""
        candidate = hashed.encode("utf-8", errors="surrogateescape") if hashed else self._dummy()
        try:
            ok = bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], candidate)
        except ValueError:
            ok = False
        return ok and hashed is not None

    def _dummy(self) -> bytes:
        if self._dummy_hash is None:
            sample = next(iter(self._entries.values()), "")
            cost = int(sample[4:6]) if sample[4:6].isdigit() and 4 <= int(sample[4:6]) <= 31 else 10
            self._dummy_hash = bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(cost))
        return self._dummy_hash

    def _digest(self, authorization: str) -> bytes:
        """Keyed hash of the header: the cache never holds a plain or bare-SHA password."""
        return hmac.new(
            self._cache_key, authorization.encode("utf-8", "surrogateescape"), hashlib.sha256
        ).digest()

    def _cached_user(self, authorization: str | None) -> str | None:
        if not authorization:
            return None
        key = self._digest(authorization)
        with self._lock:
            hit = self._cache.get(key)
            if hit is None:
                return None
            user, hashed, expires = hit
            if expires <= self.clock() or self._entries.get(user) != hashed:
                del self._cache[key]
                return None
            return user

    def _remember(self, authorization: str, user: str, hashed: str) -> None:
        key = self._digest(authorization)
        with self._lock:
            self._cache[key] = (user, hashed, self.clock() + self.cache_ttl)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def _stat_mtime(self) -> int | None:
        try:
            return os.stat(self.path).st_mtime_ns
        except OSError:
            return None

    def _file_changed(self) -> bool:
        return self._stat_mtime() != self._mtime

    def _maybe_reload(self) -> None:
        """Re-read the file when its mtime changed, as distribution does per request."""
        if not self._file_changed():
            return
        try:
            self.reload()
        except HtpasswdError as exc:
            log.warning("keeping previous htpasswd entries: %s", exc)
            with self._lock:
                self._mtime = self._stat_mtime()
