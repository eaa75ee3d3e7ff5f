"""Admin API: prewarm jobs, pins and the most pulled tags.

    POST   /admin/prewarm   {"images": ["repo:tag", "repo@digest"], "platform": "linux/amd64"|"all",
                             "pin": false}                       -> 202 {"id": ..., job}
    GET    /admin/jobs                                            -> {"jobs": [job, ...]}
    GET    /admin/jobs/{id}                                       -> job
    DELETE /admin/jobs/{id}                                       -> job (cancelled)
    POST   /admin/unpin     {"images": [...]}                     -> {"unpinned": [digest no pin holds now],
                                                                     "pins": [{"pin", "released", "kept"}],
                                                                     "unknown": [image, ...]}
    GET    /admin/pins                                            -> {"pins": [{"pin", "registry",
                                                                     "repository", "reference", "digest",
                                                                     "created", "objects", "bytes",
                                                                     "exclusive_bytes"}, ...]}
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
from mirror.registry.reference import parse_image
from mirror.web.keys import NODE

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
    """Remove the pins of images; objects another pinned image holds stay pinned."""
    node = request.app[NODE]
    removed: list[dict[str, Any]] = []
    missing = []
    for text in _images(await _json(request)):
        ref = parse_image(text, node.namespaces, node.upstream)
        found = await node.ops.unpin(ref.repo, ref.reference)
        if not found:
            missing.append(text)
        removed.extend(found)
    released = list(dict.fromkeys(d for entry in removed for d in entry["released"]))
    return web.json_response({"unpinned": released, "pins": removed, "unknown": missing})


async def list_pins(request: web.Request) -> web.Response:
    return web.json_response({"pins": await request.app[NODE].ops.pins.list()})


async def top(request: web.Request) -> web.Response:
    raw = request.query.get("n", "20")
    if not raw.isdigit():
        raise errors.RegistryError("n must be a number", status=400)
    node = request.app[NODE]
    entries = node.ops.popularity.top(min(int(raw), MAX_TOP))
    for entry in entries:  # counted per repository key: name the registry and its repository there
        entry["registry"], entry["repository"] = node.upstream.display(entry["repository"])
    return web.json_response({"top": entries})


def routes(router: web.UrlDispatcher) -> None:
    router.add_post("/admin/prewarm", prewarm)
    router.add_get("/admin/jobs", list_jobs)
    router.add_get("/admin/jobs/{id}", get_job)
    router.add_delete("/admin/jobs/{id}", cancel_job)
    router.add_post("/admin/unpin", unpin)
    router.add_get("/admin/pins", list_pins)
    router.add_get("/admin/top", top)
