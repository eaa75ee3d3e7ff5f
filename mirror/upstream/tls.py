"""Which certificate authorities the node trusts for its own outbound TLS.

Every outbound client is built with `trust_env=False` (no proxy variables or
netrc sneaking in), which would also ignore `SSL_CERT_FILE`. A zone node in
front of a central registry with a private CA (the source document's
self-signed set-up), or an edge node in front of a zone node, needs that
CA: so `SSL_CERT_FILE` / `SSL_CERT_DIR` are honoured here, explicitly.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping


def verify_setting(environ: Mapping[str, str] | None = None) -> ssl.SSLContext | bool:
    """An SSL context from `SSL_CERT_FILE`/`SSL_CERT_DIR`, else httpx's default (certifi)."""
    env = os.environ if environ is None else environ
    cafile, capath = env.get("SSL_CERT_FILE") or None, env.get("SSL_CERT_DIR") or None
    if cafile is None and capath is None:
        return True
    return ssl.create_default_context(cafile=cafile, capath=capath)
