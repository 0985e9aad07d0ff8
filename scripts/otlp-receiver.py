#!/usr/bin/env python3
"""Minimal OTLP/HTTP trace receiver for tests.

Usage: python3 scripts/otlp-receiver.py --port PORT --out FILE [--host 127.0.0.1] [--verbose]

Serves POST /v1/traces on HTTP (host 127.0.0.1 by default; --port 0 picks a free port) and accepts
  * Content-Type application/x-protobuf (OTLP/HTTP binary, what opentelemetry-otlp sends), and
  * Content-Type application/json (OTLP/HTTP JSON: ids as hex strings, as the spec requires),
either optionally with Content-Encoding gzip (or deflate). Each span becomes one JSON line in FILE
(appended, flushed after every request):
  {"trace_id": hex, "span_id": hex, "parent_span_id": hex or "", "name": str, "kind": int,
   "start_ns": int, "end_ns": int, "attributes": {...}, "events": [...], "status": {...},
   "resource": {...}, "scope": str}
and the reply is 200 with an empty ExportTraceServiceResponse in the request's encoding.
Once the socket is bound it prints `listening PORT` on stdout (flushed), so a test can wait for it.

Needs: pip install opentelemetry-proto (brings protobuf).
"""

import argparse
import base64
import gzip
import json
import signal
import sys
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
ID_KEYS = ("traceId", "spanId", "parentSpanId")


def any_value(v):
    """Convert an opentelemetry.proto.common.v1.AnyValue to a plain JSON value."""
    which = v.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(x) for x in v.array_value.values]
    if which == "kvlist_value":
        return attributes(v.kvlist_value.values)
    if which == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, which)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def span_records(req):
    for rs in req.resource_spans:
        resource = attributes(rs.resource.attributes)
        for ss in rs.scope_spans:
            scope = ss.scope.name
            for sp in ss.spans:
                yield {
                    "trace_id": sp.trace_id.hex(),
                    "span_id": sp.span_id.hex(),
                    "parent_span_id": sp.parent_span_id.hex(),
                    "name": sp.name,
                    "kind": sp.kind,
                    "start_ns": sp.start_time_unix_nano,
                    "end_ns": sp.end_time_unix_nano,
                    "attributes": attributes(sp.attributes),
                    "events": [
                        {"name": ev.name, "time_ns": ev.time_unix_nano,
                         "attributes": attributes(ev.attributes)}
                        for ev in sp.events
                    ],
                    "status": {"code": sp.status.code, "message": sp.status.message},
                    "resource": resource,
                    "scope": scope,
                }


def hex_ids_to_base64(node):
    """OTLP/JSON carries trace/span ids as hex; protobuf's JSON mapping expects base64 bytes."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ID_KEYS and isinstance(v, str):
                node[k] = base64.b64encode(bytes.fromhex(v)).decode("ascii")
            else:
                hex_ids_to_base64(v)
    elif isinstance(node, list):
        for v in node:
            hex_ids_to_base64(v)
    return node


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: reqwest reuses its connection
    server_version = "illmrec-otlp-receiver"

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("otlp-receiver: %s\n" % (fmt % args))

    def reply(self, code, body=b"", ctype=PROTOBUF):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def fail(self, code, msg):
        self.log_message("%d %s", code, msg)
        self.reply(code, msg.encode() + b"\n", "text/plain; charset=utf-8")

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self):
        self.fail(405, "only POST /v1/traces is served")

    def do_POST(self):
        body = self.read_body()
        if self.path.split("?")[0].rstrip("/") != "/v1/traces":
            return self.fail(404, "unknown path %s (only /v1/traces)" % self.path)
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        encoding = self.headers.get("Content-Encoding", "identity").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                return self.fail(415, "unsupported Content-Encoding %s" % encoding)
        except (OSError, EOFError, zlib.error) as e:
            return self.fail(400, "bad %s body: %s" % (encoding, e))
        req = trace_service_pb2.ExportTraceServiceRequest()
        try:
            if ctype == PROTOBUF:
                req.ParseFromString(body)
            elif ctype == JSON:
                data = hex_ids_to_base64(json.loads(body or b"{}"))
                json_format.ParseDict(data, req, ignore_unknown_fields=True)
            else:
                return self.fail(415, "unsupported Content-Type %r" % ctype)
        except (DecodeError, json_format.ParseError, ValueError) as e:
            return self.fail(400, "cannot decode ExportTraceServiceRequest: %s" % e)
        lines = [json.dumps(rec, separators=(",", ":")) + "\n" for rec in span_records(req)]
        with self.server.lock:
            self.server.out.writelines(lines)
            self.server.out.flush()
        self.log_message("%d span(s) from %s", len(lines), self.client_address[0])
        resp = trace_service_pb2.ExportTraceServiceResponse()
        if ctype == JSON:
            self.reply(200, json_format.MessageToJson(resp).encode(), JSON)
        else:
            self.reply(200, resp.SerializeToString(), PROTOBUF)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True, help="TCP port (0: pick a free one)")
    ap.add_argument("--out", required=True, help="JSON-lines file the spans are appended to")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = ap.parse_args(argv)

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.verbose = args.verbose
    server.out = open(args.out, "a", encoding="utf-8")
    # SIGTERM (e.g. Popen.terminate()) ends serve_forever() cleanly, like Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print("listening %d" % server.server_address[1], flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
