"""Access control for the API: which access a request needs, and who may have it.

Every request is authorized before any lookup, cached or not, so an
unauthorized caller gets the same 401 whether or not the repository or
digest exists, costs no upstream GET, and a cache hit never skips the check.
Controllers raise :class:`mirror.errors.Unauthorized` carrying the
`WWW-Authenticate` challenge; this module is where the auth library's own
`Unauthorized` is mapped to the protocol error, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Protocol, TypeVar

from aiohttp import web

from mirror import errors
from mirror.auth import access as auth_access
from mirror.auth.access import Access
from mirror.auth.challenge import bearer_token, challenge
from mirror.config import Settings
from mirror.registry.routes import Route
from mirror.upstream.client import Upstream
from mirror.web.external import external_base

if TYPE_CHECKING:
    from mirror.auth.keys import TrustedKeys
    from mirror.auth.token import Claims, TokenVerifier

log = logging.getLogger(__name__)
T = TypeVar("T")

TOKEN_PATH = "/token"
UPSTREAM_RECHECK = 30.0  # seconds between attempts to learn upstream's token service
#: Actions distribution asks for per HTTP method on repository routes.
_ACTIONS = {"GET": ("pull",), "HEAD": ("pull",), "DELETE": ("delete",)}


def required_access(route: Route, method: str, mount_from: str | None = None) -> list[Access]:
    """The access a request needs, as distribution's app.go derives it.

    A cross-repository mount (`POST ...?mount=&from=R`) also needs pull on R.
    """
    if route.name == "base":
        return []
    if route.name == "catalog":
        return [Access.of("registry", "catalog", "*")]
    actions = _ACTIONS.get(method, ("pull", "push"))
    required = [Access.of("repository", route.params["name"], *actions)]
    if route.name == "upload" and method == "POST" and mount_from:
        required.append(Access.of("repository", mount_from, "pull"))
    return required


class AccessController(Protocol):
    """Decides whether a request may proceed."""

    async def authorize(self, request: web.Request, required: Sequence[Access]) -> str | None:
        """Return the client credential to pass upstream (or None), else raise.

        Raises:
            errors.Unauthorized: with a `WWW-Authenticate` challenge.
        """


class OpenAccess:
    """No `auth` configured: everyone may pull (distribution without auth)."""

    async def authorize(self, request: web.Request, required: Sequence[Access]) -> str | None:
        return None


def deny(exc: auth_access.Unauthorized, required: Sequence[Access]) -> errors.RegistryError:
    """The protocol error for a refused request (the one mapping)."""
    log.info("access denied: %s", exc.reason or exc.error or "no credentials")
    detail = [{"Type": a.type, "Class": "", "Name": a.name, "Action": action}
              for a in required for action in sorted(a.actions)]
    return errors.Unauthorized(detail=detail or None, headers={"WWW-Authenticate": exc.challenge})


class TokenAccess:
    """distribution's `auth.token`: validate the central auth service's JWTs locally.

    Args:
        settings: the node settings (`auth.token`, `http.host`, `mirror.auth`).
        pass_token_upstream: send the client's token upstream for fetches
            (upstream trusts the same issuer for the same service).
    """

    def __init__(self, settings: Settings, upstream: Upstream | None = None) -> None:
        token = settings.auth.token
        assert token is not None
        self.settings = settings
        self.token = token
        self.upstream = upstream
        self._upstream_service: str | None = None
        self._checked_at = -UPSTREAM_RECHECK
        from mirror.auth.token import TokenVerifier  # the crypto libraries, only when used

        self.verifier = TokenVerifier(token.issuer, token.service, self._load_keys(),
                                      signing_algorithms=token.signingalgorithms)
        self.node_verifier = self._node_verifier()

    def _node_verifier(self) -> TokenVerifier | None:
        """Accepts the tokens this node issues offline (its own key and issuer only)."""
        auth = self.settings.mirror.auth
        if not (auth.token_proxy and auth.offline_grace > 0):
            return None
        from mirror.auth.nodekey import NodeKey

        return NodeKey.for_settings(self.settings).verifier(self.token.service)

    def node_issued(self, claims: Claims) -> bool:
        """True for a token this node signed: never to be sent upstream."""
        return self.node_verifier is not None and claims.issuer == self.node_verifier.issuer

    def _verify(self, raw: str) -> Claims:
        """The central service's token, else (when offline tokens are on) one of ours."""
        try:
            return self.verifier.verify(raw)
        except Exception as central_failure:
            if self.node_verifier is not None:
                with contextlib.suppress(Exception):  # report why the central check failed
                    return self.node_verifier.verify(raw)
            raise central_failure

    def _load_keys(self) -> TrustedKeys:
        from mirror.auth.keys import load_trusted_keys

        return load_trusted_keys(self.token.rootcertbundle, self.token.jwks)

    def reload(self) -> None:
        """Re-read the bundle (SIGHUP); keep the old keys if the new ones fail."""
        try:
            self.verifier.keys = self._load_keys()
            log.info("token keys reloaded")
        except Exception as exc:  # noqa: BLE001 - a bad reload must not stop serving
            log.error("token keys not reloaded, keeping the old ones: %s", exc)

    async def _pass_token_upstream(self) -> bool:
        """True when upstream challenges for our service: it trusts these tokens.

        Then on-demand fetches carry the client's own token, so upstream
        applies its ACLs; otherwise the node's own credentials are used.
        """
        if self._upstream_service is None and self.upstream is not None:
            now = time.monotonic()
            if now - self._checked_at >= UPSTREAM_RECHECK:
                self._checked_at = now
                try:
                    found = await self.upstream.challenge()
                except errors.RegistryError:
                    found = None
                self._upstream_service = found.params.get("service", "") if found else None
        return self._upstream_service == self.token.service

    def realm(self, request: web.Request) -> str:
        """The realm clients are sent to: the central one, our relay, or (distribution's
        `autoredirect`) `autoredirectpath` on the base URL clients reach this node at."""
        if self.settings.mirror.auth.token_proxy or self.token.autoredirect:
            base = external_base(request, self.settings.http.host, self.settings.mirror.trusted_proxies)
            return base + (TOKEN_PATH if self.settings.mirror.auth.token_proxy
                           else self.token.autoredirectpath)
        return self.token.realm

    async def authorize(self, request: web.Request, required: Sequence[Access]) -> str | None:
        authorization = request.headers.get("Authorization")
        raw = bearer_token(authorization)
        error = None
        if raw:
            try:
                claims = (self.verifier.cached(raw)
                          or await verify_off_loop(self._verify, raw))
            except Exception as exc:  # noqa: BLE001 - InvalidToken; anything else is invalid too
                reason = getattr(exc, "reason", str(exc))
                error, claims = "invalid_token", None
                log.info("invalid token: %s", reason)
            if claims is not None:
                if auth_access.grants_all(claims.access, required):
                    if self.node_issued(claims):
                        return None  # the node's own account upstream, or only cached content
                    return authorization if await self._pass_token_upstream() else None
                error = "insufficient_scope"
        realm = self.realm(request)
        raise deny(auth_access.Unauthorized(error, error or "no token",
                                            challenge(realm, self.token.service, required, error)), required)


_verify_pool: ThreadPoolExecutor | None = None
VERIFY_THREADS = 2


async def verify_off_loop(verify: Callable[[str], T], raw: str) -> T:
    """Run a token verification in a small pool of its own, off the event loop.

    Signature checks are CPU work; on the loop, a burst of hostile tokens
    would stall every pull. Its own pool (not the default executor, which
    file I/O uses) keeps such a burst from delaying anything but other
    token checks; valid tokens are then cached per hash.
    """
    global _verify_pool
    if _verify_pool is None:
        _verify_pool = ThreadPoolExecutor(VERIFY_THREADS, thread_name_prefix="token-verify")
    return await asyncio.get_running_loop().run_in_executor(_verify_pool, verify, raw)


class HtpasswdAccess:
    """distribution's `auth.htpasswd`: Basic credentials checked against bcrypt entries."""

    def __init__(self, settings: Settings) -> None:
        from mirror.auth.htpasswd import HtpasswdAuth

        assert settings.auth.htpasswd is not None
        self.htpasswd = HtpasswdAuth(settings.auth.htpasswd.realm, settings.auth.htpasswd.path)

    def reload(self) -> None:
        """Re-read the htpasswd file (SIGHUP); a bad file keeps the old entries."""
        self.htpasswd.reload()
        log.info("htpasswd reloaded")

    async def authorize(self, request: web.Request, required: Sequence[Access]) -> str | None:
        try:
            await self.htpasswd.check_async(request.headers.get("Authorization"))
        except auth_access.Unauthorized as exc:
            raise deny(exc, required) from None
        return None


def install_reload(*reloadables: object) -> None:
    """Make SIGHUP reload what is reloadable (keys, htpasswd) and be harmless otherwise.

    Installed in every configuration: systemd's `ExecReload` sends SIGHUP, and
    without a handler its default action kills the node. A reload that fails
    is logged and the old state kept; it never stops the serving.
    """
    targets = [reload for reload in (getattr(r, "reload", None) for r in reloadables)
               if callable(reload)]

    def on_sighup() -> None:
        if not targets:
            log.info("SIGHUP: nothing to reload in this configuration")
        for reload in targets:
            try:
                reload()
            except Exception as exc:  # noqa: BLE001 - a reload never stops the serving
                log.error("SIGHUP: reload failed, keeping the old state: %s", exc)

    try:
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, on_sighup)
    except (RuntimeError, NotImplementedError, ValueError):
        log.debug("SIGHUP reload not available here")


def build_access(settings: Settings, upstream: Upstream) -> AccessController:
    """The controller the settings ask for (forward mode only when explicit)."""
    if settings.mirror.auth.mode == "forward":
        from mirror.auth.forward import ForwardAccess, ForwardByRegistry
        from mirror.workers import current_role, worker_count

        share = worker_count(settings) if current_role() else 1  # the node's rate, split over workers
        if settings.mirror.upstreams:  # each registry relays its own challenge, judges its own tokens
            return ForwardByRegistry(upstream, share=share)  # type: ignore[arg-type]
        return ForwardAccess(upstream, share=share)
    if settings.auth.token is not None:
        return TokenAccess(settings, upstream)
    if settings.auth.htpasswd is not None:
        return HtpasswdAccess(settings)
    return OpenAccess()
