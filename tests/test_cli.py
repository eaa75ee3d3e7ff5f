"""`mirror serve` as operators run it: distribution's config files, env overrides, bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.procs import ManagedProcess, free_port, wait_http
from tests.support.token_issuer import make_ca

SEED = Path(__file__).parent / "data" / "seed_configs"


def run_mirror(*args: str, env: dict[str, str] | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mirror", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def seed_with_proxy(tmp_path: Path, name: str, remote: str = "http://127.0.0.1:9") -> Path:
    text = (SEED / name).read_text()
    text = text.replace("/var/lib/registry", str(tmp_path / "store"))
    text = text.replace("/etc/registry/root.crt", str(make_ca(tmp_path).cert_path))
    path = tmp_path / name
    path.write_text(text + f"proxy:\n  remoteurl: {remote}\n")
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in SEED.glob("*.yml")))
def test_source_document_configs_serve(tmp_path: Path, name: str) -> None:
    """Each of the source document's config.yml files, plus a proxy section, serves."""
    config = seed_with_proxy(tmp_path, name)
    port = free_port()
    env = {**os.environ, "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}", "REGISTRY_HTTP_DEBUG_ADDR": ""}
    with ManagedProcess([sys.executable, "-m", "mirror", "serve", str(config)], env=env) as process:
        wait_http(f"http://127.0.0.1:{port}/v2/", process=process)
        response = httpx.get(f"http://127.0.0.1:{port}/v2/")
        log = process.log_text()
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert log.count("config keys accepted but not used") == 1
    assert "http.secret" in log and "storage.cache" in log


@pytest.mark.parametrize(("env", "key"), [
    ({"REGISTRY_MIRROR_TAG_TTL": "soon"}, "mirror.tag_ttl"),
    ({"REGISTRY_HTTP_ADDR": "127.0.0.1:99999"}, "http.addr"),
    ({"REGISTRY_PROXY_REMOTEURL": "ftp://x"}, "proxy.remoteurl"),
    ({"REGISTRY_LOG_LEVEL": "loud"}, "log.level"),
    ({"REGISTRY_MIRROR_CACHE_MAX_SIZE": "lots"}, "mirror.cache.max_size"),
    ({"REGISTRY_MIRROR_SHUTDOWN_GRACE": "soon"}, "mirror.shutdown_grace"),
    ({"REGISTRY_MIRROR_NAMES": "[https://hub.yun.paic.com.cn]"}, "mirror.names[0]"),
])
def test_bad_value_is_one_line_naming_the_key(tmp_path: Path, env: dict[str, str], key: str) -> None:
    result = run_mirror("serve", str(seed_with_proxy(tmp_path, "public-internal.yml")), env=env)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0]
    assert "Traceback" not in result.stderr


def test_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run_mirror("serve", str(tmp_path / "nope.yml"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_no_config_is_a_docker_hub_mirror_on_5000_under_data(tmp_path: Path) -> None:
    """The embedded default: upstream Docker Hub, store ./data (port moved by env for the test)."""
    port = free_port()
    env = {**os.environ, "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}"}
    with ManagedProcess([sys.executable, "-m", "mirror", "serve"], env=env, cwd=str(tmp_path)) as process:
        wait_http(f"http://127.0.0.1:{port}/v2/", process=process)
        log = process.log_text()
    assert "https://registry-1.docker.io" in log
    assert (tmp_path / "data" / "mirror-store.json").exists()


def test_serves_tls_directly_with_tls_1_2_or_newer(tmp_path: Path) -> None:
    """`http.tls`: the node terminates TLS itself; TLS 1.1 and older are refused."""
    import ssl

    from tests.support.nginx import make_tls

    tls = make_tls(tmp_path / "tls")
    config = seed_with_proxy(tmp_path, "public-internal.yml")
    config.write_text(config.read_text().replace(
        "http:\n", f"http:\n  tls:\n    certificate: {tls.cert}\n    key: {tls.key}\n", 1))
    port = free_port()
    env = {**os.environ, "REGISTRY_HTTP_ADDR": f"127.0.0.1:{port}", "REGISTRY_HTTP_DEBUG_ADDR": ""}
    with ManagedProcess([sys.executable, "-m", "mirror", "serve", str(config)], env=env):
        trusted = ssl.create_default_context(cafile=str(tls.ca))
        _wait_tls(port, trusted)
        response = httpx.get(f"https://127.0.0.1:{port}/v2/", verify=trusted)
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    from mirror.cli import _tls
    from mirror.config import load_settings

    context = _tls(load_settings(config, {}))
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2


def _wait_tls(port: int, context: object, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(f"https://127.0.0.1:{port}/v2/", verify=context)  # type: ignore[arg-type]
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
