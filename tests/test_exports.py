"""The package's ``__all__`` is exactly what it exports (httpx's test_exported_members)."""

from __future__ import annotations

import importlib
import pkgutil
import types

import aimiddleware


def test_all_is_sorted_and_importable() -> None:
    assert list(aimiddleware.__all__) == sorted(aimiddleware.__all__)
    for name in aimiddleware.__all__:
        assert hasattr(aimiddleware, name), name


def test_all_matches_the_public_names() -> None:
    public = {
        name
        for name, value in vars(aimiddleware).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(aimiddleware.__all__)


def test_exported_objects_come_from_the_package() -> None:
    for name in aimiddleware.__all__:
        obj = getattr(aimiddleware, name)
        module = getattr(obj, "__module__", "aimiddleware")
        assert module.startswith("aimiddleware"), (name, module)


def test_every_public_module_declares_all() -> None:
    for info in pkgutil.walk_packages(aimiddleware.__path__, "aimiddleware."):
        if any(part.startswith("_") for part in info.name.split(".")):
            continue
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), info.name
        for name in module.__all__:
            assert hasattr(module, name), (info.name, name)
