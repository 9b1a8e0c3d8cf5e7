#!/usr/bin/env python3
"""Cold-start herd for `make bench` (scripts/bench/run.py).

Waits until 127.0.0.1:--port accepts a connection, then at once opens --n connections and
sends one `GET --path` on each (`Connection: close`), all concurrently, and times each from
the start of its connect to the last byte of its response. Prints one JSON object on stdout:
statuses, errors, latency percentiles (ms) and the whole burst's duration.

run.py starts this first and bearerd right after, so the burst leaves as soon as bearerd's
listener is up, while its first token request is still in flight. Standard library only, and
no asyncio streams: plain non-blocking sockets on one epoll loop cost a few tens of µs of
Python per request, so the client adds little to what it measures (run.py also times the
same herd straight at the upstream, as the floor).
"""

import argparse
import errno
import json
import resource
import selectors
import socket
import sys
import time


def raise_fd_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def wait_accepting(address, timeout):
    """Seconds until the port accepted a connection (closed again at once)."""
    started = time.perf_counter()
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
            return time.perf_counter() - started
        except OSError:
            if time.perf_counter() - started > timeout:
                raise
            time.sleep(0.0005)


class Exchange:
    """One request on its own connection."""

    __slots__ = ("sock", "started", "ended", "received", "status", "error", "length", "head")

    def __init__(self, sock, started):
        self.sock = sock
        self.started = started
        self.ended = None
        self.received = bytearray()
        self.status = None
        self.error = None
        self.length = None  # of the whole response, once the head is in
        self.head = None

    def complete(self):
        """Whether the whole response is in, given the bytes received so far."""
        if self.head is None:
            end = self.received.find(b"\r\n\r\n")
            if end < 0:
                return False
            self.head = bytes(self.received[:end])
            lines = self.head.split(b"\r\n")
            self.status = int(lines[0].split(b" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    self.length = end + 4 + int(value.strip())
        return self.length is not None and len(self.received) >= self.length


def herd(address, request, n, timeout):
    selector = selectors.DefaultSelector()
    exchanges = []
    burst_started = time.perf_counter()
    for _ in range(n):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        exchange = Exchange(sock, time.perf_counter())
        exchanges.append(exchange)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            exchange.error, exchange.ended = errno.errorcode.get(code, str(code)), time.perf_counter()
            sock.close()
            continue
        if code == 0:  # loopback connects usually complete at once: send right away
            try:
                sock.send(request)
            except OSError as error:
                exchange.error = errno.errorcode.get(error.errno, type(error).__name__)
                exchange.ended = time.perf_counter()
                sock.close()
                continue
            selector.register(sock, selectors.EVENT_READ, exchange)
        else:
            selector.register(sock, selectors.EVENT_WRITE, exchange)

    pending = len(selector.get_map())
    deadline = burst_started + timeout
    while pending:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        for key, events in selector.select(remaining):
            exchange = key.data
            sock = exchange.sock
            done = False
            try:
                if events & selectors.EVENT_WRITE:
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise OSError(code, errno.errorcode.get(code, str(code)))
                    sock.send(request)  # small: goes out whole on a fresh connection
                    selector.modify(sock, selectors.EVENT_READ, exchange)
                    continue
                chunk = sock.recv(65536)
                if chunk:
                    exchange.received += chunk
                    done = exchange.complete()
                else:  # closed: complete if the head came and no length was announced
                    done = True
                    exchange.complete()
                    if exchange.head is None or (
                        exchange.length is not None and len(exchange.received) < exchange.length
                    ):
                        exchange.status, exchange.error = None, "closed early"
            except OSError as error:
                exchange.error = errno.errorcode.get(error.errno, type(error).__name__)
                done = True
            except (ValueError, IndexError):
                exchange.error = "bad response"
                done = True
            if done:
                exchange.ended = time.perf_counter()
                selector.unregister(sock)
                sock.close()
                pending -= 1
    burst = time.perf_counter() - burst_started
    for key in list(selector.get_map().values()):
        key.data.error = "timeout"
        key.data.status = None
        key.fileobj.close()
    selector.close()
    return exchanges, burst


def percentile(sorted_values, p):
    """Nearest-rank percentile of an ascending list."""
    rank = max(1, -(-len(sorted_values) * p // 100))  # ceil
    return sorted_values[int(rank) - 1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/")
    parser.add_argument("--header", action="append", default=[], help="extra, 'Name: value'")
    parser.add_argument("--n", type=int, default=1000, help="concurrent requests")
    parser.add_argument("--timeout", type=float, default=30.0, help="for the whole burst, s")
    parser.add_argument("--wait", type=float, default=15.0, help="for the listener, seconds")
    args = parser.parse_args()
    raise_fd_limit(args.n + 256)

    headers = "".join(f"{h}\r\n" for h in args.header)
    request = (
        f"GET {args.path} HTTP/1.1\r\nHost: {args.host}:{args.port}\r\n{headers}"
        "Connection: close\r\n\r\n"
    ).encode()
    address = (args.host, args.port)
    waited = wait_accepting(address, args.wait)
    exchanges, burst = herd(address, request, args.n, args.timeout)

    now = time.perf_counter()
    latencies = sorted(((e.ended or now) - e.started) * 1000 for e in exchanges)
    statuses, errors = {}, {}
    for e in exchanges:
        if e.error is None and e.status is not None:
            statuses[str(e.status)] = statuses.get(str(e.status), 0) + 1
        else:
            errors[e.error or "?"] = errors.get(e.error or "?", 0) + 1
    result = {
        "n": args.n,
        "ok": sum(n for s, n in statuses.items() if s.startswith("2")),
        "statuses": statuses,
        "errors": errors,
        "waited_for_listener_ms": round(waited * 1000, 1),
        "p50_ms": round(percentile(latencies, 50), 2),
        "p90_ms": round(percentile(latencies, 90), 2),
        "p99_ms": round(percentile(latencies, 99), 2),
        "max_ms": round(latencies[-1], 2),
        "burst_ms": round(burst * 1000, 2),
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
