"""``install()``: the whole stack in the documented order, from one configuration object.

Outer to inner::

    Context → Errors → Cancellation → Versioning → Idempotency → RateLimit → Usage → app

Cancellation sits just inside Errors: the ``Timeout`` it raises is rendered by Errors (a
504, or an error event once a stream has started), and it reads the body the Context layer
already cached. It is outside every stateful layer, so when it cancels the endpoint their
own ``finally`` blocks run on the way out: rate limiting releases its concurrency lease and
reconciles, idempotency releases its key, usage records the partial usage.

On lifespan shutdown the stack waits (``shutdown_grace``) for what its layers still have in
flight before the app's own shutdown runs (see :mod:`aimiddleware._shutdown`).

A layer whose configuration is ``None`` is left out. Every layer is also usable alone with
``app.add_middleware``; ``install`` fixes the order, shares one :class:`Storage`, and adds
the layers as one :class:`~aimiddleware.stack_middleware.StackMiddleware`, which runs their
steps without a ``__call__`` and a ``send`` wrapper per layer (same behaviour, less cost).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aimiddleware.cancellation import CancellationConfig, CancellationMiddleware
from aimiddleware.context_middleware import (
    DEFAULT_MAX_BODY,
    RequestContextMiddleware,
    check_options,
)
from aimiddleware.error_middleware import ErrorMiddleware, register_exception_handlers
from aimiddleware.errors import DEFAULT_TYPE_BASE, ExceptionMapper, Mapper
from aimiddleware.idempotency.config import IdempotencyConfig
from aimiddleware.idempotency.middleware import IdempotencyMiddleware
from aimiddleware.openapi import document_stack
from aimiddleware.ratelimit import Policy, RateLimiter, RateLimitMiddleware
from aimiddleware.ratelimit.middleware import exempt_paths
from aimiddleware.stack_middleware import StackMiddleware
from aimiddleware.storage import Storage
from aimiddleware.types import PrincipalResolver
from aimiddleware.usage.config import UsageConfig
from aimiddleware.usage.middleware import UsageMiddleware
from aimiddleware.versioning.config import VersioningConfig
from aimiddleware.versioning.middleware import VersioningMiddleware
from aimiddleware.versioning.openapi import openapi_paths as versioning_paths

__all__ = ["StackConfig", "install"]


@dataclass
class StackConfig:
    """Everything ``install()`` needs. Each capability has its own field; ``None`` = off."""

    storage: Storage | str = "memory://"
    max_body_size: int | None = DEFAULT_MAX_BODY
    request_id_header: str = "x-request-id"
    trust_request_id: bool = True
    principal: PrincipalResolver | None = None
    error_type_base: str = DEFAULT_TYPE_BASE
    exception_mappings: Mapping[type[BaseException], Mapper] = field(default_factory=dict)
    versioning: VersioningConfig | None = None
    # A RateLimiter, or policies (one Policy or {tier: Policy}) for one on the shared storage.
    ratelimit: RateLimiter | Policy | Mapping[str, Policy] | None = None
    # Paths (or "/prefix*") the rate limiter never sees: health checks, routes with no model.
    ratelimit_exempt: Sequence[str] = ()
    usage: UsageConfig | None = None
    idempotency: IdempotencyConfig | None = None
    # On by default: a client that disconnects cancels the endpoint. Add timeout tiers here.
    cancellation: CancellationConfig | None = field(default_factory=CancellationConfig)
    # On lifespan shutdown, before the app's own: seconds to wait, in all, for requests still
    # unwinding, idempotency records and usage rows waiting for the store (then logged lost).
    shutdown_grace: float = 5.0


def install(app: Any, config: StackConfig | None = None, **options: Any) -> Any:
    """Add the stack to ``app`` and return it.

    A Starlette or FastAPI app is changed in place (its own ``HTTPException`` and validation
    handlers are replaced so they render the taxonomy too) and returned; any other ASGI app
    is returned wrapped. ``options`` override fields of ``config``.
    """
    if config is None:
        config = StackConfig(**options)
    elif options:
        config = StackConfig(**{**config.__dict__, **options})
    if config.shutdown_grace < 0:
        raise ValueError("shutdown_grace must be >= 0")
    # (checked now: Starlette builds the layers on the app's first call)
    check_options(config.max_body_size, config.request_id_header, config.principal)
    exempt = exempt_paths(config.ratelimit_exempt)
    storage = Storage.coerce(config.storage)
    mapper = ExceptionMapper(config.exception_mappings)

    # (middleware class, options), outermost first.
    layers: list[tuple[Any, dict[str, Any]]] = [
        (
            RequestContextMiddleware,
            {
                "max_body_size": config.max_body_size,
                "request_id_header": config.request_id_header,
                "trust_request_id": config.trust_request_id,
                "principal": config.principal,
                "error_type_base": config.error_type_base,
            },
        ),
        (ErrorMiddleware, {"mapper": mapper, "error_type_base": config.error_type_base}),
    ]
    if config.cancellation is not None:  # inside Errors, outside every stateful layer
        layers.append((CancellationMiddleware, dict(config.cancellation.__dict__)))
    if config.versioning is not None:
        layers.append(
            (
                VersioningMiddleware,
                {**config.versioning.options(storage), "error_type_base": config.error_type_base},
            )
        )
    if config.idempotency is not None:  # outside rate limiting: a replay costs no quota
        layers.append(
            (
                IdempotencyMiddleware,
                {
                    "storage": storage,
                    "config": config.idempotency,
                    "error_type_base": config.error_type_base,
                },
            )
        )
    if config.ratelimit is not None:
        limiter = config.ratelimit
        if not isinstance(limiter, RateLimiter):  # share the usage layer's tokenizer and prices
            usage = config.usage
            limiter = RateLimiter(
                limiter,
                storage=storage,
                counter=usage.counter if usage is not None else None,
                prices=usage.prices if usage is not None else None,
            )
        layers.append(
            (RateLimitMiddleware, {"limiter": limiter, "exempt": exempt})
        )
    if config.usage is not None:  # innermost: right before the app
        layers.append((UsageMiddleware, config.usage.middleware_options(storage)))

    if hasattr(app, "add_middleware") and hasattr(app, "add_exception_handler"):
        register_exception_handlers(app, mapper=mapper, error_type_base=config.error_type_base)
        if hasattr(app, "openapi") and hasattr(app, "openapi_schema"):  # FastAPI
            methods = config.idempotency.methods if config.idempotency is not None else ()
            versioning = config.versioning
            document_stack(
                app,
                # The routes the versioning layer answers itself (models list, migration).
                paths=[versioning_paths(versioning.models_path, versioning.migration_path)]
                if versioning is not None
                else [],
                auth=True,
                rate_limit_headers=config.ratelimit is not None,
                idempotency_methods=methods,
                rate_limit_exempt=exempt,
                usage_headers=config.usage is not None,
                version_headers=config.versioning is not None,
            )
        app.add_middleware(StackMiddleware, layers=layers, shutdown_grace=config.shutdown_grace)
        return app
    return StackMiddleware(app, layers=layers, shutdown_grace=config.shutdown_grace)
