"""The per-request context every layer reads and writes, and the pure rules behind it.

One :class:`RequestContext` per request, created by
:class:`~aimiddleware.context_middleware.RequestContextMiddleware` (the outermost layer),
reachable from ``scope["state"]["aimiddleware"]`` and from :func:`current` anywhere below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from pydantic_core import from_json

from aimiddleware.usage.models import Usage, believed

if TYPE_CHECKING:
    from aimiddleware.errors import AIError
    from aimiddleware.types import Scope

__all__ = [
    "NO_MODEL_CALL",
    "SCOPE_KEY",
    "RequestContext",
    "RequestIdFilter",
    "TraceContext",
    "after_response",
    "current",
    "current_or_none",
    "default_principal",
    "key_principal",
    "new_request_id",
    "parse_traceparent",
    "report_no_model_call",
    "report_usage",
    "run_after_response",
    "valid_request_id",
]

SCOPE_KEY = "aimiddleware"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")  # fullmatch: "$" lets "\n" end it
_TRACEPARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")
_UNPARSED: Any = object()

_current: ContextVar[RequestContext | None] = ContextVar("aimiddleware_context", default=None)
logger = logging.getLogger("aimiddleware")


def valid_request_id(value: str) -> bool:
    """An incoming request id is kept only if short (<=128) and of a safe charset."""
    return _REQUEST_ID.fullmatch(value) is not None


# Request ids are 12 os.urandom bytes each, drawn 256 at a time: one getrandom call per
# batch instead of one per request (~0.4 us). Process state like the OS entropy pool:
# deque.popleft is atomic, so threads never get the same id, and a forked child drops the
# ids its parent had drawn.
_ID_BATCH = 256
_ids: deque[str] = deque()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_ids.clear)


def new_request_id() -> str:
    """``req_`` and 24 hex digits from the OS CSPRNG (unguessable, unique in practice)."""
    try:
        return _ids.popleft()
    except IndexError:
        # "req_<24 hex>" per 12 bytes, split in C: hex() puts a space every 12 bytes
        batch = ("req_" + os.urandom(12 * _ID_BATCH).hex(" ", 12).replace(" ", " req_")).split()
        _ids.extend(batch[1:])
        return batch[0]


@dataclass(frozen=True)
class TraceContext:
    """W3C Trace Context for this request: the caller's trace, our own span id."""

    trace_id: str
    span_id: str
    parent_id: str | None
    flags: str
    tracestate: str | None = None

    @property
    def traceparent(self) -> str:
        """The header value to send on outgoing calls made for this request."""
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"


def parse_traceparent(header: str | None, tracestate: str | None = None) -> TraceContext:
    """Continue a valid incoming trace; start a new one for a missing or invalid header."""
    span_id = secrets.token_hex(8)
    if header:
        m = _TRACEPARENT.match(header.strip().lower())
        if m:
            version, trace_id, parent_id, flags, rest = m.groups()
            ok = (
                version != "ff"
                and trace_id != "0" * 32
                and parent_id != "0" * 16
                and (version != "00" or rest is None)
            )
            if ok:
                return TraceContext(trace_id, span_id, parent_id, flags, tracestate)
    return TraceContext(secrets.token_hex(16), span_id, None, "00")


# Recent API keys -> their principal: a dict hit (~40 ns) instead of a SHA-256 (~0.4 us) per
# request. Bounded (emptied when full), so at most that many raw keys are held, in memory
# only, never logged or exposed.
_PRINCIPALS_MAX = 1024
_principals: dict[bytes, str] = {}


def key_principal(token: bytes) -> str:
    """The principal of an API key (already stripped): ``key_`` + 32 hex of its SHA-256.

    What :func:`default_principal` answers for a bearer token or ``x-api-key``; a layer that
    has already found the key in the headers can call this instead of a second scan.
    """
    if type(token) is not bytes:  # a bytearray from a hand-built scope is not hashable
        token = bytes(token)
    found = _principals.get(token)
    if found is None:
        found = "key_" + hashlib.sha256(token).hexdigest()[:32]
        if len(_principals) >= _PRINCIPALS_MAX:
            _principals.clear()
        _principals[token] = found
    return found


def duplicate_key() -> AIError:
    """The 400 for a request with two ``Authorization`` (or ``x-api-key``) headers: which one
    is the caller's? (A proxy in front may have checked the other.)"""
    from aimiddleware.errors import InvalidRequest

    return InvalidRequest(
        "The request has more than one Authorization (or x-api-key) header.",
        param="authorization",
    )


def default_principal(scope: Scope) -> str:
    """Who is calling, by default: a hash of the API key, else the client address.

    The bearer token or ``x-api-key`` is hashed (never logged, never in the principal; the
    last keys seen are held in process memory, bounded, to skip re-hashing). This is only
    as trustworthy as the app's authentication: pass a ``principal`` callable that returns
    the authenticated tenant when keys are not validated before this layer.
    """
    token = api_key = None
    seen: list[bytes] = []
    for name, value in scope.get("headers", ()):
        if name == b"authorization" or name == b"x-api-key":
            if name in seen:
                raise duplicate_key()
            seen.append(name)
        if name == b"authorization":
            scheme, _, cred = value.partition(b" ")
            if scheme.lower() == b"bearer" and cred.strip():
                token = cred.strip()
        elif name == b"x-api-key" and value.strip():
            api_key = value.strip()
    token = token if token is not None else api_key
    if token is not None:
        return key_principal(token)
    client = scope.get("client")
    if client:
        return f"ip_{client[0]}"
    return "anonymous"


@dataclass(eq=False)  # (no slots: the defaults stay class attributes, see begin_context)
class RequestContext:
    """Everything the layers share about one request.

    Written by: the context layer (identity, body), versioning (``api_version``, model
    names), rate limiting (``state``), the endpoint (usage via :func:`report_usage`, or an
    Envelope / event stream), and the usage layer (cost, normalized finish_reason).
    """

    request_id: str
    principal: str
    method: str
    path: str  # as the app's routes see it: without the root path (``_asgi.route_path``)
    body: bytes = b""
    started: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    model: str | None = None
    model_version: str | None = None
    api_version: str | None = None
    usage: Usage | None = None
    """What the model call used, once known. For reading: an endpoint reports it with
    :func:`report_usage` (which reads a junk count as 0 and takes a mapping), not by
    assigning it; a direct assignment is charged and recorded as given, unchecked."""
    raw_finish_reason: str | None = None
    finish_reason: str | None = None
    estimated_cost: Decimal | None = None
    streaming: bool = False
    response_status: int | None = None
    response_complete: bool = False
    disconnected: bool = False
    stream_error_writer: Callable[[AIError], Awaitable[None]] | None = None
    after_response: list[Callable[[], Awaitable[None]]] | tuple[()] | None = None
    """What runs once the request has ended (see :func:`after_response`); ``None``: no
    context layer runs it."""
    state: dict[str, Any] = field(default_factory=dict)
    traceparent_header: str | None = field(default=None, repr=False)
    tracestate_header: str | None = field(default=None, repr=False)
    content_type: bytes | None = field(default=None, repr=False)
    """The request's raw ``Content-Type`` (first one), found in the context layer's scan."""
    _json: Any = field(default=_UNPARSED, repr=False)
    _trace: TraceContext | None = field(default=None, repr=False)

    @property
    def trace(self) -> TraceContext:
        """W3C trace context, parsed from the incoming headers on first use."""
        if self._trace is None:
            self._trace = parse_traceparent(self.traceparent_header, self.tracestate_header)
        return self._trace

    def json(self) -> Any:
        """The body parsed as JSON once, or ``None`` when empty or not JSON."""
        if self._json is _UNPARSED:
            body = self.body
            if not body:
                self._json = None
                return None
            try:
                # pydantic_core's parser: ~4x faster than json.loads on small bodies, the same
                # values where it succeeds; what it rejects (lone surrogates, a BOM or
                # UTF-16, nesting past 200, invalid JSON) is left to json.loads to decide.
                self._json = from_json(body, cache_strings="keys")
            except ValueError:
                try:
                    self._json = json.loads(body)
                except (ValueError, UnicodeDecodeError, RecursionError):  # nested too deep too
                    self._json = None
        return self._json

    @property
    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000.0


def begin_context(
    request_id: str,
    method: str,
    path: str,
    traceparent_header: str | None,
    tracestate_header: str | None,
    content_type: bytes | None,
) -> RequestContext:
    """``RequestContext(request_id=..., principal="anonymous", method=..., path=..., ...)``
    for the context layer, at less than half the cost: only what a new request sets is
    written; every other field reads its class-level default until a layer writes it."""
    ctx = object.__new__(RequestContext)
    ctx.request_id = request_id
    ctx.principal = "anonymous"
    ctx.method = method
    ctx.path = path
    ctx.started = time.perf_counter()
    ctx.started_at = time.time()
    ctx.state = {}
    ctx.traceparent_header = traceparent_header
    ctx.tracestate_header = tracestate_header
    ctx.content_type = content_type
    ctx.after_response = ()  # (this layer runs them: none yet, nothing allocated)
    return ctx


def after_response(ctx: RequestContext, hook: Callable[[], Awaitable[None]]) -> bool:
    """Have ``hook()`` awaited once the request has ended: after its response was sent, or
    after the error layer has rendered what the app raised (``ctx.response_status`` then
    says how it ended), or after it was cancelled. True when the context layer that made
    ``ctx`` will run it; False when none will (the caller does its work now).

    A hook runs on the way out of the context layer, cancelled or not: one that does I/O
    shields it. It never hides the response: an exception it raises is logged."""
    hooks = ctx.after_response
    if hooks is None:
        return False
    if not hooks:
        ctx.after_response = hooks = []
    hooks.append(hook)
    return True


async def run_after_response(ctx: RequestContext) -> None:
    """Await the hooks given to :func:`after_response` (the context layers call it)."""
    hooks, ctx.after_response = ctx.after_response or (), ()
    for hook in hooks:
        try:
            await hook()
        except Exception:
            logger.exception("an after-response hook failed")


def current_or_none() -> RequestContext | None:
    return _current.get()


def current() -> RequestContext:
    """The context of the request being served. Raises outside a request."""
    ctx = _current.get()
    if ctx is None:
        raise RuntimeError(
            "no aimiddleware request context: is RequestContextMiddleware (or install()) applied?"
        )
    return ctx


def report_usage(
    usage: Usage | Mapping[str, Any] | None = None,
    *,
    finish_reason: str | None = None,
    model: str | None = None,
    model_version: str | None = None,
) -> None:
    """Tell the stack what the model call used; call it from the endpoint.

    ``usage`` is a :class:`Usage` or a mapping of its fields; a count past ``MAX_TOKENS``
    (2**32 - 1) is junk, read as 0 as in a provider's usage. ``finish_reason`` is the raw
    provider value: the usage layer normalizes it and keeps the raw one.
    """
    ctx = current()
    if usage is not None:
        ctx.usage = believed(
            usage if isinstance(usage, Usage) else Usage.model_validate(dict(usage)))
    if finish_reason is not None:
        ctx.raw_finish_reason = finish_reason
    if model is not None and ctx.model is None:
        ctx.model = model
    if model_version is not None:
        ctx.model_version = model_version


NO_MODEL_CALL = "no_model_call"
"""``ctx.state`` key set by :func:`report_no_model_call`."""


def report_no_model_call(ctx: RequestContext) -> None:
    """``ctx``'s request called no model (a replayed stream, a job submission): a rate
    limiter charges it one request and replaces its token and cost reservation with
    nothing, and the usage layer takes no usage from what it sends (usage reported
    elsewhere) and records no row for it."""
    ctx.state[NO_MODEL_CALL] = True
    ctx.state["usage_reported"] = True


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``"-"`` outside a request) for log formats to use."""

    def __init__(self, name: str = "", default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _current.get()
        record.request_id = ctx.request_id if ctx is not None else self.default
        return True


def _set_current(ctx: RequestContext | None) -> Any:
    return _current.set(ctx)


def _reset_current(token: Any) -> None:
    _current.reset(token)
