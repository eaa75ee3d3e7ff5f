"""Resource/action model shared by token auth, scopes and challenges.

Mirrors distribution's ``auth.Access`` / ``token.ResourceActions``: a typed,
named resource plus the set of actions on it.  Matching is exact on type and
name; the ``*`` action grants every action (distribution's ``actionSet``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

WILDCARD_ACTION = "*"


class Unauthorized(Exception):
    """A request is not authorized; the HTTP layer answers 401.

    ``error`` is the RFC 6750 error code for the Bearer challenge (``None``
    when no credentials were sent, ``"invalid_token"``, ``"insufficient_scope"``).
    ``challenge`` is the ready ``WWW-Authenticate`` value when the raiser knew
    enough to build it; ``reason`` is for logs only, never for clients.
    """

    def __init__(self, error: str | None = None, reason: str = "", challenge: str = "") -> None:
        super().__init__(reason or error or "authorization required")
        self.error = error
        self.reason = reason
        self.challenge = challenge


class KeyLoadError(Exception):
    """Token key material could not be loaded; the message is one line naming the file."""


class MalformedAccess(ValueError):
    """The ``access`` claim does not have distribution's shape."""


@dataclass(frozen=True, slots=True)
class Access:
    """Actions on one typed, named resource (e.g. repository ``team/app``)."""

    type: str
    name: str
    actions: frozenset[str]

    @classmethod
    def of(cls, type: str, name: str, *actions: str) -> Access:
        """Convenience constructor: ``Access.of("repository", "team/app", "pull")``."""
        return cls(type, name, frozenset(actions))

    def allows(self, action: str) -> bool:
        """True when this entry grants ``action`` (directly or via ``*``)."""
        return action in self.actions or WILDCARD_ACTION in self.actions

    @property
    def scope(self) -> str:
        """The docker scope string for this entry."""
        return format_scope(self.type, self.name, self.actions)


# distribution calls the claim entries ResourceActions; same thing here.
ResourceActions = Access


def parse_access_claim(value: Any) -> tuple[Access, ...]:
    """Parse the JWT ``access`` claim; missing/null/empty means "no grants".

    Entries must be objects with string ``type`` and ``name``; ``actions`` is
    a list of strings (null/missing = none).  ``class`` is tolerated and
    ignored, as distribution ignores it for matching.  Anything else raises
    ``MalformedAccess`` so a weird token is rejected rather than half-read.
    """
    if value is None:
        return ()
    if not isinstance(value, list):
        raise MalformedAccess("access claim is not a list")
    return tuple(_parse_access_entry(entry) for entry in value)


def _parse_access_entry(entry: Any) -> Access:
    if not isinstance(entry, Mapping):
        raise MalformedAccess("access entry is not an object")
    rtype, name, actions = entry.get("type"), entry.get("name"), entry.get("actions")
    if not isinstance(rtype, str) or not isinstance(name, str):
        raise MalformedAccess("access entry type/name must be strings")
    if actions is None:
        actions = []
    if not isinstance(actions, list) or not all(isinstance(a, str) for a in actions):
        raise MalformedAccess("access entry actions must be a list of strings")
    return Access(rtype, name, frozenset(actions))


def grants(claims_access: Iterable[Access], type: str, name: str, action: str) -> bool:
    """True if any entry with exactly this type and name allows ``action``."""
    return any(a.type == type and a.name == name and a.allows(action) for a in claims_access)


def grants_all(claims_access: Iterable[Access], required: Iterable[Access]) -> bool:
    """True if every action of every required entry is granted."""
    held = tuple(claims_access)
    return all(grants(held, r.type, r.name, act) for r in required for act in r.actions)


def format_scope(type: str, name: str, actions: Iterable[str]) -> str:
    """``repository:team/app:pull,push``.

    A set is emitted sorted (deterministic output); an ordered sequence keeps
    its order, minus duplicates.
    """
    if isinstance(actions, (set, frozenset)):
        ordered = sorted(actions)
    else:
        ordered = list(dict.fromkeys(actions))
    return f"{type}:{name}:{','.join(ordered)}"


def parse_scope(scope: str) -> Access:
    """Parse one ``type:name:actions`` scope.

    The type ends at the first ``:`` and the actions start after the last one,
    so a name carrying a ``host:port`` prefix survives.  ``registry:catalog:*``
    gives type ``registry``, name ``catalog``, actions ``{"*"}``.
    """
    first, last = scope.find(":"), scope.rfind(":")
    if first <= 0 or last == first or " " in scope:
        raise ValueError(f"malformed scope: {scope!r}")
    rtype, name, raw_actions = scope[:first], scope[first + 1 : last], scope[last + 1 :]
    if not name:
        raise ValueError(f"malformed scope (empty name): {scope!r}")
    actions = frozenset(a for a in raw_actions.split(",") if a)
    return Access(rtype, name, actions)


def parse_scopes(value: str) -> tuple[Access, ...]:
    """Parse a space-separated list of scopes (one ``scope`` parameter)."""
    return tuple(parse_scope(s) for s in value.split(" ") if s)


def scope_param(items: Iterable[Access]) -> str:
    """Space-joined scopes for a challenge's ``scope`` parameter.

    Like distribution, one scope per (type, name) with all requested actions
    joined by ``,``; unlike distribution (Go map order) the order is stable:
    resources in first-seen order, actions in first-seen order.
    """
    merged: dict[tuple[str, str], list[str]] = {}
    for item in items:
        acts = merged.setdefault((item.type, item.name), [])
        acts.extend(a for a in sorted(item.actions) if a not in acts)
    return " ".join(format_scope(t, n, acts) for (t, n), acts in merged.items())
