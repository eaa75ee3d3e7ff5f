"""Send a request line exactly as written (clients normalise `..` and `//` away)."""

from __future__ import annotations

import asyncio
import json
from typing import Any


async def raw_request(host: str, port: int, method: str, target: str,
                      headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with a verbatim target; returns (status, headers, body)."""
    reader, writer = await asyncio.open_connection(host, port)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape"))
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    return int(status_line.split()[1]), parsed, body


def error_code_of(body: bytes) -> Any:
    """The first spec error code of a JSON error body."""
    return json.loads(body)["errors"][0]["code"]
