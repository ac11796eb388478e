"""A TCP relay that delays everything it forwards, to stand in for a target far away.

`python bench/latency.py TARGET_PORT ONE_WAY_MS` listens on a free loopback port, prints it,
and relays each connection to TARGET_PORT on 127.0.0.1, holding every chunk ONE_WAY_MS in each
direction. Chunks are forwarded as they come, each after its delay, so a stream keeps its
throughput while every round trip takes twice the delay longer: what a client sees of a
server tens of milliseconds away (the kernel's netem would do it, where available).
"""

from __future__ import annotations

import asyncio
import sys
import time

CHUNK = 256 * 1024


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float):
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def deliver() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()

    delivering = asyncio.create_task(deliver())
    try:
        while data := await reader.read(CHUNK):
            queue.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    queue.put_nowait((0.0, b""))
    try:
        await delivering
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _serve(target_port: int, delay: float) -> None:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            _relay(reader, up_writer, delay),
            _relay(up_reader, writer, delay),
            return_exceptions=True,
        )

    server = await asyncio.start_server(connection, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), float(sys.argv[2]) / 1000))
