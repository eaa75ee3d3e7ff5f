"""The `mirror` command: `mirror serve [CONFIG]` and the operator tools."""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import sys

from aiohttp import web

from mirror import __version__
from mirror.config import ConfigError, Settings, load_settings
from mirror.logs import setup_logging

log = logging.getLogger("mirror")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through cache for OCI registries")
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the registry API (config: distribution's config.yml)")
    serve.add_argument("config", nargs="?", help="config.yml (default: built-in Docker Hub mirror)")
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config, os.environ)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    return serve_forever(settings)


def serve_forever(settings: Settings) -> int:
    """Run the node until SIGINT/SIGTERM."""
    from mirror.app import create_app

    setup_logging(settings.log.level, settings.log.formatter)
    if settings.ignored_keys:
        log.warning("config keys accepted but not used by mirror: %s", ", ".join(settings.ignored_keys))
    if settings.unknown_keys:
        log.warning("unknown config keys ignored: %s", ", ".join(settings.unknown_keys))
    host, port = settings.http.bind
    log.info("mirror %s serving on %s:%d, upstream %s, store %s", __version__, host or "*", port,
             settings.proxy.remoteurl, settings.storage.root)
    web.run_app(create_app(settings), host=host or None, port=port, ssl_context=_tls(settings),
                print=None, access_log=None, handle_signals=True)
    return 0


def _tls(settings: Settings) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context when `http.tls` is configured."""
    tls = settings.http.tls
    if tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.certificate, tls.key)
    return context


if __name__ == "__main__":
    sys.exit(main())
