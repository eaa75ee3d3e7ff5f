"""A tiny client for the admin API, used by the CLI commands."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import httpx

DEFAULT_SERVER = "http://127.0.0.1:5001"


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    """`--server` (the node's debug listener) and `--token` (`mirror.admin.token`)."""
    parser.add_argument("--server", default=os.environ.get("MIRROR_ADMIN_URL", DEFAULT_SERVER),
                        help="the node's admin URL (http.debug.addr); env MIRROR_ADMIN_URL")
    parser.add_argument("--token", default=os.environ.get("MIRROR_ADMIN_TOKEN"),
                        help="mirror.admin.token; env MIRROR_ADMIN_TOKEN")


class AdminClient:
    """Calls one node's admin API; errors end the command with one line."""

    def __init__(self, server: str, token: str | None, timeout: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout,
                                    trust_env=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        return cls(args.server, args.token)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON of a successful call; exit 1 with the server's message otherwise."""
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            sys.exit(f"mirror: cannot reach the node's admin API at {self._client.base_url}: {exc}")
        if response.status_code >= 400:
            try:
                message = response.json()["errors"][0]["message"]
            except (ValueError, KeyError, IndexError, TypeError):
                message = response.text[:200]
            sys.exit(f"mirror: {method} {path}: {response.status_code} {message}")
        return response.json() if response.content else None
