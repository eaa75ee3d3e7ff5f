"""Synthetic, deterministic container images pushed through the registry HTTP API.

Everything is pure Python over ``httpx.AsyncClient``. Images are real: layers are
gzip'ed tars, configs carry correct ``rootfs.diff_ids``, manifests reference exact
sizes/digests, so distribution 2.8, skopeo and dockerd accept and pull them.

Manifest bytes are kept exactly as pushed (``Image.manifest``), so tests can compare
digests byte for byte.

Typical use::

    async with httpx.AsyncClient() as c:
        img = await push_image(c, reg.url, "lib/app", "v1", layers=[1024, 4 << 20])
        idx = await push_index(c, reg.url, "lib/multi", "latest")
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "DOCKER_CONFIG",
    "DOCKER_LAYER",
    "DOCKER_MANIFEST_LIST",
    "DOCKER_SCHEMA2",
    "MANIFEST_ACCEPT",
    "OCI_CONFIG",
    "OCI_INDEX",
    "OCI_LAYER",
    "OCI_MANIFEST",
    "Image",
    "Index",
    "RegistryAPIError",
    "blob_exists",
    "build_image",
    "build_index",
    "delete_manifest",
    "diff_id_of",
    "make_config",
    "make_layer",
    "make_layer_with_diff_id",
    "push_blob",
    "push_blob_chunked",
    "push_image",
    "push_index",
    "push_manifest",
    "sha256_digest",
    "upload_image",
    "upload_index",
]

DOCKER_SCHEMA2 = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

#: Accept header value covering all four manifest types.
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_SCHEMA2])

_CONFIG_FOR = {DOCKER_SCHEMA2: DOCKER_CONFIG, OCI_MANIFEST: OCI_CONFIG}
_LAYER_FOR = {DOCKER_SCHEMA2: DOCKER_LAYER, OCI_MANIFEST: OCI_LAYER}
_CHILD_FOR = {OCI_INDEX: OCI_MANIFEST, DOCKER_MANIFEST_LIST: DOCKER_SCHEMA2}
_CREATED = "2024-01-01T00:00:00Z"

#: ``auth`` accepted by the push helpers: anything httpx takes per request
#: (``httpx.Auth``, ``(user, password)``, or ``callable(request) -> request``).
AuthLike = httpx.Auth | tuple[str, str] | Callable[[httpx.Request], httpx.Request] | None


class RegistryAPIError(AssertionError):
    def __init__(self, what: str, response: httpx.Response) -> None:
        try:
            body = response.content[:500]
        except httpx.ResponseNotRead:
            body = b"<streamed>"
        super().__init__(
            f"{what}: {response.request.method} {response.request.url} -> "
            f"{response.status_code} {body!r}"
        )
        self.response = response


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- layers

_DIFF_IDS: dict[str, str] = {}  # compressed digest -> diff_id, filled by make_layer


def _tar_one_file(name: str, content: bytes) -> bytes:
    """A minimal, deterministic tar with one regular file (no big copies)."""
    ti = tarfile.TarInfo(name)
    ti.size = len(content)
    ti.mode = 0o644
    ti.mtime = 1704067200  # 2024-01-01
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    header = ti.tobuf(format=tarfile.USTAR_FORMAT)
    pad = (-len(content)) % 512
    return b"".join([header, content, b"\0" * pad, b"\0" * 1024])


def make_layer_with_diff_id(
    seed: int | str, size: int, *, compresslevel: int | None = None
) -> tuple[bytes, str]:
    """Like :func:`make_layer` and also return the layer's diff_id (sha256 of the tar)."""
    content = random.Random(seed).randbytes(size) if size > 0 else b""
    name = f"data/{hashlib.sha256(str(seed).encode()).hexdigest()[:16]}.bin"
    tar = _tar_one_file(name, content)
    diff_id = sha256_digest(tar)
    if compresslevel is None:
        # random content is incompressible; level 0 (stored deflate blocks) is still a
        # valid gzip stream and ~10x faster for big layers.
        compresslevel = 1 if size <= (1 << 20) else 0
    gz = gzip.compress(tar, compresslevel=compresslevel, mtime=0)
    _DIFF_IDS[sha256_digest(gz)] = diff_id
    return gz, diff_id


def make_layer(seed: int | str, size: int, *, compresslevel: int | None = None) -> bytes:
    """A gzip'ed tar holding one file of ``size`` pseudo-random bytes (deterministic).

    64 MiB takes ~0.3 s.
    """
    return make_layer_with_diff_id(seed, size, compresslevel=compresslevel)[0]


def diff_id_of(layer: bytes) -> str:
    """sha256 of the uncompressed tar of a gzip'ed layer."""
    d = sha256_digest(layer)
    cached = _DIFF_IDS.get(d)
    if cached is not None:
        return cached
    diff_id = sha256_digest(gzip.decompress(layer))
    _DIFF_IDS[d] = diff_id
    return diff_id


def make_config(
    arch: str = "amd64",
    os_: str = "linux",
    *,
    diff_ids: Sequence[str] = (),
    variant: str | None = None,
    labels: Mapping[str, str] | None = None,
    env: Sequence[str] = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
    cmd: Sequence[str] = ("/bin/sh",),
    created: str = _CREATED,
) -> bytes:
    """An image config JSON whose ``rootfs.diff_ids`` list the layers' diff_ids."""
    cfg: dict[str, Any] = {
        "architecture": arch,
        "os": os_,
    }
    if variant:
        cfg["variant"] = variant
    cfg.update(
        {
            "created": created,
            "config": {
                "Env": list(env),
                "Cmd": list(cmd),
                "Labels": dict(labels or {}),
            },
            "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
            "history": [
                {"created": created, "created_by": f"synthetic layer {i}"}
                for i in range(len(diff_ids))
            ],
        }
    )
    return json.dumps(cfg, indent=2).encode()


# --------------------------------------------------------------------------- model


@dataclass
class Image:
    repo: str
    tag: str | None
    manifest: bytes
    digest: str
    media_type: str
    config: bytes
    config_digest: str
    layers: list[tuple[str, bytes]]
    os: str = "linux"
    arch: str = "amd64"
    variant: str | None = None

    @property
    def blobs(self) -> dict[str, bytes]:
        """All blobs (config + layers) by digest."""
        out = {self.config_digest: self.config}
        out.update(dict(self.layers))
        return out

    @property
    def layer_digests(self) -> list[str]:
        return [d for d, _ in self.layers]

    @property
    def size(self) -> int:
        """Total bytes of config + layers."""
        return len(self.config) + sum(len(b) for _, b in self.layers)

    @property
    def platform(self) -> dict[str, str]:
        p = {"architecture": self.arch, "os": self.os}
        if self.variant:
            p["variant"] = self.variant
        return p

    def ref(self, by_digest: bool = False) -> str:
        return self.digest if by_digest or not self.tag else self.tag

    def descriptor(self) -> dict[str, Any]:
        return {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": len(self.manifest),
            "platform": self.platform,
        }


@dataclass
class Index:
    repo: str
    tag: str | None
    manifest: bytes
    digest: str
    media_type: str
    images: list[Image] = field(default_factory=list)

    @property
    def blobs(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for im in self.images:
            out.update(im.blobs)
        return out

    def image_for(self, os_: str = "linux", arch: str = "amd64") -> Image:
        for im in self.images:
            if im.os == os_ and im.arch == arch:
                return im
        raise KeyError((os_, arch))


def _manifest_bytes(obj: Mapping[str, Any]) -> bytes:
    # indent=3 mirrors what docker/distribution emit and keeps us honest about never
    # re-serialising manifests (compare bytes, not JSON).
    return json.dumps(obj, indent=3).encode()


def _default_variant(arch: str) -> str | None:
    return {"arm64": "v8", "arm": "v7"}.get(arch)


def build_image(
    repo: str,
    tag: str | None,
    *,
    layers: Sequence[int | bytes] = (1024, 2048),
    media_type: str = DOCKER_SCHEMA2,
    arch: str = "amd64",
    os_: str = "linux",
    variant: str | None = None,
    seed: int | str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Image:
    """Build (without pushing) an image. ``layers``: sizes (ints: generated layers,
    seeded from ``seed`` or repo/tag/platform) or ready gzip'ed tar bytes."""
    if media_type not in _CONFIG_FOR:
        raise ValueError(f"not an image manifest media type: {media_type}")
    if variant is None:
        variant = _default_variant(arch)
    base_seed = seed if seed is not None else f"{repo}:{tag}:{os_}/{arch}"
    layer_list: list[tuple[str, bytes]] = []
    diff_ids: list[str] = []
    for i, spec in enumerate(layers):
        if isinstance(spec, (bytes, bytearray, memoryview)):
            gz = bytes(spec)
            did = diff_id_of(gz)
        else:
            gz, did = make_layer_with_diff_id(f"{base_seed}#{i}", int(spec))
        layer_list.append((sha256_digest(gz), gz))
        diff_ids.append(did)
    config = make_config(arch, os_, diff_ids=diff_ids, variant=variant, labels=labels)
    config_digest = sha256_digest(config)
    manifest_obj = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": {
            "mediaType": _CONFIG_FOR[media_type],
            "size": len(config),
            "digest": config_digest,
        },
        "layers": [
            {"mediaType": _LAYER_FOR[media_type], "size": len(gz), "digest": d}
            for d, gz in layer_list
        ],
    }
    manifest = _manifest_bytes(manifest_obj)
    return Image(
        repo=repo,
        tag=tag,
        manifest=manifest,
        digest=sha256_digest(manifest),
        media_type=media_type,
        config=config,
        config_digest=config_digest,
        layers=layer_list,
        os=os_,
        arch=arch,
        variant=variant,
    )


def build_index(
    repo: str,
    tag: str | None,
    *,
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    media_type: str = OCI_INDEX,
    layers_per_image: int = 2,
    layer_size: int = 1024,
    child_media_type: str | None = None,
    images: Sequence[Image] | None = None,
    seed: int | str | None = None,
) -> Index:
    """Build (without pushing) an index/manifest list and its child images.

    Children are OCI manifests for ``OCI_INDEX`` and schema2 for
    ``DOCKER_MANIFEST_LIST`` unless ``child_media_type`` says otherwise; pass
    ``images`` to use prebuilt children instead.
    """
    if media_type not in _CHILD_FOR:
        raise ValueError(f"not an index media type: {media_type}")
    child_mt = child_media_type or _CHILD_FOR[media_type]
    if images is None:
        base_seed = seed if seed is not None else f"{repo}:{tag}"
        images = [
            build_image(
                repo,
                None,
                layers=[layer_size + i for i in range(layers_per_image)],
                media_type=child_mt,
                arch=arch,
                os_=os_,
                seed=f"{base_seed}:{os_}/{arch}",
            )
            for os_, arch in platforms
        ]
    obj = {
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": [im.descriptor() for im in images],
    }
    manifest = _manifest_bytes(obj)
    return Index(
        repo=repo,
        tag=tag,
        manifest=manifest,
        digest=sha256_digest(manifest),
        media_type=media_type,
        images=list(images),
    )


# --------------------------------------------------------------------------- HTTP API


def _kw(headers: Mapping[str, str] | None, auth: AuthLike) -> dict[str, Any]:
    kw: dict[str, Any] = {}
    if headers:
        kw["headers"] = dict(headers)
    if auth is not None:
        kw["auth"] = auth
    return kw


def _base(base_url: str) -> str:
    return base_url.rstrip("/")


async def _start_upload(
    client: httpx.AsyncClient, base_url: str, repo: str, kw: dict[str, Any]
) -> httpx.URL:
    r = await client.post(f"{_base(base_url)}/v2/{repo}/blobs/uploads/", **kw)
    if r.status_code != 202:
        raise RegistryAPIError("start upload", r)
    return r.url.join(r.headers["Location"])


async def blob_exists(
    client: httpx.AsyncClient,
    base_url: str,
    repo: str,
    digest: str,
    *,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> bool:
    r = await client.head(f"{_base(base_url)}/v2/{repo}/blobs/{digest}", **_kw(headers, auth))
    return r.status_code == 200


async def push_blob(
    client: httpx.AsyncClient,
    base_url: str,
    repo: str,
    data: bytes,
    *,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
    skip_existing: bool = False,
) -> str:
    """Monolithic upload: POST uploads/, then PUT <Location>?digest=. Returns digest."""
    digest = sha256_digest(data)
    kw = _kw(headers, auth)
    if skip_existing and await blob_exists(
        client, base_url, repo, digest, headers=headers, auth=auth
    ):
        return digest
    loc = await _start_upload(client, base_url, repo, kw)
    put_kw = dict(kw)
    put_kw["headers"] = {**kw.get("headers", {}), "Content-Type": "application/octet-stream"}
    r = await client.put(loc.copy_merge_params({"digest": digest}), content=data, **put_kw)
    if r.status_code != 201:
        raise RegistryAPIError("put blob", r)
    got = r.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise AssertionError(f"registry computed {got}, expected {digest}")
    return digest


async def push_blob_chunked(
    client: httpx.AsyncClient,
    base_url: str,
    repo: str,
    data: bytes,
    *,
    chunk_size: int = 1 << 20,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> str:
    """Chunked upload: POST, PATCH chunks with Content-Range, PUT ?digest=."""
    digest = sha256_digest(data)
    kw = _kw(headers, auth)
    loc = await _start_upload(client, base_url, repo, kw)
    base_headers = kw.get("headers", {})
    for start in range(0, len(data), chunk_size):
        chunk = data[start : start + chunk_size]
        patch_kw = dict(kw)
        patch_kw["headers"] = {
            **base_headers,
            "Content-Type": "application/octet-stream",
            "Content-Range": f"{start}-{start + len(chunk) - 1}",
        }
        r = await client.patch(loc, content=chunk, **patch_kw)
        if r.status_code != 202:
            raise RegistryAPIError("patch blob chunk", r)
        loc = r.url.join(r.headers["Location"])
    r = await client.put(loc.copy_merge_params({"digest": digest}), content=b"", **kw)
    if r.status_code != 201:
        raise RegistryAPIError("finish chunked upload", r)
    return digest


async def push_manifest(
    client: httpx.AsyncClient,
    base_url: str,
    repo: str,
    reference: str,
    body: bytes,
    media_type: str,
    *,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> str:
    """PUT the exact ``body`` bytes as a manifest. Returns its digest."""
    kw = _kw(headers, auth)
    kw["headers"] = {**kw.get("headers", {}), "Content-Type": media_type}
    r = await client.put(f"{_base(base_url)}/v2/{repo}/manifests/{reference}", content=body, **kw)
    if r.status_code != 201:
        raise RegistryAPIError("put manifest", r)
    digest = sha256_digest(body)
    got = r.headers.get("Docker-Content-Digest")
    if got and got != digest:
        raise AssertionError(f"registry says manifest digest {got}, expected {digest}")
    return digest


async def delete_manifest(
    client: httpx.AsyncClient,
    base_url: str,
    repo: str,
    digest: str,
    *,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> None:
    r = await client.delete(f"{_base(base_url)}/v2/{repo}/manifests/{digest}", **_kw(headers, auth))
    if r.status_code != 202:
        raise RegistryAPIError("delete manifest", r)


async def upload_image(
    client: httpx.AsyncClient,
    base_url: str,
    image: Image,
    *,
    repo: str | None = None,
    tag: str | None = None,
    by_digest: bool = False,
    chunked: bool = False,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> Image:
    """Push a built image's blobs then its manifest (by tag, or by digest)."""
    repo = repo or image.repo
    for _, blob in [(image.config_digest, image.config), *image.layers]:
        if chunked:
            await push_blob_chunked(client, base_url, repo, blob, headers=headers, auth=auth)
        else:
            await push_blob(client, base_url, repo, blob, headers=headers, auth=auth)
    tag = tag if tag is not None else image.tag
    ref = image.digest if (by_digest or not tag) else tag
    await push_manifest(
        client, base_url, repo, ref, image.manifest, image.media_type, headers=headers, auth=auth
    )
    return image


async def upload_index(
    client: httpx.AsyncClient,
    base_url: str,
    index: Index,
    *,
    repo: str | None = None,
    tag: str | None = None,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> Index:
    """Push each child by digest, then the index by tag (or by digest if no tag)."""
    repo = repo or index.repo
    for im in index.images:
        await upload_image(
            client, base_url, im, repo=repo, by_digest=True, headers=headers, auth=auth
        )
    tag = tag if tag is not None else index.tag
    await push_manifest(
        client,
        base_url,
        repo,
        tag or index.digest,
        index.manifest,
        index.media_type,
        headers=headers,
        auth=auth,
    )
    return index


async def push_image(
    client: httpx.AsyncClient,
    base_url: str,
    repo: str,
    tag: str | None,
    *,
    layers: Sequence[int | bytes] = (1024, 2048),
    media_type: str = DOCKER_SCHEMA2,
    arch: str = "amd64",
    os_: str = "linux",
    variant: str | None = None,
    seed: int | str | None = None,
    labels: Mapping[str, str] | None = None,
    chunked: bool = False,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> Image:
    """Build and push an image; ``tag=None`` pushes the manifest by digest only."""
    image = build_image(
        repo,
        tag,
        layers=layers,
        media_type=media_type,
        arch=arch,
        os_=os_,
        variant=variant,
        seed=seed,
        labels=labels,
    )
    return await upload_image(client, base_url, image, chunked=chunked, headers=headers, auth=auth)


async def push_index(
    client: httpx.AsyncClient,
    base_url: str,
    repo: str,
    tag: str | None,
    *,
    platforms: Sequence[tuple[str, str]] = (("linux", "amd64"), ("linux", "arm64")),
    media_type: str = OCI_INDEX,
    layers_per_image: int = 2,
    layer_size: int = 1024,
    child_media_type: str | None = None,
    seed: int | str | None = None,
    headers: Mapping[str, str] | None = None,
    auth: AuthLike = None,
) -> Index:
    """Build and push a multi-platform index (children by digest, index by tag)."""
    index = build_index(
        repo,
        tag,
        platforms=platforms,
        media_type=media_type,
        layers_per_image=layers_per_image,
        layer_size=layer_size,
        child_media_type=child_media_type,
        seed=seed,
    )
    return await upload_index(client, base_url, index, headers=headers, auth=auth)
