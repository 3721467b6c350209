"""aimiddleware: the production patterns of AI APIs as embeddable ASGI middleware."""

from aimiddleware.cancellation import (
    CancellationConfig,
    CancellationMiddleware,
    cleanup_scope,
    on_cancel,
)
from aimiddleware.context import RequestContext, RequestIdFilter, current, report_usage
from aimiddleware.context_middleware import RequestContextMiddleware
from aimiddleware.error_middleware import ErrorMiddleware, register_exception_handlers
from aimiddleware.errors import (
    AIError,
    AuthenticationFailed,
    Conflict,
    ContentFiltered,
    ExceptionMapper,
    HTTPStatusError,
    IdempotencyKeyReused,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelRetired,
    NotConfigured,
    NotFound,
    OutputSchemaInvalid,
    Overloaded,
    PermissionDenied,
    PolicyRefusal,
    PromptInjectionDetected,
    QuotaExceeded,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    Timeout,
    UnsupportedApiVersion,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
    ValidationFailed,
)
from aimiddleware.finish_reason import FinishReason, normalize_finish_reason
from aimiddleware.idempotency import (
    IdempotencyConfig,
    IdempotencyMiddleware,
    IdempotencyStore,
    idempotent,
)
from aimiddleware.jobs import JobContext, JobsRouter
from aimiddleware.pricing import ModelPrice, PriceTable
from aimiddleware.ratelimit import (
    Limit,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
    SpendAlert,
    rate_limit,
)
from aimiddleware.sse import (
    AnthropicDialect,
    EventStreamResponse,
    GenericDialect,
    OpenAIChatDialect,
    ReplayBuffer,
    ServerSentEvent,
    StreamResult,
)
from aimiddleware.stack import StackConfig, install
from aimiddleware.storage import Storage
from aimiddleware.tokens import TokenCount, TokenCounter
from aimiddleware.usage.config import UsageConfig
from aimiddleware.usage.envelope import Completion, envelope
from aimiddleware.usage.ledger import Ledger
from aimiddleware.usage.ledger_memory import MemoryLedger
from aimiddleware.usage.ledger_redis import RedisLedger
from aimiddleware.usage.ledger_sqlite import SQLiteLedger
from aimiddleware.usage.middleware import UsageMiddleware
from aimiddleware.usage.models import Envelope, Usage
from aimiddleware.usage.routes import UsageRoutes
from aimiddleware.versioning import (
    ApiVersion,
    ApiVersions,
    DeprecatedCall,
    DeprecationMonitor,
    Lifecycle,
    ModelRegistry,
    VersioningConfig,
    VersioningMiddleware,
    deprecated,
)

__version__ = "0.1.0"

__all__ = [
    "AIError",
    "AnthropicDialect",
    "ApiVersion",
    "ApiVersions",
    "AuthenticationFailed",
    "CancellationConfig",
    "CancellationMiddleware",
    "Completion",
    "Conflict",
    "ContentFiltered",
    "DeprecatedCall",
    "DeprecationMonitor",
    "Envelope",
    "ErrorMiddleware",
    "EventStreamResponse",
    "ExceptionMapper",
    "FinishReason",
    "GenericDialect",
    "HTTPStatusError",
    "IdempotencyConfig",
    "IdempotencyKeyReused",
    "IdempotencyMiddleware",
    "IdempotencyStore",
    "InternalError",
    "InvalidRequest",
    "JobContext",
    "JobsRouter",
    "Ledger",
    "Lifecycle",
    "Limit",
    "MemoryLedger",
    "MethodNotAllowed",
    "ModelPrice",
    "ModelRegistry",
    "ModelRetired",
    "NotConfigured",
    "NotFound",
    "OpenAIChatDialect",
    "OutputSchemaInvalid",
    "Overloaded",
    "PermissionDenied",
    "Policy",
    "PolicyRefusal",
    "PriceTable",
    "PromptInjectionDetected",
    "QuotaExceeded",
    "RateLimitMiddleware",
    "RateLimited",
    "RateLimiter",
    "RedisLedger",
    "ReplayBuffer",
    "RequestContext",
    "RequestContextMiddleware",
    "RequestIdFilter",
    "RequestTooLarge",
    "SQLiteLedger",
    "ServerSentEvent",
    "SpendAlert",
    "StackConfig",
    "Storage",
    "StoreUnavailable",
    "StreamResult",
    "Timeout",
    "TokenCount",
    "TokenCounter",
    "UnsupportedApiVersion",
    "UpstreamError",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "Usage",
    "UsageConfig",
    "UsageMiddleware",
    "UsageRoutes",
    "ValidationFailed",
    "VersioningConfig",
    "VersioningMiddleware",
    "cleanup_scope",
    "current",
    "deprecated",
    "envelope",
    "idempotent",
    "install",
    "normalize_finish_reason",
    "on_cancel",
    "rate_limit",
    "register_exception_handlers",
    "report_usage",
]
