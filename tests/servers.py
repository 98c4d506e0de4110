"""Real servers on 127.0.0.1 for the remote-reading tests and benchmarks (never the network).

* :class:`Nginx`: Debian's ``nginx`` serving a folder with Range support, an optional
  per-connection ``limit_rate``, and an access log of the bytes it sent per request.
* :class:`FaultyProxy`: a small threaded HTTP/1.1 proxy in front of it that injects 503s, dropped
  connections and truncated bodies from a seeded random sequence, and can add latency.
* :class:`LatencyProxy`: a TCP relay that holds every chunk of the server's answers for a fixed
  time before passing it on: a round trip ``delay`` longer, the way a distant store is, at almost
  no CPU (no HTTP parsing, one upstream connection per client connection), where ``tc netem``
  is not available (this machine's kernel has no netem).
* :func:`moto_s3`: moto's S3 server mode, as s3fs's own tests use it.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for(
    port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 10.0
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class Nginx:
    """``nginx`` serving ``root`` on ``127.0.0.1:<free port>`` (config and logs under ``workdir``)."""

    def __init__(self, root: Path, workdir: Path, *, limit_rate: str | None = None) -> None:
        if NGINX is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        self.root, self.workdir = Path(root).resolve(), Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.access_log = self.workdir / "access.log"
        rate = f"limit_rate {limit_rate};" if limit_rate else ""
        temps = "\n".join(
            f"  {k}_temp_path {self.workdir}/{k};"
            for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        conf = f"""daemon off;
master_process off;
worker_processes 1;
pid {self.workdir}/nginx.pid;
error_log {self.workdir}/error.log warn;
events {{ worker_connections 512; }}
http {{
{temps}
  types {{ }}
  default_type application/octet-stream;
  log_format sent '$status $bytes_sent $body_bytes_sent "$request" "$http_range"';
  access_log {self.access_log} sent;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{self.port};
    root {self.root};
    location / {{ {rate} }}
  }}
}}
"""
        self.conf = self.workdir / "nginx.conf"
        self.conf.write_text(conf)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        self.proc = subprocess.Popen(
            [
                str(NGINX),
                "-e",
                str(self.workdir / "error.log"),
                "-p",
                str(self.workdir),
                "-c",
                str(self.conf),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _wait_for(self.port, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def bytes_sent(self) -> tuple[int, int]:
        """``(requests, bytes sent including headers)`` logged so far (nginx flushes per request)."""
        n = total = 0
        if self.access_log.exists():
            for line in self.access_log.read_text().splitlines():
                n += 1
                total += int(line.split()[1])
        return n, total

    def reset_log(self) -> None:
        if self.access_log.exists():
            self.access_log.write_text("")  # nginx appends to the same open file (O_APPEND)

    def __enter__(self) -> Nginx:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


_FORWARD = (
    "Content-Length",
    "Content-Range",
    "Content-Type",
    "ETag",
    "Last-Modified",
    "Accept-Ranges",
)


class FaultyProxy:
    """An HTTP proxy to ``upstream`` that breaks some responses, deterministically (module docs).

    Args:
        upstream: ``host:port`` of the real server.
        fault_rate: share of requests that fail, drawn from ``random.Random(seed)`` in arrival order.
        faults: the kinds drawn from, in turn: ``"503"``, ``"drop"`` (close without answering),
            ``"truncate"`` (headers with the full length, then half the body, then close).
        fail_paths: paths that fail every time (a dead object).
        delay: seconds added before every response (latency).

    ``max_in_flight`` and ``max_paths_in_flight`` record the most requests, and the most distinct
    objects, that were being answered at once.
    """

    def __init__(
        self,
        upstream: str,
        *,
        fault_rate: float = 0.0,
        faults: Sequence[str] = ("503", "drop", "truncate"),
        seed: int = 0,
        fail_paths: Sequence[str] = (),
        delay: float = 0.0,
    ) -> None:
        self.upstream = upstream
        self.fault_rate, self.faults = fault_rate, list(faults)
        self.rng = random.Random(seed)
        self.fail_paths = set(fail_paths)
        self.delay = delay
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.in_flight: Counter[str] = Counter()  # requests being answered, by path
        self.max_in_flight = 0  # most requests answered at once
        self.max_paths_in_flight = 0  # most distinct objects among them
        self._turn = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _serve(self, head: bool) -> None:
                with proxy.lock:
                    proxy.in_flight[self.path] += 1
                    proxy.max_in_flight = max(proxy.max_in_flight, proxy.in_flight.total())
                    busy = sum(1 for v in proxy.in_flight.values() if v)
                    proxy.max_paths_in_flight = max(proxy.max_paths_in_flight, busy)
                try:
                    self._answer(head)
                finally:
                    with proxy.lock:
                        proxy.in_flight[self.path] -= 1

            def _answer(self, head: bool) -> None:
                fault = proxy._draw(self.path)
                if proxy.delay:
                    time.sleep(proxy.delay)
                if fault == "drop":
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if fault == "503":
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                try:
                    headers = {
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() in ("range", "accept-encoding")
                    }
                    conn.request("HEAD" if head else "GET", self.path, headers=headers)
                    r = conn.getresponse()
                    body = r.read()
                finally:
                    conn.close()
                self.send_response(r.status)
                for k in _FORWARD:
                    if r.getheader(k) is not None:
                        self.send_header(k, r.getheader(k) or "")
                self.end_headers()
                if head:
                    return
                if fault == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _draw(self, path: str) -> str | None:
        with self.lock:
            self.counts["requests"] += 1
            if path in self.fail_paths:
                self.counts["503"] += 1
                return "503"
            if self.fault_rate and self.rng.random() < self.fault_rate:
                kind = self.faults[self._turn % len(self.faults)]
                self._turn += 1
                self.counts[kind] += 1
                return kind
            return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class LatencyProxy:
    """A TCP relay to ``upstream`` adding ``delay`` seconds to every server-to-client chunk.

    Every chunk read from the server is forwarded ``delay`` seconds after it arrived, in order,
    so each request's answer starts ``delay`` later and a stream is only shifted, not slowed
    (it models propagation delay, not bandwidth). Runs an asyncio loop in a child process.

    Example::

        with Nginx(folder, tmp) as server, LatencyProxy(f"127.0.0.1:{server.port}", 0.01) as p:
            fetch(f"{p.url}/shard-000000.tar")
    """

    def __init__(self, upstream: str, delay: float) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay = delay
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop: Any = None

    async def _pipe(self, reader: Any, writer: Any, delay: float) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    break
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(chunk)
                await writer.drain()
            with contextlib.suppress(OSError):
                writer.close()

        sender = asyncio.ensure_future(send())
        try:
            while True:
                chunk = await reader.read(1 << 16)
                await queue.put((loop.time() + delay, chunk))
                if not chunk:
                    break
        except OSError:
            await queue.put((0.0, b""))
        await sender

    async def _client(self, creader: Any, cwriter: Any) -> None:
        import asyncio

        try:
            ureader, uwriter = await asyncio.open_connection(*self.upstream)
            await asyncio.gather(
                self._pipe(creader, uwriter, 0.0),
                self._pipe(ureader, cwriter, self.delay),
                return_exceptions=True,
            )
        except (OSError, asyncio.CancelledError):  # refused upstream, or the relay stopping
            pass
        finally:
            cwriter.close()

    def _serve(self, started: Any) -> None:
        import asyncio

        loop = asyncio.new_event_loop()
        self._loop = loop
        server = loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port, backlog=512)
        )
        started.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.close()

    def __enter__(self) -> LatencyProxy:
        import multiprocessing

        # A process of its own: in a thread the relay would share the GIL with the reader it
        # delays (and only that side: webdataset's stream reads through a curl subprocess).
        ctx = multiprocessing.get_context("fork")
        started = ctx.Event()
        self._proc = ctx.Process(target=self._serve, args=(started,), daemon=True)
        self._proc.start()
        started.wait(10)
        _wait_for(self.port)
        return self

    def __exit__(self, *exc: object) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            proc.terminate()
            proc.join(5)


@contextlib.contextmanager
def moto_s3(bucket: str, files: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """moto's S3 server on 127.0.0.1 holding ``files`` in ``bucket``; yields s3fs storage_options."""
    import boto3
    from moto.server import ThreadedMotoServer

    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        s3.create_bucket(Bucket=bucket)
        for f in files:
            s3.upload_file(str(f), bucket, Path(f).name)
        yield {
            "key": "testing",
            "secret": "testing",
            "skip_instance_cache": True,
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
