"""nginx `proxy_cache` + `proxy_cache_lock` in front of upstream: what users put there instead.

The configuration is what an operator would write for a pull-through cache
of a registry without auth: manifests cached for the tag TTL keyed by URI
and `Accept`, blobs cached for a year keyed by URI, one upstream fill per
object (`proxy_cache_lock`, waiters wait for the whole object and are then
served from the cache), sendfile, keep-alive upstream connections. It is
generated into a temp dir and listens on loopback only; `worker_processes
auto` (one per core), so per-core figures divide by all its processes' CPU.

Also here: the process-tree helpers every server's CPU and PSS are read
with (nginx's workers, and a node's workers, are children of what was
started).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Self

from tests.support.procs import ManagedProcess, free_port, wait_http
from tests.support.relay import Relay

CONFIG = """\
daemon off;
master_process on;
worker_processes auto;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=registry:16m max_size=16g inactive=7d
                     use_temp_path=off;
    upstream registry {{
        server {upstream};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_read_timeout 600s;
        proxy_cache registry;
        proxy_cache_lock on;
        proxy_cache_lock_timeout 600s;
        proxy_cache_lock_age 600s;
        proxy_cache_methods GET HEAD;
        proxy_ignore_headers Cache-Control Expires Set-Cookie;
        location ~ ^/v2/.+/manifests/ {{
            proxy_pass http://registry;
            proxy_cache_key $request_uri|$http_accept;
            proxy_cache_valid 200 {tag_ttl};
        }}
        location /v2/ {{
            proxy_pass http://registry;
            proxy_cache_key $request_uri;
            proxy_cache_valid 200 365d;
        }}
    }}
}}
"""


class ProcessServer:
    """A server run as one managed process on `self.port` (its children are its workers).

    Subclasses set `process` (a ManagedProcess) and `port`; a restart keeps
    what the server stored on disk, as it would for an operator.
    """

    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def start(self) -> Self:
        self.process.start()
        wait_http(f"{self.url}/v2/", timeout=30, process=self.process)
        return self

    def restart(self) -> None:
        self.process.stop()
        self.start()

    def log_text(self) -> str:
        return self.process.log_text()

    def close(self) -> None:
        self.process.stop()


class NginxCache(ProcessServer):
    """nginx with `proxy_cache` to `relay`, in its own temp dir under `parent`."""

    name = "nginx proxy_cache"

    def __init__(self, parent: Path, relay: Relay, tag_ttl: str) -> None:
        self.relay = relay
        self.dir = Path(tempfile.mkdtemp(prefix="nginx-", dir=parent))
        self.port = free_port()
        user = "user root;" if os.geteuid() == 0 else ""  # workers must write the root-owned temp dir
        upstream = relay.url.removeprefix("http://").rstrip("/")
        (self.dir / "nginx.conf").write_text(CONFIG.format(
            user=user, dir=self.dir, upstream=upstream, port=self.port, tag_ttl=tag_ttl))
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.process = ManagedProcess([binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                       "-e", str(self.dir / "error.log")],
                                      log_dir=self.dir, name="nginx")



def tree(pid: int) -> list[int]:
    """`pid` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def tree_cpu_seconds(pid: int) -> float:
    """utime+stime of `pid` and its descendants (all threads), in seconds."""
    total = 0
    for each in tree(pid):
        try:
            with open(f"/proc/{each}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def tree_pss(pid: int) -> int:
    """Proportional set size of `pid` and its descendants, in bytes (shared pages counted once)."""
    total = 0
    for each in tree(pid):
        try:
            with open(f"/proc/{each}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            continue
    return total
