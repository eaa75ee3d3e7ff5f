"""nginx for tests: a private instance running a site file (``deploy/nginx/mirror.conf``).

    tls = make_tls(tmp)                                  # CA + localhost server certificate
    site = render_front(Path("deploy/nginx/mirror.conf").read_text(), https_port=...,
                        http_port=..., servers=["127.0.0.1:5000"], cert=tls.cert, key=tls.key,
                        debug_headers=True)
    with Nginx(tmp / "nginx", site) as front:            # nginx -p DIR -c DIR/nginx.conf
        front.wait_ready(https_port)
        ...

The site file stays an http{}-context include, as shipped; the main ``nginx.conf`` written here
only holds what a distribution's main file would (pid, logs, temp paths, events) pointed into the
instance's own directory. The process is stopped by its PID.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .procs import LOOPBACK, ManagedProcess, ProcessStartError, port_open

__all__ = ["NGINX_BIN", "Nginx", "TLSFiles", "make_tls", "render_front"]

NGINX_BIN = os.environ.get("MIRROR_TEST_NGINX_BIN", "nginx")

#: Headers the test copy adds so a test can see the hash key and the node that answered.
DEBUG_HEADERS = (
    "add_header X-Mirror-Key $mirror_key always;",
    "add_header X-Mirror-Upstream $upstream_addr always;",
)


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class TLSFiles:
    ca_dir: Path  # holds only ca.crt: what --src-cert-dir / /etc/docker/certs.d/<host>/ expect
    ca: Path
    cert: Path
    key: Path


def make_tls(directory: Path, hosts: Sequence[str] = ("localhost", "127.0.0.1")) -> TLSFiles:
    """A private CA and a server certificate (SAN: ``hosts``) signed by it, as PEM files."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mirror test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_dir = directory / "certs.d"
    ca_dir.mkdir(exist_ok=True)
    ca_path = ca_dir / "ca.crt"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path = directory / "server.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = directory / "server.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return TLSFiles(ca_dir=ca_dir, ca=ca_path, cert=cert_path, key=key_path)


# --------------------------------------------------------------------------- templating


def _sub_once(pattern: str, replacement: str, text: str, what: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
    if count != 1:
        raise AssertionError(f"mirror.conf: expected exactly one {what}, found {count}")
    return new


def render_front(
    text: str,
    *,
    https_port: int,
    http_port: int,
    servers: Sequence[str],
    cert: Path,
    key: Path,
    debug_headers: bool = False,
) -> str:
    """The shipped front config with its deployment-specific lines rewritten for a test.

    Rewrites ``listen 443 ssl;`` and ``listen 80;`` to loopback ports, the active
    ``server HOST:PORT ...;`` lines of the upstream block to ``servers``, and the certificate
    paths. Every other line is kept as shipped. Raises AssertionError when a line to rewrite
    is missing or ambiguous, so a change to the shipped file cannot silently skip a rewrite.
    """
    text = _sub_once(
        r"^([ \t]*)listen 443 ssl;",
        rf"\g<1>listen {LOOPBACK}:{https_port} ssl;",
        text,
        "'listen 443 ssl;'",
    )
    text = _sub_once(
        r"^([ \t]*)listen 80;", rf"\g<1>listen {LOOPBACK}:{http_port};", text, "'listen 80;'"
    )
    text = _sub_once(
        r"^([ \t]*)ssl_certificate\s+\S+;",
        rf"\g<1>ssl_certificate {cert};",
        text,
        "ssl_certificate",
    )
    text = _sub_once(
        r"^([ \t]*)ssl_certificate_key\s+\S+;",
        rf"\g<1>ssl_certificate_key {key};",
        text,
        "ssl_certificate_key",
    )
    upstream = re.search(r"^upstream mirror_nodes \{\n(.*?)^\}", text, re.MULTILINE | re.DOTALL)
    if upstream is None:
        raise AssertionError("mirror.conf: no 'upstream mirror_nodes { ... }' block")
    block = upstream.group(1)
    active = re.compile(r"^([ \t]*)server (\S+)((?: [^;#\n]*)?);[^\n]*\n", re.MULTILINE)
    found = list(active.finditer(block))
    if not found:
        raise AssertionError("mirror.conf: no active 'server HOST:PORT;' line in the upstream")
    indent, options = found[0].group(1), found[0].group(3)
    lines = "".join(f"{indent}server {server}{options};\n" for server in servers)
    block = block[: found[0].start()] + lines + active.sub("", block[found[0].end() :])
    text = text[: upstream.start(1)] + block + text[upstream.end(1) :]
    if debug_headers:
        text = _sub_once(
            r"^([ \t]*)(listen \S+ ssl;)",
            r"\g<1>\g<2>" + "".join(rf"\n\g<1>{h}" for h in DEBUG_HEADERS),
            text,
            "ssl listen line",
        )
    return text


# --------------------------------------------------------------------------- the process


class Nginx:
    """``nginx -p DIR -c DIR/nginx.conf -g 'daemon off;'`` with ``site`` included in http{}."""

    def __init__(self, directory: Path, site: str) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.site_path = self.dir / "mirror.conf"
        self.site_path.write_text(site)
        self.conf_path = self.dir / "nginx.conf"
        self.conf_path.write_text(self._main_conf())
        self.error_log = self.dir / "error.log"
        self.process = ManagedProcess(
            [
                NGINX_BIN,
                "-p",
                str(self.dir),
                "-c",
                str(self.conf_path),
                "-e",
                str(self.error_log),
                "-g",
                "daemon off;",
            ],
            log_dir=self.dir,
            name="nginx",
        )

    def _main_conf(self) -> str:
        d = self.dir
        # As root, workers would switch to "nobody" and could not reach a 0700 pytest tmp dir.
        user = "user root;\n" if os.geteuid() == 0 else ""
        temp = "".join(
            f"    {kind}_temp_path {d / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return (
            f"{user}worker_processes 1;\n"
            f"pid {d / 'nginx.pid'};\n"
            f"error_log {d / 'error.log'} info;\n"
            "events { worker_connections 256; }\n"
            "http {\n"
            f"    access_log {d / 'access.log'};\n"
            f"{temp}"
            f"    include {self.site_path};\n"
            "}\n"
        )

    def check(self) -> None:
        """``nginx -t``: raises AssertionError with nginx's message when the config is invalid."""
        cp = subprocess.run(
            [
                NGINX_BIN,
                "-t",
                "-p",
                str(self.dir),
                "-c",
                str(self.conf_path),
                "-e",
                str(self.error_log),
            ],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if cp.returncode != 0:
            raise AssertionError(
                f"nginx -t failed:\n{cp.stderr}\n--- config ---\n{self.site_path.read_text()}"
            )

    def start(self, *ports: int, timeout: float = 60.0) -> Nginx:
        self.process.start()
        deadline = time.monotonic() + timeout
        while not all(port_open(LOOPBACK, port) for port in ports):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ProcessStartError(f"nginx did not start:\n{self.logs()}")
            time.sleep(0.02)
        return self

    def logs(self) -> str:
        parts = [self.process.log_tail()]
        for name in ("error.log", "access.log"):
            path = self.dir / name
            if path.exists():
                parts.append(f"--- {name} ---\n{path.read_text(errors='replace')[-4000:]}")
        return "\n".join(parts)

    def access_log(self) -> str:
        path = self.dir / "access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        """SIGTERM to the master's PID (it stops its workers), SIGKILL after a timeout."""
        self.process.stop(timeout=5.0)

    def close(self) -> None:
        self.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def nginx_available() -> bool:
    return shutil.which(NGINX_BIN) is not None
