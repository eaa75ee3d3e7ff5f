"""Token verification: every acceptance and rejection rule, plus a cross-check
against the real distribution 2.8 registry when ``docker-registry`` is installed."""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mirror.auth.access import (
    Access,
    format_scope,
    grants,
    grants_all,
    parse_access_claim,
    parse_scope,
    parse_scopes,
)
from mirror.auth.keys import (
    KeyLoadError,
    jwk_thumbprint,
    libtrust_key_id,
    load_trusted_keys,
    public_jwk,
)
from mirror.auth.challenge import bearer_token, challenge
from mirror.auth.token import InvalidToken, TokenVerifier
from tests.support.token_issuer import (
    ISSUER,
    SERVICE,
    TokenIssuer,
    make_ca,
    make_cert,
    mint,
    new_key,
    pem,
    sign,
    write_bundle,
)

NOW = math.nan  # each test's clock, set by ``_clock`` when the test starts; never at import
PULL = Access.of("repository", "team/app", "pull")
PUSH = Access.of("repository", "team/app", "push")


# ---------------------------------------------------------------------------
# Fixtures: key material is generated once per module (RSA keygen is slow)
# ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _clock(monkeypatch):
    """Read ``NOW`` when each test starts, so it always falls inside the validity
    of certificates made earlier in the run, however long the suite took to
    get here (a value fixed at import went stale after ~5 minutes)."""
    monkeypatch.setattr(f"{__name__}.NOW", float(int(time.time())))


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ids = {
        "rsa": make_ca(d, name="rsa"),
        "ec": make_ca(d, key_type="ec256", name="ec"),
        "ed": make_ca(d, key_type="ed25519", name="ed"),
        "chain1": make_ca(d, depth=1, name="chain1"),
        "chain2": make_ca(d, depth=2, name="chain2"),
        "bare": make_ca(d, name="bare", extensions=False),
        "other": make_ca(d, name="other"),  # never trusted
    }
    trusted = [b.root for n, b in ids.items() if n != "other"]
    bundle = write_bundle(d / "bundle.pem", *trusted)
    jwks_key = new_key("ec384")
    jwks_path = d / "jwks.json"
    jwks_path.write_text(
        json.dumps({"keys": [{**public_jwk(jwks_key.public_key()), "kid": "jwks-key-1"}]})
    )
    return {"dir": d, "ids": ids, "bundle": bundle, "jwks": jwks_path, "jwks_key": jwks_key}


@pytest.fixture(scope="module")
def keys(pki):
    return load_trusted_keys(pki["bundle"], pki["jwks"])


@pytest.fixture
def ids(pki):
    return pki["ids"]


def verifier(keys, **kw) -> TokenVerifier:
    kw.setdefault("clock", lambda: NOW)
    return TokenVerifier(ISSUER, SERVICE, keys, **kw)


@pytest.fixture
def v(keys):
    return verifier(keys)


def rsa_mint(ids, **kw) -> str:
    kw.setdefault("now", NOW)
    return ids["rsa"].mint(**kw)


def reject(v: TokenVerifier, token: str, *fragments: str) -> InvalidToken:
    with pytest.raises(InvalidToken) as info:
        v.verify(token)
    for fragment in fragments:
        assert fragment in info.value.reason
    return info.value


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


# ---------------------------------------------------------------------------
# Accepted tokens and the claims they yield
# ---------------------------------------------------------------------------


def test_valid_x5c_token_yields_claims(v, ids):
    token = rsa_mint(ids, subject="bob", access=[PULL], jti="j1")
    claims = v.verify(token)
    assert claims.subject == "bob"
    assert claims.issuer == ISSUER
    assert claims.audience == (SERVICE,)
    assert claims.expires_at == int(NOW + 300)
    assert claims.access == (PULL,)
    assert claims.jti == "j1"
    assert claims.grants("repository", "team/app", "pull")
    assert not claims.grants("repository", "team/app", "push")


@pytest.mark.parametrize("name", ["rsa", "ec", "ed", "chain1", "chain2", "bare"])
def test_x5c_accepted_for_every_trusted_identity(v, ids, name):
    assert v.verify(ids[name].mint(now=NOW, access=[PULL])).access == (PULL,)


def test_kid_by_libtrust_id(v, ids):
    kid = ids["ec"].kid
    assert len(kid.split(":")) == 12 and all(len(g) == 4 for g in kid.split(":"))
    assert v.verify(ids["ec"].mint(now=NOW, header_mode="kid")).kid == kid


def test_kid_by_rfc7638_thumbprint(v, ids):
    token = ids["rsa"].mint(now=NOW, header_mode="kid", kid=ids["rsa"].thumbprint)
    assert v.verify(token).kid == ids["rsa"].thumbprint


def test_jwks_key_by_kid_and_thumbprint(v, pki):
    key = pki["jwks_key"]
    assert v.verify(mint(key, now=NOW, header_mode="kid", kid="jwks-key-1"))
    assert v.verify(mint(key, now=NOW, header_mode="kid", kid=jwk_thumbprint(key.public_key())))


def test_unknown_kid_rejected(v, ids):
    reject(v, ids["other"].mint(now=NOW, header_mode="kid"), "untrusted key id")
    # a trusted kid does not help a token signed by another key
    reject(v, ids["other"].mint(now=NOW, header_mode="kid", kid=ids["rsa"].kid), "signature")


def test_trusted_embedded_jwk_accepted(v, ids):
    assert v.verify(ids["rsa"].mint(now=NOW, header_mode="jwk"))


def test_untrusted_embedded_jwk_rejected(v, ids):
    reject(v, ids["other"].mint(now=NOW, header_mode="jwk"), "untrusted jwk")


def test_jwk_with_x5c_chain(v, ids):
    b = ids["chain2"]
    x5c = [base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in b.chain]
    assert v.verify(b.mint(now=NOW, header_mode="jwk", jwk=b.jwk(x5c=x5c)))
    # the embedded key must be the chain's leaf key
    other = ids["other"]
    reject(v, other.mint(now=NOW, header_mode="jwk", jwk=other.jwk(x5c=x5c)), "does not match")


def test_aud_list_containing_service_accepted(v, ids):
    assert v.verify(rsa_mint(ids, audience=["other", SERVICE])).audience == ("other", SERVICE)


def test_pss_accepted_for_rsa(v, ids):
    assert v.verify(rsa_mint(ids, alg="PS256"))


# ---------------------------------------------------------------------------
# Claim checks
# ---------------------------------------------------------------------------


def test_expired_rejected(v, ids):
    reject(v, rsa_mint(ids, exp_delta=-3600), "expired")


@pytest.mark.parametrize(
    ("exp_delta", "ok"), [(-30, True), (-60, True), (-61, False), (-90, False)]
)
def test_exp_leeway_is_60_seconds(v, ids, exp_delta, ok):
    token = rsa_mint(ids, exp_delta=exp_delta)
    if ok:
        assert v.verify(token)
    else:
        reject(v, token, "expired")


@pytest.mark.parametrize(
    ("nbf_delta", "ok"), [(0, True), (30, True), (60, True), (61, False), (90, False)]
)
def test_nbf_leeway_is_60_seconds(v, ids, nbf_delta, ok):
    token = rsa_mint(ids, nbf_delta=nbf_delta)
    if ok:
        assert v.verify(token).not_before == int(NOW + nbf_delta)
    else:
        reject(v, token, "not valid before")


def test_custom_leeway(keys, ids):
    strict = verifier(keys, leeway=0)
    reject(strict, rsa_mint(ids, exp_delta=-1), "expired")


def test_missing_exp_rejected(v, ids):
    reject(v, rsa_mint(ids, drop_claims=["exp"]), "no exp")


_BAD_EXP = {  # each a function of the test's clock: parameters are built at import
    "float": lambda now: now + 300.5,
    "string": lambda now: str(int(now + 300)),
    "bool": lambda now: True,
    "null": lambda now: None,
    "list": lambda now: [1],
}


@pytest.mark.parametrize("bad", _BAD_EXP.values(), ids=_BAD_EXP.keys())
def test_exp_must_be_an_integer(v, ids, bad):
    reject(v, rsa_mint(ids, extra_claims={"exp": bad(NOW)}))


def test_wrong_issuer_rejected(v, ids):
    reject(v, rsa_mint(ids, issuer="evil-issuer"), "issuer")
    reject(v, rsa_mint(ids, drop_claims=["iss"]), "issuer")


def test_wrong_audience_rejected(v, ids):
    reject(v, rsa_mint(ids, audience="other-registry"), "audience")
    reject(v, rsa_mint(ids, audience=["a", "b"]), "audience")
    reject(v, rsa_mint(ids, audience=[]), "audience")
    reject(v, rsa_mint(ids, drop_claims=["aud"]), "audience")
    reject(v, rsa_mint(ids, audience=[SERVICE, 1]))  # type: ignore[list-item]


def test_non_string_subject_rejected(v, ids):
    reject(v, rsa_mint(ids, extra_claims={"sub": 42}), "sub")


@pytest.mark.parametrize("access", [None, []])
def test_missing_or_empty_access_is_valid_but_grants_nothing(v, ids, access):
    token = rsa_mint(ids, access=access)
    claims = v.verify(token)
    assert claims.access == ()
    assert not claims.grants("repository", "team/app", "pull")
    assert grants_all(claims.access, [])  # the /v2/ base endpoint requires nothing
    assert not grants_all(claims.access, [PULL])


@pytest.mark.parametrize(
    "access",
    [
        {"type": "repository"},
        ["repository:team/app:pull"],
        [{"type": "repository", "name": "team/app", "actions": "pull"}],
        [{"type": "repository", "name": 5, "actions": ["pull"]}],
        [{"name": "team/app", "actions": ["pull"]}],
        [{"type": "repository", "name": "team/app", "actions": ["pull", 1]}],
        [None],
    ],
)
def test_malformed_access_rejected(v, ids, access):
    reject(v, rsa_mint(ids, access=None, extra_claims={"access": access}), "access")


def test_access_entry_without_actions_grants_nothing(v, ids):
    token = rsa_mint(ids, access=[{"type": "repository", "name": "team/app", "class": "image"}])
    claims = v.verify(token)
    assert claims.access == (Access("repository", "team/app", frozenset()),)


# ---------------------------------------------------------------------------
# Signatures, algorithms, key sources
# ---------------------------------------------------------------------------


def test_tampered_signature_rejected(v, ids):
    head, body, sig = rsa_mint(ids).split(".")
    flipped = ("A" if sig[10] != "A" else "B").join((sig[:10], sig[11:]))
    reject(v, f"{head}.{body}.{flipped}", "signature")


def test_tampered_payload_rejected(v, ids):
    head, body, sig = rsa_mint(ids, access=[PULL]).split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["access"] = [{"type": "repository", "name": "team/app", "actions": ["*"]}]
    reject(v, f"{head}.{b64url(json.dumps(claims).encode())}.{sig}", "signature")


def test_untrusted_chain_rejected(v, ids):
    reject(v, ids["other"].mint(now=NOW), "x5c")


def test_chain_from_impostor_ca_with_trusted_name_rejected(v, ids, tmp_path):
    """An attacker CA that copies the trusted root's subject name must not pass."""
    real = ids["chain1"]
    fake_root_key = new_key("rsa")
    fake_root = make_cert(fake_root_key, real.root.subject.rfc4514_string()[3:])
    assert fake_root.subject == real.root.subject
    leaf_key = new_key("ec256")
    leaf = make_cert(leaf_key, "evil", fake_root_key, fake_root, ca=False)
    reject(v, mint(leaf_key, [leaf, fake_root], now=NOW), "not trusted")


def test_chain_through_non_ca_intermediate_rejected(v, ids):
    b = ids["chain1"]
    key = new_key("ec256")
    leaf = make_cert(key, "grandchild", b.key, b.cert, ca=False)
    reject(v, mint(key, [leaf, b.cert], now=NOW), "not trusted")


def test_chain_path_length_enforced(v, ids):
    """chain2's intermediate has pathlen 0: it may not sign another CA."""
    b = ids["chain2"]
    inter, inter_key = b.chain[1], b.chain_keys[1]
    sub_key = new_key("ec256")
    sub = make_cert(sub_key, "sub-ca", inter_key, inter, ca=True)
    leaf_key = new_key("ec256")
    leaf = make_cert(leaf_key, "leaf", sub_key, sub, ca=False)
    reject(v, mint(leaf_key, [leaf, sub, inter], now=NOW), "not trusted")
    # the same intermediate signing a leaf directly is fine
    direct = make_cert(leaf_key, "leaf", inter_key, inter, ca=False)
    assert v.verify(mint(leaf_key, [direct, inter], now=NOW))


def test_chain_under_root_without_basic_constraints_rejected(tmp_path):
    root_key = new_key("rsa")
    root = make_cert(root_key, "bare-root", extensions=False)
    key = new_key("ec256")
    leaf = make_cert(key, "leaf", root_key, root, ca=False)
    v = verifier(load_trusted_keys(write_bundle(tmp_path / "b.pem", root), None))
    reject(v, mint(key, [leaf], now=NOW), "not trusted")


def test_expired_signing_certificate_rejected_even_if_in_bundle(tmp_path):
    start = dt.datetime.fromtimestamp(NOW - 10 * 86400, dt.UTC)
    b = make_ca(
        tmp_path, key_type="ec256", not_before=start, not_after=start + dt.timedelta(days=1)
    )
    v = verifier(load_trusted_keys(b.cert_path, None))
    reject(v, b.mint(now=NOW), "expired or not yet valid")


def test_not_yet_valid_leaf_rejected(tmp_path):
    future = dt.datetime.fromtimestamp(NOW + 86400, dt.UTC)
    b = make_ca(tmp_path, key_type="ec256", depth=1, not_before=future)
    v = verifier(load_trusted_keys(b.cert_path, None))
    reject(v, b.mint(now=NOW), "not yet valid")


@pytest.mark.parametrize(
    "x5c",
    [[], "MIIB", [""], ["not base64!"], [base64.b64encode(b"not a certificate").decode()], [1]],
)
def test_malformed_x5c_rejected(v, ids, x5c):
    reject(v, rsa_mint(ids, extra_header={"x5c": x5c}), "x5c")


def test_alg_none_rejected(v, ids):
    reject(v, rsa_mint(ids, alg="none"), "none")
    reject(v, rsa_mint(ids, alg="None"), "none")
    reject(v, rsa_mint(ids, header_mode="kid", alg="none"), "none")


@pytest.mark.parametrize("mode", ["x5c", "kid", "jwk"])
def test_hs256_with_public_key_as_secret_rejected(v, ids, mode):
    """The classic key-confusion attack: the public key PEM used as HMAC secret."""
    b = ids["rsa"]
    secret = b.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    token = b.mint(now=NOW, header_mode=mode, alg="HS256", hmac_secret=secret)
    reject(v, token, "HMAC")


def test_alg_must_match_key_type(v, ids):
    reject(v, ids["ec"].mint(now=NOW, alg="ES384"), "does not fit")  # P-256 key, ES384
    reject(v, ids["ec"].mint(now=NOW, alg="RS256", sign_alg="ES256"), "does not fit")
    reject(v, rsa_mint(ids, alg="ES256", sign_alg="RS256"), "does not fit")
    reject(v, ids["ed"].mint(now=NOW, alg="ES256", sign_alg="EdDSA"), "does not fit")


def test_unknown_alg_rejected(v, ids):
    reject(v, rsa_mint(ids, alg="RS1", sign_alg="RS256"), "unsupported alg")
    reject(v, rsa_mint(ids, extra_header={"alg": 256}))


def test_signing_algorithms_restriction(keys, ids):
    only_es = verifier(keys, signing_algorithms=("ES256",))
    assert only_es.verify(ids["ec"].mint(now=NOW))
    reject(only_es, rsa_mint(ids), "signingalgorithms")


@pytest.mark.parametrize("algs", [("HS256",), ("none",), ("RS256", "XX512")])
def test_signing_algorithms_config_validated(keys, algs):
    with pytest.raises(ValueError, match="unsupported"):
        verifier(keys, signing_algorithms=algs)


@pytest.mark.parametrize("crit", [["exp"], [], "b64", ["b64"]])
def test_crit_header_rejected(v, ids, crit):
    reject(v, rsa_mint(ids, extra_header={"crit": crit, "exp": 1}), "crit")


def test_b64_false_rejected(v, ids):
    reject(v, rsa_mint(ids, extra_header={"b64": False}))


@pytest.mark.parametrize(
    "extra", [{"jku": "http://127.0.0.1:1/jwks"}, {"x5u": "http://127.0.0.1:1/c.pem"}]
)
def test_jku_x5u_never_used_as_key_source(v, ids, extra):
    reject(v, rsa_mint(ids, header_mode="none-key", extra_header=extra), "no x5c, jwk or kid")
    # ignored (not fetched) when a real key source is present
    assert v.verify(rsa_mint(ids, extra_header=extra))


def test_no_key_reference_rejected(v, ids):
    reject(v, rsa_mint(ids, header_mode="none-key"), "no x5c, jwk or kid")


def test_x5c_takes_precedence_over_kid(v, ids):
    """distribution's order: an untrusted x5c is not rescued by a trusted kid."""
    token = ids["other"].mint(now=NOW, extra_header={"kid": ids["rsa"].kid})
    reject(v, token, "x5c")


# ---------------------------------------------------------------------------
# Malformed input
# ---------------------------------------------------------------------------


def test_oversized_token_rejected(keys, ids):
    token = rsa_mint(ids)
    reject(verifier(keys, max_token_size=len(token) - 1), token, "longer than")
    assert verifier(keys, max_token_size=len(token)).verify(token)


def test_huge_token_rejected_cheaply(v):
    reject(v, "a" * 1_000_000, "longer than")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        ".payload.sig",
        "head..sig",
        "he+d.payload.sig",
        "head.pay/oad.sig",
        "head.payload.si=g",
        "a\u00e9.b.c",
    ],
)
def test_malformed_structure_rejected(v, raw):
    reject(v, raw, "malformed")


@pytest.mark.parametrize("header", [b"not json", b"[1,2]", b'"alg"', b"\xff\xfe", b"{"])
def test_header_not_a_json_object_rejected(v, header):
    reject(v, f"{b64url(header)}.{b64url(b'{}')}.{b64url(b'sig')}", "header")


def test_bad_base64_length_rejected(v):
    reject(v, "a.b.c", "base64")  # 1 char is never valid base64


def test_signed_payload_not_json_rejected(v, ids):
    b = ids["rsa"]
    x5c = [base64.b64encode(b.cert.public_bytes(serialization.Encoding.DER)).decode()]
    head = b64url(json.dumps({"alg": "RS256", "x5c": x5c}).encode())
    for payload in (b"not json", b"[1]"):
        signing_input = f"{head}.{b64url(payload)}".encode()
        token = f"{signing_input.decode()}.{b64url(sign(signing_input, b.key, 'RS256'))}"
        reject(v, token, "claims")


def test_non_string_input_rejected(v):
    reject(v, None)  # type: ignore[arg-type]
    reject(v, b"a.b.c")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------
# Access matching
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("granted", "type_", "name", "action", "ok"),
    [
        (PULL, "repository", "team/app", "pull", True),
        (PULL, "repository", "team/other", "pull", False),
        (PULL, "repository", "team/app2", "pull", False),
        (PULL, "repository", "team", "pull", False),
        (PULL, "registry", "team/app", "pull", False),
        (PUSH, "repository", "team/app", "pull", False),
        (Access.of("repository", "team/app", "*"), "repository", "team/app", "pull", True),
        (Access.of("repository", "team/app", "*"), "repository", "team/app", "delete", True),
        (Access.of("registry", "catalog", "*"), "registry", "catalog", "*", True),
        (Access.of("repository", "Team/App", "pull"), "repository", "team/app", "pull", False),
    ],
)
def test_grants(v, ids, granted, type_, name, action, ok):
    claims = v.verify(rsa_mint(ids, access=[granted]))
    assert claims.grants(type_, name, action) is ok
    assert grants(claims.access, type_, name, action) is ok


def test_grants_merges_entries_for_one_resource(v, ids):
    claims = v.verify(rsa_mint(ids, access=[PULL, PUSH]))
    assert grants_all(claims.access, [Access.of("repository", "team/app", "pull", "push")])
    assert claims.grants("repository", "team/app", "push")


# ---------------------------------------------------------------------------
# What the token access controller (mirror.auth.controller.TokenAccess) combines:
# the bearer token of the header, verify, grants_all, and the challenge
# ---------------------------------------------------------------------------

REALM = "https://auth.example.com/token"


def test_no_token_is_challenged_without_an_error():
    for header in (None, "", "Basic abc"):
        assert bearer_token(header) is None
    assert challenge(REALM, SERVICE, [PULL]) == (
        f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:team/app:pull"'
    )


def test_expired_token_is_invalid(v, ids):
    reject(v, rsa_mint(ids, exp_delta=-3600), "expired")
    assert challenge(REALM, SERVICE, [PULL], "invalid_token").endswith(',error="invalid_token"')


def test_token_without_the_access_is_insufficient_scope(v, ids):
    assert not grants_all(v.verify(rsa_mint(ids, access=[PUSH])).access, [PULL])
    assert challenge(REALM, SERVICE, [PULL], "insufficient_scope") == (
        f'Bearer realm="{REALM}",service="{SERVICE}",scope="repository:team/app:pull",'
        'error="insufficient_scope"'
    )


def test_token_granting_the_access_and_the_base_endpoint(v, ids):
    claims = v.verify(rsa_mint(ids, access=[PULL]))
    assert claims.subject == "alice" and grants_all(claims.access, [PULL])
    assert grants_all(v.verify(rsa_mint(ids, access=[])).access, [])


def test_bearer_header_is_case_insensitive(v, ids):
    token = rsa_mint(ids, access=[PULL])
    for header in (f"Bearer {token}", f"bearer {token}"):
        assert grants_all(v.verify(bearer_token(header)).access, [PULL])


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Bearer a b", None),
        ("Bearer  a", None),
        ("Basic abc", None),
        ("BEARER abc", "abc"),
        ("Bearer abc", "abc"),
    ],
)
def test_bearer_token_parsing(header, token):
    assert bearer_token(header) == token


def test_challenge_format():
    assert challenge(REALM, SERVICE) == f'Bearer realm="{REALM}",service="{SERVICE}"'
    assert challenge(REALM, SERVICE, [], "invalid_token") == (
        f'Bearer realm="{REALM}",service="{SERVICE}",error="invalid_token"'
    )
    required = [
        PULL,
        PUSH,
        Access.of("repository", "base/img", "pull"),
        Access.of("registry", "catalog", "*"),
    ]
    assert challenge(REALM, SERVICE, required, "insufficient_scope") == (
        f'Bearer realm="{REALM}",service="{SERVICE}",'
        'scope="repository:team/app:pull,push repository:base/img:pull registry:catalog:*",'
        'error="insufficient_scope"'
    )


def test_challenge_quotes_like_go():
    assert challenge('a"b\\c', "s\n") == 'Bearer realm="a\\"b\\\\c",service="s\\n"'


# ---------------------------------------------------------------------------
# Key loading and swapping
# ---------------------------------------------------------------------------


def test_key_map_contains_libtrust_ids_and_thumbprints(keys, ids):
    for name in ("rsa", "ec", "ed", "bare"):
        b = ids[name]
        assert keys.lookup(libtrust_key_id(b.public_key)) is not None
        assert keys.lookup(b.thumbprint) is not None
    assert keys.lookup(ids["other"].kid) is None
    assert keys.lookup("jwks-key-1") is not None


def test_keys_swap_takes_effect(keys, ids, tmp_path):
    v = verifier(keys)
    token = rsa_mint(ids)
    assert v.verify(token)
    v.keys = load_trusted_keys(ids["ec"].cert_path, None)
    reject(v, token)
    assert v.verify(ids["ec"].mint(now=NOW))


def test_keyload_errors_name_the_file(tmp_path, ids):
    missing = tmp_path / "missing.pem"
    with pytest.raises(KeyLoadError, match="missing.pem"):
        load_trusted_keys(missing, None)
    empty = tmp_path / "empty.pem"
    empty.write_text("")
    with pytest.raises(KeyLoadError, match="empty.pem"):
        load_trusted_keys(empty, None)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(KeyLoadError, match="garbage.pem"):
        load_trusted_keys(garbage, None)
    with pytest.raises(KeyLoadError, match="rootcertbundle or a jwks"):
        load_trusted_keys(None, None)
    for text in ("{", "[]", '{"keys": []}', '{"keys": [{"kty": "oct", "k": "AAAA"}]}'):
        bad = tmp_path / "bad.jwks"
        bad.write_text(text)
        with pytest.raises(KeyLoadError, match="bad.jwks"):
            load_trusted_keys(None, bad)
    with pytest.raises(KeyLoadError) as info:
        load_trusted_keys(missing, None)
    assert "\n" not in str(info.value)


def test_bundle_with_key_block_and_jwks_only(tmp_path, ids):
    b = ids["ec"]
    mixed = tmp_path / "mixed.pem"
    mixed.write_bytes(b.key_path.read_bytes() + pem(b.cert))
    assert load_trusted_keys(mixed, None).certificates == (b.cert,)
    jwks = tmp_path / "k.json"
    jwks.write_text(json.dumps({"keys": [b.jwk(kid="k1")]}))
    only = load_trusted_keys(None, jwks)
    assert only.certificates == ()
    assert verifier(only).verify(b.mint(now=NOW, header_mode="kid", kid="k1"))
    reject(verifier(only), b.mint(now=NOW), "x5c")  # no bundle: no chain can be trusted


def test_conflicting_jwks_kid_rejected(tmp_path, ids):
    jwks = tmp_path / "k.json"
    jwks.write_text(json.dumps({"keys": [ids["ec"].jwk(kid=ids["rsa"].kid)]}))
    with pytest.raises(KeyLoadError, match="two different keys"):
        load_trusted_keys(ids["rsa"].cert_path, jwks)


# ---------------------------------------------------------------------------
# Scopes and property tests
# ---------------------------------------------------------------------------


def test_scope_examples():
    assert format_scope("repository", "team/app", ["pull"]) == "repository:team/app:pull"
    assert format_scope("repository", "x", {"push", "pull"}) == "repository:x:pull,push"
    assert parse_scope("registry:catalog:*") == Access.of("registry", "catalog", "*")
    assert parse_scope("repository:localhost:5000/app:pull,push") == Access.of(
        "repository", "localhost:5000/app", "pull", "push"
    )
    assert parse_scopes("repository:a:pull  repository:b:push") == (
        Access.of("repository", "a", "pull"),
        Access.of("repository", "b", "push"),
    )
    for bad in ("", "repository", "repository:app", ":app:pull", "repository::pull", "a b:c:d"):
        with pytest.raises(ValueError):
            parse_scope(bad)


def test_parse_access_claim_shapes():
    assert parse_access_claim(None) == ()
    assert parse_access_claim([]) == ()
    assert parse_access_claim([{"type": "t", "name": "n", "actions": None}]) == (
        Access("t", "n", frozenset()),
    )


_type_text = st.text(
    st.characters(blacklist_characters=": ,", blacklist_categories=("Cs",)), min_size=1
)
_name_text = st.text(
    st.characters(blacklist_characters=" ,", blacklist_categories=("Cs",)), min_size=1
)
_action_text = st.text(
    st.characters(blacklist_characters=": ,", blacklist_categories=("Cs",)), min_size=1
)


@given(_type_text, _name_text, st.frozensets(_action_text, max_size=4))
def test_scope_round_trip(type_, name, actions):
    scope = format_scope(type_, name, actions)
    assert parse_scope(scope) == Access(type_, name, actions)
    assert format_scope(type_, name, actions) == format_scope(type_, name, set(actions))


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_verify_only_raises_invalid_token_for_text(v, raw):
    with pytest.raises(InvalidToken):
        v.verify(raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)
_header = st.fixed_dictionaries(
    {},
    optional={
        "alg": st.sampled_from(["RS256", "ES256", "EdDSA", "none", "HS256", "PS512"]) | _json,
        "x5c": st.lists(st.text(max_size=20), max_size=2) | _json,
        "jwk": st.fixed_dictionaries(
            {"kty": st.sampled_from(["RSA", "EC", "OKP"])},
            optional={"n": _json, "e": _json, "crv": _json, "x": _json, "y": _json},
        )
        | _json,
        "kid": st.text(max_size=10) | _json,
        "crit": _json,
    },
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    _header,
    st.dictionaries(st.sampled_from(["iss", "aud", "exp", "nbf", "access", "sub"]), _json),
    st.binary(max_size=80),
)
def test_verify_only_raises_invalid_token_for_structured_junk(v, header, claims, sig):
    raw = ".".join(
        (b64url(json.dumps(header).encode()), b64url(json.dumps(claims).encode()), b64url(sig))
    )
    with pytest.raises(InvalidToken):
        v.verify(raw)


# ---------------------------------------------------------------------------
# The real distribution 2.8 registry agrees (skipped when not installed)
# ---------------------------------------------------------------------------

REGISTRY_BIN = shutil.which("docker-registry")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, token: str | None = None) -> tuple[int, str | None]:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("WWW-Authenticate")
    except urllib.error.HTTPError as err:
        with err:
            return err.code, err.headers.get("WWW-Authenticate")


@pytest.fixture(scope="module")
def real_registry(pki):
    if REGISTRY_BIN is None:
        pytest.skip("docker-registry (distribution 2.8) not installed")
    ids = pki["ids"]
    d: Path = pki["dir"] / "registry"
    d.mkdir()
    bundle = write_bundle(
        d / "bundle.pem", ids["rsa"].root, ids["ec"].root, ids["chain2"].root, ids["bare"].root
    )
    issuer = TokenIssuer(
        ids["rsa"],
        users={"alice": ("s3cret", {"team/app": {"pull", "push"}})},
        anonymous={"library/alpine": {"pull"}},
    ).start()
    port = _free_port()
    config = d / "config.yml"
    config.write_text(
        "version: 0.1\n"
        "log:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {d / 'data'}\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
        "auth:\n  token:\n"
        f"    realm: {issuer.url}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
        f"    rootcertbundle: {bundle}\n"
    )
    log = (d / "registry.log").open("wb")
    proc = subprocess.Popen(
        [REGISTRY_BIN, "serve", str(config)], stdout=log, stderr=subprocess.STDOUT, cwd=d
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                _http(f"{base}/v2/")
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        f"registry did not start: {(d / 'registry.log').read_text()[-2000:]}"
                    )
                time.sleep(0.1)
        yield {"base": base, "issuer": issuer, "keys": load_trusted_keys(bundle, None)}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        issuer.stop()


def test_real_registry_accepts_issuer_tokens(real_registry):
    base, issuer = real_registry["base"], real_registry["issuer"]
    status, www = _http(f"{base}/v2/")
    assert status == 401
    assert www == challenge(issuer.url, SERVICE)
    status, www = _http(f"{base}/v2/team/app/tags/list")
    assert www == challenge(issuer.url, SERVICE, [PULL])
    assert _http(f"{base}/v2/", issuer.mint_for("alice", []))[0] == 200
    # a token fetched over HTTP from the issuer, as a docker client would
    req = urllib.request.Request(f"{issuer.url}?service={SERVICE}&scope=repository:team/app:pull")
    req.add_header("Authorization", "Basic " + base64.b64encode(b"alice:s3cret").decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        token = json.load(resp)["token"]
    assert _http(f"{base}/v2/team/app/tags/list", token)[0] == 404  # authorized; repo unknown
    status, www = _http(f"{base}/v2/team/app/tags/list", issuer.mint_for("alice", [PUSH]))
    assert (status, www) == (401, challenge(issuer.url, SERVICE, [PULL], "insufficient_scope"))
    status, www = _http(f"{base}/v2/team/app/tags/list", "garbage")
    assert (status, www) == (401, challenge(issuer.url, SERVICE, [PULL], "invalid_token"))


def _cases(ids):
    """(name, token, registry accepts, mirror accepts): 2.8's verdict next to ours.

    Where they differ it is deliberate: the mirror never accepts a token that
    a trusted key did not sign, but it is stricter on ``crit`` and looser on
    forms distribution 3 accepts (aud lists, PS*, thumbprint kids).
    """
    r, ec = ids["rsa"], ids["ec"]
    return [
        ("x5c", r.mint(), True, True),
        ("x5c ec", ec.mint(), True, True),
        ("x5c chain2", ids["chain2"].mint(), True, True),
        ("x5c bare self-signed", ids["bare"].mint(), True, True),
        ("kid libtrust", r.mint(header_mode="kid"), True, True),
        ("kid libtrust ec", ec.mint(header_mode="kid"), True, True),
        ("jwk trusted", r.mint(header_mode="jwk"), True, True),
        ("jwk untrusted", ids["other"].mint(header_mode="jwk"), False, False),
        ("x5c untrusted", ids["other"].mint(), False, False),
        ("expired 30s", r.mint(exp_delta=-30), True, True),
        ("expired 90s", r.mint(exp_delta=-90), False, False),
        ("nbf +30s", r.mint(nbf_delta=30), True, True),
        ("nbf +90s", r.mint(nbf_delta=90), False, False),
        ("no exp", r.mint(drop_claims=["exp"]), False, False),
        ("wrong iss", r.mint(issuer="x"), False, False),
        ("wrong aud", r.mint(audience="x"), False, False),
        ("ES384 on P-256", ec.mint(alg="ES384"), False, False),
        ("alg none", r.mint(alg="none"), False, False),
        ("access null", r.mint(access=None), True, True),
        ("crit", r.mint(extra_header={"crit": ["exp"], "exp": 1}), True, False),
        ("aud list", r.mint(audience=[SERVICE]), False, True),
        ("PS256", r.mint(alg="PS256"), False, True),
        ("kid thumbprint", r.mint(header_mode="kid", kid=r.thumbprint), False, True),
    ]


def test_real_registry_and_mirror_verdicts(real_registry, pki):
    base = real_registry["base"]
    mirror = TokenVerifier(ISSUER, SERVICE, real_registry["keys"])
    results = []
    for name, token, registry_ok, mirror_ok in _cases(pki["ids"]):
        status = _http(f"{base}/v2/", token)[0]
        try:
            mirror.verify(token)
            ours = True
        except InvalidToken:
            ours = False
        results.append((name, status == 200, ours))
        assert (name, status == 200, ours) == (name, registry_ok, mirror_ok)
