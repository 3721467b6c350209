"""``VersioningConfig``: the versioning layer's options as one ``StackConfig`` field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aimiddleware.versioning.api_versions import ApiVersions
from aimiddleware.versioning.lifecycle import Clock
from aimiddleware.versioning.monitor import DeprecationHook
from aimiddleware.versioning.registry import ModelRegistry

__all__ = ["VersioningConfig"]


@dataclass
class VersioningConfig:
    """Options of :class:`~aimiddleware.versioning.VersioningMiddleware` (same names).

    ``install`` passes the stack's shared storage, so deprecated-call counts are global.
    """

    versions: ApiVersions | None = None
    registry: ModelRegistry | None = None
    model_field: str | None = "model"
    model_header: str | None = "x-model"
    model_echo_header: str | None = "x-model"
    model_version_header: str | None = "x-model-version"
    on_deprecated: DeprecationHook | None = None
    models_path: str | None = None
    migration_path: str | None = None
    clock: Clock | None = None

    def options(self) -> dict[str, Any]:
        return dict(self.__dict__)
