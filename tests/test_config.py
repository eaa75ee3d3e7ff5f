"""mirror.config: distribution's config.yml as is, our `mirror:` section, REGISTRY_* overrides."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from mirror.config import (
    ConfigError,
    HttpSettings,
    Settings,
    load_settings,
    parse_duration,
    parse_size,
)

SEED_CONFIGS = Path(__file__).parent / "data" / "seed_configs"
PROXY_SECTION = "proxy:\n  remoteurl: https://central.example.com\n"


@pytest.fixture
def write_config(tmp_path):
    """Writes YAML (dedented) to a file and returns its path."""

    def write(text: str) -> Path:
        path = tmp_path / "config.yml"
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def load(write_config):
    """load_settings on a YAML text, with an explicit (default empty) environment."""

    def load_text(text: str, env: dict[str, str] | None = None) -> Settings:
        return load_settings(write_config(text), env or {})

    return load_text


# --- defaults ---------------------------------------------------------------------------------


def test_defaults_without_file():
    settings = load_settings(None, {})
    assert settings == Settings()
    assert settings.version == "0.1"
    assert settings.http.addr == ":5000"
    assert settings.http.bind == ("0.0.0.0", 5000)
    assert settings.http.debug_bind is None
    assert settings.http.tls is None
    assert settings.proxy.remoteurl == "https://registry-1.docker.io"
    assert settings.storage.root == Path("data")
    assert settings.metadata_dir == Path("data/metadata")
    assert settings.log.level == "info" and settings.log.formatter == "text"
    assert settings.ignored_keys == () and settings.unknown_keys == ()


def test_mirror_defaults():
    mirror = load_settings(None, {}).mirror
    assert (mirror.tag_ttl, mirror.tag_max_stale, mirror.negative_ttl) == (60, 7 * 24 * 3600, 5)
    assert mirror.metadata_dir is None
    upstream = mirror.upstream
    assert (upstream.connect_timeout, upstream.read_timeout, upstream.pool_timeout) == (10, 60, 30)
    assert (upstream.max_connections, upstream.max_keepalive, upstream.keepalive_expiry) == (
        64,
        32,
        60,
    )
    assert (upstream.retries, upstream.max_concurrency, upstream.max_bandwidth) == (3, 0, 0)
    assert (mirror.cache.max_size, mirror.cache.max_size_percent) == (None, None)
    assert (mirror.cache.high_watermark, mirror.cache.low_watermark) == (0.95, 0.85)
    assert (mirror.auth.mode, mirror.auth.token_proxy, mirror.admin.token) == ("local", False, None)
    assert (mirror.auth.offline_grace, mirror.auth.offline_key) == (86400.0, None)
    assert (mirror.passthrough_writes, mirror.trusted_proxies, mirror.notify.forward_to) == (
        False,
        (),
        (),
    )
    assert (mirror.prefetch.rules, mirror.prefetch.keep_fresh, mirror.prefetch.interval) == (
        (),
        0,
        600,
    )
    assert (mirror.client_idle_timeout, mirror.manifest_max_size) == (60, 4 * 1024 * 1024)


def test_empty_file_gives_defaults(load):
    assert load("") == Settings()


def test_settings_are_frozen():
    settings = load_settings(None, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.http.addr = ":80"  # type: ignore[misc]


# --- the source document's configs, as they are, plus a proxy section --------------------------

COMMON_IGNORED = {
    "log.fields",
    "storage.cache",
    "storage.maintenance",
    "storage.delete",
    "http.secret",
}
TOKEN = {"issuer": "caas-issuer", "service": "caas-registry"}
NOTIFY = {"timeout": 300.0, "threshold": 5, "backoff": 30.0}

SEEDS = [
    pytest.param(
        "internal-cloud.yml",
        ":80",
        "https://hub.yun.paic.com.cn",
        None,
        TOKEN,
        None,
        "json",
        COMMON_IGNORED | {"log.accesslog"},
        id="internal-cloud",
    ),
    pytest.param(
        "public-external.yml",
        ":5000",
        "https://hub.cloud.papub",
        ":5001",
        TOKEN,
        "http://100.68.3.15:8080/ECA/notify",
        "text",
        COMMON_IGNORED,
        id="public-external",
    ),
    pytest.param(
        "public-internal.yml",
        ":5000",
        "https://hub.cloud.pub",
        ":5001",
        None,
        "http://100.68.3.22:8080/PUB/notify",
        "json",
        COMMON_IGNORED,
        id="public-internal",
    ),
    pytest.param(
        "public-internet.yml",
        ":5000",
        "https://eca-hub.yun.pingan.com",
        None,
        TOKEN,
        "http://100.68.3.15:8080/ECA/notify",
        "json",
        COMMON_IGNORED,
        id="public-internet",
    ),
]


@pytest.mark.parametrize(
    ("name", "addr", "host", "debug_addr", "token", "notify_url", "formatter", "ignored"), SEEDS
)
def test_seed_config(load, name, addr, host, debug_addr, token, notify_url, formatter, ignored):
    settings = load((SEED_CONFIGS / name).read_text(encoding="utf-8") + PROXY_SECTION)

    assert settings.version == "0.1"
    assert (settings.http.addr, settings.http.host, settings.http.debug_addr) == (
        addr,
        host,
        debug_addr,
    )
    assert settings.http.bind == ("0.0.0.0", int(addr[1:]))
    assert settings.proxy.remoteurl == "https://central.example.com"
    assert settings.storage.root == Path("/var/lib/registry")
    assert (settings.log.level, settings.log.formatter) == ("debug", formatter)
    if token is None:
        assert settings.auth.token is None
    else:
        assert {
            "issuer": settings.auth.token.issuer,
            "service": settings.auth.token.service,
        } == token
        assert settings.auth.token.rootcertbundle == Path("/etc/registry/root.crt")
    if notify_url is None:
        assert settings.notifications == ()
    else:
        (endpoint,) = settings.notifications
        assert (endpoint.name, endpoint.url, endpoint.disabled) == ("notify", notify_url, False)
        assert {k: getattr(endpoint, k) for k in NOTIFY} == NOTIFY
    assert set(settings.ignored_keys) == ignored
    assert settings.unknown_keys == ()


# --- environment overrides --------------------------------------------------------------------


def attr(settings: Settings, dotted: str):
    value = settings
    for name in dotted.split("."):
        value = getattr(value, name)
    return value


ENV_CASES = [
    (
        "REGISTRY_PROXY_REMOTEURL",
        "https://hub.example.com/",
        "proxy.remoteurl",
        "https://hub.example.com",
    ),
    ("REGISTRY_PROXY", "{username: bob, password: pw}", "proxy.username", "bob"),
    ("REGISTRY_HTTP_ADDR", "127.0.0.1:8080", "http.bind", ("127.0.0.1", 8080)),
    ("REGISTRY_HTTP_DEBUG_ADDR", ":5001", "http.debug_bind", ("0.0.0.0", 5001)),
    ("REGISTRY_HTTP_HOST", "https://hub.example.com", "http.host", "https://hub.example.com"),
    (
        "REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY",
        "/srv/registry",
        "storage.root",
        Path("/srv/registry"),
    ),
    ("REGISTRY_LOG_LEVEL", "WARNING", "log.level", "warn"),
    ("REGISTRY_LOG_FORMATTER", "logstash", "log.formatter", "json"),
    ("REGISTRY_LOGLEVEL", "error", "log.level", "error"),
    ("REGISTRY_MIRROR_TAG_TTL", "5m", "mirror.tag_ttl", 300.0),
    ("REGISTRY_MIRROR_TAG_MAX_STALE", "36h", "mirror.tag_max_stale", 36 * 3600.0),
    ("REGISTRY_MIRROR_UPSTREAM_READ_TIMEOUT", "90", "mirror.upstream.read_timeout", 90.0),
    ("REGISTRY_MIRROR_UPSTREAM_MAX_BANDWIDTH", "100MB/s", "mirror.upstream.max_bandwidth", 10**8),
    ("REGISTRY_MIRROR_CACHE_MAX_SIZE", "200GiB", "mirror.cache.max_size", 200 * 1024**3),
    ("REGISTRY_MIRROR_CACHE_MAX_SIZE", "80%", "mirror.cache.max_size_percent", 80.0),
    ("REGISTRY_MIRROR_PASSTHROUGH_WRITES", "true", "mirror.passthrough_writes", True),
    (
        "REGISTRY_MIRROR_TRUSTED_PROXIES",
        "[10.0.0.0/8, 192.168.1.7]",
        "mirror.trusted_proxies",
        ("10.0.0.0/8", "192.168.1.7/32"),
    ),
    (
        "REGISTRY_MIRROR_TRUSTED_PROXIES",
        "10.0.0.0/8,172.16.0.0/12",
        "mirror.trusted_proxies",
        ("10.0.0.0/8", "172.16.0.0/12"),
    ),
    (
        "REGISTRY_MIRROR_PREFETCH_RULES",
        "[library/*, team/app:*]",
        "mirror.prefetch.rules",
        ("library/*", "team/app:*"),
    ),
    ("REGISTRY_MIRROR_ADMIN_TOKEN", "0123", "mirror.admin.token", "0123"),
    ("REGISTRY_MIRROR_ADMIN_TOKEN", "", "mirror.admin.token", None),
    ("REGISTRY_MIRROR_AUTH_MODE", "forward", "mirror.auth.mode", "forward"),
    (
        "REGISTRY_MIRROR_METADATA_DIR",
        "/var/cache/mirror",
        "metadata_dir",
        Path("/var/cache/mirror"),
    ),
]


@pytest.mark.parametrize(
    ("name", "value", "path", "expected"), ENV_CASES, ids=[f"{c[0]}={c[1]}" for c in ENV_CASES]
)
def test_env_override(name, value, path, expected):
    assert attr(load_settings(None, {name: value}), path) == expected


def test_env_wins_over_file(load):
    settings = load(
        """
        http:
          addr: :5000
          debug:
            addr: :5001
        mirror:
          tag_ttl: 10s
    """,
        {"REGISTRY_HTTP_DEBUG_ADDR": "127.0.0.1:9000", "REGISTRY_MIRROR_TAG_TTL": "1m"},
    )
    assert settings.http.addr == ":5000"
    assert settings.http.debug_addr == "127.0.0.1:9000"
    assert settings.mirror.tag_ttl == 60.0


def test_env_sets_whole_section_then_field():
    settings = load_settings(
        None,
        {
            "REGISTRY_PROXY": "{remoteurl: https://a.example.com, username: u, password: p}",
            "REGISTRY_PROXY_REMOTEURL": "https://b.example.com",
        },
    )
    assert (settings.proxy.remoteurl, settings.proxy.username) == ("https://b.example.com", "u")


def test_env_under_ignored_section_is_reported_as_ignored():
    settings = load_settings(
        None,
        {"REGISTRY_STORAGE_CACHE_BLOBDESCRIPTOR": "inmemory", "REGISTRY_REDIS_ADDR": "redis:6379"},
    )
    assert set(settings.ignored_keys) == {"storage.cache", "redis"}


@pytest.mark.parametrize(
    "name",
    [
        "REGISTRY_FOO",
        "REGISTRY_HTTP_ADDR_PORT",
        "REGISTRY_MIRROR_NOPE",
        "REGISTRY_VERSION",
        "REGISTRY_PORT_5000_TCP",
        "REGISTRY_NOTIFICATIONS_ENDPOINTS_0_URL",
    ],
)
def test_env_unknown_is_reported_not_fatal(name):
    assert load_settings(None, {name: "x"}).unknown_keys == (f"env:{name}",)


def test_env_without_prefix_is_not_read():
    assert load_settings(None, {"HTTP_ADDR": "x", "registry_http_addr": "y"}) == Settings()


# --- what distribution accepts but we ignore, and what nobody knows ----------------------------


def test_ignored_and_unknown_keys(load):
    settings = load("""
        version: 0.1
        log: {hooks: [], reportcaller: true}
        storage:
          filesystem: {rootdirectory: /srv, maxthreads: 100}
          redirect: {disable: true}
          tag: {concurrencylimit: 8}
        http:
          prefix: /reg
          debug: {prometheus: {enabled: true, path: /metrics}}
          http2: {disabled: false}
        notifications:
          events: {includereferences: true}
        middleware: {registry: []}
        reporting: {}
        health: {storagedriver: {enabled: true}}
        validation: {disabled: true}
        compatibility: {}
        policy: {}
        colour: blue
        http2: {}
        proxy: {remoteurl: https://x.example.com, cachewritetimeout: 1m}
    """)
    assert settings.ignored_keys == (
        "log.hooks",
        "log.reportcaller",
        "storage.filesystem.maxthreads",
        "storage.redirect",
        "storage.tag",
        "http.prefix",
        "http.debug.prometheus",
        "http.http2",
        "notifications.events",
        "middleware",
        "reporting",
        "health",
        "validation",
        "compatibility",
        "policy",
    )
    assert settings.unknown_keys == ("colour", "http2", "proxy.cachewritetimeout")
    assert settings.auth.token is None and settings.auth.htpasswd is None


@pytest.mark.parametrize(
    ("yaml", "root", "ignored"),
    [
        ("storage: inmemory", Path("data"), ("storage.inmemory",)),
        ("storage: {s3: {bucket: b}, cache: {}}", Path("data"), ("storage.s3", "storage.cache")),
        ("storage: filesystem", Path("/var/lib/registry"), ()),
        ("storage: {filesystem: {rootdirectory: ./store}}", Path("store"), ()),
    ],
    ids=["inmemory-shorthand", "s3", "filesystem-shorthand", "relative-root"],
)
def test_storage(load, yaml, root, ignored):
    settings = load(yaml)
    assert (settings.storage.root, settings.ignored_keys) == (root, ignored)


def test_metadata_dir_default_follows_storage_root(load):
    settings = load("storage: {filesystem: {rootdirectory: /nas/registry}}")
    assert settings.metadata_dir == Path("/nas/registry/metadata")
    settings = load(
        "storage: {filesystem: {rootdirectory: /nas/registry}}\n"
        "mirror: {metadata_dir: /var/lib/mirror}"
    )
    assert settings.metadata_dir == Path("/var/lib/mirror")


# --- our section, read in full ----------------------------------------------------------------


def test_mirror_section(load):
    mirror = load("""
        mirror:
          tag_ttl: 30s
          tag_max_stale: 2d
          negative_ttl: 500ms
          upstream:
            connect_timeout: 3
            read_timeout: 1m30s
            max_connections: 10
            max_keepalive: 10
            retries: 0
            max_concurrency: 4
            max_bandwidth: 1.5MiB
          cache: {max_size: 500GB, high_watermark: 0.9, low_watermark: 0.5}
          auth: {mode: forward, token_proxy: yes}
          admin: {token: s3cret}
          trusted_proxies: [10.1.2.3/8, "::1"]
          notify: {forward_to: ["https://hooks.example.com/a"]}
          prefetch: {rules: ["library/*"], keep_fresh: 3, interval: 1h}
          client_idle_timeout: 2m
          manifest_max_size: 8MiB
    """).mirror
    assert (mirror.tag_ttl, mirror.tag_max_stale, mirror.negative_ttl) == (30, 172800, 0.5)
    assert (mirror.upstream.connect_timeout, mirror.upstream.read_timeout) == (3, 90)
    assert mirror.upstream.pool_timeout == 30  # untouched keys keep their defaults
    assert (mirror.upstream.max_keepalive, mirror.upstream.retries) == (10, 0)
    assert mirror.upstream.max_bandwidth == 1536 * 1024
    assert (mirror.cache.max_size, mirror.cache.high_watermark, mirror.cache.low_watermark) == (
        500 * 10**9,
        0.9,
        0.5,
    )
    assert (mirror.auth.mode, mirror.auth.token_proxy, mirror.admin.token) == (
        "forward",
        True,
        "s3cret",
    )
    assert mirror.trusted_proxies == ("10.0.0.0/8", "::1/128")
    assert mirror.notify.forward_to == ("https://hooks.example.com/a",)
    assert (mirror.prefetch.rules, mirror.prefetch.keep_fresh, mirror.prefetch.interval) == (
        ("library/*",),
        3,
        3600,
    )
    assert (mirror.client_idle_timeout, mirror.manifest_max_size) == (120, 8 * 1024**2)


def test_proxy_section(load):
    proxy = load(
        "proxy: {remoteurl: 'https://hub.example.com:5443/', username: u, password: 0123,"
        " ttl: 168h}"
    ).proxy
    assert (proxy.remoteurl, proxy.username, proxy.password, proxy.ttl) == (
        "https://hub.example.com:5443",
        "u",
        "0123",
        168 * 3600,
    )


def test_secrets_are_redacted_in_repr(load):
    settings = load("""
        proxy: {remoteurl: https://x.example.com, username: u, password: hunter2}
        mirror: {admin: {token: t0ken}}
        notifications:
          endpoints:
            - {name: n, url: "http://n.example.com", headers: {Authorization: [Bearer abc123]}}
    """)
    text = repr(settings)
    assert "hunter2" not in text and "t0ken" not in text and "abc123" not in text
    assert "password='***'" in text and "token='***'" in text
    assert settings.proxy.password == "hunter2"
    assert settings.notifications[0].headers == {"Authorization": ("Bearer abc123",)}


def test_auth_htpasswd(load):
    auth = load("auth: {htpasswd: {realm: basic, path: /etc/htpasswd}}").auth
    assert auth.token is None
    assert (auth.htpasswd.realm, auth.htpasswd.path) == ("basic", Path("/etc/htpasswd"))


def test_auth_token_optional_fields(load):
    token = load("""
        auth:
          token:
            realm: https://auth.example.com/token
            service: reg
            issuer: iss
            jwks: /etc/jwks.json
            signingalgorithms: [RS256, ES256]
            autoredirect: true
    """).auth.token
    assert (token.rootcertbundle, token.jwks) == (None, Path("/etc/jwks.json"))
    assert (token.signingalgorithms, token.autoredirect) == (("RS256", "ES256"), True)


def test_notification_endpoint_details(load):
    endpoints = load("""
        notifications:
          endpoints:
            - name: a
              url: https://a.example.com/events
              headers: {X-Token: one, X-Multi: [x, y]}
              timeout: 0
              ignoredmediatypes: [application/octet-stream]
              ignore:
                mediatypes: [application/vnd.oci.image.config.v1+json]
                actions: [pull]
            - {name: b, disabled: true}
    """).notifications
    first, second = endpoints
    assert first.headers == {"X-Token": ("one",), "X-Multi": ("x", "y")}
    assert (first.timeout, first.threshold, first.backoff) == (
        1.0,
        10,
        1.0,
    )  # distribution's defaults
    assert first.ignoredmediatypes == (
        "application/octet-stream",
        "application/vnd.oci.image.config.v1+json",
    )
    assert first.ignore_actions == ("pull",)
    assert (second.disabled, second.url) == (True, "")


@pytest.mark.parametrize(
    ("addr", "bind"),
    [
        (":5000", ("0.0.0.0", 5000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:0", ("localhost", 0)),
        ("[::]:5000", ("::", 5000)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_bind(addr, bind):
    assert HttpSettings(addr=addr).bind == bind


def test_tls(load):
    tls = load("http: {tls: {certificate: /c.pem, key: /k.pem}}").http.tls
    assert (tls.certificate, tls.key) == (Path("/c.pem"), Path("/k.pem"))


@pytest.mark.parametrize("version", ["0.1", "'0.1'", '"0.1"'])
def test_version_numeric_or_quoted(load, version):
    assert load(f"version: {version}").version == "0.1"


# --- every bad value is one line naming its key ------------------------------------------------

BAD_VALUES = [
    ("version: 0.2", "version"),
    ("version: 0.10", "version"),
    ("log: {level: loud}", "log.level"),
    ("loglevel: loud", "loglevel"),
    ("log: {formatter: xml}", "log.formatter"),
    ("log: [a]", "log"),
    ("http: 5000", "http"),
    ("http: {addr: '5000'}", "http.addr"),
    ("http: {addr: ':70000'}", "http.addr"),
    ("http: {addr: ':http'}", "http.addr"),
    ("http: {addr: '::1:5000'}", "http.addr"),
    ("http: {net: unix, addr: /run/registry.sock}", "http.net"),
    ("http: {host: hub.example.com}", "http.host"),
    ("http: {debug: {addr: 'localhost'}}", "http.debug.addr"),
    ("http: {tls: {certificate: /c.pem}}", "http.tls.key"),
    ("http: {tls: {key: /k.pem}}", "http.tls.certificate"),
    ("http: {tls: [a]}", "http.tls"),
    ("storage: {filesystem: {rootdirectory: [a]}}", "storage.filesystem.rootdirectory"),
    ("storage: {filesystem: {}, s3: {}}", "storage"),
    ("storage: {filesystem: 5}", "storage.filesystem"),
    ("proxy: {remoteurl: registry-1.docker.io}", "proxy.remoteurl"),
    ("proxy: {remoteurl: 'ftp://x.example.com'}", "proxy.remoteurl"),
    ("proxy: {remoteurl: 'https://x.example.com:99999'}", "proxy.remoteurl"),
    ("proxy: {username: u}", "proxy.password"),
    ("proxy: {password: p}", "proxy.username"),
    ("proxy: {ttl: forever}", "proxy.ttl"),
    ("auth: {token: {realm: r, service: s, issuer: i}, htpasswd: {realm: r, path: p}}", "auth"),
    ("auth: {ldap: {}}", "auth.ldap"),
    ("auth: {token: {service: s, issuer: i, rootcertbundle: /r}}", "auth.token.realm"),
    ("auth: {token: {realm: r, service: s, issuer: i}}", "auth.token.rootcertbundle"),
    (
        "auth: {token: {realm: r, service: s, issuer: i, jwks: /j, signingalgorithms: [none]}}",
        "auth.token.signingalgorithms[0]",
    ),
    ("auth: {htpasswd: {realm: r}}", "auth.htpasswd.path"),
    ("notifications: {endpoints: {name: a}}", "notifications.endpoints"),
    ("notifications: {endpoints: [{name: a}]}", "notifications.endpoints[0].url"),
    (
        "notifications: {endpoints: [{name: a, url: 'http://a', timeout: soon}]}",
        "notifications.endpoints[0].timeout",
    ),
    (
        "notifications: {endpoints: [{name: a, url: 'http://a', threshold: many}]}",
        "notifications.endpoints[0].threshold",
    ),
    (
        "notifications: {endpoints: [{name: a, url: 'http://a', headers: [x]}]}",
        "notifications.endpoints[0].headers",
    ),
    ("notifications: {endpoints: [a]}", "notifications.endpoints[0]"),
    ("mirror: [a]", "mirror"),
    ("mirror: {tag_ttl: abc}", "mirror.tag_ttl"),
    ("mirror: {tag_ttl: -5s}", "mirror.tag_ttl"),
    ("mirror: {negative_ttl: [1]}", "mirror.negative_ttl"),
    ("mirror: {tag_tll: 5s}", "mirror.tag_tll"),
    ("mirror: {upstream: {read_timout: 5s}}", "mirror.upstream.read_timout"),
    ("mirror: {upstream: {connect_timeout: 0}}", "mirror.upstream.connect_timeout"),
    ("mirror: {upstream: {max_connections: 0}}", "mirror.upstream.max_connections"),
    ("mirror: {upstream: {max_connections: 4, max_keepalive: 8}}", "mirror.upstream.max_keepalive"),
    ("mirror: {upstream: {retries: -1}}", "mirror.upstream.retries"),
    ("mirror: {upstream: {retries: true}}", "mirror.upstream.retries"),
    ("mirror: {upstream: {max_bandwidth: fast}}", "mirror.upstream.max_bandwidth"),
    ("mirror: {cache: {max_size: lots}}", "mirror.cache.max_size"),
    ("mirror: {cache: {max_size: 120%}}", "mirror.cache.max_size"),
    ("mirror: {cache: {max_size: 0}}", "mirror.cache.max_size"),
    ("mirror: {cache: {high_watermark: 1.5}}", "mirror.cache.high_watermark"),
    ("mirror: {cache: {low_watermark: 0}}", "mirror.cache.low_watermark"),
    ("mirror: {cache: {low_watermark: 0.9, high_watermark: 0.8}}", "mirror.cache.low_watermark"),
    ("mirror: {auth: {mode: remote}}", "mirror.auth.mode"),
    ("mirror: {auth: {token_proxy: maybe}}", "mirror.auth.token_proxy"),
    ("mirror: {auth: {offline_grace: soon}}", "mirror.auth.offline_grace"),
    ("mirror: {auth: {offline_grace: -1h}}", "mirror.auth.offline_grace"),
    ("mirror: {auth: {offline_key: [a]}}", "mirror.auth.offline_key"),
    ("mirror: {admin: {token: [a]}}", "mirror.admin.token"),
    ("mirror: {passthrough_writes: 1}", "mirror.passthrough_writes"),
    ("mirror: {trusted_proxies: [10.0.0.0/33]}", "mirror.trusted_proxies[0]"),
    ("mirror: {trusted_proxies: [ok, '']}", "mirror.trusted_proxies[1]"),
    ("mirror: {trusted_proxies: {a: b}}", "mirror.trusted_proxies"),
    ("mirror: {notify: {forward_to: [not-a-url]}}", "mirror.notify.forward_to[0]"),
    ("mirror: {prefetch: {keep_fresh: -1}}", "mirror.prefetch.keep_fresh"),
    ("mirror: {prefetch: {interval: 0s}}", "mirror.prefetch.interval"),
    ("mirror: {prefetch: {rules: [[a]]}}", "mirror.prefetch.rules[0]"),
    ("mirror: {client_idle_timeout: 0}", "mirror.client_idle_timeout"),
    ("mirror: {manifest_max_size: 1.5}", "mirror.manifest_max_size"),
]


def assert_one_line_naming(err: ConfigError, key: str) -> None:
    text = str(err)
    assert "\n" not in text
    assert err.key == key
    assert text.startswith(f"config: {key}: ")


@pytest.mark.parametrize(("yaml", "key"), BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_bad_value_names_key(load, yaml, key):
    with pytest.raises(ConfigError) as info:
        load(yaml)
    assert_one_line_naming(info.value, key)


@pytest.mark.parametrize(
    ("name", "value", "key"),
    [
        ("REGISTRY_HTTP_ADDR", "nope", "http.addr"),
        ("REGISTRY_MIRROR_TAG_TTL", "abc", "mirror.tag_ttl"),
        ("REGISTRY_MIRROR_CACHE_MAX_SIZE", "[1, 2", "mirror.cache.max_size"),
        ("REGISTRY_MIRROR_UPSTREAM", "oops", "mirror.upstream"),
    ],
    ids=["addr", "duration", "bad-flow-yaml", "scalar-for-section"],
)
def test_bad_env_value_names_key(name, value, key):
    with pytest.raises(ConfigError) as info:
        load_settings(None, {name: value})
    assert_one_line_naming(info.value, key)


def test_duration_message():
    with pytest.raises(ConfigError) as info:
        load_settings(None, {"REGISTRY_MIRROR_TAG_TTL": "abc"})
    assert (
        str(info.value) == "config: mirror.tag_ttl: invalid duration 'abc' (examples: 30s, 5m, 1h)"
    )


def test_unknown_mirror_key_lists_valid_ones(load):
    with pytest.raises(ConfigError, match="expected one of: .*tag_ttl"):
        load("mirror: {tag_tll: 5s}")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 0.1\nhttp:\n  addr: :5000\n   host: x\n", "invalid YAML at line"),
        ("version: [0.1\n", "invalid YAML at line"),
        ("- a\n- b\n", "expected a mapping at the top level, got a list"),
        ("just a string\n", "expected a mapping at the top level, got a string"),
    ],
    ids=["bad-indent", "unclosed", "list", "scalar"],
)
def test_bad_file_is_one_line(write_config, text, message):
    path = write_config(text)
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert_one_line_naming(info.value, str(path))
    assert message in str(info.value)


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_file(tmp_path, kind):
    path = tmp_path / "nope.yml" if kind == "missing" else tmp_path
    with pytest.raises(ConfigError) as info:
        load_settings(path, {})
    assert_one_line_naming(info.value, str(path))


def test_error_message_is_forced_to_one_line():
    assert str(ConfigError("a\nb", "x\ny")) == "config: a b: x y"


# --- durations and sizes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("300ms", 0.3),
        ("5s", 5),
        ("10m", 600),
        ("1h30m", 5400),
        ("1.5h", 5400),
        ("2h45m30.5s", 9930.5),
        ("7d", 604800),
        ("100us", 1e-4),
        ("100µs", 1e-4),
        ("1ns", 1e-9),
        ("0", 0),
        ("0s", 0),
        ("5", 5),
        ("2.5", 2.5),
        (" 5s ", 5),
        (7, 7),
        (0.25, 0.25),
    ],
    ids=str,
)
def test_parse_duration(value, seconds):
    assert parse_duration(value, "k") == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value",
    [
        "abc",
        "",
        "5 s",
        "-5s",
        "-1",
        "5S",
        "1e3",
        "h",
        "5x",
        "1h 30m",
        "inf",
        "nan",
        True,
        None,
        [],
        float("inf"),
        -1,
    ],
    ids=repr,
)
def test_parse_duration_rejects(value):
    with pytest.raises(ConfigError) as info:
        parse_duration(value, "a.b")
    assert_one_line_naming(info.value, "a.b")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        (0, 0),
        (4096, 4096),
        ("4096", 4096),
        ("4096B", 4096),
        ("1KB", 1000),
        ("1kB", 1000),
        ("1KiB", 1024),
        ("1K", 1024),
        ("500MB", 500 * 10**6),
        ("500 MiB", 500 * 2**20),
        ("200GiB", 200 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("2TB", 2 * 10**12),
        ("1TiB", 2**40),
        ("1PiB", 2**50),
        ("1g", 2**30),
    ],
    ids=str,
)
def test_parse_size(value, size):
    assert parse_size(value, "k") == size


@pytest.mark.parametrize(
    "value",
    [
        "lots",
        "",
        "-1",
        -1,
        "1.5",
        "1.5B",
        "10XB",
        "80%",
        "1e9",
        True,
        None,
        1.5,
        [1],
    ],
    ids=repr,
)
def test_parse_size_rejects(value):
    with pytest.raises(ConfigError) as info:
        parse_size(value, "a.b")
    assert_one_line_naming(info.value, "a.b")
