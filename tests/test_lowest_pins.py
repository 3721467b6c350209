"""``.ci/lowest.txt`` pins each declared lower bound to itself, and nothing else.

``./dev test-lowest`` (run by CI after the main suite) installs the library with those pins
as constraints and runs its tests on them. A bound raised or lowered in ``pyproject.toml``
without the file (or the reverse) would make that run test versions the package does not
declare; this reads both files and names each package where they differ.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / ".ci" / "lowest.txt"
# Not the library's: test and benchmark tools, whose pins (if any) need only satisfy them.
TOOL_EXTRAS = ("test", "bench")


def pins_of(text: str) -> tuple[dict[str, Version], list[str]]:
    """Each ``name==version`` line of a constraints file, and what is wrong with the rest."""
    pins: dict[str, Version] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement:
            problems.append(f"line {number}: {line!r} is not a requirement")
            continue
        specs = list(req.specifier)
        name = canonicalize_name(req.name)
        if len(specs) != 1 or specs[0].operator != "==" or "*" in specs[0].version:
            problems.append(f"line {number}: {name} is not pinned to one version (name==X.Y.Z)")
        elif name in pins:
            problems.append(f"line {number}: {name} is pinned twice")
        else:
            pins[name] = Version(specs[0].version)
    return pins, problems


def lower_bound(req: Requirement) -> Version | None:
    """The lowest version a requirement admits by its ``>=``, ``~=`` or ``==``."""
    bounds = [Version(s.version) for s in req.specifier if s.operator in (">=", "~=", "==")]
    return max(bounds) if bounds else None


def mismatches(pyproject: str, constraints: str) -> list[str]:
    """How ``constraints`` fails to pin each of the library's declared bounds to itself."""
    project = tomllib.loads(pyproject)["project"]
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    library = [("dependencies", r) for r in project.get("dependencies", [])] + [
        (f"the {extra} extra", r)
        for extra, reqs in extras.items() if extra not in TOOL_EXTRAS for r in reqs
    ]
    tools = [(f"the {extra} extra", r) for extra in TOOL_EXTRAS for r in extras.get(extra, [])]
    pins, problems = pins_of(constraints)
    ours = set()
    for where, text in library:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        ours.add(name)
        bound = lower_bound(req)
        if bound is None:
            problems.append(f"{name} ({where}: {text!r}) declares no lower bound to pin")
        elif name not in pins:
            problems.append(f"{name} ({where}: >={bound}) has no pin in .ci/lowest.txt")
        elif pins[name] != bound:
            problems.append(
                f"{name}: {where} declares >={bound} but .ci/lowest.txt pins {pins[name]}"
            )
    for where, text in tools:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name not in pins:
            continue
        if name in ours:  # the test extra repeats a library bound: it must be the same one
            bound = lower_bound(req)
            if bound != pins[name]:
                problems.append(
                    f"{name}: {where} declares >={bound} but .ci/lowest.txt pins {pins[name]}"
                )
        elif pins[name] not in req.specifier:
            problems.append(f"{name}: the pin {pins[name]} is outside {where}'s {text!r}")
    declared = ours | {canonicalize_name(Requirement(text).name) for _, text in tools}
    problems += [
        f"{name}: pinned in .ci/lowest.txt but not a dependency pyproject.toml declares"
        for name in pins if name not in declared
    ]
    return problems


def test_every_declared_lower_bound_is_pinned_to_itself() -> None:
    problems = mismatches((ROOT / "pyproject.toml").read_text(), PINS.read_text())
    assert not problems, "\n".join(problems)


SAMPLE_PYPROJECT = """
[project]
dependencies = ["pydantic>=2.9,<3", "anyio>=4.6"]
[project.optional-dependencies]
redis = ["redis>=5.0.2"]
client = ["httpx>=0.27"]
jobs = ["httpx>=0.27"]
test = ["redis>=5.0.2", "pytest>=8.0", "fastapi>=0.115"]
"""
SAMPLE_PINS = """# a comment
pydantic==2.9.0
anyio==4.6   # the same version as 4.6.0
redis==5.0.2
httpx==0.27.0
fastapi==0.115.14
"""


def test_a_bound_and_its_pin_that_differ_are_named() -> None:
    assert mismatches(SAMPLE_PYPROJECT, SAMPLE_PINS) == []
    raised = SAMPLE_PYPROJECT.replace("pydantic>=2.9", "pydantic>=2.10")
    assert mismatches(raised, SAMPLE_PINS) == [
        "pydantic: dependencies declares >=2.10 but .ci/lowest.txt pins 2.9.0"
    ]
    lowered = SAMPLE_PINS.replace("redis==5.0.2", "redis==5.0.1")
    assert mismatches(SAMPLE_PYPROJECT, lowered) == [
        "redis: the redis extra declares >=5.0.2 but .ci/lowest.txt pins 5.0.1",
        "redis: the test extra declares >=5.0.2 but .ci/lowest.txt pins 5.0.1",
    ]
    dropped = SAMPLE_PINS.replace("httpx==0.27.0\n", "")
    assert mismatches(SAMPLE_PYPROJECT, dropped) == [
        "httpx (the client extra: >=0.27) has no pin in .ci/lowest.txt",
        "httpx (the jobs extra: >=0.27) has no pin in .ci/lowest.txt",
    ]
    unbounded = SAMPLE_PYPROJECT.replace('"anyio>=4.6"', '"anyio"')
    assert mismatches(unbounded, SAMPLE_PINS) == [
        "anyio (dependencies: 'anyio') declares no lower bound to pin"
    ]
    assert mismatches(SAMPLE_PYPROJECT, SAMPLE_PINS + "orjson==3.10.0\n") == [
        "orjson: pinned in .ci/lowest.txt but not a dependency pyproject.toml declares"
    ]
    assert mismatches(SAMPLE_PYPROJECT, SAMPLE_PINS + "pytest>=8.0\nhttpx==0.27.0\n") == [
        "line 7: pytest is not pinned to one version (name==X.Y.Z)",
        "line 8: httpx is pinned twice",
    ]
    old_tool = SAMPLE_PINS.replace("fastapi==0.115.14", "fastapi==0.114.0")
    assert mismatches(SAMPLE_PYPROJECT, old_tool) == [
        "fastapi: the pin 0.114.0 is outside the test extra's 'fastapi>=0.115'"
    ]
