"""Content codings: reading a gzip/deflate response body, and what a request accepts.

The stack sits outside any compression middleware added before ``install()`` (Starlette's
``GZipMiddleware``), so a response it holds (usage) or stores (idempotency) may be
compressed. Only what the standard library reads is decoded: gzip and deflate (br, zstd
are not).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

__all__ = [
    "DECODABLE", "EXPANSION", "STEP", "Inflater", "TailInflater", "accepts", "content_coding",
    "decode",
]

DECODABLE = frozenset({b"gzip", b"x-gzip", b"deflate"})
STEP = 1 << 20  # the most a piece decoded at once may hold: a small body bombs no memory
#: A body read to its end (:class:`TailInflater`) is decoded to at most this many times the
#: larger of its bound and the bytes it came in: real JSON compresses 2-4x (embeddings'
#: floats 2.4x, their base64 1.3x), a decompression bomb up to ~1,000x.
EXPANSION = 64


def content_coding(value: bytes) -> bytes:
    """A ``Content-Encoding`` value as one lower-case coding (``b""``: identity). Several
    codings stay joined (decoding them in turn is not supported)."""
    codings = [c for c in (c.strip() for c in value.lower().split(b",")) if c != b"identity"]
    return b", ".join(c for c in codings if c)


def _wbits(coding: bytes, head: bytes) -> int:
    if coding != b"deflate":
        return 16 + zlib.MAX_WBITS  # gzip
    # RFC 9110's deflate is the zlib format; some servers send raw deflate (no header)
    if len(head) >= 2 and head[0] & 0x0F == 8 and (head[0] << 8 | head[1]) % 31 == 0:
        return zlib.MAX_WBITS
    return -zlib.MAX_WBITS


def decode(body: bytes, coding: bytes, limit: int) -> bytes | None:
    """``body`` decoded (every member of a gzip body); ``None`` if its coding is not one we
    read, it is corrupt or cut short, or it decodes to more than ``limit`` bytes (no more
    than that is ever decoded)."""
    if coding not in DECODABLE:
        return None
    inflater = Inflater(coding, limit + 1)
    out: list[bytes] = []
    size = 0
    for piece in inflater.pieces(body):
        size += len(piece)
        if size > limit:
            return None
        out.append(piece)
    inflate = inflater.inflate
    if inflater.members:
        whole = inflater.ended()
    else:  # (deflate: one stream, and whatever follows it is not read)
        whole = not inflater.failed and inflate is not None and inflate.eof
    return b"".join(out) if whole else None


class Inflater:
    """Decodes one gzip/deflate body message by message, in pieces of at most ``step``
    bytes (memory stays bounded however much a message expands).

    A gzip body may be several members one after the other (RFC 1952 2.2: what
    ``cat a.gz b.gz`` makes, and some servers send): each is decoded in turn, zero bytes
    between them skipped (as gzip(1) does). Deflate is one stream.
    """

    __slots__ = ("coding", "failed", "inflate", "members", "step")

    def __init__(self, coding: bytes, step: int = STEP) -> None:
        self.coding = coding
        self.members = coding != b"deflate"
        self.step = max(step, 1)  # (0 would mean no bound to zlib)
        self.inflate: zlib._Decompress | None = None
        self.failed = False  # corrupt data: nothing more is decoded

    def pieces(self, data: bytes) -> Iterator[bytes]:
        """What the next body message ``data`` decodes to, piece by piece."""
        if self.failed or not data:
            return
        if self.inflate is None:
            self.inflate = zlib.decompressobj(_wbits(self.coding, data))
        inflate = self.inflate
        try:
            while data:
                if inflate.eof and self.members:  # a member ended: the next one, if any
                    data = data.lstrip(b"\0")
                    if not data:
                        return
                    inflate = self.inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
                out = inflate.decompress(data, self.step)
                if out:
                    yield out
                if inflate.eof and self.members:
                    data = inflate.unused_data  # (the rest of this message)
                else:
                    data = inflate.unconsumed_tail
        except zlib.error:
            self.failed = True

    def ended(self) -> bool:
        """Whether what was fed decoded whole: to its end (its last gzip member's), with
        nothing after it but zero bytes after gzip, nothing corrupt."""
        inflate = self.inflate
        if self.failed or inflate is None or not inflate.eof:
            return False
        rest = inflate.unused_data
        return not rest or (self.members and not rest.strip(b"\0"))


class TailInflater(Inflater):
    """The first and last ``keep`` bytes a gzip/deflate body decodes to, fed message by
    message.

    Memory stays bounded (pieces of at most ``step``, only ``keep`` bytes at each end
    kept), and so does the work: past :data:`EXPANSION` times the larger of ``floor`` and
    the bytes fed, it gives up (a decompression bomb is decoded no further).
    """

    __slots__ = ("decoded", "fed", "floor", "head", "keep", "tail")

    def __init__(self, coding: bytes, keep: int, floor: int, step: int = STEP) -> None:
        super().__init__(coding, step)
        self.keep, self.floor = keep, floor
        self.fed = self.decoded = 0
        self.head = self.tail = b""

    def feed(self, data: bytes) -> None:
        """Decode the next body message ``data``, keeping the last bytes."""
        if self.failed:
            return
        self.fed += len(data)
        most = EXPANSION * max(self.floor, self.fed)
        keep = self.keep
        for piece in self.pieces(data):
            self.decoded += len(piece)
            if self.decoded > most:
                self.failed = True  # (a bomb, or past what is read: nothing more decoded)
                self.tail = b""
                return
            if len(self.head) < keep:
                self.head = (self.head + piece)[:keep]
            self.tail = piece[-keep:] if len(piece) >= keep else (self.tail + piece)[-keep:]

    def result(self) -> bytes | None:
        """The body's last decoded bytes; ``None`` unless it decoded whole: to its end, with
        nothing after it, not corrupt, not given up on."""
        return self.tail if self.ended() else None


def accepts(headers: Iterable[tuple[bytes, bytes]], coding: bytes) -> bool:
    """Does a request with these headers accept a response in content ``coding``?

    RFC 9110 12.5.3 (``q=0`` refuses, ``*`` stands for codings not named), except that a
    request without ``Accept-Encoding`` accepts no coding: a compression middleware sends
    such a request nothing compressed, so nor should a replay. A malformed ``q`` refuses.
    """
    named: float | None = None
    star: float | None = None
    aliases = (b"gzip", b"x-gzip") if coding in (b"gzip", b"x-gzip") else (coding,)
    for name, value in headers:
        if name.lower() != b"accept-encoding":
            continue
        for item in value.split(b","):
            token, _, params = item.partition(b";")
            token = token.strip().lower()
            if token in aliases:
                named = _q(params)
            elif token == b"*":
                star = _q(params)
    q = named if named is not None else star
    return q is not None and q > 0


def _q(params: bytes) -> float:
    for param in params.split(b";"):
        name, _, value = param.partition(b"=")
        if name.strip().lower() == b"q":
            try:
                q = float(value.strip())
            except ValueError:
                return 0.0
            return q if 0 <= q <= 1 else 0.0
    return 1.0
