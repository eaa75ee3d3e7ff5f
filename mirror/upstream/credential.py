"""Whose credentials an upstream request carries: a client's, the node's, or nobody's.

Every upstream call takes a :class:`Credential`, with no default, so a
call that forgets to say whose it is fails (a `TypeError`, and mypy finds
it) instead of silently meaning "the node's own account". Deciding whose is
the auth layer's job (:mod:`mirror.api.middleware` reads its verdict); the
layers below only carry the value.

| kind        | what upstream receives                                        |
| `client`    | the client's own `Authorization` header, as it sent it        |
| `node`      | `proxy.username`/`password` (basic or the token dance);       |
|             | an anonymous token when no account is configured              |
| `anonymous` | no account: the token dance without credentials               |
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["client", "node", "anonymous"]


@dataclass(frozen=True, slots=True)
class Credential:
    """Whose credentials an upstream request carries.

    Build one with :meth:`client`, :meth:`node` or :meth:`anonymous`. The
    client's header is kept out of `repr` so a logged credential never
    leaks a token.
    """

    kind: Kind
    header: str | None = None  # the client's Authorization header (kind "client" only)

    def __post_init__(self) -> None:
        if (self.kind == "client") != bool(self.header):
            raise ValueError("a client credential carries the client's header, and only it")

    @classmethod
    def client(cls, header: str) -> Credential:
        """A client's own `Authorization` header, passed upstream as it is."""
        return cls("client", header)

    @classmethod
    def node(cls) -> Credential:
        """The node's own account (`proxy.username`/`proxy.password`)."""
        return cls("node")

    @classmethod
    def anonymous(cls) -> Credential:
        """No account at all: upstream's anonymous access."""
        return cls("anonymous")

    @property
    def is_client(self) -> bool:
        """True for a client's token (it may expire; another client's may replace it)."""
        return self.kind == "client"

    def __repr__(self) -> str:
        return f"Credential.{self.kind}()" if self.kind != "client" else "Credential.client(<redacted>)"
