"""A threaded HTTP server on 127.0.0.1 for download tests.

It serves in-memory objects with `Range: bytes=N-` support, answers S3 ListObjectsV2
requests (`/?list-type=2&prefix=...`) in pages, records every request, and injects
faults queued per object.
"""

import base64
import hashlib
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"


class ObjectServer:
    """Serve `objects` ({key: bytes}); use as a context manager, then `server.url`.

    `fault(key, ...)` queues one fault for the next request of `key`:
    `status=503` answers that status; `drop_after=K` declares the full length but sends
    only K bytes and closes; `reset_after=K` sends K bytes, then resets the connection (TCP
    RST); `stall_after=K` sends K bytes, then nothing for `stall` seconds (default 3) before
    closing; `corrupt=True` flips one byte of the body; `length=K` serves only the first K
    bytes as if they were the whole object; `html=True` answers 200 with a web page
    (Content-Type text/html unless `content_type` says otherwise); `ignore_range=True`
    answers 200 with the whole body. `ignore_range` on the server applies to every request.
    """

    def __init__(self, page_size: int = 1000, ignore_range: bool = False):
        self.objects: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.faults: dict[str, list[dict]] = {}
        self.requests: list[dict] = []
        self.page_size = page_size
        self.ignore_range = ignore_range
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def add(self, key: str, data: bytes, etag: str | None = None) -> None:
        self.objects[key] = data
        self.etags[key] = etag or hashlib.md5(data).hexdigest()

    def fault(self, key: str, **fault) -> None:
        self.faults.setdefault(key, []).append(fault)

    def requests_for(self, key: str) -> list[dict]:
        return [r for r in self.requests if r["key"] == key]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()


def _handler(server: ObjectServer):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output quiet
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            key = unquote(parts.path.lstrip("/"))
            with server._lock:
                server.requests.append({"key": key, "query": query, "headers": dict(self.headers)})
                queue = server.faults.get(key, [])
                fault = queue.pop(0) if queue else {}
            if not key and query.get("list-type") == ["2"]:
                return self._listing(query)
            if key not in server.objects:
                return self._send(404, b"<Error><Code>NoSuchKey</Code></Error>")
            if "status" in fault:
                return self._send(fault["status"], b"try later")
            if fault.get("html"):
                page = b"<!DOCTYPE html>\n<html><body>Please sign in</body></html>\n"
                kind = fault.get("content_type", "text/html; charset=utf-8")
                return self._send(200, page, [("Content-Type", kind)] if kind else [])
            data = server.objects[key][: fault.get("length")]
            if fault.get("corrupt"):
                data = data[:100] + bytes([data[100] ^ 0xFF]) + data[101:]
            self._object(data, fault)

        def _send(self, status, body, headers=()):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _object(self, data, fault):
            start = 0
            requested = self.headers.get("Range", "")
            honour = not (server.ignore_range or fault.get("ignore_range"))
            if requested.startswith("bytes=") and honour:
                start = int(requested[6:].rstrip("-"))
                if start >= len(data):
                    return self._send(416, b"", [("Content-Range", f"bytes */{len(data)}")])
            body = data[start:]
            self.send_response(206 if start else 200)
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            cut = min(fault.get(k, len(body)) for k in ("drop_after", "reset_after", "stall_after"))
            self.wfile.write(body[:cut])
            self.wfile.flush()
            if "stall_after" in fault:
                time.sleep(fault.get("stall", 3.0))
            if "reset_after" in fault:  # close with SO_LINGER 0: the client sees a reset
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
                self.connection.close()
            self.close_connection = True

        def _listing(self, query):
            prefix = query.get("prefix", [""])[0]
            keys = sorted(k for k in server.objects if k.startswith(prefix))
            token = query.get("continuation-token", [None])[0]
            start = int(base64.urlsafe_b64decode(token)) if token else 0
            page = keys[start : start + server.page_size]
            truncated = start + server.page_size < len(keys)
            xml = [f'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult xmlns="{S3_NS}">']
            xml.append(f"<Name>bucket</Name><Prefix>{escape(prefix)}</Prefix>")
            xml.append(f"<KeyCount>{len(page)}</KeyCount><MaxKeys>{server.page_size}</MaxKeys>")
            xml.append(f"<IsTruncated>{str(truncated).lower()}</IsTruncated>")
            for key in page:
                xml.append(
                    f"<Contents><Key>{escape(key)}</Key>"
                    "<LastModified>2026-06-22T00:00:00.000Z</LastModified>"
                    f"<ETag>&quot;{server.etags[key]}&quot;</ETag>"
                    f"<Size>{len(server.objects[key])}</Size>"
                    "<StorageClass>STANDARD</StorageClass></Contents>"
                )
            if truncated:
                next_token = base64.urlsafe_b64encode(str(start + server.page_size).encode())
                xml.append(f"<NextContinuationToken>{next_token.decode()}</NextContinuationToken>")
            xml.append("</ListBucketResult>")
            self._send(200, "".join(xml).encode(), [("Content-Type", "application/xml")])

    return Handler
