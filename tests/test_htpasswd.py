"""htpasswd Basic auth: distribution-compatible parsing, checks, caching, reloads."""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import bcrypt
import pytest

from mirror.auth import htpasswd as htmod
from mirror.auth.access import Unauthorized
from mirror.auth.htpasswd import HtpasswdAuth, HtpasswdError, parse_basic, parse_htpasswd

REALM = "mirror realm"


def bcrypt_hash(password: bytes, prefix: str = "$2y$") -> str:
    """A cheap (cost 4) bcrypt hash with the Apache ``$2y$`` prefix htpasswd -B writes."""
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(4)).decode()
    return prefix + hashed[4:]


def basic(user: str, password: str | bytes) -> str:
    raw = user.encode() + b":" + (password if isinstance(password, bytes) else password.encode())
    return "Basic " + base64.b64encode(raw).decode()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def counting(monkeypatch):
    """Count bcrypt comparisons to observe caching and dummy comparisons."""
    calls = []
    real = bcrypt.checkpw

    def checkpw(password, hashed):
        calls.append(hashed)
        return real(password, hashed)

    monkeypatch.setattr(htmod.bcrypt, "checkpw", checkpw)
    return calls


@pytest.fixture
def htfile(tmp_path) -> Path:
    path = tmp_path / "htpasswd"
    path.write_text(
        "# users\n"
        f"alice:{bcrypt_hash(b'wonderland')}\n"
        "\n"
        f"  bob:{bcrypt_hash(b'builder', '$2b$')}  \n"
        "carol:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n"
        "dave:$apr1$abc$def\n"
    )
    return path


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def auth(htfile, clock):
    return HtpasswdAuth(REALM, htfile, cache_ttl=30, clock=clock)


def deny(auth: HtpasswdAuth, header: str | None) -> Unauthorized:
    with pytest.raises(Unauthorized) as info:
        auth.check(header)
    assert info.value.challenge == f'Basic realm="{REALM}"'
    return info.value


def bump(path: Path, text: str) -> None:
    """Rewrite and move the mtime forward so the change is always noticed."""
    stat = path.stat()
    path.write_text(text)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def test_parse_skips_comments_blanks_and_non_bcrypt(htfile):
    entries = parse_htpasswd(htfile.read_text())
    assert set(entries) == {"alice", "bob"}


def test_parse_rejects_line_without_colon():
    with pytest.raises(HtpasswdError, match="line 2"):
        parse_htpasswd("alice:$2y$04$x\nbroken\n")


def test_missing_file_named_in_error(tmp_path):
    with pytest.raises(HtpasswdError, match="nope"):
        HtpasswdAuth(REALM, tmp_path / "nope")


def test_valid_credentials(auth):
    assert auth.check(basic("alice", "wonderland")) == "alice"
    assert auth.check(basic("bob", "builder")) == "bob"
    assert auth.users == {"alice", "bob"}


def test_challenge(auth):
    assert auth.challenge() == 'Basic realm="mirror realm"'
    assert HtpasswdAuth('a"b', auth.path).challenge() == 'Basic realm="a\\"b"'


def test_wrong_password(auth):
    err = deny(auth, basic("alice", "wrong"))
    assert err.error == "invalid_credentials"


def test_non_bcrypt_entries_never_authenticate(auth):
    deny(auth, basic("carol", "password"))


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer abc",
        "Basic",
        "Basic !!!",
        "Basic " + base64.b64encode(b"nocolon").decode(),
    ],
)
def test_missing_or_malformed_header(auth, header):
    assert deny(auth, header).error is None


def test_basic_parsing_like_go():
    assert parse_basic("basic " + base64.b64encode(b"u:p:q").decode()) == ("u", b"p:q")
    assert parse_basic("Basic " + base64.b64encode(b":").decode()) == ("", b"")
    assert parse_basic("Basic YQ") is None  # unpadded base64 is rejected by Go's StdEncoding


def test_unknown_user_still_costs_one_bcrypt(auth, counting):
    deny(auth, basic("mallory", "x"))
    assert len(counting) == 1


def test_success_is_cached_then_expires(auth, clock, counting):
    header = basic("alice", "wonderland")
    assert auth.check(header) == "alice"
    assert auth.check(header) == "alice"
    assert len(counting) == 1
    clock.now += 31
    assert auth.check(header) == "alice"
    assert len(counting) == 2


def test_failures_are_not_cached(auth, counting):
    for _ in range(2):
        deny(auth, basic("alice", "wrong"))
    assert len(counting) == 2


def test_cache_key_is_the_whole_header(auth, counting):
    assert auth.check(basic("alice", "wonderland")) == "alice"
    deny(auth, basic("alice", "wonderlan"))
    assert len(counting) == 2


def test_file_change_reloads_and_invalidates_cache(auth, htfile, counting):
    header = basic("alice", "wonderland")
    assert auth.check(header) == "alice"
    bump(htfile, f"alice:{bcrypt_hash(b'new')}\nerin:{bcrypt_hash(b'e')}\n")
    deny(auth, header)
    assert auth.check(basic("alice", "new")) == "alice"
    assert auth.check(basic("erin", "e")) == "erin"


def test_broken_file_keeps_previous_entries(auth, htfile):
    bump(htfile, "garbage-without-colon\n")
    assert auth.check(basic("alice", "wonderland")) == "alice"


def test_explicit_reload(auth, htfile):
    htfile.write_text(f"zed:{bcrypt_hash(b'z')}\n")
    auth.reload()
    assert auth.check(basic("zed", "z")) == "zed"
    htfile.unlink()
    with pytest.raises(HtpasswdError):
        auth.reload()
    assert auth.check(basic("zed", "z")) == "zed"


def test_long_password_truncated_at_72_bytes_like_go(tmp_path):
    password = b"p" * 100
    path = tmp_path / "h"
    path.write_text(f"long:{bcrypt_hash(password[:72])}\n")
    auth = HtpasswdAuth(REALM, path)
    assert auth.check(basic("long", password)) == "long"


async def test_check_async(auth, counting):
    header = basic("alice", "wonderland")
    assert await auth.check_async(header) == "alice"
    assert await auth.check_async(header) == "alice"
    assert len(counting) == 1
    with pytest.raises(Unauthorized):
        await auth.check_async(basic("alice", "no"))


# ---------------------------------------------------------------------------
# Same file, same verdicts as the real distribution 2.8 (skipped if absent)
# ---------------------------------------------------------------------------


def _get(url: str, authorization: str | None) -> tuple[int, str | None]:
    req = urllib.request.Request(url)
    if authorization:
        req.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("WWW-Authenticate")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers.get("WWW-Authenticate")


@pytest.mark.skipif(shutil.which("docker-registry") is None, reason="docker-registry not installed")
def test_real_registry_htpasswd_agrees(tmp_path, htfile):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp_path / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        f"auth:\n  htpasswd:\n    realm: {REALM}\n    path: {htfile}\n"
    )
    log = (tmp_path / "registry.log").open("wb")
    proc = subprocess.Popen(
        [shutil.which("docker-registry"), "serve", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/v2/"
    ours = HtpasswdAuth(REALM, htfile)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _get(url, None)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "registry did not start"
                time.sleep(0.1)
        for header in (
            None,
            basic("alice", "wonderland"),
            basic("bob", "builder"),
            basic("alice", "nope"),
            basic("carol", "password"),
            basic("mallory", "x"),
        ):
            status, www = _get(url, header)
            try:
                ours.check(header)
                mine = 200
            except Unauthorized as exc:
                mine = 401
                assert www == exc.challenge
            assert (header, status) == (header, mine)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
