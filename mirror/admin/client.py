"""A tiny client for the admin API, used by the CLI commands.

Every command finds the node as `registry garbage-collect CONFIG` finds its
store: from the node's own config file, given as the first positional
argument. `--server` and `--token` override what the file says; without a
file (or where it says nothing) `MIRROR_ADMIN_URL` / `MIRROR_ADMIN_TOKEN` and
then `http://127.0.0.1:5001` are used.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import httpx

from mirror.config import ConfigError, Settings, load_settings

DEFAULT_SERVER = "http://127.0.0.1:5001"
#: A first positional argument ending so is the node's config (see :func:`split_config`).
CONFIG_SUFFIXES = (".yml", ".yaml")


def add_server_arguments(parser: argparse.ArgumentParser, config_positional: bool = True) -> None:
    """`CONFIG` (the node's config.yml), `--server` (http.debug.addr) and `--token` (mirror.admin.token).

    Args:
        config_positional: add `CONFIG` as an optional positional; commands with
            positionals of their own pass False and call :func:`split_config`.
    """
    if config_positional:
        parser.add_argument("config", nargs="?", metavar="CONFIG",
                            help="the node's config.yml: admin address, token and store from it")
    parser.add_argument("--server", default=None,
                        help="the node's admin URL (default: http.debug.addr of CONFIG, "
                             f"else env MIRROR_ADMIN_URL, else {DEFAULT_SERVER})")
    parser.add_argument("--token", default=None,
                        help="the admin token (default: mirror.admin.token of CONFIG, "
                             "else env MIRROR_ADMIN_TOKEN)")


def split_config(values: list[str]) -> tuple[str | None, list[str]]:
    """`[CONFIG] ARGS...`: the config file, if the first value is one, and the rest.

    The first value is the config when it ends in .yml/.yaml and is a file,
    or when more values follow (so a mistyped path is reported as a config
    that cannot be read, not sent to the node as an image name).
    """
    if values and values[0].endswith(CONFIG_SUFFIXES) and (os.path.isfile(values[0]) or len(values) > 1):
        return values[0], values[1:]
    return None, values


def node_settings(args: argparse.Namespace) -> Settings | None:
    """The node's settings from `args.config` (with its REGISTRY_* environment), or None.

    A bad file ends the command with the node's own one-line message (exit 2).
    """
    path = getattr(args, "config", None)
    if path is None:
        return None
    try:
        return load_settings(path, os.environ)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        sys.exit(2)


def admin_url(settings: Settings) -> str | None:
    """The admin API's URL on this host from `http.debug.addr` (a wildcard means loopback)."""
    bind = settings.http.debug_bind
    if bind is None:
        return None
    host, port = bind
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def store_root(args: argparse.Namespace) -> Path | None:
    """`storage.filesystem.rootdirectory` of the node's config, if one was given."""
    settings = node_settings(args)
    return settings.storage.root if settings is not None else None


class AdminClient:
    """Calls one node's admin API; errors end the command with one line."""

    def __init__(self, server: str, token: str | None, timeout: float | None = 60.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.Client(base_url=server.rstrip("/"), headers=headers, timeout=timeout,
                                    trust_env=False)

    @classmethod
    def from_args(cls, args: argparse.Namespace, timeout: float | None = 60.0) -> AdminClient:
        """Flags first, then the node's config file, then the environment, then the default."""
        settings = node_settings(args)
        server, token = args.server, args.token
        if settings is not None:
            if server is None and (server := admin_url(settings)) is None:
                print(f"mirror: {args.config}: http.debug.addr is not set, so the node has no admin "
                      "API (set it, or pass --server)", file=sys.stderr)
                sys.exit(2)
            token = token or settings.mirror.admin.token
        server = server or os.environ.get("MIRROR_ADMIN_URL") or DEFAULT_SERVER
        token = token or os.environ.get("MIRROR_ADMIN_TOKEN")
        return cls(server, token, timeout=timeout)

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
