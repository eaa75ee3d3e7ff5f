"""The `mirror` command: `mirror serve [CONFIG]` and the operator tools."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import ssl
import sys
import threading

from aiohttp import web

from mirror import __version__
from mirror.auth.access import KeyLoadError
from mirror.commands import registry as commands_registry
from mirror.config import ConfigError, Settings, load_settings
from mirror.logs import setup_logging
from mirror.storage.blobstore import StoreLayoutError

log = logging.getLogger("mirror")

#: Seconds after the shutdown grace for cutting, unwinding and the flush; the
#: default 20 s grace thus ends the process by 25 s, inside a 30 s kill.
FLUSH_BUDGET = 5.0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="mirror", description="Pull-through cache for OCI registries")
    parser.add_argument("--version", action="version", version=f"mirror {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the registry API (config: distribution's config.yml)")
    serve.add_argument("config", nargs="?", help="config.yml (default: built-in Docker Hub mirror)")
    for command in commands_registry.ALL:
        command.register(commands)
    args = parser.parse_args(argv)
    if args.command != "serve":
        return int(args.func(args) or 0)
    try:
        settings = load_settings(args.config, os.environ)
    except ConfigError as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    return serve_forever(settings, args.config)


def serve_forever(settings: Settings, config: str | None = None) -> int:
    """Run the node (and its debug listener) until SIGINT/SIGTERM.

    With `mirror.workers` above 1 this process supervises the workers
    (:mod:`mirror.workers`), each of which loads `config` again.
    """
    from mirror.workers import Supervisor, current_role, die_with_parent, worker_count

    setup_logging(settings.log.level, settings.log.formatter)
    _raise_nofile_limit()
    role = current_role()
    if role is None and worker_count(settings) > 1:
        try:
            return Supervisor(settings, config, worker_count(settings), FLUSH_BUDGET).run()
        except OSError as exc:
            print(f"mirror: {exc}", file=sys.stderr)
            return 2
    if role is not None:
        die_with_parent()
    if settings.ignored_keys and (role is None or role.leader):
        log.warning("config keys accepted but not used by mirror: %s", ", ".join(settings.ignored_keys))
    if settings.unknown_keys and (role is None or role.leader):
        log.warning("unknown config keys ignored: %s", ", ".join(settings.unknown_keys))
    try:
        asyncio.run(_serve(settings))
    except (KeyLoadError, StoreLayoutError, OSError) as exc:
        print(f"mirror: {exc}", file=sys.stderr)
        return 2
    return 0


async def _serve(settings: Settings) -> None:
    from mirror.api.debug import create_debug_app
    from mirror.web.keys import NODE
    from mirror.api.server import CLEANUP_TIMEOUT, CUT_WAIT, MirrorRunner, drain, warn_if_unguarded
    from mirror.app import create_app
    from mirror.observe.nodetotals import publish, publish_forever
    from mirror.workers import current_role

    role = current_role()
    warn_if_unguarded()
    app = create_app(settings)
    # request-header timeout, 75 s keep-alive; drain() bounds the shutdown
    runner = MirrorRunner(app, access_log=None, shutdown_timeout=CLEANUP_TIMEOUT)
    await runner.setup()
    debug: web.AppRunner | None = None
    publisher: asyncio.Task[None] | None = None
    try:
        host, port = settings.http.bind
        # Workers each listen with SO_REUSEPORT: the kernel spreads connections over them.
        await web.TCPSite(runner, host, port, ssl_context=_tls(settings), reuse_port=role is not None).start()
        log.info("mirror %s %sserving on %s:%d, upstream %s, store %s", __version__,
                 "" if role is None else f"worker {role.index} (pid {os.getpid()}) ", host, port,
                 settings.proxy.remoteurl, settings.storage.root)
        if settings.http.debug_bind is not None and (role is None or role.leader):
            debug = web.AppRunner(create_debug_app(app[NODE]), access_log=None, shutdown_timeout=CUT_WAIT)
            await debug.setup()
            await web.TCPSite(debug, *settings.http.debug_bind).start()
            log.info("debug listener on %s:%d", *settings.http.debug_bind)
        if role is not None and not role.leader:  # the leader's /metrics adds this worker's figures
            publisher = asyncio.create_task(
                publish_forever(app[NODE].metrics.registry, settings.metadata_dir, role.index))
        await _until_signalled()
        grace = settings.mirror.shutdown_grace
        _exit_after(grace + FLUSH_BUDGET)
        app[NODE].draining = True  # readiness answers 503 from now on
        await drain(runner, grace)  # the debug listener still answers meanwhile
        if publisher is not None:
            publisher.cancel()
            await asyncio.to_thread(publish, app[NODE].metrics.registry, settings.metadata_dir, role.index)
    finally:
        if debug is not None:
            await debug.cleanup()
        await runner.cleanup()  # the node's cleanup flushes access times, pull counts, events
    log.info("stopped")


def _exit_after(seconds: float) -> None:
    """The last resort: end the process `seconds` from now, before the platform's SIGKILL.

    Only a stuck thread or flush gets here; the store and SQLite are
    crash-safe, and a log line saying so beats a silent kill.
    """
    def expire() -> None:
        log.error("shutdown did not finish within %.1fs: exiting now", seconds)
        logging.shutdown()
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _raise_nofile_limit() -> None:
    """Raise the soft RLIMIT_NOFILE to the hard limit: connections cost descriptors."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open-files limit from %d: %s", soft, exc)


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")


def _tls(settings: Settings) -> ssl.SSLContext | None:
    """A TLS 1.2+ server context when `http.tls` is configured (`http.tls.clientcas`: mTLS)."""
    from mirror.api.server import tls_context

    return tls_context(settings)


if __name__ == "__main__":
    sys.exit(main())
