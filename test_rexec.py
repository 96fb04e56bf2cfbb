"""Tests for rexec: real servers on port 0, real sockets, real children, curl.

Run them:        python3 -m unittest -v test_rexec
Run benchmarks:  python3 test_rexec.py bench [--json FILE]

Every server runs in a child process of its own (so signals, descriptors and
process groups are as in production) and logs to a pipe that the test reads.
"""

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
REXEC = os.path.join(HERE, "rexec.py")
sys.path.insert(0, HERE)
import rexec  # noqa: E402

CURL = shutil.which("curl")
SERVING = re.compile(r"Serving on (\S+) port (\d+)")


# --------------------------------------------------------------------------
# Helpers: a server in a child process, and a small HTTP/1.1 client
# --------------------------------------------------------------------------

class Server:
    """A rexec server in a child process, bound to a free loopback port."""

    def __init__(self, *args, env=None, ip="127.0.0.1", pass_fds=()):
        full_env = dict(os.environ)
        full_env.pop("REXEC_TOKEN", None)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, REXEC, "-i", ip, "-p", "0"] + list(args),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=full_env, pass_fds=pass_fds)
        self.lines = []
        self._lines_lock = threading.Lock()
        first = self._read_until_serving()
        self.host, self.port = first.group(1), int(first.group(2))
        self._reader = threading.Thread(target=self._collect, daemon=True)
        self._reader.start()

    def _read_until_serving(self):
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline().decode("utf-8", "replace")
            if not line:
                raise RuntimeError("server exited: %s" % "".join(self.lines))
            self.lines.append(line)
            match = SERVING.search(line)
            if match:
                return match
        raise RuntimeError("server did not start")

    def _collect(self):
        for raw in self.proc.stderr:
            with self._lines_lock:
                self.lines.append(raw.decode("utf-8", "replace"))

    def log(self):
        with self._lines_lock:
            return "".join(self.lines)

    def wait_log(self, pattern, timeout=10):
        """Wait for a log line matching `pattern`; return the match."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log())
            if match:
                return match
            time.sleep(0.02)
        raise AssertionError("no log line matches %r in:\n%s" % (pattern, self.log()))

    def stop(self, sig=signal.SIGTERM, timeout=30):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            status = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            status = self.proc.wait()
        self._reader.join(5)
        self.proc.stderr.close()
        return status

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def connect(self, timeout=10):
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


class Response:
    """An HTTP response read off a socket, byte by byte, trailers included."""

    def __init__(self, status, reason, headers, body, chunks, trailers, raw):
        self.status, self.reason, self.headers = status, reason, headers
        self.body, self.chunks, self.trailers, self.raw = body, chunks, trailers, raw

    def json(self):
        return json.loads(self.body.decode("utf-8"))


class Conn:
    """One client connection; requests are written raw and responses parsed strictly."""

    def __init__(self, server, timeout=20, sock=None):
        self.sock = sock or server.connect(timeout)
        self.file = self.sock.makefile("rb")

    def close(self):
        self.file.close()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def send(self, method, path, body=None, headers=None, version="HTTP/1.1"):
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
        lines = ["%s %s %s" % (method, path, version), "Host: test"]
        for name, value in (headers or {}).items():
            lines.append("%s: %s" % (name, value))
        if body is not None and not any(k.lower() == "content-length" for k in (headers or {})):
            lines.append("Content-Length: %d" % len(body))
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))

    def head(self):
        """Read a status line and headers: (status, reason, headers dict lower-cased, raw)."""
        raw = b""
        status_line = self.file.readline()
        raw += status_line
        if not status_line:
            raise ConnectionError("connection closed before a response")
        _, status, reason = status_line.decode("latin-1").rstrip("\r\n").split(" ", 2)
        headers = {}
        while True:
            line = self.file.readline()
            raw += line
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(status), reason, headers, raw

    def response(self, on_chunk=None):
        status, reason, headers, raw = self.head()
        while status == 100:
            status, reason, headers, more = self.head()
            raw += more
        chunks, trailers = [], {}
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size_line = self.file.readline()
                raw += size_line
                size = int(size_line, 16)
                if size == 0:
                    break
                data = self.file.read(size)
                crlf = self.file.read(2)
                raw += data + crlf
                assert crlf == b"\r\n", crlf
                chunks.append(data)
                if on_chunk:
                    on_chunk(data)
            while True:
                line = self.file.readline()
                raw += line
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode("latin-1").partition(":")
                trailers[name.strip()] = value.strip()
            body = b"".join(chunks)
        elif "content-length" in headers:
            body = self.file.read(int(headers["content-length"]))
            raw += body
        else:
            body = self.file.read()
            raw += body
        return Response(status, reason, headers, body, chunks, trailers, raw)

    def request(self, method, path, body=None, headers=None, **kw):
        self.send(method, path, body, headers, **kw)
        return self.response()


def run(server, spec, **kw):
    """POST spec on a new connection and read the whole response."""
    with Conn(server) as conn:
        return conn.request("POST", "/process", spec, **kw)


def pid_alive(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(predicate, timeout=10, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def children_of(pid):
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                pass
    return found


class ServerTestCase(unittest.TestCase):
    """Starts one server per test (arguments in `server_args`) and stops it after."""

    server_args = ()
    server_env = None

    def setUp(self):
        self.server = Server(*self.server_args, env=self.server_env)
        self.addCleanup(self.server.stop)

    def ps(self):
        with Conn(self.server) as conn:
            return conn.request("GET", "/process").json()


# --------------------------------------------------------------------------
# Issue 2: the core
# --------------------------------------------------------------------------

class StreamTests(ServerTestCase):

    def test_framing_is_byte_exact(self):
        response = run(self.server, {"alias": "a", "cmd": "printf", "args": ["hello"]})
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["transfer-encoding"], "chunked")
        self.assertEqual(response.headers["trailer"], "Rexec-Exit-Code, Rexec-Reason")
        body = response.raw.split(b"\r\n\r\n", 1)[1]
        self.assertEqual(body, b"5\r\nhello\r\n0\r\nRexec-Exit-Code: 0\r\nRexec-Reason: exit\r\n\r\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        sys.exit(bench_main(sys.argv[2:]))  # noqa: F821 -- defined in the benchmark section
    unittest.main()
