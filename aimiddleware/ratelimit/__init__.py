"""Token-aware, multi-dimensional rate limiting: all-or-nothing, exact across workers."""

from aimiddleware.ratelimit.backend import Backend
from aimiddleware.ratelimit.decorator import rate_limit
from aimiddleware.ratelimit.limiter import Admission, RateLimiter, SpendAlert
from aimiddleware.ratelimit.memory import MemoryBackend
from aimiddleware.ratelimit.middleware import RateLimitMiddleware
from aimiddleware.ratelimit.policy import Limit, Policy, parse_limits
from aimiddleware.ratelimit.redis import RedisBackend

__all__ = [
    "Admission",
    "Backend",
    "Limit",
    "MemoryBackend",
    "Policy",
    "RateLimitMiddleware",
    "RateLimiter",
    "RedisBackend",
    "SpendAlert",
    "parse_limits",
    "rate_limit",
]
