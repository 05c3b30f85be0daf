"""The fault proxies themselves, on real loopback sockets: each mode does what it says, and seeds repeat."""

from __future__ import annotations

import http.client
import http.server
import socket
import threading
import time

import pytest

from http_faults import HTTPFaultProxy
from proxy import FaultProxy


class Upstream:
    """A TCP server that records what it receives and echoes it back."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        with conn:
            try:
                while data := conn.recv(65536):
                    self.received += data
                    conn.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.close()


@pytest.fixture
def proxy(upstream):
    p = FaultProxy(upstream.port, seed=5)
    yield p
    p.close()


def roundtrip(port: int, payload: bytes, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while data := s.recv(65536):
            out += data
        return bytes(out)


def test_pass_delay_and_throttle_deliver_every_byte(proxy):
    payload = bytes(range(256)) * 1024
    assert roundtrip(proxy.port, payload) == payload
    assert proxy.landed == 0
    proxy.mode("delay", 5, jitter=2)
    assert roundtrip(proxy.port, payload) == payload
    proxy.mode("throttle", 4 << 20)
    assert roundtrip(proxy.port, payload) == payload
    assert proxy.landed > 0


def test_cut_after_n_bytes_forwards_exactly_n_then_drops_the_link(proxy, upstream):
    proxy.mode("cut", 1000)
    got = _read_until_closed(proxy.port, b"x" * 5000)
    wait_for(lambda: len(upstream.received) >= 1000)
    assert len(upstream.received) == 1000
    assert len(got) <= 1000  # the echo of what got through, at most
    proxy.heal()
    assert roundtrip(proxy.port, b"after") == b"after"


def wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def _read_until_closed(port: int, payload: bytes) -> bytes:
    out = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(payload)
            while data := s.recv(65536):
                out += data
        except (ConnectionResetError, BrokenPipeError):
            pass
    return bytes(out)


def test_reset_sends_rst_to_new_and_open_connections(proxy):
    open_conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    open_conn.sendall(b"hello")
    assert open_conn.recv(5) == b"hello"
    proxy.mode("reset")
    with pytest.raises(ConnectionResetError):
        open_conn.sendall(b"more")
        open_conn.recv(10) or open_conn.recv(10)  # RST: the next read or write fails
    open_conn.close()
    with pytest.raises(ConnectionResetError):
        roundtrip(proxy.port, b"new")


def test_blackhole_reads_but_never_answers_or_forwards(proxy, upstream):
    proxy.mode("blackhole")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=0.5) as s:
        s.sendall(b"anyone there?" * 1000)
        with pytest.raises(socket.timeout):
            s.recv(1)
    assert upstream.received == b""
    assert proxy.landed >= 1


def test_unknown_mode_is_refused_with_the_choices(proxy):
    with pytest.raises(ValueError, match="use one of pass, delay"):
        proxy.mode("flaky")


# --- HTTP ---------------------------------------------------------------------------------------

class Handler(http.server.BaseHTTPRequestHandler):
    def do_PUT(self):  # noqa: N802 - http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(201)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_upstream():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def put(port: int, body: bytes) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("PUT", "/devstoreaccount1/c/blob", body=body)
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def test_http_proxy_forwards_or_answers_azure_style_errors(http_upstream):
    proxy = HTTPFaultProxy(http_upstream, seed=3)
    try:
        assert put(proxy.port, b"block")[:2] == (201, b"block")
        proxy.configure(1.0, ("503",))
        status, body, headers = put(proxy.port, b"x" * 100_000)
        assert status == 503 and headers["x-ms-error-code"] == "ServerBusy" and b"<Code>ServerBusy" in body
        proxy.configure(1.0, ("500",))
        assert put(proxy.port, b"y")[0] == 500
        proxy.configure(1.0, ("stall",), stall_seconds=0.2)
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            put(proxy.port, b"z")
        proxy.heal()
        assert put(proxy.port, b"again")[:2] == (201, b"again")
        assert proxy.landed == 3
    finally:
        proxy.close()


def test_http_fault_decisions_repeat_with_the_seed(http_upstream):
    def decisions(seed: int) -> list[int]:
        proxy = HTTPFaultProxy(http_upstream, seed=seed)
        try:
            proxy.configure(0.5, ("500", "503"))
            return [put(proxy.port, b"b")[0] for _ in range(12)]
        finally:
            proxy.close()

    first = decisions(11)
    assert first == decisions(11)
    assert set(first) > {201}  # some requests got through, some did not
