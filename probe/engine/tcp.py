"""TCP connect: one observation per attempt at an address and port, each with its own
timeout (a connect that timed out is tried once more: see ``probe.engine.measure``)."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from probe.engine.trace import Trace
from schema.model import TCPConnect

if TYPE_CHECKING:
    from probe.engine.context import EngineContext

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def connect(
    ip: str,
    port: int,
    ctx: EngineContext,
    trace: Trace,
    record: list[TCPConnect] | None = None,
) -> tuple[TCPConnect, Stream | None]:
    """Open a TCP connection; the caller owns (and must close) the returned stream."""
    obs = TCPConnect(ip=ip, port=port, t0=trace.now(), t=0.0)
    if record is not None:
        record.append(obs)
        obs.connection = len(record)  # numbered as started (several run at once)
    stream: Stream | None = None
    async with trace.step(obs, "connect", ctx.timeouts.tcp):
        stream = await asyncio.open_connection(ip, port)
    return obs, stream


async def close(stream: Stream | None) -> None:
    """Close a stream without letting a failing peer raise into the caller."""
    if stream is None:
        return
    writer = stream[1]
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except (OSError, TimeoutError):
        pass
