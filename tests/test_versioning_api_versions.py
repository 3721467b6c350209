from __future__ import annotations

import pytest

from aimiddleware.errors import InvalidRequest, ModelRetired, UnsupportedApiVersion
from aimiddleware.versioning import ApiVersion, ApiVersions
from aimiddleware.versioning.api_versions import well_formed
from tests.versioning_app import FakeClock, at, make_versions


def h(**headers: str) -> list[tuple[bytes, bytes]]:
    return [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("2026-06-01", True),
        ("2024-09-30.acacia", True),
        ("2024-10-01-preview", True),
        ("v1", True),
        ("v2.1", True),
        ("2026-02-30", False),
        ("2026-6-1", False),
        ("latest", False),
        ("v", False),
        ("", False),
    ],
)
def test_well_formed(value: str, ok: bool) -> None:
    assert well_formed(value) is ok


def test_configuration_is_validated() -> None:
    with pytest.raises(ValueError, match="malformed"):
        ApiVersions(["June"])
    with pytest.raises(ValueError, match="default"):
        ApiVersions(["2026-06-01"], default="2026-01-01")
    with pytest.raises(ValueError, match="twice"):
        ApiVersions(["v1", "v1"], header=None, path_prefix=True)
    with pytest.raises(ValueError, match="pin"):
        ApiVersions(["v1"], pins={"tenant-a": "v9"})
    with pytest.raises(ValueError, match="replacement"):
        ApiVersions([ApiVersion.deprecated("v1", deprecated="2026-01-01", replacement="v3")])
    with pytest.raises(ValueError, match="Sunset"):
        ApiVersion.deprecated("v1", deprecated="2026-01-01", sunset="2025-01-01")
    with pytest.raises(ValueError, match="header"):
        ApiVersions(["v1"], header=None)


def test_one_version_given_as_a_str_or_a_bad_header_is_refused() -> None:
    # ApiVersions("2026-06-01") iterated the str: "API version '2' is malformed".
    with pytest.raises(TypeError, match=r"versions takes a list of versions, such as \['2026"):
        ApiVersions("2026-06-01")
    with pytest.raises(TypeError, match=r"such as \['v1'\]"):
        ApiVersions(ApiVersion("v1"))  # type: ignore[arg-type]
    # A header name with a space or a colon was taken, and never matched a request's header.
    for bad in ("api version", "api-version:", ""):
        with pytest.raises(ValueError, match=r"^header must be a header name"):
            ApiVersions(["v1"], header=bad)
    with pytest.raises(ValueError, match=r"^echo_header must be a header name"):
        ApiVersions(["v1"], echo_header="x version")
    # path_prefix="/v1" was taken for True; True with no v<n> version could never match.
    with pytest.raises(TypeError, match=r"^path_prefix is True"):
        ApiVersions(["v1"], path_prefix="/v1")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="path_prefix=True needs a path-style version"):
        ApiVersions(["2026-06-01"], path_prefix=True)
    ok = ApiVersions(("2026-06-01", "v1"), header="Api-Version", path_prefix=True)
    assert ok.header == ok.echo_header == "api-version" and ok.supported == ["2026-06-01", "v1"]


async def test_strip_prefix_must_be_a_bool() -> None:
    # strip_prefix took any value for its truth: "no" or "/v1" stripped the prefix, and
    # None (meant as "the default") kept it.
    for bad in ("no", "/v1", None, 0):
        with pytest.raises(TypeError, match=r"^strip_prefix is True \(the app sees /chat"):
            ApiVersions(["v1"], path_prefix=True, strip_prefix=bad)  # type: ignore[arg-type]
    for strip, seen in ((True, "/chat"), (False, None)):
        versions = ApiVersions(["v1"], path_prefix=True, strip_prefix=strip)
        resolved = await versions.resolve("/v1/chat", [], "tenant")
        assert (resolved.name, resolved.source, resolved.path) == ("v1", "path", seen)


async def test_header_then_pin_then_default() -> None:
    clock = FakeClock(at("2026-03-01"))
    versions = make_versions(clock, pins={"tenant-old": "2025-01-01"})
    by_header = await versions.resolve("/chat", h(x_api_version="2025-01-01"), "tenant-new")
    assert (by_header.name, by_header.source) == ("2025-01-01", "header")
    pinned = await versions.resolve("/chat", [], "tenant-old")
    assert (pinned.name, pinned.source) == ("2025-01-01", "pin")
    # an explicit header beats the caller's pin
    explicit = await versions.resolve("/chat", h(x_api_version="2026-06-01"), "tenant-old")
    assert (explicit.name, explicit.source) == ("2026-06-01", "header")
    default = await versions.resolve("/chat", [], "tenant-new")
    assert (default.name, default.source) == ("2026-06-01", "default")


async def test_callable_pins_sync_and_async() -> None:
    clock = FakeClock(at("2026-03-01"))

    async def async_pin(principal: str) -> str | None:
        return "2025-01-01" if principal.startswith("legacy") else None

    def sync_pin(principal: str) -> str | None:
        return "2025-01-01" if principal.startswith("legacy") else None

    for pins in (async_pin, sync_pin):
        versions = make_versions(clock, pins=pins)
        assert (await versions.resolve("/x", [], "legacy-1")).name == "2025-01-01"
        assert (await versions.resolve("/x", [], "modern")).name == "2026-06-01"


async def test_unknown_and_malformed_list_the_supported_versions() -> None:
    versions = make_versions(FakeClock(at("2026-03-01")))
    with pytest.raises(UnsupportedApiVersion) as unknown:
        await versions.resolve("/x", h(x_api_version="2027-01-01"), "p")
    assert "not supported" in unknown.value.detail
    assert unknown.value.extra["supported_versions"] == ["2025-01-01", "2026-06-01"]
    assert unknown.value.status == 400 and unknown.value.param == "x-api-version"
    assert "'2027-01-01'" in unknown.value.detail  # (a well-formed value is named)
    for value in ("yesterday", "<script>", "2026-13-01"):
        with pytest.raises(UnsupportedApiVersion) as malformed:
            await versions.resolve("/x", h(x_api_version=value), "p")
        assert "malformed" in malformed.value.detail
        assert value not in malformed.value.detail  # (what the client sent is not echoed)


async def test_path_prefix_is_stripped_and_unknown_prefix_rejected() -> None:
    versions = make_versions(FakeClock(at("2026-03-01")), path_prefix=True)
    v1 = await versions.resolve("/v1/chat", [], "p")
    assert (v1.name, v1.source, v1.path) == ("v1", "path", "/chat")
    root = await versions.resolve("/v2", [], "p")
    assert root.path == "/"
    unprefixed = await versions.resolve("/health", [], "p")
    assert (unprefixed.name, unprefixed.source, unprefixed.path) == ("v2", "default", None)
    with pytest.raises(UnsupportedApiVersion, match="v7"):
        await versions.resolve("/v7/chat", [], "p")
    # '/v1x' is not a version prefix
    assert (await versions.resolve("/v1x", [], "p")).source == "default"


async def test_retired_api_version_is_410_naming_the_replacement() -> None:
    clock = FakeClock(at("2026-09-01"))
    versions = make_versions(clock)
    with pytest.raises(ModelRetired) as exc:
        await versions.resolve("/x", h(x_api_version="2025-01-01"), "p")
    assert exc.value.status == 410
    assert exc.value.extra["replacement"] == "2026-06-01"
    assert exc.value.extra["retired_api_version"] == "2025-01-01"
    assert "2026-06-01" in exc.value.detail


async def test_a_pin_naming_an_unknown_version_is_a_typed_400() -> None:
    versions = make_versions(FakeClock(at("2026-03-01")), pins=lambda principal: "2020-01-01")
    with pytest.raises(UnsupportedApiVersion, match="pinned for this caller"):
        await versions.resolve("/x", [], "p")


async def test_a_header_sent_twice_must_name_one_version() -> None:
    versions = make_versions(FakeClock(at("2026-03-01")))
    twice = [(b"x-api-version", b"2025-01-01"), (b"x-api-version", b"2026-06-01")]
    with pytest.raises(InvalidRequest) as exc:
        await versions.resolve("/x", twice, "p")
    assert exc.value.status == 400 and exc.value.param == "x-api-version"
    assert "more than once" in exc.value.detail
    same = [(b"x-api-version", b"2025-01-01"), (b"x-api-version", b" 2025-01-01")]
    assert (await versions.resolve("/x", same, "p")).name == "2025-01-01"
