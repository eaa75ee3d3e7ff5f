"""Admin API: the store tools (verify, gc, purge, du, stats, quarantine).

    POST /admin/verify  [?workers=4]                      -> {"checked", "ok", "corrupt", "missing",
                                                              "bytes", "quarantined": [digest, ...],
                                                              "quarantined_bytes"}
    POST /admin/gc      {"target": 1073741824 | "1GiB"}    -> {"evicted", "bytes", "used"}
                        (no target: down to the low watermark)
    POST /admin/purge   {"reference": "REPO[:TAG|@DIGEST]"} -> {"tags", "links", "objects", "bytes"}
    GET  /admin/du                                         -> {"objects", "bytes", "pinned_objects",
                                                              "pinned_bytes", "quarantined_objects",
                                                              "repositories": [{"repository", "objects",
                                                              "bytes", "tags"}, ...]}
    GET  /admin/stats                                      -> {"store", "quota", "disk", "cache",
                                                              "evictions", "link", "inflight"}
                        (cache, evictions and link are totals kept across restarts)
    GET    /admin/quarantine                               -> {"objects": [{"name", "digest", "size",
                                                              "quarantined_at"}], "count", "bytes"}
    DELETE /admin/quarantine                               -> {"removed", "bytes"}

Purge takes content down, pinned or not: `REPO:TAG` forgets the tag and
removes the manifest it points at with what it references (an index's
children, config, layers); `REPO@DIGEST` does the same from a digest (and
forgets the repository's tags pointing at it); `REPO` forgets all of the
repository's tags, its tag list and its links. Whatever the form, an object
is deleted only when no other repository links it (it stays, unlinked from
REPO, for the others); it is refetched on demand if a client asks again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from collections.abc import Callable
from typing import Any

from aiohttp import web

from mirror import errors
from mirror.config import ConfigError, parse_size
from mirror.node import Node
from mirror.observe.lifetime import LIFETIME
from mirror.registry import manifest as manifests
from mirror.registry.digest import Digest
from mirror.registry.reference import RepositoryName, parse_reference
from mirror.storage import quarantine
from mirror.storage.verify import DEFAULT_WORKERS, verify_online
from mirror.web.keys import NODE

SERVED_LOCALLY = ("hit", "revalidated", "stale")  # cache outcomes answered from the store
MAX_WORKERS = 64


async def _json(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise errors.RegistryError("body must be JSON", status=400) from exc
    if not isinstance(body, dict):
        raise errors.RegistryError("body must be a JSON object", status=400)
    return body


async def _io(node: Node, fn: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(node.executor, fn, *args)


# -- verify -----------------------------------------------------------------------


async def verify(request: web.Request) -> web.Response:
    """Re-hash every object in threads; quarantine and forget mismatches."""
    node = request.app[NODE]
    try:
        workers = int(request.query.get("workers", DEFAULT_WORKERS))
    except ValueError as exc:
        raise errors.RegistryError("workers must be a number", status=400) from exc
    workers = max(1, min(workers, MAX_WORKERS))
    async with node.quota.verifying:
        report = await verify_online(node.store, node.metadata, workers)
    await node.quota.resync()
    return web.json_response(report.as_dict())


# -- gc ------------------------------------------------------------------------------


async def gc(request: web.Request) -> web.Response:
    """Evict least-recently-used objects now, down to a target size."""
    node = request.app[NODE]
    body = await _json(request)
    target = body.get("target")
    if target is not None:
        try:
            target = parse_size(target, "target")
        except ConfigError as exc:
            raise errors.RegistryError(str(exc), status=400) from exc
    return web.json_response(await node.quota.gc(target))


# -- purge ---------------------------------------------------------------------------


def parse_purge_reference(value: str) -> tuple[str, str | None, Digest | None]:
    """`REPO`, `REPO:TAG` or `REPO@DIGEST` -> (repo, tag, digest).

    Raises:
        RegistryError: a malformed name, tag or digest (400).
    """
    if "@" in value:
        name, _, rest = value.partition("@")
        return RepositoryName.parse(name).value, None, Digest.parse(rest)
    slash = value.rfind("/")
    colon = value.rfind(":")
    if colon > slash:
        name, tag = value[:colon], value[colon + 1:]
        parse_reference(tag)  # validates the tag grammar
        return RepositoryName.parse(name).value, tag, None
    return RepositoryName.parse(value).value, None, None


async def purge(node: Node, repo: str, tag: str | None = None, digest: Digest | None = None) -> dict[str, int]:
    """Take content down from the node (see the module docstring); returns counts."""
    metadata = node.metadata
    counts = {"tags": 0, "links": 0, "objects": 0, "bytes": 0}
    if tag is None and digest is None:
        def repository(db: sqlite3.Connection) -> tuple[list[str], list[str]]:
            tags = [row[0] for row in db.execute("SELECT tag FROM tags WHERE repo=?", (repo,))]
            linked = [row[0] for row in db.execute("SELECT digest FROM links WHERE repo=?", (repo,))]
            db.execute("DELETE FROM tag_lists WHERE repo=?", (repo,))
            return tags, linked

        tags, linked = await metadata.transact(repository)
        if not tags and not linked:
            raise errors.NameUnknown(f"nothing cached for {repo}")
        for each in tags:
            await metadata.delete_tag(repo, each)
        counts["tags"] = len(tags)
        targets = [Digest.parse(d) for d in linked]
    else:
        if tag is not None:
            record = await metadata.get_tag(repo, tag)
            if record is None:
                raise errors.ManifestUnknown(f"{repo}:{tag} is not cached")
            digest = record.digest
        assert digest is not None
        root = digest
        tagged = await metadata.transact(lambda db: [row[0] for row in db.execute(
            "SELECT tag FROM tags WHERE repo=? AND digest=?", (repo, str(root)))])
        if tag is not None and tag not in tagged:
            tagged.append(tag)
        for each in tagged:
            await metadata.delete_tag(repo, each)
        counts["tags"] = len(tagged)
        if not tagged and not await metadata.is_linked(repo, root):
            raise errors.ManifestUnknown(f"{repo}@{root} is not cached")
        targets = await _closure(node, root)
    for target in targets:
        counts["links"] += int(await metadata.is_linked(repo, target))
        await metadata.unlink(repo, target)
        if await metadata.transact(_link_count(str(target))):
            continue  # another repository still links it
        stored = await metadata.get_object(target)
        removed = await _io(node, node.store.delete, target)
        await metadata.forget_object(target)
        if stored is not None or removed:
            counts["objects"] += 1
            counts["bytes"] += removed
            node.quota.adjust(-(stored.size if stored is not None else removed))
    return counts


def _link_count(key: str) -> Callable[[sqlite3.Connection], int]:
    def query(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT count(*) FROM links WHERE digest=?", (key,)).fetchone()[0])

    return query


async def _closure(node: Node, root: Digest) -> list[Digest]:
    """A manifest and everything it references that is stored (children, config, layers)."""
    found: dict[Digest, None] = {root: None}
    queue = [root]
    while queue:
        digest = queue.pop()
        record = await node.metadata.get_object(digest)
        if record is None or record.media_type is None:
            continue
        raw = await _io(node, node.store.read, digest, record.size)
        if raw is None:
            continue
        try:
            parsed = manifests.parse(raw, record.media_type)
        except errors.RegistryError:
            continue
        for child in parsed.children:
            if child.digest not in found:
                found[child.digest] = None
                queue.append(child.digest)
        for blob in parsed.blobs():
            found.setdefault(blob.digest, None)
    return list(found)


async def purge_handler(request: web.Request) -> web.Response:
    body = await _json(request)
    reference = body.get("reference")
    if not isinstance(reference, str) or not reference:
        raise errors.RegistryError('"reference" must be "REPO", "REPO:TAG" or "REPO@DIGEST"', status=400)
    repo, tag, digest = parse_purge_reference(reference)
    repo = request.app[NODE].upstream.resolve(repo) or repo  # `ghcr.io/org/app`: that registry's key
    return web.json_response(await purge(request.app[NODE], repo, tag, digest))


# -- du and stats ----------------------------------------------------------------------


async def usage(node: Node) -> dict[str, Any]:
    """Totals and per-repository usage, from the metadata."""
    def read(db: sqlite3.Connection) -> dict[str, Any]:
        objects, size = db.execute("SELECT count(*), coalesce(sum(size), 0) FROM objects").fetchone()
        pinned, pinned_size = db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM objects WHERE pinned > 0").fetchone()
        tags = dict(db.execute("SELECT repo, count(*) FROM tags GROUP BY repo").fetchall())
        repositories = [
            {"repository": repo, "objects": count, "bytes": total, "tags": tags.get(repo, 0)}
            for repo, count, total in db.execute(
                "SELECT l.repo, count(*), coalesce(sum(o.size), 0) FROM links l "
                "JOIN objects o ON o.digest = l.digest GROUP BY l.repo ORDER BY 3 DESC, 1")]
        return {"objects": objects, "bytes": size, "pinned_objects": pinned, "pinned_bytes": pinned_size,
                "repositories": repositories}

    result = await node.metadata.transact(read)
    result["quarantined_objects"] = await _io(node, _count_files, node.store.root / "quarantine")
    return result


def _count_files(directory: os.PathLike[str]) -> int:
    try:
        return sum(1 for entry in os.scandir(directory) if entry.is_file())
    except FileNotFoundError:
        return 0


async def du(request: web.Request) -> web.Response:
    return web.json_response(await usage(request.app[NODE]))


def cache_outcomes(totals: dict[str, float]) -> dict[str, dict[str, int]]:
    """Request outcomes by kind (manifest, blob) from the lifetime counters (`cache:<kind>:<outcome>`)."""
    outcomes: dict[str, dict[str, int]] = {}
    for name, value in totals.items():
        section, _, rest = name.partition(":")
        if section == "cache":
            kind, _, outcome = rest.partition(":")
            outcomes.setdefault(kind, {})[outcome] = int(value)
    return outcomes


def hit_ratio(outcomes: dict[str, int]) -> float | None:
    total = sum(outcomes.values())
    return None if not total else sum(outcomes.get(o, 0) for o in SERVED_LOCALLY) / total


async def stats(request: web.Request) -> web.Response:
    node = request.app[NODE]
    quota = node.quota
    store = await usage(node)
    store.pop("repositories")
    total, free = await _io(node, quota.disk)
    lifetime = await request.app[LIFETIME].totals()  # kept across restarts
    by_kind = cache_outcomes(lifetime)
    overall: dict[str, int] = {}
    for kind in by_kind.values():
        for outcome, count in kind.items():
            overall[outcome] = overall.get(outcome, 0) + count
    cache = {"outcomes": overall, "hit_ratio": hit_ratio(overall),
             "by_kind": {k: {"outcomes": v, "hit_ratio": hit_ratio(v)} for k, v in sorted(by_kind.items())}}
    body = {
        "store": store,
        "quota": {"max_size": quota.limit, "high_watermark": quota.high, "low_watermark": quota.low,
                  "used": quota.used, "reserved": quota.reserved},
        "disk": {"total": total, "free": free, "reserve_bytes": quota.reserve_size},
        "cache": cache,
        "evictions": {"objects": int(lifetime.get("evictions:objects", 0)),
                      "bytes": int(lifetime.get("evictions:bytes", 0))},
        "link": {"saved": int(lifetime.get("bytes_saved", 0)), "fetched": int(lifetime.get("upstream_bytes", 0))},
        "inflight": len(node.fetcher.inflight),
    }
    return web.json_response(body)


# -- quarantine ------------------------------------------------------------------------


async def quarantine_list(request: web.Request) -> web.Response:
    node = request.app[NODE]
    return web.json_response(await _io(node, quarantine.report, node.store.root))


async def quarantine_empty(request: web.Request) -> web.Response:
    node = request.app[NODE]
    files, size = await _io(node, quarantine.empty_quarantine, node.store.root)
    return web.json_response({"removed": files, "bytes": size})


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/verify", verify)
    router.add_post("/admin/gc", gc)
    router.add_post("/admin/purge", purge_handler)
    router.add_get("/admin/du", du)
    router.add_get("/admin/stats", stats)
    router.add_get("/admin/quarantine", quarantine_list)
    router.add_delete("/admin/quarantine", quarantine_empty)
