"""The v2 route table: keywords parsed from the right, unknown shapes are 404."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirror.errors import RegistryError
from mirror.registry.routes import READ_METHODS, Route, match

D = "sha256:" + "ab" * 32

ROUTES = [
    # (id, path, route name, params)
    ("base-slash", "/v2/", "base", {}),
    ("base-no-slash", "/v2", "base", {}),
    ("catalog", "/v2/_catalog", "catalog", {}),
    ("tags", "/v2/library/alpine/tags/list", "tags", {"name": "library/alpine"}),
    ("manifest-tag", "/v2/library/alpine/manifests/latest", "manifest",
     {"name": "library/alpine", "reference": "latest"}),
    ("manifest-digest", f"/v2/alpine/manifests/{D}", "manifest", {"name": "alpine", "reference": D}),
    ("blob", f"/v2/library/alpine/blobs/{D}", "blob", {"name": "library/alpine", "digest": D}),
    ("repo-named-blobs-manifest", "/v2/x/blobs/manifests/latest", "manifest",
     {"name": "x/blobs", "reference": "latest"}),
    ("repo-named-manifests-blob", f"/v2/x/manifests/blobs/{D}", "blob", {"name": "x/manifests", "digest": D}),
    ("repo-named-tags-tags", "/v2/x/tags/tags/list", "tags", {"name": "x/tags"}),
    ("repo-named-manifests-tags", "/v2/x/manifests/tags/list", "tags", {"name": "x/manifests"}),
    ("repo-named-blobs-tags", "/v2/x/blobs/tags/list", "tags", {"name": "x/blobs"}),
    ("repo-named-tags-manifest", "/v2/x/tags/manifests/latest", "manifest",
     {"name": "x/tags", "reference": "latest"}),
    ("repo-named-tags-list-manifest", "/v2/x/tags/list/manifests/latest", "manifest",
     {"name": "x/tags/list", "reference": "latest"}),
    ("repo-named-manifests-manifest", "/v2/manifests/manifests/manifests", "manifest",
     {"name": "manifests", "reference": "manifests"}),
    ("repo-named-blobs-blob", f"/v2/blobs/blobs/{D}", "blob", {"name": "blobs", "digest": D}),
    ("repo-named-blobs-uploads-blob", f"/v2/x/blobs/uploads/blobs/{D}", "blob",
     {"name": "x/blobs/uploads", "digest": D}),
    ("repo-named-blobs-uploads-manifest", "/v2/x/blobs/uploads/manifests/latest", "manifest",
     {"name": "x/blobs/uploads", "reference": "latest"}),
    ("repo-named-catalog-tags", "/v2/_catalog/tags/list", "tags", {"name": "_catalog"}),
    ("upload-start", "/v2/library/alpine/blobs/uploads/", "upload", {"name": "library/alpine", "upload": ""}),
    ("upload-session", "/v2/library/alpine/blobs/uploads/abc-123", "upload",
     {"name": "library/alpine", "upload": "abc-123"}),
    ("upload-repo-named-blobs", "/v2/x/blobs/blobs/uploads/u1", "upload", {"name": "x/blobs", "upload": "u1"}),
    # The raw (percent-encoded) path is routed; each parameter is decoded afterwards.
    ("encoded-colon-in-digest", "/v2/alpine/blobs/sha256%3A" + "ab" * 32, "blob", {"name": "alpine", "digest": D}),
    ("encoded-slash-stays-in-digest", "/v2/alpine/blobs/sha256%3A..%2F..%2Fetc", "blob",
     {"name": "alpine", "digest": "sha256:../../etc"}),
    ("encoded-slash-stays-in-reference", "/v2/alpine/manifests/a%2Fb", "manifest",
     {"name": "alpine", "reference": "a/b"}),
    ("encoded-newline-in-reference", "/v2/alpine/manifests/latest%0A", "manifest",
     {"name": "alpine", "reference": "latest\n"}),
    # ... except an encoded slash in a name, which stays the text %2F (NAME_INVALID later).
    ("encoded-slash-in-name", "/v2/library%2Falpine/manifests/latest", "manifest",
     {"name": "library%2Falpine", "reference": "latest"}),
    ("encoded-slash-in-name-lowercase", "/v2/library%2falpine/tags/list", "tags", {"name": "library%2falpine"}),
    ("encoded-keyword-is-not-a-keyword", "/v2/x%2Fmanifests%2Fy/blobs/" + D, "blob",
     {"name": "x%2Fmanifests%2Fy", "digest": D}),
    ("invalid-utf8-replaced", "/v2/a%FF/tags/list", "tags", {"name": "a\ufffd"}),
    # Names are not validated here; the handler validates them with the name grammar.
    ("unvalidated-name", "/v2/UPPER/../x/manifests/latest", "manifest",
     {"name": "UPPER/../x", "reference": "latest"}),
]


@pytest.mark.parametrize(("path", "name", "params"), [r[1:] for r in ROUTES], ids=[r[0] for r in ROUTES])
def test_routes(path: str, name: str, params: dict[str, str]) -> None:
    route = match(path)
    assert route == Route(name, params)


NOT_ROUTES = [
    ("root", "/"),
    ("empty", ""),
    ("v1", "/v1/"),
    ("v2-prefix-only", "/v2x"),
    ("v3", "/v3/library/alpine/manifests/latest"),
    ("no-leading-slash", "v2/library/alpine/manifests/latest"),
    ("repo-only", "/v2/library/alpine"),
    ("manifests-no-reference", "/v2/library/alpine/manifests/"),
    ("manifests-no-name", "/v2/manifests/latest"),
    ("manifests-empty-name", "/v2//manifests/latest"),
    ("blobs-no-digest", "/v2/library/alpine/blobs/"),
    ("blobs-no-name", f"/v2/blobs/{D}"),
    ("tags-without-list", "/v2/library/alpine/tags"),
    ("tags-list-trailing-slash", "/v2/library/alpine/tags/list/"),
    ("tags-other", "/v2/library/alpine/tags/all"),
    ("tags-no-name", "/v2/tags/list"),
    ("manifest-reference-with-slash", "/v2/library/alpine/manifests/a/b/c"),
    ("manifest-trailing-slash", "/v2/library/alpine/manifests/latest/"),
    ("blob-trailing-slash", f"/v2/library/alpine/blobs/{D}/"),
    ("catalog-trailing-slash", "/v2/_catalog/"),
    ("referrers", f"/v2/library/alpine/referrers/{D}"),
    ("upload-nested", "/v2/library/alpine/blobs/uploads/a/b"),
    ("double-slash-base", "/v2//"),
]


@pytest.mark.parametrize("path", [r[1] for r in NOT_ROUTES], ids=[r[0] for r in NOT_ROUTES])
def test_unknown_shapes_are_404(path: str) -> None:
    with pytest.raises(RegistryError) as info:
        match(path)
    assert info.value.status == 404
    assert info.value.code == "NAME_UNKNOWN"


def test_read_methods_cover_every_route() -> None:
    assert set(READ_METHODS) == {"base", "catalog", "tags", "manifest", "blob", "upload"}
    assert READ_METHODS["upload"] == set()
    for name in ("base", "catalog", "tags", "manifest", "blob"):
        assert READ_METHODS[name] == {"GET", "HEAD"}


_component = st.sampled_from(["a", "x", "blobs", "manifests", "tags", "list", "uploads", "lib-ary", "_catalog"])
_names = st.lists(_component, min_size=1, max_size=5).map("/".join)


@given(_names, st.sampled_from(["latest", D, "manifests", "blobs", "tags"]))
def test_manifest_name_is_everything_before_last_keyword(name: str, reference: str) -> None:
    route = match(f"/v2/{name}/manifests/{reference}")
    assert route == Route("manifest", {"name": name, "reference": reference})


@given(_names)
def test_blob_name_is_everything_before_last_keyword(name: str) -> None:
    route = match(f"/v2/{name}/blobs/{D}")
    assert route == Route("blob", {"name": name, "digest": D})


@given(_names)
def test_tags_name_is_everything_before_last_keyword(name: str) -> None:
    route = match(f"/v2/{name}/tags/list")
    assert route == Route("tags", {"name": name})


@given(st.text(max_size=80))
def test_match_only_raises_registry_errors(path: str) -> None:
    try:
        match("/v2/" + path)
    except RegistryError as exc:
        assert exc.status == 404
