"""A real gRPC server and client (grpcio) for tests/interop/grpc.rs: bearerd between them.

    grpc_peer.py server TOKEN     serves bearerd.test.Echo on 127.0.0.1:<port the kernel
                                  picks>, prints "port <n>", and runs until stdin closes.
                                  Every call must carry `authorization: Bearer TOKEN`, or it
                                  is aborted UNAUTHENTICATED: the server checks the token.
    grpc_peer.py client TARGET    makes the four kinds of call through TARGET (host:port of
                                  bearerd) and prints one JSON object with what it got.
    grpc_peer.py status TARGET METHOD [TIMEOUT]
                                  one unary call; prints {"code", "details"} of its outcome.

Messages are raw bytes (generic handlers, no .proto), which is all a proxy sees anyway.
"""

import json
import queue
import sys
import threading
import time
from concurrent import futures

import grpc

SERVICE = "bearerd.test.Echo"


def identity(data):
    return data


def serve(token):
    expected = "Bearer " + token

    def check(context):
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != expected:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no or wrong bearer token")
        # The app's own metadata reaches the server beside bearerd's token.
        context.set_trailing_metadata((("x-app-metadata", metadata.get("x-app", "")),))

    def unary(request, context):
        check(context)
        return b"unary:" + request

    def server_stream(request, context):
        check(context)
        for i in range(int(request)):
            yield b"item-%d" % i

    def client_stream(requests, context):
        check(context)
        return b"+".join(requests)

    def bidi(requests, context):
        check(context)
        for request in requests:
            yield request.upper()

    def fail(request, context):
        check(context)
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.decode())

    def slow(request, context):
        check(context)
        time.sleep(5)
        return request

    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary, identity, identity),
        "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream, identity, identity),
        "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream, identity, identity),
        "Bidi": grpc.stream_stream_rpc_method_handler(bidi, identity, identity),
        "Fail": grpc.unary_unary_rpc_method_handler(fail, identity, identity),
        "Slow": grpc.unary_unary_rpc_method_handler(slow, identity, identity),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("port %d" % port, flush=True)
    sys.stdin.read()
    server.stop(0)


def method(channel, kind, name):
    path = "/%s/%s" % (SERVICE, name)
    return getattr(channel, kind)(path, request_serializer=identity, response_deserializer=identity)


def client(target):
    out = {}
    metadata = (("x-app", "from-the-app"),)
    with grpc.insecure_channel(target) as channel:
        unary = method(channel, "unary_unary", "Unary")
        response, call = unary.with_call(b"hello", metadata=metadata, timeout=10)
        out["unary"] = response.decode()
        out["unary_trailers"] = dict(call.trailing_metadata())

        stream = method(channel, "unary_stream", "ServerStream")
        out["server_stream"] = [m.decode() for m in stream(b"5", timeout=10)]

        collect = method(channel, "stream_unary", "ClientStream")
        out["client_stream"] = collect(iter([b"a", b"b", b"c"]), timeout=10).decode()

        # Bidirectional, in lock step: each message is sent only once the answer to the one
        # before has arrived. A proxy that buffered either direction would stall here.
        outgoing = queue.Queue()

        def requests():
            while True:
                item = outgoing.get()
                if item is None:
                    return
                yield item

        bidi = method(channel, "stream_stream", "Bidi")
        responses = bidi(requests(), timeout=10)
        echoed = []
        for word in [b"one", b"two", b"three"]:
            outgoing.put(word)
            echoed.append(next(responses).decode())
        outgoing.put(None)
        out["bidi"] = echoed
    print(json.dumps(out), flush=True)


def status(target, name, timeout):
    with grpc.insecure_channel(target) as channel:
        unary = method(channel, "unary_unary", name)
        try:
            unary(b"x", timeout=timeout)
            result = {"code": "OK", "details": ""}
        except grpc.RpcError as error:
            result = {"code": error.code().name, "details": error.details() or ""}
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "server":
        serve(sys.argv[2])
    elif mode == "client":
        client(sys.argv[2])
    elif mode == "status":
        status(sys.argv[2], sys.argv[3], float(sys.argv[4]) if len(sys.argv) > 4 else 10.0)
    else:
        sys.exit("unknown mode " + mode)
