"""Request dispatch, the one place errors become the spec's JSON envelope."""

from __future__ import annotations

import ast
import logging
import re
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from aiohttp import web
from aiohttp.http_exceptions import InvalidURLError

from mirror import errors
from mirror.api import handlers, stalls, writes
from mirror.auth.controller import required_access
from mirror.registry import routes
from mirror.registry.digest import Digest
from mirror.registry.reference import RepositoryName, parse_reference
from mirror.upstream.credential import Credential
from mirror.upstream.registries import Registry
from mirror.web import keys

log = logging.getLogger(__name__)

API_VERSION = ("Docker-Distribution-API-Version", "registry/2.0")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: llhttp quotes the refused line as a bytes literal on its own line.
_PARSER_LINE = re.compile(r"^  (b'.*'|b\".*\")$", re.M)
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII stays; other bytes get %XX
_NODE_CREDENTIAL = Credential.node()  # immutable: one for every request, not one built per request


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every RegistryError once; anything unexpected is UNKNOWN/500."""
    try:
        return await handler(request)
    except errors.RegistryError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 405:
            return error_response(errors.Unsupported())
        return error_response(errors.RegistryError(exc.reason, status=exc.status))
    except Exception:
        log.exception("unexpected failure serving %s %s", request.method, request.path)
        return error_response(errors.Unknown())


def parser_refusal(status: int, exc: BaseException | None) -> web.Response:
    """The spec's JSON answer for a request aiohttp's HTTP parser refused.

    Such a request never reaches :func:`dispatch` (aiohttp answers plain
    text on its own). A raw non-ASCII byte in the target means what its
    percent-encoding means, so the target, when it can be recovered from
    the parser's message, is judged as dispatch would judge the encoded one:
    NAME_INVALID, TAG_INVALID, DIGEST_INVALID; anything else keeps the
    parser's status (400, 431) with a generic message.
    """
    error = _judged_target(_refused_target(exc)) or errors.RegistryError("malformed HTTP request",
                                                                         status=status)
    response = error_response(error)
    response.headers[API_VERSION[0]] = API_VERSION[1]
    response.force_close()  # the parser's state is lost: the connection cannot go on
    return response


def _refused_target(exc: BaseException | None) -> str | None:
    """The request target quoted in an llhttp URL error, percent-encoded."""
    found = _PARSER_LINE.search(exc.message) if isinstance(exc, InvalidURLError) else None
    if found is None:
        return None
    try:
        line = ast.literal_eval(found.group(1))
    except (ValueError, SyntaxError):
        return None
    parts = line.split(b" ") if isinstance(line, bytes) else []
    return quote(parts[1], safe=_SAFE) if len(parts) == 3 and parts[2].startswith(b"HTTP/") else None


def _judged_target(target: str | None) -> errors.RegistryError | None:
    if target is None:
        return None
    try:
        route = routes.match(target.split("?", 1)[0])
        if "name" in route.params:
            RepositoryName.parse(route.params["name"])
        if "reference" in route.params:
            parse_reference(route.params["reference"])
        if "digest" in route.params:
            Digest.parse(route.params["digest"])
    except errors.RegistryError as exc:
        return exc
    return None


def error_response(error: errors.RegistryError) -> web.Response:
    """The JSON error envelope with the error's status and headers."""
    response = web.json_response(error.body(), status=error.status)
    response.headers.update(error.headers)
    return response


async def add_api_version(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: the version header on every response."""
    response.headers[API_VERSION[0]] = API_VERSION[1]


async def dispatch(request: web.Request) -> web.StreamResponse:
    """Route a `/v2/...` request by parsing the path from the right."""
    route = routes.match(request.rel_url.raw_path)
    request[keys.ROUTE_NAME] = route.name
    node = request.app[keys.NODE]
    stalls.watch(request, node.settings.mirror.client_idle_timeout)  # a client that takes nothing is cut
    allowed = routes.READ_METHODS[route.name]
    if node.settings.mirror.passthrough_writes:
        allowed = allowed | writes.WRITE_METHODS.get(route.name, set())
    if request.method not in allowed:
        raise errors.Unsupported(headers={"Allow": ", ".join(sorted(allowed))})
    if "name" in route.params:
        RepositoryName.parse(route.params["name"])  # a bad name is 400 for everyone, before auth
    if request.query.get("from"):
        RepositoryName.parse(request.query["from"])
    route, registry_of_name = _keyed(request, route)
    if registry_of_name is not None:
        request[keys.REGISTRY_LABEL] = registry_of_name.label
    required = required_access(route, request.method, request.query.get("from"))
    client_header = await node.access.authorize(request, required)
    if (registry_of_name is not None and registry_of_name.prefix is not None
            and node.settings.mirror.auth.mode != "forward"):
        client_header = None  # a client's token for this node is never sent to another registry
    request[keys.UPSTREAM_CREDENTIAL] = upstream_credential(client_header)
    if request.method not in routes.READ_METHODS[route.name]:
        if registry_of_name is not None and registry_of_name is not node.upstream.default:
            raise errors.Unsupported("pushes are relayed to the default upstream only")
        return await writes.forward(request, route)
    if route.name == "base":
        return await handlers.base(request)
    _check_namespace(request)
    return await handlers.HANDLERS[route.name](request, route.params)


def _keyed(request: web.Request, route: routes.Route) -> tuple[routes.Route, Registry | None]:
    """The route with its name as the node keys it: `<registry prefix>/<repo>` for a
    repository of another registry than the default (by `?ns=` or by path prefix).

    Done before auth, so the token scope a client needs names the registry too;
    an unknown `ns` keeps the name as sent and is refused after auth.
    """
    if "name" not in route.params:
        return route, None
    registries = request.app[keys.NODE].upstream
    ns = request.query.get("ns")
    key = registries.resolve(route.params["name"], ns)
    if key is None:
        return route, None
    RepositoryName.parse(key)  # the prefix may take a long name past the length limit
    request[keys.CLIENT_NAME] = route.params["name"]
    return routes.Route(route.name, {**route.params, "name": key}), registries.owner(key)[0]


def upstream_credential(client_header: str | None) -> Credential:
    """Whose credentials a request's upstream calls carry (README, Auth).

    The access controller returns the client's `Authorization` header when
    upstream judges the client itself (forward mode; token mode when upstream
    trusts the same token service); otherwise (no auth, htpasswd, tokens
    upstream does not trust) the node fetches with its own account.
    """
    return Credential.client(client_header) if client_header else _NODE_CREDENTIAL


def _check_namespace(request: web.Request) -> None:
    """containerd's `?ns=`: serve only names of our own upstream.

    Raises:
        NameUnknown: `ns` names another registry, so containerd moves on to its
            next host instead of getting another registry's image by name.
    """
    ns = request.query.get("ns")
    if ns is not None and not request.app[keys.NODE].serves_namespace(ns):
        raise errors.NameUnknown(f"this mirror does not serve registry {ns[:100]!r}")
