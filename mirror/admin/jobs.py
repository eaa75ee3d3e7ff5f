"""Admin API: prewarm jobs, pins and the most pulled tags.

    POST   /admin/prewarm   {"images": ["repo:tag", "repo@digest"], "platform": "linux/amd64"|"all",
                             "pin": false}                       -> 202 {"id": ..., job}
    GET    /admin/jobs                                            -> {"jobs": [job, ...]}
    GET    /admin/jobs/{id}                                       -> job
    DELETE /admin/jobs/{id}                                       -> job (cancelled)
    POST   /admin/unpin     {"images": [...]}                     -> {"unpinned": [digest, ...]}
    GET    /admin/top?n=20                                        -> {"top": [{repository, tag, pulls,
                                                                     last_pull}, ...]}

A job is `{"id", "state" (queued|running|done|failed|cancelled), "images",
"platform", "pin", "manifests", "blobs_total", "blobs_done", "blobs_cached",
"bytes_total", "bytes_done", "bytes_fetched", "errors": [{"image", "error",
"digest"?}], "resolved": [{"image", "digest", ...}], "created", "started",
"finished"}`; `failed` means it ended with errors (what could be fetched was).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from mirror import errors
from mirror.api.handlers import NODE
from mirror.ops.prewarm import parse_image
from mirror.registry import manifest as manifests
from mirror.registry.digest import Digest
from mirror.upstream.credential import Credential

MAX_IMAGES = 10_000
MAX_TOP = 1000


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except ValueError as exc:
        raise errors.RegistryError("body must be JSON", status=400) from exc
    if not isinstance(body, dict):
        raise errors.RegistryError("body must be a JSON object", status=400)
    return body


def _images(body: dict[str, Any]) -> list[str]:
    images = body.get("images")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) and i for i in images):
        raise errors.RegistryError('"images" must be a non-empty list of image references', status=400)
    if len(images) > MAX_IMAGES:
        raise errors.RegistryError(f"at most {MAX_IMAGES} images per request", status=400)
    return images


async def prewarm(request: web.Request) -> web.Response:
    body = await _json(request)
    platform = body.get("platform")
    if platform is not None and not isinstance(platform, str):
        raise errors.RegistryError('"platform" must be a string', status=400)
    job = request.app[NODE].ops.warmer.submit(_images(body), platform, bool(body.get("pin", False)))
    return web.json_response(job.to_json(), status=202, headers={"Location": f"/admin/jobs/{job.id}"})


async def list_jobs(request: web.Request) -> web.Response:
    return web.json_response({"jobs": [j.to_json() for j in request.app[NODE].ops.jobs.all()]})


def _job(request: web.Request) -> Any:
    job = request.app[NODE].ops.jobs.get(request.match_info["id"])
    if job is None:
        raise errors.RegistryError("no such job", status=404)
    return job


async def get_job(request: web.Request) -> web.Response:
    return web.json_response(_job(request).to_json())


async def cancel_job(request: web.Request) -> web.Response:
    job = _job(request)
    request.app[NODE].ops.warmer.cancel(job)
    if job.task is not None:
        await asyncio.gather(job.task, return_exceptions=True)  # the job's state says how it ended
    return web.json_response(job.to_json())


async def unpin(request: web.Request) -> web.Response:
    """Unpin images: their manifests (an index with its stored children) and blobs."""
    node = request.app[NODE]
    digests: list[Digest] = []
    missing = []
    for text in _images(await _json(request)):
        ref = parse_image(text, node.namespaces)
        digest = ref.digest
        if digest is None:
            record = await node.metadata.get_tag(ref.repo, str(ref.tag))
            digest = record.digest if record is not None else None
        if digest is None:
            missing.append(text)
            continue
        digests.extend(await _closure(node, ref.repo, digest))
    await node.ops.unpin(digests)
    return web.json_response({"unpinned": list(dict.fromkeys(map(str, digests))), "unknown": missing})


async def _closure(node: Any, repo: str, digest: Digest) -> list[Digest]:
    """A stored manifest, its stored children and their blobs."""
    found = [digest]
    record = await node.metadata.get_object(digest)
    if record is None or record.media_type is None:
        return found
    try:
        result = await node.manifests.by_digest(repo, digest, Credential.node())
        parsed = manifests.parse(result.raw, result.media_type)
    except errors.RegistryError:
        return found
    for child in parsed.children:
        if await node.metadata.get_object(child.digest) is not None:
            found.extend(await _closure(node, repo, child.digest))
    found.extend(d.digest for d in parsed.blobs())
    return found


async def top(request: web.Request) -> web.Response:
    raw = request.query.get("n", "20")
    if not raw.isdigit():
        raise errors.RegistryError("n must be a number", status=400)
    return web.json_response({"top": request.app[NODE].ops.popularity.top(min(int(raw), MAX_TOP))})


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/prewarm", prewarm)
    router.add_get("/admin/jobs", list_jobs)
    router.add_get("/admin/jobs/{id}", get_job)
    router.add_delete("/admin/jobs/{id}", cancel_job)
    router.add_post("/admin/unpin", unpin)
    router.add_get("/admin/top", top)
