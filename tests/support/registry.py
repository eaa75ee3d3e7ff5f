"""A real upstream: CNCF distribution 2.8 (Debian ``docker-registry``) on 127.0.0.1.

    with run_registry() as reg:          # own temp dir, removed on exit
        reg.url   -> "http://127.0.0.1:PORT"
        reg.stop(); reg.start()         # same port, same storage: content survives

The same helper runs distribution's pull-through proxy mode
(``proxy_remoteurl=...``), e.g. as a benchmark baseline.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .procs import LOOPBACK, ManagedProcess, ProcessStartError, free_port, wait_http

__all__ = ["REGISTRY_BIN", "Registry", "TokenIssuer", "run_registry"]

REGISTRY_BIN = os.environ.get("MIRROR_TEST_REGISTRY_BIN", "docker-registry")


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in extra.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


class Registry:
    """One distribution instance. Use :func:`run_registry` or ``with Registry(...)``.

    tmp_dir: parent directory; a private subdirectory is created inside it (or in the
    system temp dir when None) and removed by :meth:`close`.
    auth_token: ``{"realm", "service", "issuer", "rootcertbundle"[, "autoredirect"]}``
    proxy_remoteurl: run as distribution's pull-through cache of that URL.
    notifications: list of endpoint dicts (``name``, ``url`` required; timeout,
    threshold, backoff, headers defaulted).
    http_host: ``http.host`` (absolute URL used when building Location headers).
    extra: deep-merged into the generated config last.
    port: fixed port (default: a free one). log_level: distribution log level
    (``warn`` for benchmarks); access_log: distribution's Apache-style access log.
    Logs (stdout+stderr) go to ``<dir>/<name>.log``; see :meth:`log_tail`.
    """

    def __init__(
        self,
        tmp_dir: str | os.PathLike[str] | None = None,
        *,
        auth_token: Mapping[str, Any] | None = None,
        proxy_remoteurl: str | None = None,
        notifications: list[Mapping[str, Any]] | None = None,
        http_host: str | None = None,
        extra: Mapping[str, Any] | None = None,
        port: int | None = None,
        log_level: str = "info",
        access_log: bool = True,
        name: str = "registry",
    ) -> None:
        if tmp_dir is not None:
            Path(tmp_dir).mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_dir))
        self.root = self.dir / "storage"
        self.root.mkdir()
        self.config_path = self.dir / "config.yml"
        self.auth_token = dict(auth_token) if auth_token else None
        self.proxy_remoteurl = proxy_remoteurl
        self.notifications = [dict(n) for n in notifications] if notifications else None
        self.http_host = http_host
        self.extra = dict(extra) if extra else None
        self.log_level = log_level
        self.access_log = access_log
        self.name = name
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.config: dict[str, Any] = {}
        self._write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("REGISTRY_", "OTEL_"))}
        self.process = ManagedProcess(
            [REGISTRY_BIN, "serve", str(self.config_path)],
            env=env,
            inherit_env=False,
            log_dir=self.dir,
            name=name,
        )
        self._started_once = False

    # -- addresses
    @property
    def host(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def log_path(self) -> Path:
        return self.process.log_path

    # -- config
    def build_config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {
            "version": 0.1,
            "log": {
                "level": self.log_level,
                "formatter": "text",
                "fields": {"service": self.name},
                "accesslog": {"disabled": not self.access_log},
            },
            "storage": {
                "filesystem": {"rootdirectory": str(self.root)},
                "delete": {"enabled": True},
                "maintenance": {
                    "uploadpurging": {"enabled": False},
                    "readonly": {"enabled": False},
                },
                "redirect": {"disable": True},
            },
            "http": {
                "addr": f"{LOOPBACK}:{self.port}",
                # fixed secret: upload state stays valid across stop()/start()
                "secret": "mirror-tests-not-secret",
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
        }
        if self.http_host:
            cfg["http"]["host"] = self.http_host
        if self.auth_token:
            cfg["auth"] = {"token": dict(self.auth_token)}
        if self.proxy_remoteurl:
            cfg["proxy"] = {"remoteurl": self.proxy_remoteurl}
        if self.notifications:
            eps = []
            for n in self.notifications:
                ep = {"timeout": "1s", "threshold": 5, "backoff": "1s", "headers": {}}
                ep.update(n)
                eps.append(ep)
            cfg["notifications"] = {"endpoints": eps}
        if self.extra:
            _deep_merge(cfg, self.extra)
        return cfg

    def _write_config(self) -> None:
        self.config = self.build_config()
        # JSON is valid YAML; avoids a PyYAML dependency and quoting surprises.
        self.config_path.write_text(json.dumps(self.config, indent=2) + "\n")

    # -- lifecycle
    def start(self, timeout: float = 60.0) -> Registry:
        """Start (or restart after :meth:`stop`) on the same port and storage root."""
        attempts = 1 if (self._fixed_port or self._started_once) else 3
        for attempt in range(attempts):
            self.process.start()
            try:
                wait_http(f"{self.url}/v2/", timeout=timeout, process=self.process)
            except ProcessStartError:
                self.process.stop()
                tail = self.process.log_tail()
                if attempt + 1 < attempts and "address already in use" in tail:
                    self.port = free_port()  # lost a race for the port: pick another
                    self._write_config()
                    continue
                raise
            self._started_once = True
            return self
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 5.0) -> int | None:
        return self.process.stop(timeout=timeout)

    def kill9(self) -> int | None:
        return self.process.kill9()

    def restart(self) -> Registry:
        self.stop()
        return self.start()

    @property
    def running(self) -> bool:
        return self.process.running

    def close(self) -> None:
        """Stop the process and remove the whole private directory (storage too)."""
        self.process.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, max_bytes: int = 4000) -> str:
        return self.process.log_tail(max_bytes)

    # -- storage introspection (handy for assertions)
    def blob_path(self, digest: str) -> Path:
        algo, hexd = digest.split(":", 1)
        return self.root / "docker/registry/v2/blobs" / algo / hexd[:2] / hexd / "data"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def __enter__(self) -> Registry:
        if not self.process.running:
            try:
                self.start()
            except BaseException:
                self.close()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Registry {self.url} pid={self.process.pid} root={self.root}>"


@contextmanager
def run_registry(
    tmp_dir: str | os.PathLike[str] | None = None,
    *,
    auth_token: Mapping[str, Any] | None = None,
    proxy_remoteurl: str | None = None,
    notifications: list[Mapping[str, Any]] | None = None,
    http_host: str | None = None,
    extra: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Iterator[Registry]:
    """Start a distribution registry, yield it, stop it and remove its directory."""
    reg = Registry(
        tmp_dir,
        auth_token=auth_token,
        proxy_remoteurl=proxy_remoteurl,
        notifications=notifications,
        http_host=http_host,
        extra=extra,
        **kwargs,
    )
    with reg:
        yield reg


# --------------------------------------------------------------------------- token auth


class TokenIssuer:
    """Minimal signer for distribution's token auth (test use only).

    Creates an RSA key and a self-signed cert (``cert_path`` = rootcertbundle) in
    ``directory``. ``auth_config(realm)`` gives the dict for ``run_registry(auth_token=)``;
    ``token(access)`` mints an RS256 JWT whose ``kid`` is the libtrust key id that
    distribution 2.8 derives from the bundle. ``access`` example:
    ``[{"type": "repository", "name": "lib/app", "actions": ["pull", "push"]}]``.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        service: str = "test-registry",
        issuer: str = "test-issuer",
    ) -> None:
        import base64
        import datetime
        import hashlib

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import rsa
        from cryptography.x509.oid import NameOID

        self.service = service
        self.issuer = issuer
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(self.key, hashes.SHA256())
        )
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.cert_path = Path(directory) / f"{issuer}.crt"
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self.key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
        self.kid = ":".join(b32[i : i + 4] for i in range(0, len(b32), 4))

    def auth_config(self, realm: str) -> dict[str, str]:
        return {
            "realm": realm,
            "service": self.service,
            "issuer": self.issuer,
            "rootcertbundle": str(self.cert_path),
        }

    def token(
        self,
        access: list[Mapping[str, Any]] | None = None,
        *,
        subject: str = "tester",
        ttl: int = 300,
        audience: str | None = None,
    ) -> str:
        import time
        import uuid

        import jwt

        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": audience or self.service,
            "iat": now - 5,
            "nbf": now - 5,
            "exp": now + ttl,
            "jti": uuid.uuid4().hex,
            "access": [dict(a) for a in (access or [])],
        }
        return jwt.encode(claims, self.key_pem, algorithm="RS256", headers={"kid": self.kid})

    @staticmethod
    def repo_access(repo: str, *actions: str) -> dict[str, Any]:
        return {"type": "repository", "name": repo, "actions": list(actions or ("pull",))}
