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


def _subclasses(cls: type) -> list[type]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def test_no_model_field_is_in_a_protected_namespace() -> None:
    """pydantic before 2.10 protects every ``model_`` name and warns (UserWarning) for a
    field such as ``model_version`` when its class is made, so on import: an app whose
    warnings are errors (pytest's ``filterwarnings = error``) could not import the package.
    A model with such a field declares ``protected_namespaces=()``."""
    from pydantic import BaseModel

    for info in pkgutil.walk_packages(aimiddleware.__path__, "aimiddleware."):
        importlib.import_module(info.name)
    models = [m for m in _subclasses(BaseModel) if m.__module__.startswith("aimiddleware.")]
    assert len(models) > 10  # (the walk found the package's models)
    for model in models:
        protected = model.model_config.get("protected_namespaces", ("model_",))
        for name in model.model_fields:
            clash = [ns for ns in protected if isinstance(ns, str) and name.startswith(ns)]
            assert not clash, (model.__qualname__, name, clash)
