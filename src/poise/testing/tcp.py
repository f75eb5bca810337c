"""`TcpEcho`: a TCP backend on 127.0.0.1 for L4 tests, echoing what it receives.

Per connection it records the peer, the first bytes received (``heads``; with
``proxy_header`` set, exactly the PROXY protocol header read off the front), and how the
client's side ended. It echoes every byte back, and when the client half-closes it
half-closes too (after the echo), so a relay's half-close can be seen end to end. With
``banner`` it speaks first; with ``reset_after`` it resets the connection (SO_LINGER 0)
once that many bytes have arrived.
"""

from __future__ import annotations

import asyncio
import socket
import struct

from poise.l4 import proxy_protocol
from poise.testing._server import _TcpServer

__all__ = ["TcpEcho"]


class TcpEcho(_TcpServer):
    def __init__(
        self,
        *,
        name: str = "echo",
        proxy_header: bool = False,
        banner: bytes = b"",
        reset_after: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(name, host, port)
        self.proxy_header = proxy_header
        self.banner = banner
        self.reset_after = reset_after
        self.peers: list[tuple[str, int]] = []
        self.headers: list[proxy_protocol.ProxyHeader] = []
        self.heads: list[bytes] = []  # up to the first 64 KiB received, per connection
        self.half_closed = 0  # connections whose client sent EOF (we saw it)
        self.received = 0  # bytes, in total

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, connection_id: int
    ) -> None:
        peer = writer.get_extra_info("peername")
        self.peers.append((str(peer[0]), int(peer[1])))
        head = bytearray()
        if self.proxy_header:
            header = None
            while header is None:
                chunk = await reader.read(1)  # byte by byte: nothing after the header is eaten
                if not chunk:
                    return
                head += chunk
                header = proxy_protocol.decode(head)
            self.headers.append(header)
        if self.banner:
            writer.write(self.banner)
        index = len(self.heads)
        self.heads.append(b"")
        got = 0
        while data := await reader.read(1 << 16):
            got += len(data)
            self.received += len(data)
            if len(self.heads[index]) < 1 << 16:
                self.heads[index] += data[: (1 << 16) - len(self.heads[index])]
            if self.reset_after and got >= self.reset_after:
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
                return
            writer.write(data)
            await writer.drain()
        self.half_closed += 1
        self._notify()
        if writer.can_write_eof():
            writer.write_eof()
        await writer.drain()
