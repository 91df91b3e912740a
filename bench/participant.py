"""A minimal, fast participant for benchmarks: answers every request with SUCCESS.

It is a raw asyncio protocol rather than an aiohttp app so that the participant costs
little CPU next to the coordinator it serves. `GET /stats` returns the call counts by
path, which the benchmark uses to check that each branch was called.

With a second port it also serves gRPC branch calls there: any method
(``/busi.Busi/TransOut``…) answers OK with an empty body, counted by its path in the same
`/stats`, so the sagas of ``--protocol grpc`` can call their branches over gRPC.

Run: python -m bench.participant PORT [GRPC_PORT]
"""

from __future__ import annotations

import asyncio
import collections
import sys
from typing import ClassVar, cast

import grpc
import orjson

OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 24\r\n\r\n"
    b'{"dtm_result":"SUCCESS"}'
)


class Participant(asyncio.Protocol):
    counts: ClassVar[collections.Counter[str]] = collections.Counter()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end]
            length = 0
            lower = head.lower()
            at = lower.find(b"content-length:")
            if at >= 0:
                stop = lower.find(b"\r\n", at)
                length = int(lower[at + 15 : stop if stop >= 0 else len(lower)])
            total = end + 4 + length
            if len(self.buffer) < total:
                return
            self.buffer = self.buffer[total:]
            path = head.split(b" ", 2)[1].split(b"?", 1)[0].decode()
            if path == "/stats":
                body = orjson.dumps(dict(Participant.counts))
                self.transport.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                continue
            Participant.counts[path] += 1
            self.transport.write(OK)


async def grpc_answer(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return b""


class AnyMethod(grpc.GenericRpcHandler):  # type: ignore[type-arg]  # not generic at run time
    """Every method is a branch that succeeds; no (de)serializers, the body stays bytes."""

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        Participant.counts[details.method] += 1
        return grpc.unary_unary_rpc_method_handler(grpc_answer)


async def main(port: int, grpc_port: int = 0) -> None:
    loop = asyncio.get_running_loop()
    if grpc_port:
        # Listening before the HTTP side: once /stats answers, gRPC does too.
        grpc_server = grpc.aio.server()
        grpc_server.add_generic_rpc_handlers((AnyMethod(),))
        grpc_server.add_insecure_port(f"127.0.0.1:{grpc_port}")
        await grpc_server.start()
    server = await loop.create_server(Participant, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main(*(int(arg) for arg in sys.argv[1:3])))
