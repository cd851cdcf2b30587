"""The process node's kubelet endpoint: just `/containerLogs` and `/healthz`, over HTTPS.

`kubectl logs POD` asks the API server, which connects to the address and port in the Node's
`status.daemonEndpoints.kubeletEndpoint` and GETs `/containerLogs/{ns}/{pod}/{container}` with the
query options (follow, tailLines, limitBytes, previous). The API server authenticates with its
kubelet client certificate (signed by the cluster CA); this server requires it. exec, attach and
port-forward are not served (404).
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

# (namespace, pod, container, previous) -> (log file, is the container still running?)
LogLookup = Callable[[str, str, str, bool], tuple[Path, Callable[[], bool]] | None]


def tail_bytes(data: bytes, tail_lines: int | None, limit_bytes: int | None) -> bytes:
    """The kubelet's tailLines then limitBytes, on a whole log."""
    if tail_lines is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail_lines:]) if tail_lines > 0 else b""
    if limit_bytes is not None:
        data = data[:limit_bytes]
    return data


def _handler(lookup: LogLookup) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # quiet: the node logs what matters
            pass

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            url = urlparse(self.path)
            if url.path in ("/healthz", "/readyz"):
                self._send(200, b"ok")
                return
            parts = url.path.strip("/").split("/")
            if len(parts) != 4 or parts[0] != "containerLogs":
                self._send(404, b"the process node serves only /containerLogs and /healthz\n")
                return
            query = {k: v[-1] for k, v in parse_qs(url.query).items()}
            found = lookup(parts[1], parts[2], parts[3], query.get("previous") == "true")
            if found is None:
                self._send(404, f"container {parts[3]!r} of pod {parts[1]}/{parts[2]} has no logs here\n".encode())
                return
            path, running = found
            data = path.read_bytes() if path.exists() else b""
            tail = int(query["tailLines"]) if "tailLines" in query else None
            limit = int(query["limitBytes"]) if "limitBytes" in query else None
            data = tail_bytes(data, tail, limit)
            if query.get("follow") != "true":
                self._send(200, data)
                return
            self._follow(path, data, running)

        def _send(self, code: int, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _follow(self, path: Path, first: bytes, running: Callable[[], bool]) -> None:
            """Stream the log as it grows, until the container stops (chunked encoding)."""
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            offset = path.stat().st_size if path.exists() else 0
            try:
                self._chunk(first)
                while True:
                    alive = running()
                    if path.exists() and path.stat().st_size > offset:
                        with open(path, "rb") as f:
                            f.seek(offset)
                            more = f.read()
                        offset += len(more)
                        self._chunk(more)
                    elif not alive:
                        break
                    else:
                        time.sleep(0.2)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                pass

        def _chunk(self, data: bytes) -> None:
            if data:
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

    return Handler


def serve(lookup: LogLookup, cert: Path, key: Path, ca: Path, host: str = "127.0.0.1",
          port: int = 0) -> ThreadingHTTPServer:
    """Start the endpoint in a daemon thread; `server.server_address[1]` is the port."""
    server = ThreadingHTTPServer((host, port), _handler(lookup))
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.load_verify_locations(str(ca))
    context.verify_mode = ssl.CERT_REQUIRED  # only the API server (cluster-CA client cert) may read logs
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, name="kubelet-server", daemon=True).start()
    return server
