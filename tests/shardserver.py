"""A web server on loopback that serves a dataset folder, and whose shards can misbehave as storage does: stall
half-way, trickle, reset the connection half-way (every time, or once per file), with or without Range requests;
or as a misconfigured web server does: redirect in a loop, answer with a web page.

    python tests/shardserver.py DATA MODE [--no-ranges]    # prints its URL, serves until killed (for trying by hand)
"""

from __future__ import annotations

import http.server
import re
import socket
import struct
import sys
import threading
import time
from pathlib import Path

MODES = ("ok", "stall", "trickle", "reset", "reset-once", "loop", "html")
TRICKLE = (10, 0.3)  # bytes sent one at a time, seconds apart


class ShardServer(http.server.ThreadingHTTPServer):
    """`mode` says what a request for a `.tar` does: ok; stall (half the bytes, then nothing until the server
    closes); trickle (half the bytes, then TRICKLE's bytes one by one, then the rest); reset (half the bytes, then
    a TCP reset); reset-once (a reset the first time each shard is asked for, all of it after); loop (a redirect to
    itself); html (a web page, as a login page is). `requests` logs (path, Range header or None) of every
    request."""

    daemon_threads = True

    def __init__(self, root: Path, mode: str = "ok", ranges: bool = True) -> None:
        assert mode in MODES, mode
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.mode, self.ranges = Path(root), mode, ranges
        self.requests: list[tuple[str, str | None]] = []
        self.closing = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> ShardServer:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.closing.set()  # stalled handlers end
        self.shutdown()
        self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ShardServer

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        server, path = self.server, self.path.lstrip("/")
        wanted = self.headers.get("Range")
        earlier = sum(p == path for p, _ in server.requests)
        server.requests.append((path, wanted))
        file = server.root / path
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        if path.endswith(".tar") and server.mode in ("loop", "html"):
            self._misdirect(server.mode)
            return
        start = int(re.fullmatch(r"bytes=(\d+)-", wanted)[1]) if wanted and server.ranges else 0
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        misbehave = path.endswith(".tar") and (
            server.mode in ("stall", "reset") or (server.mode == "reset-once" and not earlier)
        )
        if not misbehave and server.mode != "trickle":
            self.wfile.write(body)
            return
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        if server.mode == "trickle":
            count, pause = TRICKLE
            for at in range(len(body) // 2, len(body) // 2 + count):
                time.sleep(pause)
                self.wfile.write(body[at : at + 1])
                self.wfile.flush()
            self.wfile.write(body[len(body) // 2 + count :])
        elif server.mode == "stall":
            server.closing.wait()
        else:  # a close with SO_LINGER 0 sends a TCP reset
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
        self.close_connection = True

    def _misdirect(self, mode: str) -> None:
        if mode == "loop":
            self.send_response(302)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        page = b"<!doctype html><html><body>Please log in</body></html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)


if __name__ == "__main__":
    with ShardServer(Path(sys.argv[1]), sys.argv[2], ranges="--no-ranges" not in sys.argv) as running:
        print(running.url, flush=True)
        threading.Event().wait()
