"""``VersioningConfig``: the versioning layer's options as one ``StackConfig`` field."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aimiddleware.headers import header_name
from aimiddleware.storage import Storage
from aimiddleware.versioning.api_versions import ApiVersions
from aimiddleware.versioning.lifecycle import Clock
from aimiddleware.versioning.middleware import check_options
from aimiddleware.versioning.monitor import DeprecationHook, DeprecationMonitor
from aimiddleware.versioning.registry import ModelRegistry

__all__ = ["VersioningConfig"]


@dataclass
class VersioningConfig:
    """Options of :class:`~aimiddleware.versioning.VersioningMiddleware` (same names).

    ``install`` passes the stack's shared storage to the default monitor, so
    deprecated-call counts are global. Pass your own ``monitor`` to read the counts
    (``await monitor.counts(principal)``) from your code.
    """

    versions: ApiVersions | None = None
    registry: ModelRegistry | None = None
    model_field: str | None = "model"
    model_header: str | None = "x-model"
    model_echo_header: str | None = "x-model"
    model_version_header: str | None = "x-model-version"
    on_deprecated: DeprecationHook | None = None
    monitor: DeprecationMonitor | None = None
    models_path: str | None = None
    migration_path: str | None = None
    clock: Clock | None = None

    def __post_init__(self) -> None:
        # Checked here, not first when the layer is built: Starlette builds it on the first
        # ASGI call, where a failing lifespan is taken for "lifespan unsupported".
        check_options(self.versions, self.registry, self.model_field, self.model_header,
                      self.models_path, self.migration_path)
        for option in ("model_echo_header", "model_version_header"):
            if getattr(self, option) is not None:
                header_name(option, getattr(self, option))

    def options(self, storage: Storage | None = None) -> dict[str, Any]:
        """Keyword arguments for the middleware; ``storage`` backs the default monitor."""
        opts = dict(self.__dict__)
        if self.monitor is None:
            opts.pop("monitor")
            opts["storage"] = storage
        elif self.on_deprecated is not None:
            raise ValueError("give the hook to your DeprecationMonitor, not on_deprecated")
        else:
            opts.pop("on_deprecated")
        return opts
