"""API versions, model pinning, deprecation and sunset.

- :class:`ApiVersions`: the supported API versions and how a request picks one.
- :class:`ModelRegistry`: dated snapshots, aliases, lifecycles; the models list.
- :class:`Lifecycle`: deprecation / sunset dates and their headers (pure).
- :class:`DeprecationMonitor`: deprecated calls counted per principal, and a hook.
- :class:`VersioningMiddleware`: all of it on every route; :func:`deprecated` on one.
"""

from aimiddleware.versioning.api_versions import ApiVersion, ApiVersions, ResolvedVersion
from aimiddleware.versioning.config import VersioningConfig
from aimiddleware.versioning.decorator import deprecated
from aimiddleware.versioning.diff import compare
from aimiddleware.versioning.lifecycle import Lifecycle, merge_headers
from aimiddleware.versioning.middleware import VersioningMiddleware
from aimiddleware.versioning.migration import MigrationRequest, MigrationSide
from aimiddleware.versioning.monitor import DeprecatedCall, DeprecationMonitor
from aimiddleware.versioning.registry import ModelRegistry, ResolvedModel, Snapshot

__all__ = [
    "ApiVersion",
    "ApiVersions",
    "DeprecatedCall",
    "DeprecationMonitor",
    "Lifecycle",
    "MigrationRequest",
    "MigrationSide",
    "ModelRegistry",
    "ResolvedModel",
    "ResolvedVersion",
    "Snapshot",
    "VersioningConfig",
    "VersioningMiddleware",
    "compare",
    "deprecated",
    "merge_headers",
]
