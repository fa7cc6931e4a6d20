"""The Debian mirror, relayed into a test's network namespace without a route out.

Two halves joined by a Unix socket (a file, so it crosses network namespaces):

* :class:`MirrorProxy` runs in the test process, in the host's namespace: an HTTP/1.1
  server on the Unix socket that answers ``GET`` and ``HEAD`` for paths under the
  mirror's own path (``/debian/...``) by fetching them from the real mirror. Anything
  else is a 403: it serves the mirror's paths only.
* ``python -m tests.mirrorrelay listen PORT SOCKET``, started inside the namespace,
  accepts TCP on ``127.0.0.1:PORT`` and pipes each connection to the socket.

A daemon in the namespace configured with ``debian_mirror = "http://127.0.0.1:PORT/debian"``
then reaches the mirror, and nothing else.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import socketserver
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

UPSTREAM_TIMEOUT_S = 60


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class MirrorProxy:
    """Serve ``upstream``'s paths (``http://host/debian``) on Unix socket ``path``."""

    def __init__(self, upstream: str, path: Path) -> None:
        self.upstream = upstream.rstrip("/")
        self.prefix = urlsplit(self.upstream).path + "/"
        self.path = path
        self.requests: list[str] = []
        self.refused: list[str] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def address_string(self) -> str:
                return "relay"

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

            def _serve(self, body: bool) -> None:
                if not self.path.startswith(proxy.prefix) or ".." in self.path:
                    proxy.refused.append(self.path)
                    self._empty(403)
                    return
                proxy.requests.append(self.path)
                url = proxy.upstream + self.path[len(proxy.prefix) - 1:]
                req = urllib.request.Request(url, method="GET" if body else "HEAD")
                try:
                    resp = urllib.request.urlopen(req, timeout=UPSTREAM_TIMEOUT_S)
                except urllib.error.HTTPError as exc:
                    self._empty(exc.code)
                    return
                except OSError:
                    self._empty(502)
                    return
                with resp:
                    data = resp.read() if body else b""
                    self.send_response(resp.status)
                    length = len(data) if body else int(resp.headers.get("Content-Length", 0))
                    self.send_header("Content-Length", str(length))
                    for h in ("Last-Modified", "Content-Type"):
                        if resp.headers.get(h):
                            self.send_header(h, resp.headers[h])
                    self.end_headers()
                    if body:
                        self.wfile.write(data)

            def _empty(self, code: int) -> None:
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self._server = _UnixHTTPServer(str(path), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


class Relay:
    """The namespace half, as a child process: ``wrap`` runs it in the namespace."""

    def __init__(self, port: int, sock: Path, wrap: Callable[[Sequence[str]], list[str]]
                 ) -> None:
        self.port = port
        self.sock = sock
        self.wrap = wrap
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        root = Path(__file__).resolve().parent.parent
        self.proc = subprocess.Popen(
            self.wrap([sys.executable, "-m", "tests.mirrorrelay", "listen", str(self.port),
                       str(self.sock)]),
            cwd=root, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            raise RuntimeError("the mirror relay did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := src.recv(1 << 16):
            dst.sendall(data)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


def _serve_connection(conn: socket.socket, sock: str) -> None:
    up = socket.socket(socket.AF_UNIX)
    try:
        up.connect(sock)
    except OSError:
        conn.close()
        return
    t = threading.Thread(target=_pipe, args=(up, conn), daemon=True)
    t.start()
    _pipe(conn, up)
    t.join()
    conn.close()
    up.close()


def listen(port: int, sock: str) -> None:
    srv = socket.create_server(("127.0.0.1", port))
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=_serve_connection, args=(conn, sock), daemon=True).start()


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "listen":
        listen(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: python -m tests.mirrorrelay listen PORT SOCKET")
