#!/usr/bin/env python3
"""A counting OAuth2 token endpoint for `make bench` (scripts/bench/run.py).

POST (any path): a client-credentials token response, after --delay seconds; each POST
counts, on arrival. A POST with a `DPoP` header (RFC 9449) gets `"token_type": "DPoP"` if the
proof looks like one (a JWT whose header has `typ` dpop+jwt, an `alg` and a `jwk`, and whose
claims have `htm` POST, `htu`, `iat` and `jti`; the signature is not checked), 400
`invalid_dpop_proof` if not; without the header, `"token_type": "Bearer"` as before. It never
sends a `DPoP-Nonce`. GET /count: {"count": N, "dpop": M}, the POSTs so far and how many of
them carried a `DPoP` header. Anything else: 404.

It binds 127.0.0.1:--port (0 picks a free port) and prints the port it got as the first line
on stdout, then nothing more: run.py reads that line and keeps the pipe open. Standard
library only. It is hit once per bearerd process, so http.server is fast enough.
"""

import argparse
import base64
import binascii
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs


class TokenServer(ThreadingHTTPServer):
    daemon_threads = True
    # A herd never reaches it (bearerd sends one request), but be generous anyway.
    request_queue_size = 128

    def __init__(self, address, delay, expires_in):
        super().__init__(address, Handler)
        self.delay = delay
        self.expires_in = expires_in
        self.count = 0
        self.dpop_count = 0
        self.lock = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: TokenServer

    def do_POST(self):
        proof = self.headers.get("DPoP")
        with self.server.lock:
            self.server.count += 1
            n = self.server.count
            if proof is not None:
                self.server.dpop_count += 1
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        if self.server.delay > 0:
            time.sleep(self.server.delay)
        if form.get("grant_type") != ["client_credentials"]:
            self.reply(400, {"error": "unsupported_grant_type"})
            return
        if proof is not None and not looks_like_proof(proof):
            self.reply(400, {"error": "invalid_dpop_proof"})
            return
        self.reply(
            200,
            {
                "access_token": f"bench-{'dpop-' if proof is not None else ''}token-{n}",
                "token_type": "DPoP" if proof is not None else "Bearer",
                "expires_in": self.server.expires_in,
            },
        )

    def do_GET(self):
        if self.path == "/count":
            with self.server.lock:
                count = self.server.count
                dpop = self.server.dpop_count
            self.reply(200, {"count": count, "dpop": dpop})
        else:
            self.reply(404, {"error": "not_found"})

    def reply(self, status, document):
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass


def looks_like_proof(proof):
    """Whether `proof` is shaped like a DPoP proof for a token request (RFC 9449 §4.2): three
    base64url parts, a JSON header with typ dpop+jwt, alg and jwk, JSON claims with htm POST,
    htu, iat and jti. The signature is not verified (standard library only)."""

    def part(text):
        return json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))

    parts = proof.split(".")
    if len(parts) != 3 or not all(parts):
        return False
    try:
        header, claims = part(parts[0]), part(parts[1])
    except (ValueError, binascii.Error):
        return False
    return (isinstance(header, dict) and isinstance(claims, dict)
            and header.get("typ") == "dpop+jwt" and "alg" in header
            and isinstance(header.get("jwk"), dict)
            and claims.get("htm") == "POST"
            and all(k in claims for k in ("htu", "iat", "jti")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    parser.add_argument("--expires-in", type=int, default=3600, help="token lifetime, seconds")
    args = parser.parse_args()
    server = TokenServer(("127.0.0.1", args.port), args.delay, args.expires_in)
    print(server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
