"""aimiddleware: the production patterns of AI APIs as embeddable ASGI middleware."""

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
from aimiddleware.pricing import ModelPrice, PriceTable
from aimiddleware.ratelimit import (
    Limit,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
    SpendAlert,
    rate_limit,
)
from aimiddleware.stack import StackConfig, install
from aimiddleware.storage import Storage
from aimiddleware.tokens import TokenCount, TokenCounter
from aimiddleware.usage.config import UsageConfig
from aimiddleware.usage.envelope import Completion, envelope
from aimiddleware.usage.ledger import Ledger, MemoryLedger
from aimiddleware.usage.ledger_redis import RedisLedger
from aimiddleware.usage.ledger_sqlite import SQLiteLedger
from aimiddleware.usage.middleware import UsageMiddleware
from aimiddleware.usage.models import Envelope, Usage
from aimiddleware.usage.routes import UsageRoutes

__version__ = "0.1.0"

__all__ = [
    "AIError",
    "AuthenticationFailed",
    "Completion",
    "Conflict",
    "ContentFiltered",
    "Envelope",
    "ErrorMiddleware",
    "ExceptionMapper",
    "FinishReason",
    "HTTPStatusError",
    "IdempotencyKeyReused",
    "InternalError",
    "InvalidRequest",
    "Ledger",
    "Limit",
    "MemoryLedger",
    "MethodNotAllowed",
    "ModelPrice",
    "ModelRetired",
    "NotFound",
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
    "RequestContext",
    "RequestContextMiddleware",
    "RequestIdFilter",
    "RequestTooLarge",
    "SQLiteLedger",
    "SpendAlert",
    "StackConfig",
    "Storage",
    "StoreUnavailable",
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
    "current",
    "envelope",
    "install",
    "normalize_finish_reason",
    "rate_limit",
    "register_exception_handlers",
    "report_usage",
]
