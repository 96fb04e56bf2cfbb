"""Tests for rexec: real servers on port 0, real sockets, real children, curl.

Run them:        python3 -m unittest -v test_rexec
Run benchmarks:  python3 test_rexec.py bench [--quick] [--json FILE] [--only PARTS]

Every server runs in a child process of its own (so signals, descriptors and
process groups are as in production) and logs to a pipe that the test reads.
"""

import contextlib
import json
import math
import os
import re
import resource
import select
import selectors
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

    def __init__(self, *args, env=None, ip="127.0.0.1", pass_fds=(), prelude=None, argv=None):
        """`prelude` is Python run inside the server process before main(), to
        shorten a constant or break something on purpose; `argv` replaces the
        whole command line."""
        full_env = dict(os.environ)
        full_env.pop("REXEC_TOKEN", None)
        full_env.update(env or {})
        command = argv or [sys.executable, REXEC, "-i", ip, "-p", "0"] + list(args)
        if prelude:
            command = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import rexec; %s; "
                       "sys.exit(rexec.main(sys.argv[1:]))" % (HERE, prelude)] + command[2:]
        self.proc = subprocess.Popen(
            command,
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
        return self.rest(status, reason, headers, raw, on_chunk)

    def rest(self, status=200, reason="OK", headers=None, raw=b"", on_chunk=None):
        """Read the body after a head (by default, of a chunked 200)."""
        headers = {"transfer-encoding": "chunked"} if headers is None else headers
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
    except (FileNotFoundError, ProcessLookupError):
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

    def test_no_output_is_just_the_last_chunk(self):
        response = run(self.server, {"alias": "a", "cmd": "true"})
        self.assertEqual(response.raw.split(b"\r\n\r\n", 1)[1],
                         b"0\r\nRexec-Exit-Code: 0\r\nRexec-Reason: exit\r\n\r\n")

    def test_binary_output_is_unchanged(self):
        data = bytes(range(256)) * 300 + b"\r\n0\r\n\r\n\x00"
        path = os.path.join(self.enterContext_tmp(), "blob")
        with open(path, "wb") as handle:
            handle.write(data)
        response = run(self.server, {"alias": "a", "cmd": "cat", "args": [path]})
        self.assertEqual(response.body, data)
        self.assertTrue(all(response.chunks), "an empty chunk before the end")

    def enterContext_tmp(self):
        directory = tempfile.mkdtemp(prefix="rexec-test-")
        self.addCleanup(shutil.rmtree, directory, True)
        return directory

    def test_output_is_delivered_live(self):
        # The child waits for a file that the test creates only after it has
        # received the first line: only live delivery lets this finish.
        flag = os.path.join(self.enterContext_tmp(), "go")
        script = "echo first; while [ ! -e %s ]; do sleep 0.01; done; echo second" % flag
        seen = []

        def on_chunk(data):
            seen.append(data)
            if b"first" in b"".join(seen):
                open(flag, "w").close()
        with Conn(self.server) as conn:
            conn.send("POST", "/process", {"alias": "live", "cmd": "sh", "args": ["-c", script]})
            response = conn.response(on_chunk=on_chunk)
        self.assertEqual(response.body, b"first\nsecond\n")
        self.assertEqual(response.trailers["Rexec-Exit-Code"], "0")

    def test_exit_status_and_signals_in_the_trailer(self):
        for script, code in (("exit 3", "3"), ("kill -KILL $$", "-9"), ("kill -TERM $$", "-15")):
            response = run(self.server, {"alias": "a", "cmd": "sh", "args": ["-c", script]})
            self.assertEqual(response.trailers, {"Rexec-Exit-Code": code, "Rexec-Reason": "exit"})

    def test_args_cwd_and_envs(self):
        directory = self.enterContext_tmp()
        response = run(self.server, {"alias": "a", "cmd": "sh", "cwd": directory,
                                     "args": ["-c", 'pwd; echo "$REXEC_X $HOME"'],
                                     "envs": {"REXEC_X": "x y", "HOME": "/nowhere"}})
        self.assertEqual(response.body.decode(), "%s\nx y /nowhere\n" % os.path.realpath(directory))

    def test_default_cwd_is_the_servers(self):
        response = run(self.server, {"alias": "a", "cmd": "pwd"})
        self.assertEqual(response.body.decode().strip(), os.getcwd())

    def test_stdin_is_dev_null(self):
        response = run(self.server, {"alias": "a", "cmd": "readlink", "args": ["/proc/self/fd/0"]})
        self.assertEqual(response.body, b"/dev/null\n")

    def test_stderr_goes_to_the_servers_stderr(self):
        response = run(self.server, {"alias": "a", "cmd": "sh", "args": ["-c", "echo to-stderr-1234 >&2"]})
        self.assertEqual(response.body, b"")
        self.server.wait_log("to-stderr-1234")

    def test_http10_gets_raw_bytes_and_a_close(self):
        with Conn(self.server) as conn:
            response = conn.request("POST", "/process", {"alias": "a", "cmd": "printf", "args": ["a\\nb"]},
                                    version="HTTP/1.0")
            self.assertEqual(response.status, 200)
            self.assertNotIn("transfer-encoding", response.headers)
            self.assertEqual(response.headers["connection"], "close")
            self.assertEqual(response.body, b"a\nb")
            self.assertEqual(conn.sock.recv(1), b"")

    def test_keep_alive_across_requests_and_errors(self):
        with Conn(self.server) as conn:
            self.assertEqual(conn.request("POST", "/process", {"alias": "a", "cmd": "echo", "args": ["1"]}).body, b"1\n")
            self.assertEqual(conn.request("POST", "/process", b"{bad").status, 400)
            self.assertEqual(conn.request("GET", "/nowhere").status, 501)
            self.assertEqual(conn.request("POST", "/process", {"alias": "a", "cmd": "/nonexistent"}).status, 404)
            self.assertEqual(conn.request("GET", "/process").json(), [])
            self.assertEqual(conn.request("POST", "/process", {"alias": "a", "cmd": "echo", "args": ["2"]}).body, b"2\n")

    def test_alias_is_free_when_the_last_chunk_arrives(self):
        with Conn(self.server) as conn:
            for i in range(30):
                response = conn.request("POST", "/process", {"alias": "same", "cmd": "echo", "args": [str(i)]})
                self.assertEqual((response.status, response.body), (200, b"%d\n" % i))

    def test_du_example_from_the_original_readme_with_curl(self):
        if not CURL:
            self.skipTest("curl is not installed")
        out = subprocess.check_output(
            [CURL, "-sS", "%s/process" % self.server.url, "-H", "Content-Type: application/json",
             "-X", "POST", "-d", '{"alias":"du", "cmd":"du", "args":["-h", "-c"] }'], cwd=HERE)
        self.assertIn(b"total", out)

    def test_curl_sees_the_trailers(self):
        if not CURL:
            self.skipTest("curl is not installed")
        result = subprocess.run(
            [CURL, "-sS", "-v", "--raw", "%s/process" % self.server.url, "-d",
             '{"alias":"t", "cmd":"sh", "args":["-c", "echo hi; exit 7"]}'],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(result.returncode, 0)
        self.assertIn(b"3\r\nhi\n\r\n0\r\nRexec-Exit-Code: 7\r\nRexec-Reason: exit\r\n", result.stdout)


class RefusalTests(ServerTestCase):

    def assertRefused(self, response, status, fragment):
        self.assertEqual(response.status, status, response.body)
        self.assertEqual(response.headers["content-type"], "text/plain; charset=utf-8")
        self.assertEqual(int(response.headers["content-length"]), len(response.body))
        text = response.body.decode("utf-8")
        self.assertTrue(text.endswith("\n") and text.count("\n") == 1, text)
        self.assertIn(fragment, text)

    def test_bad_bodies_get_400_naming_the_problem(self):
        cases = [
            (b"not json", "not JSON"),
            (b"\xff\xfe{}", "not UTF-8"),
            (json.dumps({"alias": "a", "cmd": "echo"}).encode("utf-16"), "not UTF-8"),
            (b"[1, 2]", "JSON object"),
            (b'"text"', "JSON object"),
            (b"[" * 100000 + b"]" * 100000, ""),
            (b'{"cmd": "echo"}', "'alias' is required"),
            (b'{"alias": "a"}', "'cmd' is required"),
            (b'{"alias": "", "cmd": "echo"}', "'alias' must not be empty"),
            (b'{"alias": "a", "cmd": ""}', "'cmd' must not be empty"),
            (b'{"alias": 1, "cmd": "echo"}', "'alias' must be a string"),
            (b'{"alias": "a", "cmd": ["echo"]}', "'cmd' must be a string"),
            (b'{"alias": "a", "cmd": "echo", "args": "x"}', "'args' must be a list of strings"),
            (b'{"alias": "a", "cmd": "echo", "args": [1]}', "'args' must be a list of strings"),
            (b'{"alias": "a", "cmd": "echo", "cwd": 5}', "'cwd' must be a string"),
            (b'{"alias": "a", "cmd": "echo", "envs": []}', "'envs' must be an object"),
            (b'{"alias": "a", "cmd": "echo", "envs": {"A": 1}}', "'envs' must be an object"),
            (b'{"alias": "a", "cmd": "echo", "envs": {"A=B": "1"}}', "invalid variable name"),
            (b'{"alias": "a\\u0000", "cmd": "echo"}', "NUL"),
            (b'{"alias": "a", "cmd": "ec\\u0000ho"}', "NUL"),
            (b'{"alias": "a", "cmd": "echo", "args": ["\\u0000"]}', "NUL"),
            (b'{"alias": "a", "cmd": "echo", "cwd": "/\\u0000"}', "NUL"),
            (b'{"alias": "a", "cmd": "echo", "envs": {"A": "\\u0000"}}', "NUL"),
            (b'{"alias": "a", "cmd": "echo", "args": ["\\ud800"]}', "not valid Unicode"),
            (b'{"alias": "a", "cmd": "echo", "timout": 5}', "unknown field(s): 'timout'"),
        ]
        with Conn(self.server) as conn:
            for body, fragment in cases:
                with self.subTest(body=body[:60]):
                    self.assertRefused(conn.request("POST", "/process", body), 400, fragment)
        self.assertEqual(self.ps(), [])

    def test_processes_that_cannot_start_get_404_with_the_reason(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        script = os.path.join(directory, "not-executable")
        open(script, "w").close()
        for spec, reason in (({"cmd": "no-such-command-xyz"}, "No such file or directory"),
                             ({"cmd": script}, "Permission denied"),
                             ({"cmd": "true", "cwd": "/no/such/dir"}, "No such file or directory"),
                             ({"cmd": "true", "cwd": script}, "Not a directory")):
            spec["alias"] = "a"
            with self.subTest(spec=spec):
                self.assertRefused(run(self.server, spec), 404, reason)
        # The alias was given back each time.
        self.assertEqual(run(self.server, {"alias": "a", "cmd": "true"}).status, 200)

    def test_other_paths_and_methods_get_501(self):
        with Conn(self.server) as conn:
            for method, path in (("GET", "/"), ("POST", "/processes"), ("PUT", "/process"),
                                 ("GET", "/process/x"), ("DELETE", "/process"), ("POST", "/metrics"),
                                 ("PATCH", "/process"), ("OPTIONS", "/process")):
                with self.subTest(method=method, path=path):
                    self.assertRefused(conn.request(method, path), 501, "not supported")
            conn.send("HEAD", "/")
            self.assertEqual(conn.head()[0], 501)
            self.assertEqual(conn.request("GET", "/health").body, b"ok\n")

    def test_413_without_reading_the_body(self):
        with Conn(self.server) as conn:
            # Only the head is sent: the answer must come without the body.
            conn.sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                              % (rexec.MAX_BODY + 1))
            response = conn.response()
            self.assertRefused(response, 413, "larger than")
            self.assertEqual(response.headers["connection"], "close")

    def test_413_reaches_a_client_that_sent_the_whole_body(self):
        # The refusal must not be lost to a connection reset caused by the unread body.
        with Conn(self.server) as conn:
            body = b"x" * (3 * rexec.MAX_BODY)
            conn.sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                              % len(body) + body)
            self.assertRefused(conn.response(), 413, "larger than")

    def test_413_before_100_continue(self):
        with Conn(self.server) as conn:
            conn.sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                              b"Content-Length: %d\r\n\r\n" % (10 * rexec.MAX_BODY))
            status, _, headers, _ = conn.head()
            self.assertEqual(status, 413)

    def test_100_continue_then_body(self):
        with Conn(self.server) as conn:
            body = json.dumps({"alias": "a", "cmd": "echo", "args": ["ok"]}).encode()
            conn.sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                              b"Content-Length: %d\r\n\r\n" % len(body))
            self.assertEqual(conn.head()[0], 100)
            conn.sock.sendall(body)
            self.assertEqual(conn.response().body, b"ok\n")

    def test_curl_with_a_large_body_gets_413(self):
        if not CURL:
            self.skipTest("curl is not installed")
        body = json.dumps({"alias": "a", "cmd": "echo", "args": ["x" * (2 * rexec.MAX_BODY)]})
        result = subprocess.run([CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--data-binary", "@-",
                                 "%s/process" % self.server.url],
                                input=body.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(result.stdout, b"413")

    def test_length_required(self):
        with Conn(self.server) as conn:
            conn.sock.sendall(b"POST /process HTTP/1.1\r\nHost: x\r\n\r\n")
            self.assertRefused(conn.response(), 411, "Content-Length")

    def test_409_when_the_alias_runs(self):
        barrier = threading.Barrier(8)
        statuses = []

        def post():
            conn = Conn(self.server)
            self.addCleanup(conn.close)
            barrier.wait()
            conn.send("POST", "/process", {"alias": "dup", "cmd": "sleep", "args": ["30"]})
            statuses.append(conn.head()[0])
        threads = [threading.Thread(target=post) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(sorted(statuses), [200] + [409] * 7)

    def test_500_frees_the_alias_and_the_server_goes_on(self):
        server = Server(prelude="rexec.Stream.run = lambda self: 1 / 0")
        self.addCleanup(server.stop)
        with Conn(server) as conn:
            conn.send("POST", "/process", {"alias": "boom", "cmd": "sleep", "args": ["30"]})
            status, _, headers, _ = conn.head()
            self.assertEqual(status, 200)   # the stream had begun: the connection just ends
            self.assertEqual(conn.file.read(), b"")
        server.wait_log("ZeroDivisionError")
        server.wait_log(r"end alias=boom .*exit=-9")
        with Conn(server) as conn:
            self.assertEqual(conn.request("GET", "/process").json(), [])
        broken = Server(prelude="rexec.parse_spec = lambda body: 1 / 0")
        self.addCleanup(broken.stop)
        self.assertRefused(run(broken, {"alias": "a", "cmd": "true"}), 500, "internal error")
        self.assertEqual(run(broken, {"alias": "a", "cmd": "true"}).status, 500)


class LifetimeTests(ServerTestCase):
    server_args = ("--grace", "0.5")

    def start_stream(self, spec):
        """POST spec and read the response head; returns the open connection."""
        conn = Conn(self.server)
        self.addCleanup(conn.close)
        conn.send("POST", "/process", spec)
        self.assertEqual(conn.head()[0], 200)
        return conn

    def pids_in_group(self, pgid):
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open("/proc/%s/stat" % entry) as handle:
                        fields = handle.read().rsplit(")", 1)[1].split()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                if int(fields[2]) == pgid and fields[0] != "Z":
                    found.append(int(entry))
        return found

    def running_pid(self, alias):
        found = []
        self.assertTrue(wait_for(lambda: found.extend(p["pid"] for p in self.ps() if p["alias"] == alias)
                                 or found))
        return found[0]

    def test_silent_child_dies_when_the_client_leaves(self):
        conn = self.start_stream({"alias": "s", "cmd": "sleep", "args": ["300"]})
        pid = self.running_pid("s")
        conn.close()
        self.assertTrue(wait_for(lambda: not pid_alive(pid)), "sleep outlived its client")
        self.server.wait_log(r"end alias=s .*reason=disconnect")
        self.assertEqual(self.ps(), [])

    def test_chatty_child_dies_when_the_client_leaves(self):
        conn = self.start_stream({"alias": "y", "cmd": "yes"})
        pid = self.running_pid("y")
        conn.file.read(100000)
        conn.close()
        self.assertTrue(wait_for(lambda: not pid_alive(pid)))

    def test_the_whole_tree_dies(self):
        conn = self.start_stream({"alias": "t", "cmd": "sh", "args": [
            "-c", "sleep 300 & sh -c 'sleep 301 & wait' & echo started; wait"]})
        pgid = self.running_pid("t")
        self.assertTrue(wait_for(lambda: len(self.pids_in_group(pgid)) >= 4))
        conn.close()
        self.assertTrue(wait_for(lambda: not self.pids_in_group(pgid)), self.pids_in_group(pgid))

    def test_term_ignoring_child_gets_killed_after_grace(self):
        conn = self.start_stream({"alias": "i", "cmd": "sh", "args": ["-c", "trap '' TERM; sleep 300"]})
        pgid = self.running_pid("i")
        conn.close()
        self.assertTrue(wait_for(lambda: not self.pids_in_group(pgid)))
        self.server.wait_log(r"end alias=i .*exit=-9 reason=disconnect")

    def test_background_leftovers_are_killed_and_not_waited_for(self):
        # `sleep 300 &` keeps the pipe open; the response must still end.
        response = run(self.server, {"alias": "bg", "cmd": "sh", "args": ["-c", "sleep 300 & echo $!"]})
        self.assertEqual(response.trailers, {"Rexec-Exit-Code": "0", "Rexec-Reason": "exit"})
        self.assertFalse(pid_alive(int(response.body)))
        # ...and so must one that does not hold the pipe.
        response = run(self.server, {"alias": "bg", "cmd": "sh", "args": [
            "-c", "sleep 300 >/dev/null 2>&1 & echo $!"]})
        self.assertTrue(wait_for(lambda: not pid_alive(int(response.body))))

    def test_remaining_output_is_sent_before_the_end(self):
        response = run(self.server, {"alias": "r", "cmd": "sh", "args": [
            "-c", "head -c 3000000 /dev/zero; (sleep 0.2; echo late) & exit 5"]})
        self.assertEqual(len(response.body), 3000000)
        self.assertEqual(response.trailers["Rexec-Exit-Code"], "5")

    def test_slow_reader_slows_the_child_without_growing_memory(self):
        def rss_kib():
            with open("/proc/%d/status" % self.server.proc.pid) as handle:
                return int(re.search(r"VmRSS:\s+(\d+)", handle.read()).group(1))
        before = rss_kib()
        size = 256 << 20   # far more than the pipe and the socket buffers hold
        conn = self.start_stream({"alias": "big", "cmd": "head", "args": ["-c", str(size), "/dev/zero"]})
        pid = self.running_pid("big")
        # The client reads nothing: the child blocks on its full pipe, its
        # written-bytes count stops moving, far short of the whole.
        def wchar():
            with open("/proc/%d/io" % pid) as handle:
                return int(re.search(r"wchar: (\d+)", handle.read()).group(1))
        samples = []
        self.assertTrue(wait_for(lambda: samples.append(wchar()) or samples[-5:] == [samples[-1]] * 5,
                                 timeout=20, interval=0.1))
        self.assertLess(samples[-1], size // 4)
        self.assertTrue(pid_alive(pid), "the child wrote it all to a client that reads nothing")
        self.assertLess(rss_kib() - before, 16 * 1024)
        received = 0
        while True:
            size_line = conn.file.readline()
            n = int(size_line, 16)
            if n == 0:
                break
            received += len(conn.file.read(n))
            conn.file.read(2)
        self.assertEqual(received, size)

    def test_sigterm_ends_every_stream_with_its_trailer_and_exits_0(self):
        conns = [self.start_stream({"alias": "s%d" % i, "cmd": "sleep", "args": ["300"]}) for i in range(3)]
        stubborn = self.start_stream({"alias": "stubborn", "cmd": "sh", "args": ["-c", "trap '' TERM; echo x; sleep 300"]})
        pids = [self.running_pid("s%d" % i) for i in range(3)] + [self.running_pid("stubborn")]
        self.server.proc.send_signal(signal.SIGTERM)
        for conn in conns:
            body = conn.file.read()
            self.assertTrue(body.endswith(b"0\r\nRexec-Exit-Code: -15\r\nRexec-Reason: shutdown\r\n\r\n"), body)
        self.assertTrue(stubborn.file.read().endswith(b"Rexec-Exit-Code: -9\r\nRexec-Reason: shutdown\r\n\r\n"))
        self.assertEqual(self.server.proc.wait(30), 0)
        self.assertFalse(any(pid_alive(pid) for pid in pids))

    def test_sigint_stops_it_too(self):
        self.assertEqual(self.server.stop(signal.SIGINT), 0)
        self.assertIn("stopped", self.server.log())

    def test_nothing_leaks_after_many_requests(self):
        pid = self.server.proc.pid

        def counts():
            with open("/proc/%d/status" % pid) as handle:
                threads = int(re.search(r"Threads:\s+(\d+)", handle.read()).group(1))
            return len(os.listdir("/proc/%d/fd" % pid)), threads
        run(self.server, {"alias": "warm", "cmd": "true"})
        before = counts()
        specs = [{"cmd": "echo", "args": ["x"]}, {"cmd": "sh", "args": ["-c", "sleep 30 & exit 1"]},
                 {"cmd": "no-such-command"}, {"cmd": "cat", "stdin": "abc"},
                 {"cmd": "sh", "args": ["-c", "echo e >&2"], "stderr": "merge"},
                 {"cmd": "tty", "tty": True}, {"cmd": "sleep", "args": ["5"], "timeout": 0.01}]
        threads = []
        for i in range(60):
            spec = dict(specs[i % len(specs)], alias="n%d" % i)
            threads.append(threading.Thread(target=run, args=(self.server, spec)))
            threads[-1].start()
        for i in range(10):   # and some that leave early
            conn = self.start_stream({"alias": "gone%d" % i, "cmd": "sleep", "args": ["300"]})
            conn.close()
        for thread in threads:
            thread.join()
        self.assertTrue(wait_for(lambda: self.ps() == [] and counts() == before, timeout=15),
                        "fds/threads before %s, after %s" % (before, counts()))
        self.assertEqual([c for c in children_of(pid)], [])


class CommandLineTests(unittest.TestCase):

    def rexec(self, *args):
        return subprocess.run([sys.executable, REXEC] + list(args), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=30)

    def test_port_in_use_exits_2_with_one_line(self):
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            result = self.rexec("-i", "127.0.0.1", "-p", str(taken.getsockname()[1]))
        self.assertEqual(result.returncode, 2)
        self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
        self.assertIn(b"Address already in use", result.stderr)

    def test_bad_arguments_exit_2_with_one_line(self):
        for args in (["-p", "http"], ["-p", "70000"], ["--grace", "-1"], ["--bogus"], ["--max-procs", "0"],
                     ["--log-format", "xml"], ["--token-file", "/no/such/file"], ["--keyfile", "k"]):
            with self.subTest(args=args):
                result = self.rexec(*args)
                self.assertEqual(result.returncode, 2)
                self.assertEqual(len(result.stderr.splitlines()), 1, result.stderr)
                self.assertNotIn(b"Traceback", result.stderr)

    def test_version_and_help(self):
        self.assertEqual(self.rexec("--version").stdout.strip(), ("rexec " + rexec.__version__).encode())
        self.assertIn(b"--grace", self.rexec("-h").stdout)

    def test_logs_the_bound_address(self):
        server = Server()
        self.addCleanup(server.stop)
        self.assertNotEqual(server.port, 0)
        self.assertIn("Serving on 127.0.0.1 port %d" % server.port, server.log())


class LoggingTests(ServerTestCase):
    server_args = ("-vv",)

    def test_start_and_end_lines_without_env_values(self):
        run(self.server, {"alias": "lg", "cmd": "sh", "args": ["-c", "printf abc; exit 2"],
                          "envs": {"SECRET_KEY": "QWE_YUI_345_GHJ_789"}})
        self.server.wait_log(r"INFO start alias=lg pid=\d+ cmd=sh")
        self.server.wait_log(r"INFO end alias=lg pid=\d+ cmd=sh exit=2 reason=exit duration=[\d.]+s bytes=3")
        self.server.wait_log(r"DEBUG request alias=lg .*env_names=\['SECRET_KEY'\]")
        self.server.wait_log(r"TRACE chunk alias=lg bytes=3")
        self.assertNotIn("QWE_YUI_345_GHJ_789", self.server.log())


# --------------------------------------------------------------------------
# Issue 4: timeout, stdin, stderr, tty, list and kill
# --------------------------------------------------------------------------

class ControlTests(LifetimeTests.__base__):
    server_args = ("--grace", "0.5")

    start_stream = LifetimeTests.start_stream
    running_pid = LifetimeTests.running_pid

    def test_timeout_ends_the_group(self):
        response = run(self.server, {"alias": "t", "cmd": "sh", "args": ["-c", "echo a; sleep 300"], "timeout": 0.3})
        self.assertEqual(response.body, b"a\n")
        self.assertEqual(response.trailers, {"Rexec-Exit-Code": "-15", "Rexec-Reason": "timeout"})

    def test_timeout_on_a_child_that_ignores_sigterm(self):
        response = run(self.server, {"alias": "t", "cmd": "sh", "args": ["-c", "trap '' TERM; sleep 300"],
                                     "timeout": 0.2})
        self.assertEqual(response.trailers, {"Rexec-Exit-Code": "-9", "Rexec-Reason": "timeout"})

    def test_a_child_that_ends_in_time_is_not_a_timeout(self):
        response = run(self.server, {"alias": "t", "cmd": "true", "timeout": 60})
        self.assertEqual(response.trailers, {"Rexec-Exit-Code": "0", "Rexec-Reason": "exit"})

    def test_bad_values_get_400(self):
        for extra in ({"timeout": 0}, {"timeout": -1}, {"timeout": "5"}, {"timeout": True},
                      {"timeout": None}, {"stdin": 5}, {"stderr": "stdout"}, {"stderr": None},
                      {"tty": "yes"}, {"tty": 1}):
            with self.subTest(extra=extra):
                spec = dict({"alias": "a", "cmd": "true"}, **extra)
                response = run(self.server, spec)
                if extra == {"timeout": None}:   # null is "no timeout"
                    self.assertEqual(response.status, 200)
                    continue
                self.assertEqual(response.status, 400)
                self.assertIn(list(extra)[0], response.body.decode())
        with Conn(self.server) as conn:
            for literal in (b"NaN", b"Infinity", b"1e999"):
                body = b'{"alias": "a", "cmd": "true", "timeout": %s}' % literal
                self.assertEqual(conn.request("POST", "/process", body).status, 400, literal)

    def test_stdin_is_fed_and_closed(self):
        response = run(self.server, {"alias": "a", "cmd": "cat", "stdin": "h\u00e9llo\nworld"})
        self.assertEqual(response.body, "h\u00e9llo\nworld".encode("utf-8"))
        response = run(self.server, {"alias": "a", "cmd": "wc", "args": ["-c"], "stdin": ""})
        self.assertEqual(response.body.strip(), b"0")

    def test_large_stdin_through_cat_does_not_deadlock(self):
        text = "".join(chr(32 + i % 90) for i in range(800 * 1000))
        response = run(self.server, {"alias": "a", "cmd": "cat", "stdin": text})
        self.assertEqual(response.body, text.encode())

    def test_stdin_and_a_large_output(self):
        # The child writes 4 MiB before it reads a byte of its stdin.
        response = run(self.server, {"alias": "a", "cmd": "sh", "stdin": "x" * 500000,
                                     "args": ["-c", "head -c 4194304 /dev/zero; wc -c"]})
        self.assertEqual(len(response.body), 4194304 + len("500000\n"))
        self.assertTrue(response.body.endswith(b"500000\n"))

    def test_stdin_a_child_does_not_read(self):
        response = run(self.server, {"alias": "a", "cmd": "true", "stdin": "x" * 500000})
        self.assertEqual(response.trailers["Rexec-Exit-Code"], "0")

    def test_stderr_modes(self):
        script = "echo 1; echo 2 >&2; echo 3; echo 4 >&2"
        merged = run(self.server, {"alias": "a", "cmd": "sh", "args": ["-c", script], "stderr": "merge"})
        self.assertEqual(merged.body, b"1\n2\n3\n4\n")
        discard = run(self.server, {"alias": "a", "cmd": "sh", "args": ["-c", "echo out; echo gone-4711 >&2"],
                                    "stderr": "discard"})
        self.assertEqual(discard.body, b"out\n")
        run(self.server, {"alias": "a", "cmd": "sh", "args": ["-c", "echo kept-4712 >&2"], "stderr": "inherit"})
        self.server.wait_log("kept-4712")
        self.assertNotIn("gone-4711", self.server.log())

    def test_tty(self):
        code = "import sys; print(sys.stdin.isatty(), sys.stdout.isatty(), sys.stderr.isatty())"
        response = run(self.server, {"alias": "a", "cmd": sys.executable, "args": ["-c", code], "tty": True})
        self.assertEqual(response.body, b"False True True\n")   # no "\r\n": the stream stays byte-exact
        response = run(self.server, {"alias": "a", "cmd": "sh", "args": ["-c", "echo o; echo e >&2"],
                                     "tty": True})
        self.assertEqual(response.body, b"o\ne\n")

    def test_tty_streams_a_line_buffered_program_live(self):
        flag = os.path.join(tempfile.mkdtemp(), "go")
        self.addCleanup(shutil.rmtree, os.path.dirname(flag))
        code = ("import os, time\nprint('first')\nwhile not os.path.exists(%r): time.sleep(0.01)\n"
                "print('second')" % flag)
        seen = []

        def on_chunk(data):
            seen.append(data)
            if b"first" in b"".join(seen):
                open(flag, "w").close()
        with Conn(self.server) as conn:
            conn.send("POST", "/process", {"alias": "a", "cmd": sys.executable, "args": ["-c", code], "tty": True})
            self.assertEqual(conn.response(on_chunk=on_chunk).body, b"first\nsecond\n")

    def test_tty_with_background_leftover_and_stdin(self):
        response = run(self.server, {"alias": "a", "cmd": "sh", "tty": True, "stdin": "in\n",
                                     "args": ["-c", "sleep 300 & read x; echo got $x"]})
        self.assertEqual(response.body, b"got in\n")
        self.assertEqual(response.trailers["Rexec-Reason"], "exit")

    def test_list(self):
        self.start_stream({"alias": "one", "cmd": "sleep", "args": ["300"], "cwd": "/"})
        self.start_stream({"alias": "two", "cmd": "sh", "args": ["-c", "sleep 300"], "timeout": 100})
        pid = self.running_pid("two")
        listing = self.ps()
        self.assertEqual([p["alias"] for p in listing], ["one", "two"])
        one, two = listing
        self.assertEqual((one["cmd"], one["args"], one["cwd"]), ("sleep", ["300"], "/"))
        self.assertEqual((two["pid"], two["timeout"]), (pid, 100))
        self.assertLess(abs(one["started"] - time.time()), 60)
        with Conn(self.server) as conn:
            response = conn.request("GET", "/process")
        self.assertEqual(response.headers["content-type"], "application/json")

    def test_delete_kills_a_silent_child(self):
        conn = self.start_stream({"alias": "a b/c%", "cmd": "sleep", "args": ["300"]})
        pid = self.running_pid("a b/c%")
        with Conn(self.server) as other:
            response = other.request("DELETE", "/process/a%20b%2Fc%25")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.json(), {"alias": "a b/c%", "exit_code": -15})
        self.assertFalse(pid_alive(pid))
        rest = conn.rest().raw
        self.assertTrue(rest.endswith(b"0\r\nRexec-Exit-Code: -15\r\nRexec-Reason: killed\r\n\r\n"), rest)

    def test_delete_a_term_ignoring_child(self):
        self.start_stream({"alias": "k", "cmd": "sh", "args": ["-c", "trap '' TERM; sleep 300"]})
        self.running_pid("k")
        with Conn(self.server) as other:
            self.assertEqual(other.request("DELETE", "/process/k").json(), {"alias": "k", "exit_code": -9})

    def test_delete_unknown_alias_is_404(self):
        with Conn(self.server) as conn:
            response = conn.request("DELETE", "/process/nope")
            self.assertEqual(response.status, 404)
            self.assertIn("nope", response.body.decode())
            self.assertEqual(conn.request("DELETE", "/process/%FF").status, 400)

    def test_list_and_delete_race_with_the_processes_own_exit(self):
        errors = []

        def hammer(i):
            try:
                with Conn(self.server) as conn:
                    for _ in range(15):
                        status = conn.request("DELETE", "/process/r%d" % i).status
                        if status not in (200, 404):
                            errors.append(status)
                        conn.request("GET", "/process").json()
            except Exception as exc:   # noqa: B902 -- any failure is the test's finding
                errors.append(exc)

        def runner(i):
            for _ in range(15):
                response = run(self.server, {"alias": "r%d" % i, "cmd": "sleep", "args": ["0.01"]})
                if response.trailers.get("Rexec-Reason") not in ("exit", "killed"):
                    errors.append(response.trailers)
        threads = [threading.Thread(target=f, args=(i,)) for i in range(4) for f in (hammer, runner)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(self.ps(), [])
        self.assertEqual(run(self.server, {"alias": "r0", "cmd": "true"}).status, 200)

    def test_original_fields_alone_behave_as_before(self):
        response = run(self.server, {"alias": "a", "cmd": "sh", "args": ["-c", "echo out; echo err >&2"]})
        self.assertEqual(response.body, b"out\n")
        self.server.wait_log("err")


# --------------------------------------------------------------------------
# Issue 7: socket activation, metrics, access log, health
# --------------------------------------------------------------------------

class OperatingTests(ServerTestCase):

    def metrics(self):
        with Conn(self.server) as conn:
            response = conn.request("GET", "/metrics")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.headers["content-type"], "text/plain; version=0.0.4; charset=utf-8")
        samples = {}
        families = set()
        for line in response.body.decode().splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(" ")
                self.assertIn(kind, ("counter", "gauge"))
                families.add(name)
            elif line.startswith("# HELP "):
                continue
            else:
                match = re.match(r'^([a-z_]+)(\{[a-z]+="[^"]*"\})? (\S+)$', line)
                self.assertIsNotNone(match, line)
                self.assertIn(match.group(1), families)
                samples[match.group(1) + (match.group(2) or "")] = float(match.group(3))
        return samples

    def test_metrics_move(self):
        before = self.metrics()
        run(self.server, {"alias": "a", "cmd": "printf", "args": ["12345"]})
        run(self.server, {"alias": "a", "cmd": "no-such-command"})
        run(self.server, {"alias": "a", "cmd": "sleep", "args": ["10"], "timeout": 0.05})
        conn = Conn(self.server)
        conn.send("POST", "/process", {"alias": "gone", "cmd": "sleep", "args": ["300"]})
        conn.head()
        self.assertEqual(self.metrics()["rexec_processes_running"], 1)
        conn.close()
        self.assertTrue(wait_for(lambda: self.metrics()["rexec_processes_running"] == 0))
        after = self.metrics()

        def delta(name):
            return after[name] - before.get(name, 0)
        self.assertEqual(delta("rexec_processes_started_total"), 3)
        self.assertEqual(delta('rexec_process_exits_total{reason="exit"}'), 1)
        self.assertEqual(delta('rexec_process_exits_total{reason="timeout"}'), 1)
        self.assertEqual(delta('rexec_process_exits_total{reason="disconnect"}'), 1)
        self.assertEqual(delta("rexec_spawn_failures_total"), 1)
        self.assertEqual(delta("rexec_stream_bytes_total"), 5)
        self.assertGreaterEqual(delta('rexec_requests_total{code="200"}'), 3)
        self.assertEqual(delta('rexec_requests_total{code="404"}'), 1)
        self.assertGreater(after["rexec_uptime_seconds"], 0)

    def test_access_log_one_line_per_request(self):
        run(self.server, {"alias": "acc", "cmd": "printf", "args": ["abc"], "stdin": "secret-stdin-1",
                          "envs": {"X": "secret-env-1"}})
        with Conn(self.server) as conn:
            conn.request("GET", "/nowhere?token=secret-query-1")
        self.server.wait_log(r"INFO access peer=127\.0\.0\.1 method=POST path=/process status=200 bytes=3 "
                             r"duration=[\d.]+s alias=acc")
        self.server.wait_log(r"INFO access peer=127\.0\.0\.1 method=GET path=/nowhere status=501 ")
        for secret in ("secret-stdin-1", "secret-env-1", "secret-query-1"):
            self.assertNotIn(secret, self.server.log())

    def test_health_needs_no_token(self):
        server = Server(env={"REXEC_TOKEN": "t0ken"})
        self.addCleanup(server.stop)
        with Conn(server) as conn:
            response = conn.request("GET", "/health")
            self.assertEqual((response.status, response.body), (200, b"ok\n"))
            self.assertEqual(conn.request("GET", "/metrics").status, 401)
            self.assertEqual(conn.request("GET", "/metrics", headers={"Authorization": "Bearer t0ken"}).status, 200)

    def test_json_log_format(self):
        server = Server("--log-format", "json", "-v")
        self.addCleanup(server.stop)
        run(server, {"alias": "j", "cmd": "sh", "args": ["-c", "exit 4"]})
        server.wait_log('"event": "access"')
        server.stop()
        records = [json.loads(line) for line in server.log().splitlines()]
        events = [r.get("event") for r in records]
        self.assertIn("start", events)
        end = [r for r in records if r.get("event") == "end"][0]
        self.assertEqual((end["alias"], end["exit"], end["reason"]), ("j", 4, "exit"))
        access = [r for r in records if r.get("event") == "access"][0]
        self.assertEqual((access["method"], access["status"], access["alias"]), ("POST", 200, "j"))

    def test_socket_activation(self):
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        fd = listener.fileno()
        # systemd sets LISTEN_PID to the service's own pid: `exec` keeps the shell's.
        script = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" "$1" -p 1 3<&%d' % fd
        server = Server(argv=["sh", "-c", script, sys.executable, REXEC], pass_fds=(fd,))
        self.addCleanup(server.stop)
        self.assertEqual(server.port, port)
        listener.close()
        response = run(server, {"alias": "sa", "cmd": "sh", "args": ["-c", 'echo "${LISTEN_FDS:-unset}"']})
        self.assertEqual(response.body, b"unset\n")   # not passed on to children
        self.assertEqual(server.stop(), 0)

    def test_socket_activation_ignores_another_pid(self):
        server = Server(env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
        self.addCleanup(server.stop)
        self.assertEqual(run(server, {"alias": "a", "cmd": "true"}).status, 200)


# --------------------------------------------------------------------------
# Issue 6: the splice fast path and the copying fallback send the same bytes
# --------------------------------------------------------------------------

OPENSSL = shutil.which("openssl")
# A prelude that logs every os.splice call, so a test can tell which path ran.
COUNT_SPLICES = ("_splice = rexec.os.splice; rexec.os.splice = lambda *a, **k: "
                 "(rexec.log.warning('splice-call %d', a[2]), _splice(*a, **k))[1]"
                 if rexec.CAN_SPLICE else "pass")


def throwaway_cert(directory):
    """A self-signed certificate and key for 127.0.0.1 (openssl CLI), or None."""
    if not OPENSSL:
        return None
    cert, key = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    done = subprocess.run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                           "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                           "-subj", "/CN=127.0.0.1", "-keyout", key, "-out", cert],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return (cert, key) if done.returncode == 0 else None


def client_tls_context():
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def read_to_eof(sock):
    """Everything until the peer closes.  rexec closes TLS without a close_notify,
    which some Pythons report as an SSLError: that counts as the end here."""
    parts = []
    while True:
        try:
            data = sock.recv(1 << 16)
        except OSError as exc:
            if type(exc).__module__ != "ssl":
                raise
            data = b""
        if not data:
            return b"".join(parts)
        parts.append(data)


def parse_chunked(raw):
    """Strictly split a raw chunked body: (data, chunk sizes, trailers, leftover)."""
    data, sizes, pos = [], [], 0
    while True:
        end = raw.index(b"\r\n", pos)
        line = raw[pos:end]
        assert re.match(rb"^[0-9A-F]+$", line), "bad chunk-size line %r" % line
        size = int(line, 16)
        pos = end + 2
        if size == 0:
            break
        assert raw[pos + size:pos + size + 2] == b"\r\n", "chunk not followed by CRLF"
        data.append(raw[pos:pos + size])
        sizes.append(size)
        pos += size + 2
    end = raw.index(b"\r\n\r\n", pos - 2)
    trailers = raw[pos:end + 2].decode("ascii").splitlines()
    return b"".join(data), sizes, trailers, raw[end + 4:]


class FastPathTests(unittest.TestCase):
    """The same children through every write path must give the same bytes:
    splice (as configured, and for every chunk), the copying sendmsg fallback
    (CAN_SPLICE = False: small chunks read, large ones read in place into the
    writer's buffer; and every chunk in place), and TLS (one send per chunk).
    No timings asserted."""

    SIZES = (0, 1, 16383, 16384, 16385, (1 << 20) + 7)

    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.mkdtemp(prefix="rexec-fastpath-")
        cls.blob = os.path.join(cls.tmp, "blob")
        with open(cls.blob, "wb") as handle:
            handle.write(os.urandom((3 << 20) + 13))
        with open(cls.blob, "rb") as handle:
            cls.data = handle.read()
        cls.servers = {}
        try:
            cls.servers["splice"] = Server(prelude=COUNT_SPLICES)
            cls.servers["splice-every-chunk"] = Server(prelude="rexec.SPLICE_MIN = 1; " + COUNT_SPLICES)
            cls.servers["copy"] = Server(prelude="rexec.CAN_SPLICE = False; " + COUNT_SPLICES)
            cls.servers["copy-in-place-every-chunk"] = Server(
                prelude="rexec.CAN_SPLICE = False; rexec.SPLICE_MIN = 1; " + COUNT_SPLICES)
            tls = throwaway_cert(cls.tmp)
            if tls:
                cls.servers["tls"] = Server("--certfile", tls[0], "--keyfile", tls[1],
                                            prelude=COUNT_SPLICES)
        except BaseException:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for server in cls.servers.values():
            server.stop()
        shutil.rmtree(cls.tmp, True)

    def fetch(self, mode, spec, version="HTTP/1.1"):
        """POST spec to the `mode` server; returns (head lines without Date, raw body)."""
        server = self.servers[mode]
        sock = server.connect()
        if mode == "tls":
            sock = client_tls_context().wrap_socket(sock)
        with Conn(server, sock=sock) as conn:
            conn.send("POST", "/process", spec, version=version,
                      headers={"Connection": "close"})
            if version == "HTTP/1.0":
                raw = read_to_eof(conn.sock)
            else:
                raw = conn.response().raw
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = [l for l in head.split(b"\r\n") if not l.lower().startswith(b"date:")]
        return lines, body

    def through_every_path(self, spec, version="HTTP/1.1"):
        """{mode: (head lines, data, trailers)}, each framing checked strictly."""
        results = {}
        for mode in self.servers:
            with self.subTest(mode=mode):
                head, body = self.fetch(mode, spec, version)
                if version == "HTTP/1.0":
                    results[mode] = (head, body, [])
                    continue
                data, sizes, trailers, leftover = parse_chunked(body)
                self.assertEqual(leftover, b"")
                self.assertTrue(all(sizes), sizes)
                results[mode] = (head, data, trailers)
        first = next(iter(results.values()))
        for mode, result in results.items():
            self.assertEqual(result[0], first[0], "%s: different response head" % mode)
            self.assertEqual(result[2], first[2], "%s: different trailers" % mode)
            self.assertTrue(result[1] == first[1], "%s: different data" % mode)
        return first

    def test_odd_sizes_are_byte_identical(self):
        for size in self.SIZES:
            spec = {"alias": "odd", "cmd": "head", "args": ["-c", str(size), self.blob]}
            _, data, trailers = self.through_every_path(spec)
            self.assertTrue(data == self.data[:size], "size %d differs from the file" % size)
            self.assertEqual(trailers, ["Rexec-Exit-Code: 0", "Rexec-Reason: exit"])

    def test_binary_file_through_cat(self):
        _, data, _ = self.through_every_path({"alias": "cat", "cmd": "cat", "args": [self.blob]})
        self.assertTrue(data == self.data, "the streamed file differs")

    def test_terminal_output_is_byte_identical(self):
        size = (1 << 20) + 7
        spec = {"alias": "tty", "cmd": "head", "args": ["-c", str(size), self.blob], "tty": True}
        _, data, trailers = self.through_every_path(spec)
        self.assertTrue(data == self.data[:size], "the terminal's output differs from the file")
        self.assertEqual(trailers, ["Rexec-Exit-Code: 0", "Rexec-Reason: exit"])

    def test_raw_body_of_http10_is_identical(self):
        spec = {"alias": "raw", "cmd": "head", "args": ["-c", str((1 << 20) + 7), self.blob]}
        _, data, _ = self.through_every_path(spec, version="HTTP/1.0")
        self.assertTrue(data == self.data[:(1 << 20) + 7], "the raw HTTP/1.0 body differs")

    def test_child_closing_stdout_early(self):
        _, data, trailers = self.through_every_path(
            {"alias": "shut", "cmd": "sh", "args": ["-c", "printf abc; exec >&-; sleep 0.2; exit 7"]})
        self.assertEqual((data, trailers), (b"abc", ["Rexec-Exit-Code: 7", "Rexec-Reason: exit"]))
        script = ("import os, time; os.write(1, b'x' * 100000); os.close(1); "
                  "time.sleep(0.2); os._exit(3)")
        _, data, trailers = self.through_every_path(
            {"alias": "shut", "cmd": sys.executable, "args": ["-c", script]})
        self.assertEqual((data, trailers), (b"x" * 100000, ["Rexec-Exit-Code: 3", "Rexec-Reason: exit"]))

    def test_each_server_takes_its_own_path(self):
        spec = {"alias": "path", "cmd": "head", "args": ["-c", str(1 << 20), self.blob]}
        self.through_every_path(spec)
        for mode, server in self.servers.items():
            spliced = wait_for(lambda: "splice-call" in server.log(), timeout=0.5)
            expected = rexec.CAN_SPLICE and mode.startswith("splice")
            self.assertEqual(spliced, expected, "%s: splice used: %s" % (mode, spliced))


# ==========================================================================
# Benchmark (issue 6): python3 test_rexec.py bench [--quick] [--json FILE]
#
# Starts real servers (the Server helper above) and measures each figure
# beside a baseline run in the same process tree on the same machine within
# the same minute.  Prints one table; targets are reported, never asserted.
# ==========================================================================

GIB = 1 << 30
MIB = 1 << 20
FULL = dict(stream_bytes=GIB, stream_reps=5, echo_n=300, conc_clients=8, conc_each=40,
            ttfb_n=20, kill_n=10, scale_n=1000, scale_window=6.0, idle_n=1000, idle_window=3.0,
            flood_bytes=GIB, flood_pause=2.0)
QUICK = dict(stream_bytes=128 * MIB, stream_reps=3, echo_n=50, conc_clients=8, conc_each=10,
             ttfb_n=5, kill_n=3, scale_n=100, scale_window=3.0, idle_n=50, idle_window=2.0,
             flood_bytes=128 * MIB, flood_pause=1.0)
# A line a second without a fork a second (1000 shells forking `sleep` saturate two
# cores by themselves): bash's `read -t 1` on a FIFO that nobody writes to ("$0").
TICKER = 'exec 3<>"$0"; while :; do echo tick; read -t 1 -u 3; done'
SLEEP_TICKER = "while :; do echo tick; sleep 1; done"

# The baseline for streaming: no HTTP, no framing; one connection at a time,
# the child's pipe relayed to the socket with blocking os.splice (the same
# pipe size rexec asks for) or, over TLS or without splice, read/sendall of
# rexec's READ_SIZE.  Run as its own process so its CPU time can be read.
RELAY = r'''
import fcntl, os, socket, ssl, subprocess, sys
pipe_size, read_size, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
command = sys.argv[5:]
context = None
if cert:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(8)
print(listener.getsockname()[1], "splice" if hasattr(os, "splice") and not cert else "copy",
      flush=True)
while True:
    conn = listener.accept()[0]
    if context:
        conn = context.wrap_socket(conn, server_side=True)
    request = b""
    while b"\r\n\r\n" not in request:
        data = conn.recv(4096)
        if not data:
            break
        request += data
    conn.sendall(b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\n")
    child = subprocess.Popen(command, stdout=subprocess.PIPE, bufsize=0)
    fd = child.stdout.fileno()
    try:
        fcntl.fcntl(fd, 1031, pipe_size)
    except OSError:
        pass
    try:
        if hasattr(os, "splice") and not cert:
            while os.splice(fd, conn.fileno(), pipe_size, flags=os.SPLICE_F_MOVE):
                pass
        else:
            while True:
                data = os.read(fd, read_size)
                if not data:
                    break
                conn.sendall(data)
    except OSError:
        pass
    conn.close()
    child.stdout.close()
    child.wait()
'''


def proc_cpu(pid):
    """User + system CPU seconds of process `pid` (all its threads)."""
    with open("/proc/%d/stat" % pid) as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_status(pid, field):
    """A kB figure (VmRSS, VmHWM) of /proc/PID/status, in bytes."""
    with open("/proc/%d/status" % pid) as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(math.ceil(fraction * len(ordered))) - 1)]


def post_request(spec):
    body = json.dumps(spec).encode("utf-8")
    return (b"POST /process HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body


def bench_connect(port, tls=False):
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    return client_tls_context().wrap_socket(sock) if tls else sock


def drain(sock, buffer):
    """recv_into until EOF (an SSLError at EOF counts as EOF); bytes received."""
    total = 0
    while True:
        try:
            count = sock.recv_into(buffer)
        except OSError as exc:
            if type(exc).__module__ != "ssl":
                raise
            count = 0
        if not count:
            return total
        total += count


def read_until(sock, marker, limit=1 << 20):
    data = b""
    while marker not in data and len(data) < limit:
        more = sock.recv(65536)
        if not more:
            raise ConnectionError("closed before %r" % marker)
        data += more
    return data


class Bench:
    """One benchmark run: the figures dict, and a row list for the table."""

    def __init__(self, sizes, tmp):
        self.sizes = sizes
        self.tmp = tmp
        self.figures = {}
        self.rows = []
        self.tls = throwaway_cert(tmp)

    def row(self, name, rexec_value, baseline, ratio=None, target=None, met=None):
        self.rows.append((name, rexec_value, baseline, ratio, target, met))
        print("  %-48s %s | %s | %s" % (name, rexec_value, baseline,
                                          "" if ratio is None else "%.2fx" % ratio),
              file=sys.stderr, flush=True)

    # -- 1. stream throughput ------------------------------------------------

    def start_relay(self, tls):
        cert, key = self.tls if tls else ("", "")
        command = ["head", "-c", str(self.sizes["stream_bytes"]), "/dev/zero"]
        relay = subprocess.Popen([sys.executable, "-c", RELAY, str(rexec.PIPE_SIZE),
                                  str(rexec.READ_SIZE), cert, key] + command,
                                 stdout=subprocess.PIPE)
        port, mode = relay.stdout.readline().split()
        return relay, int(port), mode.decode()

    def fetch_curl(self, url, tls, body=None):
        argv = [CURL, "-s", "-o", "/dev/null", "-w", "%{size_download}"] + (["-k"] if tls else [])
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "--data-binary", body]
        return int(subprocess.run(argv + [url], stdout=subprocess.PIPE, check=True).stdout)

    def fetch_python(self, port, tls, request):
        buffer = bytearray(MIB)
        with bench_connect(port, tls) as sock:
            sock.sendall(request)
            return drain(sock, buffer)

    def timed(self, pid, fetch):
        """(seconds, server CPU seconds, bytes) of one fetch."""
        cpu, start = proc_cpu(pid), time.monotonic()
        received = fetch()
        return time.monotonic() - start, proc_cpu(pid) - cpu, received

    def stream(self, server, tls, client):
        size = self.sizes["stream_bytes"]
        spec = {"alias": "flow", "cmd": "head", "args": ["-c", str(size), "/dev/zero"]}
        relay, relay_port, relay_mode = self.start_relay(tls)
        scheme = "https" if tls else "http"
        try:
            if client == "curl":
                ours = lambda: self.fetch_curl("%s://127.0.0.1:%d/process" % (scheme, server.port),
                                               tls, json.dumps(spec))
                theirs = lambda: self.fetch_curl("%s://127.0.0.1:%d/" % (scheme, relay_port), tls)
            else:
                ours = lambda: self.fetch_python(server.port, tls, post_request(spec))
                theirs = lambda: self.fetch_python(relay_port, tls, b"GET / HTTP/1.0\r\n\r\n")
            runs = {"rexec": [], "relay": []}
            for rep in range(self.sizes["stream_reps"]):
                for who in (("rexec", "relay") if rep % 2 == 0 else ("relay", "rexec")):
                    pid = server.proc.pid if who == "rexec" else relay.pid
                    seconds, cpu, received = self.timed(pid, ours if who == "rexec" else theirs)
                    if received < size:
                        raise RuntimeError("%s sent %d of %d bytes" % (who, received, size))
                    runs[who].append((size / seconds / 1e6, cpu * GIB / size))
        finally:
            relay.kill()
            relay.wait()
        name = "stream %s, %s client" % ("TLS" if tls else "plain", client)
        rate = {who: median([r for r, _ in runs[who]]) for who in runs}
        cpu = {who: median([c for _, c in runs[who]]) for who in runs}
        rate_ratio, cpu_ratio = rate["rexec"] / rate["relay"], cpu["rexec"] / max(cpu["relay"], 0.01)
        self.figures[name] = dict(rexec_mb_s=rate["rexec"], relay_mb_s=rate["relay"],
                                  rate_ratio=rate_ratio, rexec_cpu_s_per_gib=cpu["rexec"],
                                  relay_cpu_s_per_gib=cpu["relay"], cpu_ratio=cpu_ratio,
                                  relay_mode=relay_mode, bytes=size, runs=runs)
        self.row(name + ": MB/s", "%.0f" % rate["rexec"], "%.0f (%s relay)" % (rate["relay"], relay_mode),
                 rate_ratio, ">= 0.9x", rate_ratio >= 0.9)
        self.row(name + ": CPU s/GiB", "%.2f" % cpu["rexec"], "%.2f" % cpu["relay"],
                 cpu_ratio, "<= 1.25x", cpu_ratio <= 1.25)

    # -- 2. request latency and rate -------------------------------------------

    def echo_rexec(self, port, alias, tls=False):
        with bench_connect(port, tls) as sock:
            sock.sendall(post_request({"alias": alias, "cmd": "echo", "args": ["hi"]}))
            data = read_until(sock, b"Rexec-Reason: exit\r\n\r\n")
        assert b"3\r\nhi\n\r\n" in data, data

    @staticmethod
    def echo_direct():
        out = subprocess.run(["echo", "hi"], stdout=subprocess.PIPE).stdout
        assert out == b"hi\n", out

    def latency(self, server):
        def sample(call, n):
            times = []
            for _ in range(n):
                start = time.monotonic()
                call()
                times.append(time.monotonic() - start)
            return times
        n = self.sizes["echo_n"]
        sample(lambda: self.echo_rexec(server.port, "echo"), 5)
        ours, theirs = [], []
        for _ in range(5):   # interleaved, so both see the same background load
            ours += sample(lambda: self.echo_rexec(server.port, "echo"), n // 5)
            theirs += sample(self.echo_direct, n // 5)
        ratio = median(ours) / median(theirs)
        self.figures["echo latency"] = dict(
            rexec_median_ms=median(ours) * 1e3, rexec_p99_ms=percentile(ours, 0.99) * 1e3,
            direct_median_ms=median(theirs) * 1e3, direct_p99_ms=percentile(theirs, 0.99) * 1e3,
            ratio=ratio, n=len(ours))
        f = self.figures["echo latency"]
        self.row("echo hi latency: median ms (p99)", "%.2f (%.2f)" % (f["rexec_median_ms"], f["rexec_p99_ms"]),
                 "%.2f (%.2f) direct spawn" % (f["direct_median_ms"], f["direct_p99_ms"]),
                 ratio, "<= 1.35x", ratio <= 1.35)

    def rate(self, server):
        clients, each = self.sizes["conc_clients"], self.sizes["conc_each"]

        def run_threads(work):
            errors = []

            def loop(index):
                try:
                    for i in range(each):
                        work(index, i)
                except Exception as exc:  # reported, not swallowed
                    errors.append(exc)
            threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
            start = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
            return clients * each / (time.monotonic() - start)
        ours = run_threads(lambda c, i: self.echo_rexec(server.port, "c%d" % c))
        theirs = run_threads(lambda c, i: self.echo_direct())
        ours = (ours + run_threads(lambda c, i: self.echo_rexec(server.port, "c%d" % c))) / 2
        ratio = ours / theirs
        self.figures["echo rate"] = dict(rexec_req_s=ours, direct_req_s=theirs, ratio=ratio,
                                         clients=clients, requests_each=each)
        self.row("echo hi, %d clients: req/s" % clients, "%.0f" % ours,
                 "%.0f direct spawn (%d threads)" % (theirs, clients), ratio, ">= 0.7x", ratio >= 0.7)

    # -- 3. time to first byte -----------------------------------------------

    def first_byte(self, server):
        script = "echo ready; sleep 5"
        ours, theirs = [], []
        for i in range(self.sizes["ttfb_n"]):
            with bench_connect(server.port) as sock:
                start = time.monotonic()
                sock.sendall(post_request({"alias": "ttfb%d" % i, "cmd": "sh", "args": ["-c", script]}))
                read_until(sock, b"ready\n")
                ours.append(time.monotonic() - start)
            start = time.monotonic()
            child = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE,
                                     start_new_session=True)
            child.stdout.readline()
            theirs.append(time.monotonic() - start)
            os.killpg(child.pid, signal.SIGKILL)
            child.stdout.close()
            child.wait()
        value = median(ours) * 1e3
        self.figures["first byte"] = dict(rexec_median_ms=value, rexec_max_ms=max(ours) * 1e3,
                                          direct_median_ms=median(theirs) * 1e3, n=len(ours))
        self.row("first byte of `echo ready; sleep 5`: ms", "%.2f (max %.2f)" % (value, max(ours) * 1e3),
                 "%.2f direct spawn" % (median(theirs) * 1e3), None, "< 5 ms", value < 5)

    # -- 4. kill latency -----------------------------------------------------

    def kill_latency(self, server, chatty):
        program = "yes" if chatty else "sleep 300"
        times = []
        for i in range(self.sizes["kill_n"]):
            sock = bench_connect(server.port)
            sock.sendall(post_request({"alias": "kill%d" % i, "cmd": "sh",
                                       "args": ["-c", "echo pid=$$; exec %s" % program]}))
            data = b""
            while not re.search(rb"pid=(\d+)\n", data):
                data += read_until(sock, b"\n")
            pgid = int(re.search(rb"pid=(\d+)\n", data).group(1))
            if chatty:
                for _ in range(16):   # let it stream for a moment
                    sock.recv(65536)
            else:
                time.sleep(0.05)      # sleep has replaced sh
            start = time.monotonic()
            sock.close()
            while True:
                try:
                    os.killpg(pgid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.0002)
            times.append(time.monotonic() - start)
        name = "kill latency, %s (`%s`)" % ("chatty" if chatty else "silent", program)
        value = median(times) * 1e3
        self.figures[name] = dict(median_ms=value, max_ms=max(times) * 1e3, n=len(times))
        self.row(name + ": ms", "%.2f (max %.2f)" % (value, max(times) * 1e3), "-", None,
                 "< 20 ms", value < 20)

    # -- 5. idle streams and scale ------------------------------------------

    def open_streams(self, server, count, spec, prefix):
        """`count` streams of `spec` held open on one selector: (selector, sockets)."""
        sel = selectors.DefaultSelector()
        socks = []
        for i in range(count):
            sock = bench_connect(server.port)
            sock.sendall(post_request(dict(spec, alias="%s%d" % (prefix, i))))
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ, {"index": i, "ticks": [], "tail": b""})
            socks.append(sock)
        return sel, socks

    @staticmethod
    def pump(sel, until, on_tick=None):
        """Read every stream until `until`; record the time of each 'tick' line."""
        while time.monotonic() < until:
            for key, _ in sel.select(max(0.0, until - time.monotonic())):
                try:
                    data = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                if not data:
                    raise ConnectionError("stream %d ended" % key.data["index"])
                now = time.monotonic()
                text = key.data["tail"] + data
                key.data["ticks"].extend([now] * text.count(b"tick\n"))
                key.data["tail"] = text[-4:]

    def close_streams(self, server, sel, socks):
        """Disconnect them all, and wait for rexec to have ended every group."""
        sel.close()
        for sock in socks:
            sock.close()

        def all_gone():
            with Conn(server) as conn:
                return not conn.request("GET", "/process").json() and not children_of(server.proc.pid)
        if not wait_for(all_gone, timeout=60, interval=0.2):
            raise RuntimeError("rexec still has children a minute after the clients left")

    def idle_cpu(self, server):
        count, window = self.sizes["idle_n"], self.sizes["idle_window"]
        sel, socks = self.open_streams(server, count, {"cmd": "sleep", "args": ["300"]}, "idle")
        try:
            if not wait_for(lambda: len(children_of(server.proc.pid)) >= count, timeout=60):
                raise RuntimeError("only %d of %d idle streams started"
                                   % (len(children_of(server.proc.pid)), count))
            time.sleep(0.5)
            cpu = proc_cpu(server.proc.pid)
            time.sleep(window)
            used = proc_cpu(server.proc.pid) - cpu
        finally:
            self.close_streams(server, sel, socks)
        per_s = used / window
        self.figures["idle streams"] = dict(streams=count, seconds=window, server_cpu_s=used,
                                            cpu_fraction=per_s)
        self.row("%d idle streams: server CPU" % count, "%.1f ms/s" % (per_s * 1e3), "-", None,
                 "≈ 0 (< 5 ms/s)", per_s < 0.005)

    def scale(self, server):
        count, window = self.sizes["scale_n"], self.sizes["scale_window"]
        pid = server.proc.pid
        idle_rss = proc_status(pid, "VmRSS")
        start = time.monotonic()
        if shutil.which("bash"):
            fifo = os.path.join(self.tmp, "never")
            os.mkfifo(fifo)
            spec = {"cmd": "bash", "args": ["-c", TICKER, fifo]}
        else:
            spec = {"cmd": "sh", "args": ["-c", SLEEP_TICKER]}
        self.figures["scale child"] = " ".join([spec["cmd"]] + spec["args"])
        sel, socks = self.open_streams(server, count, spec, "tick")
        keys = [sel.get_key(sock) for sock in socks]
        try:
            deadline = start + 120
            while time.monotonic() < deadline and not all(k.data["ticks"] for k in keys):
                self.pump(sel, time.monotonic() + 0.2)
            ramp = time.monotonic() - start
            for key in keys:
                key.data["ticks"][:] = key.data["ticks"][-1:]
            cpu, begin = proc_cpu(pid), time.monotonic()
            rss = []
            end = begin + window
            while time.monotonic() < end:
                self.pump(sel, min(end, time.monotonic() + 0.5))
                rss.append(proc_status(pid, "VmRSS"))
            cpu = proc_cpu(pid) - cpu
            with Conn(server) as conn:
                listed = conn.request("GET", "/process").json()
            alive = sum(1 for p in listed if pid_alive(p["pid"]))
            gaps = []
            for key in keys:
                ticks = key.data["ticks"] + [end]
                gaps.append(max(b - a for a, b in zip(ticks, ticks[1:])) if len(ticks) > 1 else window)
            rss_peak = max(rss)
        finally:
            self.close_streams(server, sel, socks)
        worst = max(gaps)
        self.figures["scale"] = dict(
            streams=count, ramp_s=ramp, alive=alive, window_s=window, worst_gap_s=worst,
            median_gap_s=median(gaps), idle_rss_mib=idle_rss / MIB, rss_mib=rss_peak / MIB,
            rss_per_stream_kib=(rss_peak - idle_rss) / count / 1024, server_cpu_s=cpu,
            max_procs_default=rexec.DEFAULT_MAX_PROCS)
        f = self.figures["scale"]
        self.row("%d ticking streams: alive" % count, "%d (ramp %.1f s)" % (alive, ramp), "-", None,
                 "all %d" % count, alive == count)
        self.row("%d ticking streams: worst gap between lines" % count, "%.2f s" % worst,
                 "median %.2f s" % f["median_gap_s"], None, "<= 1.5 s", worst <= 1.5)
        self.row("%d ticking streams: server RSS" % count, "%.1f MiB" % f["rss_mib"],
                 "idle %.1f MiB, +%.0f KiB/stream" % (f["idle_rss_mib"], f["rss_per_stream_kib"]),
                 None, "< 100 MiB", f["rss_mib"] < 100)

    # -- 6. memory under a flood -----------------------------------------------

    def flood(self, name, server, tls=False):
        pid, size = server.proc.pid, self.sizes["flood_bytes"]
        self.echo_rexec(server.port, "warm", tls)
        time.sleep(0.3)
        idle, hwm_before = proc_status(pid, "VmRSS"), proc_status(pid, "VmHWM")
        samples, stop = [], threading.Event()

        def sampler():
            while not stop.wait(0.005):
                samples.append(proc_status(pid, "VmRSS"))
        thread = threading.Thread(target=sampler)
        thread.start()
        try:
            with bench_connect(server.port, tls) as sock:
                sock.sendall(post_request({"alias": "flood", "cmd": "head",
                                           "args": ["-c", str(size), "/dev/zero"]}))
                time.sleep(self.sizes["flood_pause"])       # paused
                pause_end = time.monotonic() + self.sizes["flood_pause"]
                while time.monotonic() < pause_end:          # slow: 64 KiB per 5 ms
                    sock.recv(65536)
                    time.sleep(0.005)
                drain(sock, bytearray(MIB))
        finally:
            stop.set()
            thread.join()
        hwm = proc_status(pid, "VmHWM")
        peak = max(samples + ([hwm] if hwm > hwm_before else []))
        growth = (peak - idle) / MIB
        self.figures["flood " + name] = dict(idle_rss_mib=idle / MIB, peak_rss_mib=peak / MIB,
                                             growth_mib=growth, bytes=size)
        self.row("flood to a paused client (%s): peak RSS" % name, "+%.1f MiB" % growth,
                 "idle %.1f MiB" % (idle / MIB), None, "< 16 MiB", growth < 16)

    # -- the run -------------------------------------------------------------

    PARTS = ("stream", "latency", "rate", "first-byte", "kill", "scale", "idle", "flood")

    @contextlib.contextmanager
    def server(self, tls=False, prelude=None):
        """A fresh rexec server (HTTPS with the throwaway certificate if `tls`)."""
        server = Server(*(("--certfile", self.tls[0], "--keyfile", self.tls[1]) if tls else ()),
                        prelude=prelude)
        try:
            yield server
        finally:
            server.stop()

    def run(self, parts):
        clients = ("curl", "python") if CURL else ("python",)
        if not self.tls:
            print("  (no openssl: the TLS rows are skipped)", file=sys.stderr)
        if "stream" in parts:
            for tls in (False, True) if self.tls else (False,):
                with self.server(tls) as server:
                    for client in clients:
                        self.stream(server, tls, client)
        with self.server() as server:
            if "latency" in parts:
                self.latency(server)
            if "rate" in parts:
                self.rate(server)
            if "first-byte" in parts:
                self.first_byte(server)
            if "kill" in parts:
                self.kill_latency(server, chatty=False)
                self.kill_latency(server, chatty=True)
        with self.server() as server:   # a fresh one: its idle RSS is the baseline for scale
            if "scale" in parts:
                self.scale(server)
            if "idle" in parts:
                self.idle_cpu(server)
        if "flood" in parts:
            modes = [("splice", None)] if rexec.CAN_SPLICE else []
            modes.append(("copy", "rexec.CAN_SPLICE = False"))
            for name, prelude in modes:
                with self.server(prelude=prelude) as server:
                    self.flood(name, server)
            if self.tls:
                with self.server(tls=True) as server:
                    self.flood("TLS", server, tls=True)


def machine_info():
    model = "?"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return dict(nproc=os.cpu_count(), cpu=model, kernel=os.uname().release,
                python=sys.version.split()[0], date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                load=" ".join("%.2f" % x for x in os.getloadavg()))


def format_table(rows):
    """Markdown: ratios first, then the figures."""
    lines = ["| measure | ratio | target | met | rexec | baseline |",
             "| --- | ---: | --- | --- | ---: | --- |"]
    for name, value, baseline, ratio, target, met in rows:
        lines.append("| %s | %s | %s | %s | %s | %s |" % (
            name, "%.2fx" % ratio if ratio is not None else "", target or "",
            {True: "met", False: "**missed**", None: ""}[met], value, baseline))
    return "\n".join(lines)


def bench_main(argv):
    import argparse
    parser = argparse.ArgumentParser(prog="test_rexec.py bench",
                                     description="Benchmark rexec against bare baselines.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes and counts (a smoke run of about a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    parser.add_argument("--only", metavar="PARTS", default=",".join(Bench.PARTS),
                        help="comma-separated parts to run (default all: %(default)s)")
    options = parser.parse_args(argv)
    parts = options.only.split(",")
    if not set(parts) <= set(Bench.PARTS):
        parser.error("unknown part(s): %s" % ", ".join(sorted(set(parts) - set(Bench.PARTS))))
    if sys.version_info < (3, 7):
        print("the benchmark needs Python 3.7 or newer", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sizes = QUICK if options.quick else FULL
    info = machine_info()
    tmp = tempfile.mkdtemp(prefix="rexec-bench-")
    try:
        bench = Bench(sizes, tmp)
        bench.run(parts)
    finally:
        shutil.rmtree(tmp, True)
    info["load_after"] = " ".join("%.2f" % x for x in os.getloadavg())
    print("rexec %s benchmark%s: %d CPU(s) %s, Linux %s, Python %s, %s, load %s -> %s" % (
        rexec.__version__, " (--quick)" if options.quick else "", info["nproc"], info["cpu"],
        info["kernel"], info["python"], info["date"], info["load"], info["load_after"]))
    print(format_table(bench.rows))
    if options.json:
        with open(options.json, "w") as handle:
            json.dump(dict(machine=info, quick=options.quick, sizes=sizes, figures=bench.figures,
                           targets=[dict(measure=r[0], ratio=r[3], target=r[4], met=r[5])
                                    for r in bench.rows]), handle, indent=2)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["bench"]:
        sys.exit(bench_main(sys.argv[2:]))  # noqa: F821 -- defined in the benchmark section
    unittest.main()
