"""A real OTLP/HTTP trace receiver for tests/interop/telemetry.rs.

Binds 127.0.0.1 on a port the OS picks and prints `listening PORT`; then, for each
`POST /v1/traces`, decodes the body as an ExportTraceServiceRequest (protobuf, the
`opentelemetry-proto` package) and prints one JSON line per span:

    {"service": ..., "trace_id": hex, "span_id": hex, "parent_span_id": hex, "name": ...,
     "kind": int, "status": int, "attributes": {...}, "links": [{"trace_id", "span_id"}]}

`--answer ok` (default) answers 200 with an ExportTraceServiceResponse; `--answer 503`
answers that status; `--answer hang` reads the request and never answers (a stuck
collector). Every request is also announced as `request N` before it is answered.
"""

import argparse
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

lock = threading.Lock()
requests = 0


def say(line):
    with lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def value(any_value):
    kind = any_value.WhichOneof("value")
    return getattr(any_value, kind) if kind else None


def attributes(pairs):
    return {pair.key: value(pair.value) for pair in pairs}


class Handler(BaseHTTPRequestHandler):
    answer = "ok"

    def log_message(self, *args):
        pass

    def do_POST(self):
        global requests
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with lock:
            requests += 1
            n = requests
        say(f"request {n}")
        if self.path != "/v1/traces":
            self.send_response(404)
            self.end_headers()
            return
        if self.answer == "hang":
            threading.Event().wait()
        if self.answer != "ok":
            self.send_response(int(self.answer))
            self.send_header("content-length", "0")
            self.end_headers()
            return
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            service = attributes(resource_spans.resource.attributes).get("service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    say(json.dumps({
                        "service": service,
                        "content_type": self.headers.get("content-type"),
                        "trace_id": span.trace_id.hex(),
                        "span_id": span.span_id.hex(),
                        "parent_span_id": span.parent_span_id.hex(),
                        "name": span.name,
                        "kind": span.kind,
                        "status": span.status.code,
                        "attributes": attributes(span.attributes),
                        "links": [
                            {"trace_id": link.trace_id.hex(), "span_id": link.span_id.hex()}
                            for link in span.links
                        ],
                    }))
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--answer", default="ok")
    Handler.answer = parser.parse_args().answer
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    say(f"listening {server.server_address[1]}")
    server.serve_forever()


if __name__ == "__main__":
    main()
