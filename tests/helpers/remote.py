"""Real servers on loopback for the remote-data tests: an HTTP file server with Range support and
injected faults, and moto's standalone S3 server.

    with serve_http(root) as server:            # server.url -> "http://127.0.0.1:PORT"
        server.faults["/train/train-000001.tar"] = [Drop(5000), Status(503)]
        ...                                       # each request of that path takes the next fault
        server.logins["127.0.0.1:PORT"] = "Basic ..."  # requests with that Host header need it (else 401)
        server.seen                               # (Host, path, Authorization or None) of every request
    s3 = S3Server(); env = s3.env(); ...; s3.stop() # env: AWS_* variables pointing boto3 at the server
"""

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from typing import Dict, List, Optional


@dataclass
class Drop:
    """Send the headers of the whole answer, then ``at`` bytes of the body, then close the connection."""

    at: int


@dataclass
class Status:
    """Answer with this HTTP status (503, 403, 404, ...) and no body."""

    code: int


@dataclass
class Drip:
    """Send the headers of the whole answer, then ``count`` bytes of the body one at a time, one every
    ``interval`` seconds (a server that is slow but never silent for a whole timeout), then close."""

    interval: float
    count: int


@dataclass
class Partial:
    """Answer 206 from byte ``start`` (None: from the byte asked for, but without a Content-Range header),
    with a Content-Range that states the object size plus ``grown`` bytes: a broken proxy or server."""

    start: Optional[int]
    grown: int = 0


@dataclass
class Stall:
    """Wait ``seconds`` before answering (normally)."""

    seconds: float


@dataclass
class Redirect:
    """Answer 302 with this Location ("{url}" in it is the server's own URL)."""

    location: str


class _Handler(SimpleHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def do_GET(self):  # noqa: N802 (http.server's naming)
        server = self.server
        host, authorization = self.headers.get("Host"), self.headers.get("Authorization")
        with server.lock:
            server.requests.append(self.path)
            server.seen.append((host, self.path, authorization))
            queue = server.faults.get(self.path)
            fault = queue.pop(0) if queue else None
        if isinstance(fault, Stall):
            time.sleep(fault.seconds)
        if host in server.logins and authorization != server.logins[host]:
            self.send_error(401)
            return
        if isinstance(fault, Redirect):
            self.send_response(302)
            self.send_header("Location", fault.location.format(url=server.url))
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if isinstance(fault, Status) or self.path in server.forbidden:
            self.send_error(fault.code if fault else 403)
            return
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404)
            return
        with open(path, "rb") as f:
            data = f.read()
        start = 0
        header = self.headers.get("Range")
        if isinstance(fault, Partial):
            start = int(header.split("=")[1].split("-")[0]) if fault.start is None else fault.start
            self.send_response(206)
            if fault.start is not None or fault.grown:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data) + fault.grown}")
        elif header and server.ranges:
            start = int(header.split("=")[1].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if isinstance(fault, Drip):
            try:
                for i in range(fault.count):
                    self.wfile.write(body[i:i + 1])
                    self.wfile.flush()
                    time.sleep(fault.interval)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on it
                pass
            self.close_connection = True
            return
        if isinstance(fault, Drop):
            self.wfile.write(body[:fault.at])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the stream end before Content-Length
            return
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # a client that stops reading (a size cap, a test)
            self.close_connection = True


@contextlib.contextmanager
def serve_http(root, ranges: bool = True):
    """A threaded HTTP server of ``root`` on 127.0.0.1 (``ranges``: honour Range requests)."""

    class Handler(_Handler):
        def __init__(self, *args, **kw):
            super().__init__(*args, directory=str(root), **kw)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.lock = threading.Lock()
    server.faults: Dict[str, List[object]] = {}
    server.forbidden = set()
    server.requests: List[str] = []
    server.seen: List[tuple] = []
    server.logins: Dict[str, str] = {}
    server.ranges = ranges

    def reset():  # no faults, refusals or records left over from another test
        for record in (server.faults, server.forbidden, server.requests, server.seen, server.logins):
            record.clear()
        return server

    server.reset = reset
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class S3Server:
    """moto's standalone S3 server in its own process on 127.0.0.1. It starts at construction (moto's
    imports take seconds, so a module fixture starts it early) and ``env()`` waits until it answers."""

    def __init__(self):
        from moe_dist.distributed import free_port

        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def env(self, timeout: float = 120.0) -> Dict[str, str]:
        """The environment that points boto3 at the server (credentials are moto's dummies)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto's S3 server did not start (exit {self.proc.poll()})") from None
                time.sleep(0.2)
        return {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}", "AWS_ACCESS_KEY_ID": "testing",
                "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
