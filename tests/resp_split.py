"""A TCP proxy in front of a real Redis/Valkey that forwards a client's commands one at a time
and runs a hook once between two of them: what another client's write, landing between the
commands of one pipeline, does to the pipeline's later commands.

The hook runs after the server has answered the first watched command seen (so that command
has run), before the commands after it are forwarded. A script (one EVALSHA) has no "between".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from anyio.abc import SocketAttribute, SocketStream

__all__ = ["split_after", "take_command"]

_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


def take_command(buf: bytes) -> tuple[bytes, bytes, bytes] | None:
    """One whole RESP command off the front of ``buf``: (its name, its bytes, the rest)."""
    end = buf.find(b"\r\n")
    if end < 0:
        return None
    count, pos, name = int(buf[1:end]), end + 2, b""
    for i in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        start = end + 2
        stop = start + int(buf[pos + 1 : end])
        if len(buf) < stop + 2:
            return None
        if i == 0:
            name = buf[start:stop].upper()
        pos = stop + 2
    return name, buf[:pos], buf[pos:]


@asynccontextmanager
async def split_after(
    port: int, watched: frozenset[bytes], hook: Callable[[], Awaitable[None]]
) -> AsyncIterator[int]:
    """A proxy to the server on ``port``; yields the proxy's port."""
    pending: list[Callable[[], Awaitable[None]]] = [hook]

    async def handle(client: SocketStream) -> None:
        answered = anyio.Event()

        async def back(server: SocketStream) -> None:  # server -> client
            try:
                while True:
                    data = await server.receive()
                    answered.set()
                    await client.send(data)
            except _GONE:
                return

        async def forth(server: SocketStream) -> None:  # client -> server, one by one
            nonlocal answered
            buf = b""
            try:
                while True:
                    buf += await client.receive()
                    while (cmd := take_command(buf)) is not None:
                        name, wire, buf = cmd
                        if name not in watched or not pending:
                            await server.send(wire)
                            continue
                        answered = anyio.Event()  # (the replies before it were all read)
                        await server.send(wire)
                        await answered.wait()
                        await pending.pop()()
            except _GONE:
                return

        server = await anyio.connect_tcp("127.0.0.1", port)
        async with client, server, anyio.create_task_group() as tg:
            tg.start_soon(back, server)
            await forth(server)
            tg.cancel_scope.cancel()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, handle)
        yield listener.extra(SocketAttribute.local_port)
        tg.cancel_scope.cancel()
