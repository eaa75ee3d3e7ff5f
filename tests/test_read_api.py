"""The v2 read API through the node, against the real distribution upstream."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.support import images
from tests.support.images import DOCKER_MANIFEST_LIST, DOCKER_SCHEMA2, OCI_INDEX, OCI_MANIFEST
from tests.support.rawhttp import error_code_of, raw_request

ALL_TYPES = ", ".join([DOCKER_SCHEMA2, DOCKER_MANIFEST_LIST, OCI_MANIFEST, OCI_INDEX])
API_VERSION = "registry/2.0"


def repo_name(prefix: str = "team") -> str:
    return f"{prefix}/app-{uuid.uuid4().hex[:8]}"


def error_code(response: httpx.Response) -> str:
    body = response.json()
    assert set(body["errors"][0]) <= {"code", "message", "detail"}
    return str(body["errors"][0]["code"])


async def test_base_answers_with_api_version(mirror) -> None:
    async with mirror.client() as client:
        response = await client.get("/v2/")
    assert response.status_code == 200
    assert response.headers["Docker-Distribution-API-Version"] == API_VERSION


@pytest.mark.parametrize("media_type", [DOCKER_SCHEMA2, OCI_MANIFEST])
async def test_image_manifest_by_tag_and_digest(mirror, upstream, upstream_client, media_type) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", media_type=media_type)
    async with mirror.client(headers={"Accept": ALL_TYPES}) as client:
        by_tag = await client.get(f"/v2/{image.repo}/manifests/v1")
        by_digest = await client.get(f"/v2/{image.repo}/manifests/{image.digest}")
        head = await client.head(f"/v2/{image.repo}/manifests/v1")
    for response in (by_tag, by_digest):
        assert response.status_code == 200
        assert response.content == image.manifest
        assert response.headers["Content-Type"] == media_type
        assert response.headers["Docker-Content-Digest"] == image.digest
        assert response.headers["ETag"] == f'"{image.digest}"'
        assert int(response.headers["Content-Length"]) == len(image.manifest)
        assert response.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert by_tag.headers["Vary"] == "Accept"
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == len(image.manifest)
    assert head.headers["Docker-Content-Digest"] == image.digest


async def test_etag_revalidation_answers_not_modified(mirror, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with mirror.client(headers={"Accept": ALL_TYPES}) as client:
        response = await client.get(f"/v2/{image.repo}/manifests/v1",
                                    headers={"If-None-Match": f'"{image.digest}"'})
    assert response.status_code == 304
    assert response.headers["Docker-Content-Digest"] == image.digest


async def test_oci_manifest_needs_oci_accept(mirror, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", media_type=OCI_MANIFEST)
    async with mirror.client() as client:
        refused = await client.get(f"/v2/{image.repo}/manifests/v1", headers={"Accept": DOCKER_SCHEMA2})
        head = await client.head(f"/v2/{image.repo}/manifests/v1", headers={"Accept": DOCKER_SCHEMA2})
        served = await client.get(f"/v2/{image.repo}/manifests/v1", headers={"Accept": OCI_MANIFEST})
    assert refused.status_code == 404 and error_code(refused) == "MANIFEST_UNKNOWN"
    assert head.status_code == 404
    assert served.status_code == 200 and served.headers["Docker-Content-Digest"] == image.digest


async def test_oci_index_needs_oci_accept(mirror, upstream, upstream_client) -> None:
    index = await images.push_index(upstream_client, upstream.url, repo_name(), "latest", media_type=OCI_INDEX)
    async with mirror.client() as client:
        refused = await client.get(f"/v2/{index.repo}/manifests/latest", headers={"Accept": DOCKER_SCHEMA2})
        served = await client.get(f"/v2/{index.repo}/manifests/latest", headers={"Accept": OCI_INDEX})
    assert refused.status_code == 404 and error_code(refused) == "MANIFEST_UNKNOWN"
    assert served.status_code == 200 and served.content == index.manifest


async def test_manifest_list_for_schema2_only_client_is_its_amd64_image(mirror, upstream, upstream_client) -> None:
    index = await images.push_index(upstream_client, upstream.url, repo_name(), "latest",
                                    media_type=DOCKER_MANIFEST_LIST)
    amd64 = index.image_for("linux", "amd64")
    async with mirror.client() as client:
        old_client = await client.get(f"/v2/{index.repo}/manifests/latest", headers={"Accept": DOCKER_SCHEMA2})
        new_client = await client.get(f"/v2/{index.repo}/manifests/latest", headers={"Accept": ALL_TYPES})
        by_digest = await client.get(f"/v2/{index.repo}/manifests/{index.digest}",
                                     headers={"Accept": DOCKER_SCHEMA2})
    assert old_client.status_code == 200
    assert old_client.headers["Docker-Content-Digest"] == amd64.digest
    assert old_client.content == amd64.manifest
    assert new_client.headers["Docker-Content-Digest"] == index.digest
    assert by_digest.headers["Docker-Content-Digest"] == index.digest  # by digest: never rewritten


async def test_different_accept_lists_never_see_two_digests_for_one_tag(mirror, relay, upstream,
                                                                        upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with mirror.client() as client:
        digests = {
            (await client.get(f"/v2/{image.repo}/manifests/v1", headers={"Accept": accept}))
            .headers["Docker-Content-Digest"]
            for accept in (DOCKER_SCHEMA2, ALL_TYPES, f"{DOCKER_SCHEMA2}, {OCI_MANIFEST}", "*/*")
        }
    assert digests == {image.digest}
    assert relay.count("GET", "/manifests/") == 1
    assert all("/manifests/" not in r.path_qs or r.method == "GET" for r in relay.records)


async def test_blob_get_head_and_ranges(mirror, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1", layers=[300_000])
    digest, data = image.layers[0]
    url = f"/v2/{image.repo}/blobs/{digest}"
    async with mirror.client() as client:
        head_cold = await client.head(url)
        whole = await client.get(url)
        head_warm = await client.head(url)
        ranges = {spec: await client.get(url, headers={"Range": spec})
                  for spec in ("bytes=0-9", "bytes=100-", "bytes=-7", "bytes=299990-400000")}
        unsatisfiable = await client.get(url, headers={"Range": f"bytes={len(data)}-"})
        reversed_range = await client.get(url, headers={"Range": "bytes=9-0"})
    assert head_cold.status_code == 200 and int(head_cold.headers["Content-Length"]) == len(data)
    assert whole.status_code == 200 and whole.content == data
    assert whole.headers["Docker-Content-Digest"] == digest
    assert head_warm.status_code == 200 and head_warm.content == b""
    assert int(head_warm.headers["Content-Length"]) == len(data)
    assert ranges["bytes=0-9"].status_code == 206 and ranges["bytes=0-9"].content == data[:10]
    assert ranges["bytes=0-9"].headers["Content-Range"] == f"bytes 0-9/{len(data)}"
    assert ranges["bytes=100-"].content == data[100:]
    assert ranges["bytes=-7"].content == data[-7:]
    assert ranges["bytes=299990-400000"].content == data[299990:]
    for response in (unsatisfiable, reversed_range):
        assert response.status_code == 416 and error_code(response) == "RANGE_INVALID"
        assert response.headers["Content-Range"] == f"bytes */{len(data)}"


async def test_tags_list_paginates_with_link(mirror, upstream, upstream_client) -> None:
    repo = repo_name()
    tags = ["a", "b", "c", "d", "e"]
    for tag in tags:
        await images.push_image(upstream_client, upstream.url, repo, tag, seed=f"{repo}{tag}")
    async with mirror.client() as client:
        whole = await client.get(f"/v2/{repo}/tags/list")
        first = await client.get(f"/v2/{repo}/tags/list?n=2")
        second = await client.get(f"/v2/{repo}/tags/list?n=2&last=b")
        last = await client.get(f"/v2/{repo}/tags/list?n=2&last=d")
        huge = await client.get(f"/v2/{repo}/tags/list?n=1000000000000")
    assert whole.json() == {"name": repo, "tags": tags}
    assert first.json()["tags"] == ["a", "b"]
    assert first.headers["Link"] == f'</v2/{repo}/tags/list?last=b&n=2>; rel="next"'
    assert second.json()["tags"] == ["c", "d"]
    assert last.json()["tags"] == ["e"] and "Link" not in last.headers
    assert huge.json()["tags"] == tags


@pytest.mark.parametrize("n", ["-1", "abc", "1_000", "\u0661\u0662", "1e3", "0x10"])
async def test_tags_list_rejects_bad_page_numbers(mirror, upstream, upstream_client, n) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    async with mirror.client() as client:
        response = await client.get(f"/v2/{image.repo}/tags/list", params={"n": n})
    assert response.status_code == 400 and error_code(response) == "PAGINATION_NUMBER_INVALID"


async def test_catalog_lists_what_the_node_holds(mirror, upstream, upstream_client) -> None:
    held = await images.push_image(upstream_client, upstream.url, repo_name("held"), "v1")
    not_held = await images.push_image(upstream_client, upstream.url, repo_name("other"), "v1")
    async with mirror.client(headers={"Accept": ALL_TYPES}) as client:
        await client.get(f"/v2/{held.repo}/manifests/v1")
        catalog = await client.get("/v2/_catalog")
        paged = await client.get("/v2/_catalog?n=1000000000")
    assert held.repo in catalog.json()["repositories"]
    assert not_held.repo not in catalog.json()["repositories"]
    assert paged.status_code == 200


@pytest.mark.parametrize("method", ["PUT", "POST", "PATCH", "DELETE"])
@pytest.mark.parametrize("path", ["/v2/team/app/manifests/v1", "/v2/team/app/blobs/uploads/",
                                  "/v2/team/app/blobs/uploads/abc",
                                  f"/v2/team/app/blobs/sha256:{'a' * 64}"])
async def test_writes_are_unsupported(mirror, relay, method, path) -> None:
    async with mirror.client() as client:
        response = await client.request(method, path)
    assert response.status_code == 405 and error_code(response) == "UNSUPPORTED"
    assert response.headers["Docker-Distribution-API-Version"] == API_VERSION
    assert relay.count() == 0


@pytest.mark.parametrize(("path", "code", "status"), [
    ("/v2/Team/app/manifests/v1", "NAME_INVALID", 400),
    ("/v2/team/../etc/manifests/v1", "NAME_INVALID", 400),
    ("/v2/team/%2e%2e/etc/manifests/v1", "NAME_INVALID", 400),
    ("/v2/team/a%00b/manifests/v1", "NAME_INVALID", 400),
    ("/v2/team//app/manifests/v1", "NAME_INVALID", 400),
    ("/v2/t%C3%A9am/app/manifests/v1", "NAME_INVALID", 400),
    ("/v2/" + "a" * 256 + "/manifests/v1", "NAME_INVALID", 400),
    ("/v2/team/app/manifests/" + "t" * 129, "TAG_INVALID", 400),
    ("/v2/team/app/manifests/latest%0A", "TAG_INVALID", 400),
    ("/v2/team/app/manifests/sha256:" + "a" * 63, "DIGEST_INVALID", 400),
    ("/v2/team/app/blobs/sha256:" + "A" * 64, "DIGEST_INVALID", 400),
    ("/v2/team/app/blobs/md5:" + "a" * 32, "DIGEST_INVALID", 400),
    ("/v2/team/app/blobs/sha256:..%2F..%2Fetc", "DIGEST_INVALID", 400),
    ("/v2/team/app/blobs/not-a-digest", "DIGEST_INVALID", 400),
])
async def test_bad_names_tags_and_digests(mirror, relay, path, code, status) -> None:
    got, _headers, body = await raw_request("127.0.0.1", mirror.port, "GET", path)
    assert (got, error_code_of(body)) == (status, code), body
    assert relay.count() == 0


async def test_unknown_content_maps_to_spec_codes(mirror, upstream, upstream_client) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    missing = "sha256:" + "0" * 64
    async with mirror.client(headers={"Accept": ALL_TYPES}) as client:
        tag = await client.get(f"/v2/{image.repo}/manifests/nope")
        manifest = await client.get(f"/v2/{image.repo}/manifests/{missing}")
        blob = await client.get(f"/v2/{image.repo}/blobs/{missing}")
        blob_head = await client.head(f"/v2/{image.repo}/blobs/{missing}")
        repo = await client.get("/v2/no/such-repo/tags/list")
    assert tag.status_code == 404 and error_code(tag) == "MANIFEST_UNKNOWN"
    assert manifest.status_code == 404 and error_code(manifest) == "MANIFEST_UNKNOWN"
    assert blob.status_code == 404 and error_code(blob) == "BLOB_UNKNOWN"
    assert blob_head.status_code == 404
    assert repo.status_code == 404 and error_code(repo) == "NAME_UNKNOWN"


async def test_repositories_named_like_routes_route_correctly(mirror, upstream, upstream_client) -> None:
    for name in ("x/blobs", "x/manifests", "x/tags"):
        image = await images.push_image(upstream_client, upstream.url, name, "v1", seed=name)
        async with mirror.client(headers={"Accept": ALL_TYPES}) as client:
            manifest = await client.get(f"/v2/{name}/manifests/v1")
            blob = await client.get(f"/v2/{name}/blobs/{image.config_digest}")
            tags = await client.get(f"/v2/{name}/tags/list")
        assert manifest.headers["Docker-Content-Digest"] == image.digest
        assert blob.content == image.config
        assert tags.json() == {"name": name, "tags": ["v1"]}


async def test_blob_is_only_served_through_a_repository_that_holds_it(mirror, relay, upstream,
                                                                      upstream_client) -> None:
    private = await images.push_image(upstream_client, upstream.url, repo_name("private"), "v1")
    public = await images.push_image(upstream_client, upstream.url, repo_name("public"), "v1")
    digest, data = private.layers[0]
    async with mirror.client() as client:
        assert (await client.get(f"/v2/{private.repo}/blobs/{digest}")).content == data
        guessed = await client.get(f"/v2/{public.repo}/blobs/{digest}")
    assert guessed.status_code == 404 and error_code(guessed) == "BLOB_UNKNOWN"


@pytest.mark.parametrize(("ns", "served"), [(None, True), ("UPSTREAM", True), ("quay.io", False),
                                            ("docker.io", False)])
async def test_containerd_ns_parameter(mirror, relay, upstream, upstream_client, ns, served) -> None:
    image = await images.push_image(upstream_client, upstream.url, repo_name(), "v1")
    params = {} if ns is None else {"ns": relay.host if ns == "UPSTREAM" else ns}
    async with mirror.client(headers={"Accept": ALL_TYPES}) as client:
        response = await client.get(f"/v2/{image.repo}/manifests/v1", params=params)
    if served:
        assert response.status_code == 200
    else:
        assert response.status_code == 404 and error_code(response) == "NAME_UNKNOWN"
        assert relay.count() == 0


async def test_error_bodies_are_spec_json(mirror) -> None:
    async with mirror.client() as client:
        response = await client.get("/v2/team/app/blobs/sha256:xyz")
    assert response.headers["Content-Type"].startswith("application/json")
    body = json.loads(response.content)
    assert body["errors"][0]["code"] == "DIGEST_INVALID"
