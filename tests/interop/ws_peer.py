"""A real WebSocket server and clients for tests/interop/websocket.rs: bearerd between them.

    ws_peer.py server TOKEN         serves WebSockets on 127.0.0.1:<port the kernel picks>
                                    (Python `websockets`), prints "port <n>", and runs until
                                    stdin closes. The handshake must carry
                                    `Authorization: Bearer TOKEN`, or it is answered 401: the
                                    server checks the token. A handshake to /refuse is
                                    answered 403 whatever it carries. Each text message is
                                    answered "echo:<message>"; "bye" closes the connection.
    ws_peer.py client URL MSG...    connects with `websockets` to URL (ws://bearerd/...),
                                    sends each MSG, and prints {"replies": [...]} (with
                                    "closed_by_server": code when the server closed the
                                    connection instead of replying), or
                                    {"refused": status, "body": text} when the handshake
                                    is not answered 101.
    ws_peer.py h2client HOST PORT PATH MSG
                                    a WebSocket over HTTP/2 (RFC 8441), which `websockets`
                                    does not speak: the `h2` package's client opens an
                                    extended CONNECT to HOST:PORT (h2c), sends MSG in one
                                    masked text frame and prints {"settings_connect",
                                    "status", "reply"}.
"""

import asyncio
import http
import json
import os
import socket
import sys

import h2.config
import h2.connection
import h2.events
import h2.settings


def serve(token):
    from websockets.asyncio.server import serve as ws_serve

    expected = "Bearer " + token

    def process_request(connection, request):
        if request.path == "/refuse":
            return connection.respond(http.HTTPStatus.FORBIDDEN, "refused by the server\n")
        if request.headers.get("Authorization") != expected:
            return connection.respond(http.HTTPStatus.UNAUTHORIZED, "no or wrong bearer token\n")
        return None

    async def echo(websocket):
        async for message in websocket:
            if message == "bye":
                await websocket.close()
                return
            await websocket.send("echo:" + message)

    async def main():
        async with ws_serve(echo, "127.0.0.1", 0, process_request=process_request) as server:
            port = server.sockets[0].getsockname()[1]
            print("port", port, flush=True)
            # Until the test closes stdin (or dies).
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    asyncio.run(main())


def client(url, messages):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed, InvalidStatus

    async def main():
        try:
            async with connect(url, open_timeout=30) as websocket:
                replies = []
                for message in messages:
                    await websocket.send(message)
                    try:
                        replies.append(await websocket.recv())
                    except ConnectionClosed as closed:
                        # The server closed (its "bye"): the closing handshake is done
                        # when recv raises, and the library closes its TCP side next.
                        code = closed.rcvd.code if closed.rcvd else None
                        return {"replies": replies, "closed_by_server": code}
                return {"replies": replies}
        except InvalidStatus as refused:
            return {
                "refused": refused.response.status_code,
                "body": refused.response.body.decode("utf-8", "replace"),
            }

    print(json.dumps(asyncio.run(main())))


def text_frame(message):
    """A client's text frame (RFC 6455 §5.2): FIN, opcode 1, masked, payload under 126."""
    payload = message.encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


def h2client(host, port, path, message):
    sock = socket.create_connection((host, int(port)), timeout=30)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    sock.sendall(conn.data_to_send())
    result = {"settings_connect": None, "status": None, "reply": None}
    stream_id = None
    frames = b""
    while result["reply"] is None:
        data = sock.recv(65536)
        if not data:
            break
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.RemoteSettingsChanged) and stream_id is None:
                setting = event.changed_settings.get(h2.settings.SettingCodes.ENABLE_CONNECT_PROTOCOL)
                result["settings_connect"] = setting.new_value if setting else None
                stream_id = conn.get_next_available_stream_id()
                conn.send_headers(
                    stream_id,
                    [
                        (":method", "CONNECT"),
                        (":protocol", "websocket"),
                        (":scheme", "http"),
                        (":path", path),
                        (":authority", "%s:%s" % (host, port)),
                        ("sec-websocket-version", "13"),
                    ],
                )
            elif isinstance(event, h2.events.ResponseReceived):
                result["status"] = int(dict(event.headers)[b":status"])
                if result["status"] == 200:
                    conn.send_data(stream_id, text_frame(message))
                else:
                    result["reply"] = ""
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                frames += event.data
                # A server's frame is unmasked: 0x81, length, payload.
                if len(frames) >= 2 and len(frames) >= 2 + (frames[1] & 0x7F):
                    result["reply"] = frames[2 : 2 + (frames[1] & 0x7F)].decode()
            elif isinstance(event, (h2.events.StreamReset, h2.events.ConnectionTerminated)):
                result["reply"] = result["reply"] or ""
        sock.sendall(conn.data_to_send())
    sock.close()
    print(json.dumps(result))


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "server":
        serve(sys.argv[2])
    elif command == "client":
        client(sys.argv[2], sys.argv[3:])
    elif command == "h2client":
        h2client(*sys.argv[2:6])
    else:
        sys.exit("unknown command " + command)
