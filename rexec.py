#!/usr/bin/env python3
"""rexec -- run processes on this host for HTTP clients and stream their stdout.

A client POSTs a JSON description of a command to /process.  rexec starts it
in a process group of its own and streams whatever it writes to stdout back as
the HTTP response, live, in chunks written as soon as they are read; the
response ends with trailers that carry the exit status (Rexec-Exit-Code) and
why the process ended (Rexec-Reason); for clients that drop trailers, the
Accept header can ask for server-sent events instead, or for one JSON answer
once the process has ended.  Closing the connection ends the whole process
group.  GET /process lists what runs, DELETE /process/ALIAS ends one,
GET /metrics and GET /health are for operators.  The same file is a client:

    python3 rexec.py --port 8910                              # the server
    python3 rexec.py run --url http://host:8910 -- du -h -c   # the client

SECURITY WARNING: rexec runs any command, as the user it runs as, for whoever
may talk to it.  With no token configured it serves loopback peers only
("protected mode").  Set REXEC_TOKEN (or --token-file; named tokens with
roles: --tokens), and TLS (--certfile/--keyfile, --client-ca) beyond a trusted
network, before you let anyone else reach its port; --allow narrows what may
be run.

Standard library only; CPython 3.6 or newer; Linux first, other POSIX systems
(macOS) without the Linux fast paths.  Not for Windows.

The sections of this file, in order:

    Protocol            chunk framing; BodyWriter (ChunkedWriter, RawWriter), which
                        owns every byte path from a child's output to a socket;
                        its encoders (EventEncoder, OutputCollector) and the
                        Accept header's choice among them; new_poller(), what
                        every loop waits in
    Requests            parse_spec(): what a POST /process body may say
    Process supervision Ending, the one owner of how a process group ends;
                        Process (one child); StderrLines, its stderr into the log;
                        Stream, the event loop of one stream
    Registry, metrics   the alias registry; counters for GET /metrics
    Access              who may do what: named tokens (Credential), their roles, the
                        tokens file; Access, the whole of it, swapped whole on SIGHUP
    Logging             one line per event, as text or JSON, in one write straight to
                        the log; a start line may wait for its end's (log_event_soon)
    HTTP handler        RexecHandler: the API on one connection, its socket
                        non-blocking throughout (DeadlineReader, SocketWriter)
    Server              RexecServer: the accept loop, a thread per connection
                        (WarmThreads), the drain, signals and reloads
    Command line        the server's options, its start-up and signals: serve();
                        rexec.py token, which makes a token and its tokens-file line
    Client              rexec.py run | ps | kill
"""

import argparse
import base64
import collections
import contextlib
import difflib
import email.utils
import errno
import fcntl
import functools
import hashlib
import hmac
import http.client
import http.server
import io
import ipaddress
import json
import logging
import math
import mmap
import os
import pty
import random
import re
import resource
import secrets
import select
import selectors
import shlex
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import termios
import threading
import time
import urllib.parse
from http import HTTPStatus

try:
    import ssl
except ImportError:  # a Python built without OpenSSL still serves plain HTTP
    ssl = None

__version__ = "1.0.0"

DEFAULT_IP = "0.0.0.0"
DEFAULT_PORT = 8910
DEFAULT_GRACE = 3.0          # seconds a process group gets between SIGTERM and SIGKILL
MAX_GRACE = 3600.0           # a longer --grace is a typo, and overflows the shutdown's wait
DEFAULT_MAX_PROCS = 1024     # concurrent processes; high enough for a 1000-stream fleet
MAX_BODY = 1 << 20           # request bodies above this get 413 without being read
READ_SIZE = 64 * 1024        # the most a small chunk, stdin write or discard read takes at once
COPY_SIZE = 256 * 1024       # a copied large chunk (TLS, a terminal, no splice): fewer chunks,
                             # less CPU per byte -- a quarter less over TLS than 64 KiB chunks
SPLICE_MIN = 16 * 1024       # smaller chunks are read in place: one send beats three calls
OUTPUT_BURST = 16            # large chunks passed on in a row before the selector runs again
HEAD_ROOM = 16               # bytes kept free before a chunk read in place, for its head
HEAD_WAIT = 0.005            # seconds a response head waits for output to go out with it
COALESCE_MAX = 64 * 1024     # a first frame up to this size is copied to go out with the head
FIRST_WAIT = 0.001           # seconds a first output waits for the exit, once the output ended
LOG_HOLD = HEAD_WAIT         # seconds a start line may wait to go out with the end line
PIPE_SIZE = 1 << 20          # asked of F_SETPIPE_SZ: fewer, larger chunks for fast children
REQUEST_TIMEOUT = 30.0       # seconds for a request (head and body) to arrive, keep-alive idle too
WRITE_TIMEOUT = 30.0         # seconds a client that stopped reading may hold up a stream's end
EVENT_KEEPALIVE = 15.0       # seconds an event stream may be silent: proxies time idle ones out
DEFAULT_MAX_OUTPUT = 8 << 20   # bytes of output a JSON answer holds (--max-output)
HANGUP_CHECK = 0.05          # seconds between looks for a dead child's pipe losing its last
                             # writer while a slow client has yet to take what is in it
HANDSHAKE_TIMEOUT = 10.0     # seconds for a TLS handshake, on the connection's own thread
EARLY_LIMIT = 64 * 1024      # bytes of a client's next request held while its stream runs
MAX_HEAD = 64 * 1024         # request line and header lines, empty line included: more is 431
MAX_REQUEST_LINE = 64 * 1024   # a longer one is 414, as in http.server
MAX_HEADER_LINES = 100       # the empty line included, as http.client counts: more is 431
MAX_EMPTY_LINES = 4          # CRLFs skipped before a request line (RFC 9112 2.2): more is 400
LOGGED_PATH = 200            # characters of a path an access line keeps: no log line may
                             # outgrow its request, an unauthorized one least of all
LINGER_TIME = 1.0            # seconds spent discarding an unread body before closing
THREAD_STACK_SIZE = 512 * 1024   # a thread per connection: 1000 streams fit in little memory
WARM_IDLE = 10.0             # seconds a connection's thread waits for the next one, then exits
LISTEN_BACKLOG = 1024        # a burst of connects waits in the kernel instead of being refused
ACCEPT_PAUSE = 0.1           # seconds without accepting while out of descriptors (EMFILE)
DRAIN_SLACK = 5.0            # seconds a stop waits past the grace for streams to send their end
DRAIN_POLL = 0.05            # seconds between a draining stop's looks at its streams
CUT_WAIT = 1.0               # seconds for streams cut off at a drain's end to write their logs
SD_LISTEN_FDS_START = 3      # systemd socket activation hands the socket over as fd 3
UNIX_PEER = "unix"           # the peer address of a client on an inherited Unix socket
TRACE = 5                    # the -vv log level, below DEBUG

# Socket errnos that mean "the peer is gone", not "rexec is broken".
PEER_GONE_ERRNOS = frozenset({
    errno.EPIPE, errno.ECONNRESET, errno.ECONNABORTED, errno.ESHUTDOWN,
    errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETRESET,
})
# What each signal that would end rexec by default does instead (README, Operating).
# Stop: end every group, send each stream its trailers, exit 0; a second one kills now.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGQUIT})
# Reload: read the tokens file, --token-file and the TLS certificate and key again.
RELOAD_SIGNAL = signal.SIGHUP
# Logged and ignored: none has a meaning here, and dying of one would orphan every child.
IGNORED_SIGNALS = frozenset(
    [getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGALRM", "SIGVTALRM",
                                        "SIGPROF", "SIGIO", "SIGPWR", "SIGSTKFLT")
     if hasattr(signal, name)]
    + list(range(getattr(signal, "SIGRTMIN", 0), getattr(signal, "SIGRTMAX", -1) + 1)))
# accept() errnos that say "not now": the process or system is out of something.
OUT_OF_RESOURCES_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
REASONS = ("exit", "timeout", "killed", "shutdown", "disconnect")
TRAILERS = ("Rexec-Exit-Code", "Rexec-Reason")   # how a stream says how its process ended
# "inherit": to rexec's side, as the original did -- read here and logged line by line.
STDERR_MODES = {"inherit": subprocess.PIPE, "merge": subprocess.STDOUT,
                "discard": subprocess.DEVNULL}
MAX_STDERR_LINE = 4096       # bytes of a child's stderr line per log event; longer: in pieces
STDERR_BURST = 200           # a stream's stderr lines logged at once, then ...
STDERR_LINES_PER_SECOND = 100   # ... this many a second; the rest are counted, not logged
STDERR_DROP_REPORT = 1.0     # seconds from a line dropped to the line that says how many
STDERR_DRAIN = 16            # READ_SIZE reads, at most, of what is left in a stream's end
MAX_NESTING = 32             # JSON depth; deeper input could overflow a small thread stack
# An unterminated string runs to the end: every match succeeds, so the scan stays linear.
JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"?', re.DOTALL)
MAX_TIMEOUT = 365 * 86400.0  # a longer "timeout" is surely a mistake; leave it out for none
MAX_ALIAS = 128              # characters; an alias is repeated in every log line and listing
MAX_NUMBER = 40              # characters of a JSON number literal: int() of a longer one could
                             # take seconds under the GIL (3.11+ refuses them itself, 3.6 not)
MAX_SELECT = 86400.0         # selectors overflow on huge timeouts; waking daily costs nothing
CONTENT_LENGTH = re.compile(r"[0-9]{1,16}")   # ASCII only: int() also takes "+5", "1_0", "٥"
HTTP_VERSION = re.compile(r"HTTP/([0-9]{1,10})\.([0-9]{1,10})")
HEAD_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")   # CTLs but HTAB (RFC 9110 5.5)
LINE_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")   # in a request line, HTAB too (RFC 9112 3)
# A request head that nothing in it makes the line-by-line reads refuse, or
# read otherwise: a request line of method, target (no control character, and
# none that str.split() takes for white space: NEL, NBSP) and HTTP/d.d, each
# after one space; field lines of a token, a colon and a value without control
# characters but HTAB; all ended by CRLF, then the empty line.  Linear: each
# repetition ends at a byte it cannot contain.
WHOLE_HEAD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+ [!-~\x80-\x84\x86-\x9f\xa1-\xff]+ "
                        rb"HTTP/[0-9]\.[0-9]\r\n"
                        rb"((?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t -~\x80-\xff]*\r\n)*\r\n)")
SPEC_FIELDS = ("alias", "cmd", "args", "cwd", "envs", "timeout", "stdin", "stderr", "tty")
SPEC_FIELD_SET = frozenset(SPEC_FIELDS)
ROLES = ("run", "read", "admin")   # what a token may do (README, Security); "run" by default
LEGACY_TOKEN = "legacy"      # the name of the token of REXEC_TOKEN or --token-file (an admin)
TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,31}")   # in every log line and metric
TOKEN_HASH = re.compile(r"sha256:([0-9a-fA-F]{64})")
TOKEN_BYTES = 32             # of entropy in a token that `rexec.py token` makes
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031 if sys.platform.startswith("linux") else None)
CAN_SPLICE = hasattr(os, "splice")
CAN_PIDFD = hasattr(os, "pidfd_open")
CAN_EVENTFD = hasattr(os, "eventfd")   # 3.10+: one descriptor, and no pipe, per wake-up channel
WAKE = (1).to_bytes(8, sys.byteorder)  # adds 1 to an eventfd's counter; 8 bytes in a pipe
# "Try again once the descriptor is ready"; TLS says so with SSLErrors of its own.
WOULD_BLOCK = (BlockingIOError, InterruptedError) + (
    (ssl.SSLWantReadError, ssl.SSLWantWriteError) if ssl is not None else ())
# A stream waits on a handful of descriptors for a short while: poll(2) needs no
# descriptor of its own and no syscall per (un)registration, as epoll does.
# Linux only: macOS's poll(2) does not serve terminals (tty streams).
USE_POLL = sys.platform.startswith("linux") and hasattr(select, "poll")
FS_ENCODING = sys.getfilesystemencoding()       # what os.fsencode() encodes str with,
FS_ERRORS = sys.getfilesystemencodeerrors()     # and how: surrogateescape on POSIX

log = logging.getLogger("rexec")


# --------------------------------------------------------------------------
# Protocol: framing, and the writer that owns every byte path
# --------------------------------------------------------------------------

class ClientDisconnected(Exception):
    """The client is gone: a write failed, timed out, or its socket hit EOF."""


class Refused(Exception):
    """A request that gets an error response: status, one-line message, headers."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


def is_peer_gone(exc):
    """True for the socket errors a vanished client causes."""
    if isinstance(exc, WOULD_BLOCK):
        return False
    if ssl is not None and isinstance(exc, ssl.SSLError):
        return True
    return isinstance(exc, (ConnectionError, socket.timeout)) or (
        isinstance(exc, OSError) and exc.errno in PEER_GONE_ERRNOS)


def chunk_head(size):
    """The line that opens a chunk of `size` (> 0) bytes."""
    return b"%X\r\n" % size


def last_chunk(trailers):
    """The zero-size chunk that ends a chunked body, with its trailer fields."""
    return b"0\r\n" + b"".join(b"%s: %s\r\n" % (k.encode("ascii"), v.encode("ascii"))
                               for k, v in trailers) + b"\r\n"


_last_chunks = {}   # (exit code, reason) -> its last chunk: a few hundred at most


def ending_chunk(exit_code, reason):
    """The last chunk of a stream whose process ended so, its trailers saying how."""
    chunk = _last_chunks.get((exit_code, reason))
    if chunk is None:
        chunk = _last_chunks[exit_code, reason] = last_chunk(
            zip(TRAILERS, (str(exit_code), reason)))
    return chunk


def fionread(fd):
    """Bytes waiting to be read in a pipe, socket or terminal."""
    count = bytearray(4)   # mutable: ioctl() tries that first, and bytes cost a failed try
    fcntl.ioctl(fd, termios.FIONREAD, count)
    return int.from_bytes(count, sys.byteorder)


def read_output(fd, view):
    """Read a child's output into `view`: the count; 0 at its end (EIO is how
    a terminal whose last writer is gone says so); None when nothing is there."""
    try:
        return os.readv(fd, [view])
    except BlockingIOError:
        return None
    except OSError as exc:
        if exc.errno != errno.EIO:
            raise
        return 0


POLLIN = getattr(select, "POLLIN", 1)     # poll(2)'s event bits, the ones rexec asks for;
POLLOUT = getattr(select, "POLLOUT", 4)   # every other bit that comes (a hang-up, an error)
                                          # means "look": the read or write will tell


class SelectorPoller:
    """select.poll()'s interface -- register(fd, events), which also modifies;
    unregister(fd); poll(milliseconds or None) -> [(fd, events)] -- on a
    selectors.DefaultSelector, where poll(2) cannot serve (see USE_POLL).
    Its descriptor, if it has one, closes as soon as it is dropped: a selector
    refers to itself (its map), so left alone it would wait for the cyclic
    garbage collector, holding a kqueue or epoll descriptor."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()

    def __del__(self):
        self._selector.close()

    def register(self, fd, events):
        mask = ((selectors.EVENT_READ if events & POLLIN else 0)
                | (selectors.EVENT_WRITE if events & POLLOUT else 0))
        if fd in self._selector.get_map():
            self._selector.modify(fd, mask)
        else:
            self._selector.register(fd, mask)

    def unregister(self, fd):
        self._selector.unregister(fd)

    def poll(self, timeout=None):
        return [(key.fd, (POLLIN if mask & selectors.EVENT_READ else 0)
                 | (POLLOUT if mask & selectors.EVENT_WRITE else 0))
                for key, mask in self._selector.select(None if timeout is None
                                                       else timeout / 1000)]


def new_poller():
    """What a loop waits in: poll(2) itself where USE_POLL (no descriptor of
    its own, no syscall to register), else a SelectorPoller."""
    return select.poll() if USE_POLL else SelectorPoller()


def poll_ms(timeout):
    """A timeout in seconds (None: none) as poll() takes it."""
    return None if timeout is None else math.ceil(min(timeout, MAX_SELECT) * 1000)


def wait_ready(fileobj, events, timeout):
    """Block until `fileobj` (a descriptor, or what has fileno()) is ready for
    `events` (POLLIN or POLLOUT); False when `timeout` passes first."""
    poller = new_poller()
    poller.register(fileobj if isinstance(fileobj, int) else fileobj.fileno(), events)
    return bool(poller.poll(poll_ms(timeout)))


_frame_buffers = threading.local()   # each thread's BodyWriter buffer (see _frame_buffer())


class BodyWriter:
    """Moves one child's output into one response body on a non-blocking socket.

    The stream says when the output is readable (output_ready) and when the
    socket is writable (flush); the writer picks the byte path.  A chunk of
    SPLICE_MIN bytes or more goes from the pipe straight into the socket with
    splice(2) where it can (not TLS, not a terminal); everything else is read
    in place into the writer's buffer, between room for its framing, so that
    one send() passes on a whole frame (and, over TLS, whole records).

    At most one frame is pending: the output is read only while the writer is
    idle, so a slow client slows the child through its full pipe instead of
    growing memory here.  Once the client is gone (lose()), what the child
    writes is read and dropped.  A write that fails because the peer is gone
    raises ClientDisconnected.

    Subclasses frame the body, each in one way (as h11 keeps a writer per
    framing): ChunkedWriter for HTTP/1.1, RawWriter for HTTP/1.0.
    """

    headers = ()            # what the response head says of the framing
    keeps_connection = True  # False: the body ends when the connection closes
    tail = b""              # what follows each frame's data
    # Each writer's own once it changes:
    output_open = True      # False once the output reached its end
    large = False           # a chunk of SPLICE_MIN or more came (_take_chunk)
    gone = False            # the client left: output is dropped
    sent = 0                # output bytes framed for the client
    progress_at = None      # when the client last took bytes (monotonic)
    framed_at = None        # when the last frame was queued (monotonic)
    _buffer = None          # see _frame_buffer()
    _head = _head_due = None   # the response head while held (start())
    timed = False           # True while tick() may have something to send (see there)
    _first_held = False     # the first output went into the held head

    def head(self, size):
        """What comes before a frame of `size` (> 0) bytes."""
        raise NotImplementedError

    def last(self, exit_code, reason):
        """What ends the body once the process has ended, and how."""
        raise NotImplementedError

    def __init__(self, sock, output_fd, tty, label, encoder=None):
        self.sock = sock
        self.output_fd = output_fd
        self.label = label                    # the alias, for -vv lines
        self.encoder = encoder                # None: the output as it is, else see EventEncoder
        tls = ssl is not None and isinstance(sock, ssl.SSLSocket)
        self.can_splice = CAN_SPLICE and not tls and not tty and encoder is None
        self.grow_pipe = bool(F_SETPIPE_SZ) and not tty   # see _grow_pipe()
        self.pending = collections.deque()   # bytes, or an int: bytes to splice
        self.progress_at = self.framed_at = time.monotonic()
        self.timed = encoder is not None and encoder.keepalive is not None

    @property
    def idle(self):
        return not self.pending

    @property
    def holds_head(self):
        """True while the response head waits to go out (start())."""
        return self._head is not None

    @property
    def wants_output(self):
        """True while the output should be read: there is room, or no client."""
        return self.output_open and not self.pending

    def output_ready(self):
        """Pass on what the child wrote.  After a large chunk the client took at
        once, the next one goes straight out too (up to OUTPUT_BURST), without a
        trip through the selector: a fast child costs fewer calls per byte.
        The first output is read on at once: when the pipe is then at its end
        (a short command that wrote and exited), the output stays held with the
        head for the exit, FIRST_WAIT at most, to go out in one send with the
        end of the body; else it goes out at once."""
        for _ in range(OUTPUT_BURST):
            size = self._take_chunk()
            wants_output = self.output_open and not self.pending
            if size and self._head is not None and wants_output:
                # The first output is held: read on at once, so that the end of
                # a child that wrote and exited is seen without another poll.
                continue
            if size < SPLICE_MIN or not wants_output:
                break
        if self._first_held and self._head is not None and self.output_open:
            self._queue()   # the child writes on: its first output goes out now
            self.flush()

    def flush(self):
        """Send what the socket takes without blocking; True once nothing is pending."""
        self.progress_at = time.monotonic()
        try:
            while self.pending:
                item = self.pending[0]
                if isinstance(item, int):
                    rest = item - self._splice(item)
                else:
                    rest = memoryview(item)[self.sock.send(item):]
                if rest:
                    self.pending[0] = rest
                else:
                    self.pending.popleft()
            return True
        except WOULD_BLOCK:
            return False
        except OSError as exc:
            if is_peer_gone(exc):
                raise ClientDisconnected(str(exc)) from exc
            raise

    def start(self, head):
        """Hold the response head for the first output (or the end) to go out
        with it in one send; HEAD_WAIT at most, then alone (see tick())."""
        self._head, self._head_due = head, time.monotonic() + HEAD_WAIT
        self.timed = True

    def finish(self, exit_code, reason):
        """Send what is pending and the end of the body, which says how the
        process ended; blocking up to WRITE_TIMEOUT for each pause of the client's."""
        if self.encoder is not None:
            self._queue_frame(self.encoder.end(exit_code, reason))
        self._queue(self.last(exit_code, reason))
        while not self.flush():
            if not wait_ready(self.sock, POLLOUT, WRITE_TIMEOUT):
                raise ClientDisconnected("the client stopped reading")

    def tick(self, now):
        """Send what time calls for: the response head once it waited HEAD_WAIT
        for output, and the encoder's keep-alive once the stream has been
        silent for EVENT_KEEPALIVE (a proxy in between must not take it for a
        dead one).  Returns when the writer next sends something of its own
        (a monotonic time), or None.  Only `timed` writers need a tick."""
        due = None
        if self._head is not None:
            if now >= self._head_due:
                self._queue()
                self.flush()
            else:
                due = self._head_due
        encoder = self.encoder
        if encoder is not None and encoder.keepalive is not None and not self.gone:
            if now >= self.framed_at + EVENT_KEEPALIVE and not self.pending:
                self._queue_frame(encoder.keepalive)
                self.flush()
            due = earliest(due, self.framed_at + EVENT_KEEPALIVE)
        return due

    def lose(self):
        """The client is gone: drop what is pending, and from now on the output."""
        self.gone = True
        self._head = None
        self.timed = False
        self.pending.clear()

    def _take_chunk(self):
        """Frame one chunk of output (or drop it) and send what the socket
        takes; the chunk's size, 0 if there was none."""
        fd = self.output_fd
        # How much is there decides the path, once a large chunk was seen: before,
        # everything is read in place (a short command costs no FIONREAD).
        size = fionread(fd) if self.large else 0
        if size >= SPLICE_MIN and self.can_splice and not self.gone:
            size = min(size, PIPE_SIZE)
            self._queue(self.head(size), size, self.tail)
        else:
            view = self._frame_buffer()
            size = read_output(fd, view[HEAD_ROOM:len(view) - len(self.tail)])
            if size == 0:
                self.output_open = False
            if not size:
                return 0
            if size >= SPLICE_MIN and (self.can_splice or self.grow_pipe) and not self.large:
                self.large = True
                if self.grow_pipe:
                    self._grow_pipe()
            if self.gone:
                return size
            if self.encoder is None:
                self._queue(self._frame_in_place(view, size), output=True)
                self.framed_at = time.monotonic()
            else:
                self._queue_frame(self.encoder.encode(view[HEAD_ROOM:HEAD_ROOM + size]), True)
        self.sent += size
        if log.isEnabledFor(TRACE):
            log_event(TRACE, "chunk", alias=self.label, bytes=size)
        if self.pending:   # not when the chunk waits with the held head
            self.flush()
        return size

    def _queue(self, *items, output=False):
        """Queue items (bytes, or an int: bytes to splice) after the held head.
        `output`: they are a frame of the child's output."""
        if self._head is not None:   # the held response head goes first, in one send if small
            if (output and not self._first_held and len(items) == 1
                    and not isinstance(items[0], int) and len(items[0]) <= COALESCE_MAX):
                # The first output waits with the head; output_ready() decides
                # for how long (see there).
                self._head += items[0]
                self._head_due = min(self._head_due, time.monotonic() + FIRST_WAIT)
                self._first_held = True
                return
            head, self._head = self._head, None
            self.timed = self.encoder is not None and self.encoder.keepalive is not None
            if items and not isinstance(items[0], int) and len(items[0]) <= COALESCE_MAX:
                items = (head + items[0],) + items[1:]
            else:
                items = (head,) + items
        for item in items:
            if item:   # never an empty write
                self.pending.append(item)

    def _queue_frame(self, data, output=False):
        """Queue `data`, copied into one frame; nothing at all when it is empty
        (an empty chunk would end the body)."""
        if data:
            self._queue(self.head(len(data)) + data + self.tail, output=output)
            self.framed_at = time.monotonic()

    def _frame_buffer(self):
        """The writer's own buffer, at most HEAD_ROOM + COPY_SIZE long: a large
        chunk goes out as whole 16 KiB TLS records.  Allocated on first use
        (children that write nothing never need one); reused, so only while idle.

        OpenSSL copies each record out of this buffer into its own.  When the
        two addresses share a page offset to within a cache line, that copy
        runs several times slower (4K aliasing: the CPU takes the loads for
        reloads of the stores just made), and two buffers from the same heap
        can do so by construction -- measured here as 3.0 instead of 2.1 s of
        CPU per GiB over TLS.  OpenSSL's buffer is not ours to place, so each
        stream puts its chunks at a random cache-line offset in a page-aligned
        buffer: no heap layout can make every stream slow.  The mapping is the
        thread's, made once and reused by each stream it serves, one at a time
        (a short command costs no mapping of its own); the offset is each
        stream's (an unlucky one does not stay with the thread)."""
        if self._buffer is None:
            mapped = getattr(_frame_buffers, "view", None)
            if mapped is None:
                mapped = _frame_buffers.view = memoryview(mmap.mmap(-1, 4096 + COPY_SIZE))
            offset = 64 * (random.getrandbits(6) or 1)   # the mapping is page-aligned
            self._buffer = mapped[offset:offset + COPY_SIZE]
        return self._buffer

    def _frame_in_place(self, view, size):
        """The frame around the `size` bytes just read into `view` at HEAD_ROOM."""
        head, end = self.head(size), HEAD_ROOM + size
        start = HEAD_ROOM - len(head)
        view[start:HEAD_ROOM] = head
        view[end:end + len(self.tail)] = self.tail
        return view[start:end + len(self.tail)]

    def _grow_pipe(self):
        """A child that fills large chunks gets a PIPE_SIZE pipe: fewer, larger
        chunks.  Only such a child: every grown pipe counts against the user's
        pipe budget (fs.pipe-user-pages-soft, 64 MiB), and once an unprivileged
        user is over it, all its new pipes -- its children's too -- get 8 KiB."""
        self.grow_pipe = False
        try:
            fcntl.fcntl(self.output_fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:  # over the per-user pipe budget: the default works
            pass

    def _splice(self, size):
        moved = os.splice(self.output_fd, self.sock.fileno(), size,
                          flags=os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK)
        if moved <= 0:  # only this thread reads the pipe, so FIONREAD's bytes are there
            raise RuntimeError("pipe lost %d announced bytes" % size)
        return moved


class ChunkedWriter(BodyWriter):
    """HTTP/1.1: each read is one chunk, and the last chunk carries the trailers."""

    headers = (("Transfer-Encoding", "chunked"), ("Trailer", ", ".join(TRAILERS)))
    tail = b"\r\n"

    def head(self, size):
        return chunk_head(size)

    def last(self, exit_code, reason):
        return ending_chunk(exit_code, reason)


class RawWriter(BodyWriter):
    """HTTP/1.0: the output as it is; the body ends when the connection closes."""

    headers = (("Connection", "close"),)
    keeps_connection = False

    def head(self, size):
        return b""

    def last(self, exit_code, reason):
        return b""


def incomplete_utf8_tail(data):
    """How many bytes (0 to 3) at the end of `data` begin a UTF-8 character
    that is not complete yet: the next read may complete it."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:   # not a continuation byte: a character begins here
            length = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else (
                4 if byte & 0xF8 == 0xF0 else 1)
            return back if length > back else 0
    return 0


class EventEncoder:
    """The output as server-sent events (Accept: text/event-stream), for
    clients that drop trailers: each read is one event

        event: output
        data: {"text":"..."}       (or {"base64":"..."} for bytes that are not UTF-8)

    and the end is an exit event, {"exit_code":N,"reason":"..."}.  The text
    payloads encoded as UTF-8 and the base64 ones decoded give back, in order,
    exactly the bytes the child wrote: a character split between two reads is
    held back until the next one completes it.  Each data line is one line of
    compact JSON.
    """

    content_type = "text/event-stream; charset=utf-8"
    headers = (("Cache-Control", "no-cache"),)   # an event stream is never to be cached
    keepalive = b": keepalive\n\n"             # a comment: event parsers skip it

    def __init__(self):
        self._held = b""   # the start of a character that the next read completes

    def encode(self, data):
        data = self._held + bytes(data)
        whole = len(data) - incomplete_utf8_tail(data)
        self._held = data[whole:]
        return self._output(data[:whole])

    def end(self, exit_code, reason):
        rest, self._held = self._held, b""
        return self._output(rest) + event("exit", {"exit_code": exit_code, "reason": reason})

    def _output(self, data):
        if not data:
            return b""
        try:
            return event("output", {"text": data.decode("utf-8")})
        except UnicodeDecodeError as exc:   # text as far as it is text, then the bytes
            text = self._output(data[:exc.start]) if exc.start else b""
            return text + event("output", {"base64": base64.b64encode(data[exc.start:])
                                           .decode("ascii")})


def event(name, payload):
    """One server-sent event: its name, and `payload` as one line of compact JSON
    (json.dumps escapes every line break, so the data is one line)."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return b"event: %s\ndata: %s\n\n" % (name.encode("ascii"), data.encode("utf-8"))


class OutputCollector:
    """The output kept for one JSON answer (Accept: application/json), up to
    `limit` bytes; the rest is read and dropped, never held.  Nothing of it is
    sent while the process runs: answer() is the whole response body."""

    keepalive = None

    def __init__(self, limit):
        self.limit = limit
        self.data = bytearray()
        self.truncated = False

    def encode(self, data):
        room = self.limit - len(self.data)
        if len(data) > room:
            self.truncated = True
        self.data += data[:room]
        return b""

    def end(self, exit_code, reason):
        return b""

    def answer(self, alias, exit_code, reason):
        data = bytes(self.data)
        if self.truncated:   # a character cut at the limit is no text
            data = data[:len(data) - incomplete_utf8_tail(data)]
        answer = {"alias": alias, "exit_code": exit_code, "reason": reason}
        try:
            answer["output"] = data.decode("utf-8")
        except UnicodeDecodeError:
            answer["output_base64"] = base64.b64encode(data).decode("ascii")
        answer["truncated"] = self.truncated
        return answer


# What an Accept header may choose; the raw stream is the default.
ANSWERS = {"application/octet-stream": "raw", "text/event-stream": "events",
           "application/json": "json"}


def chosen_answer(accept):
    """The answer an Accept header prefers among ANSWERS (the highest q, the
    first of equals); "raw" when it names none of them."""
    best, best_q = "raw", 0.0
    if not accept:
        return best
    for item in accept.split(","):
        media, _, params = item.partition(";")
        answer = ANSWERS.get(media.strip().lower())
        if answer is None:
            continue
        q = 1.0
        for param in params.split(";"):
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > best_q:
            best, best_q = answer, q
    return best


# --------------------------------------------------------------------------
# Requests: what a client may ask for
# --------------------------------------------------------------------------

class ProcessSpec:
    """A validated POST /process body; see parse_spec()."""

    __slots__ = SPEC_FIELDS

    def __init__(self, alias, cmd, args, cwd, envs, timeout, stdin, stderr, tty):
        self.alias, self.cmd, self.args, self.cwd, self.envs = alias, cmd, args, cwd, envs
        self.timeout, self.stdin, self.stderr, self.tty = timeout, stdin, stderr, tty


def _text(obj, name, default=None, required=False, nonempty=False):
    """Field `name` of `obj` as a str that can become an OS argument."""
    if name not in obj:
        if required:
            raise Refused(HTTPStatus.BAD_REQUEST, "field %r is required" % name)
        return default
    value = obj[name]
    if not isinstance(value, str):
        raise Refused(HTTPStatus.BAD_REQUEST, "field %r must be a string" % name)
    _check_os_string(value, "field %r", name)
    if nonempty and not value:
        raise Refused(HTTPStatus.BAD_REQUEST, "field %r must not be empty" % name)
    return value


def _check_os_string(value, what, *args):
    """Refuse (400) `value` unless it can be an OS string; `what`, or `what % args`,
    names it (made only then: a request's fields are nearly always fine)."""
    if "\0" in value:
        problem = "contains a NUL byte"
    else:
        try:
            value.encode(FS_ENCODING, FS_ERRORS)
            return
        except UnicodeEncodeError:
            problem = "is not valid Unicode text"
    raise Refused(HTTPStatus.BAD_REQUEST, "%s %s" % (what % args if args else what, problem))


def alias_problem(alias):
    """What is wrong with `alias` ("must be ..."), or None if it can be one.

    An alias is at most MAX_ALIAS printable characters (str.isprintable: no
    control, format or separator characters but the space, no lone surrogates),
    so that one_line() leaves it as it is: a log line, a listing or a message
    shows it verbatim, and it can be typed back to DELETE it.
    """
    if len(alias) > MAX_ALIAS:
        return "must be at most %d characters" % MAX_ALIAS
    if not alias.isprintable():
        return ("must be printable text (no control, format or line-separator characters, "
                "no lone surrogates)")
    return None


class JSONLimit(ValueError):
    """Valid JSON that goes beyond what rexec parses (see load_json)."""


def _json_number(convert):
    def parse(literal):
        if len(literal) > MAX_NUMBER:
            raise JSONLimit("a number longer than %d characters" % MAX_NUMBER)
        return convert(literal)
    return parse


def _json_constant(name):
    raise ValueError("%s is not a JSON number" % name)


_json_decoders = threading.local()   # each thread's decoder for load_json(), made once


def load_json(text):
    """json.loads, but a number literal over MAX_NUMBER characters raises JSONLimit
    before it is converted (int() is quadratic; 3.11+ would raise its own error at
    4300 digits), and NaN and Infinity, which JSON does not have, raise ValueError."""
    decoder = getattr(_json_decoders, "decoder", None)
    if decoder is None:   # json.loads() with these options would make one for each call
        decoder = _json_decoders.decoder = json.JSONDecoder(
            parse_int=_json_number(int), parse_float=_json_number(float),
            parse_constant=_json_constant)
    if text.startswith("\ufeff"):   # what json.loads() itself checks first
        raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    return decoder.decode(text)


def json_depth(body):
    """How deeply arrays and objects nest in `body` (a guess for invalid JSON).

    json.loads recurses in C for each level; on a 512 KiB thread stack some
    Pythons (3.13) crash before their recursion limit, so depth is measured first.
    """
    if body.count(b"[") + body.count(b"{") <= MAX_NESTING:   # too few to be too deep
        return 0
    skeleton = JSON_STRING.sub(b"", body)
    if skeleton.count(b"[") + skeleton.count(b"{") <= MAX_NESTING:
        return 0
    depth = deepest = 0
    for bracket in re.findall(rb"[][{}]", skeleton):
        depth += 1 if bracket in b"[{" else -1
        deepest = max(deepest, depth)
    return deepest


def did_you_mean(word, names):
    """' (did you mean 'NAME'?)' for the name in `names` closest to `word`, or ''."""
    close = difflib.get_close_matches(word, names, 1)
    return " (did you mean %r?)" % close[0] if close else ""


def unknown_names_message(kind, unknown, names):
    """'unknown field 'timout' (did you mean 'timeout'?)' for the `unknown` names
    of a `kind`; with no close match, the list of the valid `names` instead."""
    shown = ", ".join(map(repr, unknown[:5])) + (" and %d more" % (len(unknown) - 5)
                                                 if len(unknown) > 5 else "")
    hints = [difflib.get_close_matches(word, names, 1) for word in unknown[:5]]
    hints = [close[0] for close in hints if close]
    return "unknown %s%s %s%s" % (
        kind, "s" if len(unknown) > 1 else "", shown,
        " (did you mean %s?)" % " or ".join(map(repr, hints)) if hints
        else "; the %ss are %s" % (kind, ", ".join(names)))


def parse_spec(body):
    """Turn a request body into a ProcessSpec, or raise Refused(400) naming the problem.

    Fields: alias (see alias_problem) and cmd (non-empty strings, required); args (list of
    strings); cwd (string, default "."); envs (object of string to string,
    added to the server's environment); timeout (positive number of seconds);
    stdin (string, fed to the child as UTF-8); stderr ("inherit", "merge",
    "discard"); tty (boolean).  Unknown fields are refused, so that a typo
    such as "timout" cannot silently run a command without its limit.
    """
    bad = HTTPStatus.BAD_REQUEST
    if json_depth(body) > MAX_NESTING:
        raise Refused(bad, "the body is nested too deeply")
    try:
        obj = load_json(body.decode("utf-8"))
    except UnicodeDecodeError:
        raise Refused(bad, "the body is not UTF-8")
    except RecursionError:
        raise Refused(bad, "the body is nested too deeply")
    except JSONLimit as exc:
        raise Refused(bad, "the body has %s" % exc)
    except ValueError as exc:
        raise Refused(bad, "the body is not JSON: %s" % exc)
    if not isinstance(obj, dict):
        raise Refused(bad, "the body must be a JSON object")
    if not SPEC_FIELD_SET.issuperset(obj):
        unknown = sorted(set(obj) - SPEC_FIELD_SET)
        raise Refused(bad, unknown_names_message("field", unknown, SPEC_FIELDS))

    args = obj.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise Refused(bad, "field 'args' must be a list of strings")
    for arg in args:
        _check_os_string(arg, "field 'args'")
    envs = obj.get("envs", {})
    if not isinstance(envs, dict) or not all(isinstance(v, str) for v in envs.values()):
        raise Refused(bad, "field 'envs' must be an object of strings")
    for key, value in envs.items():
        if not key or "=" in key:
            raise Refused(bad, "field 'envs' has an invalid variable name %r" % key)
        _check_os_string(key, "a name in field 'envs'")
        _check_os_string(value, "a value in field 'envs'")
    timeout = obj.get("timeout")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= MAX_TIMEOUT):
        raise Refused(bad, "field 'timeout' must be a positive number of seconds, "
                           "at most %d" % MAX_TIMEOUT)
    stdin = obj.get("stdin")
    if stdin is not None:
        if not isinstance(stdin, str):
            raise Refused(bad, "field 'stdin' must be a string")
        try:
            stdin = stdin.encode("utf-8")
        except UnicodeEncodeError:
            raise Refused(bad, "field 'stdin' is not valid Unicode text")
    stderr = obj.get("stderr", "inherit")
    if not isinstance(stderr, str) or stderr not in STDERR_MODES:
        raise Refused(bad, "field 'stderr' must be one of %s" % ", ".join(STDERR_MODES))
    tty = obj.get("tty", False)
    if not isinstance(tty, bool):
        raise Refused(bad, "field 'tty' must be true or false")
    alias = _text(obj, "alias", required=True, nonempty=True)
    problem = alias_problem(alias)
    if problem:
        raise Refused(bad, "field 'alias' %s" % problem)
    return ProcessSpec(alias, _text(obj, "cmd", required=True, nonempty=True), args,
                       _text(obj, "cwd", ".", nonempty=True), envs, timeout, stdin, stderr, tty)


# --------------------------------------------------------------------------
# Process supervision: how a process ends, and its stream
# --------------------------------------------------------------------------

def signal_group(pgid, sig):
    """Send `sig` to a process group; a group that is already gone is fine."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):  # macOS says EPERM for a zombie-only group
        pass


def open_pty():
    """A pseudo-terminal pair whose output passes bytes through unchanged."""
    master, slave = pty.openpty()
    attrs = termios.tcgetattr(slave)
    attrs[1] &= ~termios.OPOST  # no "\n" -> "\r\n": the stream stays byte-exact
    termios.tcsetattr(slave, termios.TCSANOW, attrs)
    return master, slave


def output_hung_up(fd):
    """True once nothing holds the write end of output `fd`, though bytes may
    be left in it: poll(2) reports POLLHUP even for a descriptor that asks for
    no events, so this reads nothing."""
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


class WakeChannel:
    """A descriptor another thread can make readable, to wake a stream's poll:
    an eventfd (Python 3.10+) or a pipe.  A warm thread makes one for its
    first stream and keeps it for each next one it serves, until it ends
    (WarmThreads): a short command costs no descriptors for it, and a
    connection that never streams holds none.  A wake-up left over from the
    last stream only makes the next one look once."""

    def __init__(self):
        if CAN_EVENTFD:
            self.read_fd = self.write_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        else:
            self.read_fd, self.write_fd = os.pipe()
            os.set_blocking(self.write_fd, False)

    def close(self):
        for fd in {self.read_fd, self.write_fd}:
            os.close(fd)


_wake_channels = threading.local()   # `channel`: the warm thread's WakeChannel, once made


class Ending:
    """How one process group ends: the one place that decides it.

    Whatever wants the group to end -- its child exiting, the timeout, a
    DELETE, a client gone, a shutdown -- calls ask() with its reason, from any
    thread; the first reason holds.  The stream's thread moves the group on
    with step(), through four states:

        RUNNING -> TERMINATING -> KILLED -> REAPED

    TERMINATING: the group got SIGTERM (not when the child has exited and
    nothing holds its output: nothing is left to ask).  KILLED: SIGKILL, after
    `grace`, or at once when the child is dead and its output has no writer
    left.  REAPED: the child's status is collected, and only then is the alias
    released (on_reaped) and a DELETE answered (wait()).  The child's pid stays
    a zombie until then and cannot be reused, so signalling the group is safe.
    finish() is every way out: SIGKILL to what is left, reap, release.
    """

    RUNNING, TERMINATING, KILLED, REAPED = "running", "terminating", "killed", "reaped"

    # Each ending's own once it changes (a short command's costs fewer assignments):
    state = RUNNING
    reason = None            # one of REASONS
    exit_code = None         # the child's status: -N for signal N
    exited = False           # the child has exited (a zombie until reaped)
    wake_fd = None           # readable when ask() wants the stream to look
    exit_fd = None           # a pidfd, readable once the child exits
    _popen = None
    _deadline = _term_at = None
    _wake_w = None
    _own_channel = None      # a WakeChannel made for this ending alone (see prepare())

    def __init__(self, grace, timeout, on_reaped):
        self.grace = grace
        self.timeout = timeout        # seconds from the start, or None
        self.on_reaped = on_reaped    # frees the alias
        self._done = threading.Lock()   # held until the child is reaped (cheaper than an Event)
        self._done.acquire()
        self._lock = threading.Lock()

    def prepare(self):
        """Take the thread's wake-up channel (made now if it has none yet),
        before the child starts; on a thread that WarmThreads does not run,
        open one of this ending's own.  OSError: out of descriptors."""
        own = None
        if getattr(_wake_channels, "kept", False):
            channel = getattr(_wake_channels, "channel", None)
            if channel is None:
                channel = _wake_channels.channel = WakeChannel()
        else:
            channel = own = WakeChannel()
        with self._lock:
            self.wake_fd, self._wake_w, self._own_channel = channel.read_fd, channel.write_fd, own

    def begin(self, popen):
        """Take charge of the child `popen`, just started."""
        self._popen = popen
        if self.timeout:
            self._deadline = time.monotonic() + self.timeout
        self._watch_exit()

    def ask(self, reason, wake=True, hurry=False):
        """Ask for the group to end because of `reason`; any thread may.
        `hurry`: no grace, SIGKILL right after SIGTERM."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            if hurry:
                self.grace = 0.0
            if wake and self._wake_w is not None:
                try:
                    os.write(self._wake_w, WAKE)
                except OSError:  # full: a wake-up is already waiting
                    pass

    def on_wake(self, mask=None):
        try:
            os.read(self.wake_fd, 512)
        except BlockingIOError:
            pass

    def child_exited(self, mask=None):
        """The child is dead (its pidfd is readable, or waitid said so)."""
        self.exited = True
        self.ask("exit", wake=False)

    def step(self, now, output_done):
        """Move the group on; returns when step() is next due (a monotonic
        time), or None.  `output_done()` tells whether the child's output can
        still get anything (False) or has no writer left (True)."""
        if self.state == self.RUNNING:
            if self._deadline is not None and now >= self._deadline:
                self.ask("timeout", wake=False)
            if self.reason is None:
                return self._deadline
            if not (self.exited and output_done()):
                # the child, or what it left behind (`cmd &`), gets its SIGTERM
                signal_group(self._popen.pid, signal.SIGTERM)
            self.state, self._term_at = self.TERMINATING, now
        if self.state == self.TERMINATING and (
                now >= self._term_at + self.grace or self.exited and output_done()):
            signal_group(self._popen.pid, signal.SIGKILL)
            self.state = self.KILLED
        if self.state == self.KILLED and self.exited:
            self._reap()
        return self._term_at + self.grace if self.state == self.TERMINATING else None

    def finish(self):
        """Every way out: SIGKILL what is left of the group, reap, release.  Idempotent."""
        if self.state != self.REAPED:
            if self._popen is not None:
                signal_group(self._popen.pid, signal.SIGKILL)
            self.state = self.KILLED
            self._reap()

    def abandon(self):
        """The child could not start: free the alias; a waiting DELETE gets None."""
        self.state = self.REAPED
        self._release()

    def wait(self):
        """Block until the child is reaped; its exit code (None: it never started)."""
        with self._done:   # each waiter passes it on to the next
            pass
        return self.exit_code

    def close(self):
        """Close the descriptors, and let go of the wake-up channel under the
        lock: a late ask() must never write into the thread's next stream's
        channel, or into a reused descriptor number."""
        with self._lock:
            exit_fd, own = self.exit_fd, self._own_channel
            self.wake_fd = self._wake_w = self.exit_fd = self._own_channel = None
        if exit_fd is not None:
            os.close(exit_fd)
        if own is not None:
            own.close()

    def _reap(self):
        try:
            if self._popen is not None:
                self._popen.wait()
                self.exit_code = self._popen.returncode
                if self.reason is None:   # nothing else ended it
                    self.ask("exit", wake=False)
        finally:
            self.state = self.REAPED
            self._release()

    def _release(self):
        # Dropped once called: it refers back to the Process, and a cycle would
        # leave each process to the cyclic garbage collector.
        on_reaped, self.on_reaped = self.on_reaped, None
        on_reaped()
        self._done.release()   # once: abandon() and _reap() each end in REAPED

    def _watch_exit(self):
        """Learn of the child's exit without reaping it: a pidfd for the stream's
        selector, or (before Linux 5.3 and Python 3.9) a thread in waitid()."""
        if CAN_PIDFD:
            try:
                self.exit_fd = os.pidfd_open(self._popen.pid)
                return
            except OSError:  # a kernel older than 5.3
                pass
        threading.Thread(target=self._wait_in_thread, daemon=True,
                         name="rexec-wait-%d" % self._popen.pid).start()

    def _wait_in_thread(self):
        try:
            if hasattr(os, "waitid"):
                os.waitid(os.P_PID, self._popen.pid, os.WEXITED | os.WNOWAIT)
            else:
                self._popen.wait()
        except ChildProcessError:
            pass
        self.exited = True
        self.ask("exit")


# -- starting a child: posix_spawn(3) where it makes the same child, else Popen

# False: every child starts with subprocess.Popen, as on the systems the fast path skips.
FAST_SPAWN = True
MAX_KEPT_ARRAY_TYPES = 64    # argv and environment lengths whose ctypes array type is kept


class PipeEnd:
    """This side's end of a pipe to a child: what rexec uses of a Popen's pipe
    file, fileno() and close() (a file object would fstat it when made)."""

    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def close(self):
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class Spawned:
    """A child that posix_spawn started: what rexec uses of a Popen -- pid,
    stdin, stdout and stderr (PipeEnd, or None), wait() and returncode (-N for
    signal N, as Popen's)."""

    def __init__(self, pid, stdin, stdout, stderr):
        self.pid = pid
        self.stdin, self.stdout, self.stderr = stdin, stdout, stderr
        self.returncode = None
        self._lock = threading.Lock()

    def wait(self):
        """Reap the child (once) and return its returncode."""
        with self._lock:
            if self.returncode is None:
                try:
                    status = os.waitpid(self.pid, 0)[1]   # EINTR is retried (PEP 475)
                except ChildProcessError:   # reaped by someone else: Popen says 0 too
                    status = 0
                self.returncode = (-os.WTERMSIG(status) if os.WIFSIGNALED(status)
                                   else os.WEXITSTATUS(status))
        return self.returncode


class FileActions:
    """A posix_spawn_file_actions_t (`buffer`) that glibc initialized, and what
    they were made for (`key`); destroyed (glibc frees what it allocated for
    them) once dropped: replaced, or with its thread's threading.local."""

    __slots__ = ("buffer", "key", "_destroy")

    def __init__(self, buffer, destroy):
        self.buffer, self._destroy = buffer, destroy
        self.key = ()   # initialized, not yet complete

    def __del__(self):
        if self.key is not None:
            self._destroy(self.buffer)


class PosixSpawn:
    """glibc's posix_spawn(3), called through ctypes, which lets go of the GIL
    for the call (os.posix_spawn holds it throughout: other connections wait).

    It makes the child Popen(close_fds=True, start_new_session=True) makes:
    a new session (POSIX_SPAWN_SETSID); SIGPIPE and SIGXFSZ back to SIG_DFL,
    as Popen's restore_signals (POSIX_SPAWN_SETSIGDEF), while an ignored
    signal stays ignored and a handled one gets SIG_DFL from the exec; the
    signal mask of the calling thread; its pipes on 0, 1 and 2 and nothing
    else open (closefrom(3)), after a chdir to cwd.  The program is looked
    up as Popen does it: in the PATH of the child's environment (by glibc's
    posix_spawnp when that is rexec's own), relative names after the chdir.
    spawn() returns None whenever it does not start
    the child -- nothing runnable found, or posix_spawn failed -- and Popen
    then starts it, or raises its own error: a refusal's reason is always
    Popen's.

    available() is None without glibc 2.34 (closefrom_np), on Python < 3.8,
    off Linux, or without ctypes.
    """

    SETSIGDEF, SETSID = 0x04, 0x80       # glibc's <spawn.h>; SETSID since 2.26
    STRUCT_SIZE = 1024                   # posix_spawnattr_t and posix_spawn_file_actions_t are
                                         # opaque (336 and 80 bytes in glibc 2.36): a generous
                                         # buffer, only ever passed by pointer
    _loaded = None                       # the one instance, or False when unavailable
    _load_lock = threading.Lock()

    @classmethod
    def available(cls):
        """The PosixSpawn of this process, or None where it cannot be used."""
        if cls._loaded is None:
            with cls._load_lock:
                if cls._loaded is None:
                    try:
                        cls._loaded = cls() if cls._usable_libc() else False
                    except (ImportError, OSError, AttributeError, ValueError):
                        cls._loaded = False
        return cls._loaded or None

    @staticmethod
    def _usable_libc():
        if sys.version_info < (3, 8) or not sys.platform.startswith("linux"):
            return False
        try:
            name, _, version = os.confstr("CS_GNU_LIBC_VERSION").partition(" ")
        except (ValueError, OSError, AttributeError):   # not glibc (musl has no such name)
            return False
        return name == "glibc" and tuple(int(n) for n in version.split(".")[:2]) >= (2, 34)

    def __init__(self):
        import ctypes   # here: neither the client nor a Popen-only system loads it
        libc = ctypes.CDLL(None)       # its calls let go of the GIL: for the spawn itself
        quick = ctypes.PyDLL(None)     # its calls keep it: the file actions only fill memory,
                                       # and each hand-over of the GIL costs a busy server more
        ptr, cstr, c_int = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int

        def function(name, *argtypes, lib=quick):
            func = getattr(lib, name)     # AttributeError: not there, no fast path
            func.argtypes, func.restype = argtypes, c_int
            return func
        self._spawn = function("posix_spawn", ptr, cstr, ptr, ptr, ptr, ptr, lib=libc)
        self._spawnp = function("posix_spawnp", ptr, cstr, ptr, ptr, ptr, ptr, lib=libc)
        self._init = function("posix_spawn_file_actions_init", ptr)
        self._destroy = function("posix_spawn_file_actions_destroy", ptr)
        self._dup2 = function("posix_spawn_file_actions_adddup2", ptr, c_int, c_int)
        self._open = function("posix_spawn_file_actions_addopen", ptr, c_int, cstr, c_int,
                              ctypes.c_uint)
        self._chdir = function("posix_spawn_file_actions_addchdir_np", ptr, cstr)
        self._closefrom = function("posix_spawn_file_actions_addclosefrom_np", ptr, c_int)
        self._environ = ptr.in_dll(libc, "environ")
        self._ctypes = ctypes
        self._actions = threading.local()   # `kept`: each thread's last FileActions
        self._array_types = {}              # see _strings()
        # One attribute set for every child: posix_spawn only reads it.
        self._attr = ctypes.create_string_buffer(self.STRUCT_SIZE)
        sigdefault = ctypes.create_string_buffer(self.STRUCT_SIZE)   # a sigset_t
        checked = [function("posix_spawnattr_init", ptr)(self._attr),
                   function("sigemptyset", ptr)(sigdefault)]
        # glibc keeps the kernel's first real-time signals (32, 33: below SIGRTMIN)
        # for itself, and its child leaves them ignored, across the exec, unless
        # they are here; sigaddset refuses them, so their bits are set directly.
        words = (ctypes.c_ulong * (self.STRUCT_SIZE // ctypes.sizeof(ctypes.c_ulong))
                 ).from_buffer(sigdefault)
        bits = 8 * ctypes.sizeof(ctypes.c_ulong)
        for signum in [signal.SIGPIPE, signal.SIGXFSZ] + list(range(32, signal.SIGRTMIN)):
            words[(signum - 1) // bits] |= 1 << (signum - 1) % bits
        checked += [function("posix_spawnattr_setsigdefault", ptr, ptr)(self._attr, sigdefault),
                    function("posix_spawnattr_setflags", ptr, ctypes.c_short)(
                        self._attr, self.SETSID | self.SETSIGDEF)]
        if any(checked):
            raise OSError("posix_spawnattr_t could not be set up")

    def spawn(self, argv, executable, cwd, env, stdin, stdout, stderr):
        """Start `argv` as Popen(argv, executable=, cwd=, env=, stdin=, stdout=,
        stderr=, bufsize=0, close_fds=True, start_new_session=True) would: a
        Spawned, or None (see the class)."""
        cmd, call = argv[0], self._spawn
        if executable is not None:
            path = executable
        elif "/" in cmd:
            path = cmd
        elif env is None or env.get("PATH") == os.environ.get("PATH"):
            # glibc looks cmd up in rexec's PATH, in the child after its chdir: as
            # Popen does.  Where the two part -- glibc stops at an ENOEXEC, Popen
            # goes on to the next entry -- posix_spawnp fails and Popen takes over.
            path, call = cmd, self._spawnp
        else:
            path = self._find(cmd, cwd, env)
            if path is None:
                return None
        ctypes = self._ctypes
        mine, theirs = [], []    # pipe ends: this side keeps `mine`, the child gets `theirs`
        try:
            targets = []         # what goes on 0, 1, 2: an fd, or None for /dev/null
            for number, how in enumerate((stdin, stdout, stderr)):
                if how == subprocess.PIPE:
                    read, write = os.pipe()
                    mine.append(write if number == 0 else read)
                    theirs.append(read if number == 0 else write)
                    targets.append(theirs[-1])
                else:
                    mine.append(None)
                    targets.append(None if how == subprocess.DEVNULL else
                                   targets[1] if how == subprocess.STDOUT else how)
            if any(fd is not None and fd < 3 for fd in targets):
                return None   # rexec's own 0-2 are closed: Popen shuffles such descriptors
            actions = self._file_actions(targets, cwd)
            if actions is None:
                return None
            args = self._strings([arg.encode(FS_ENCODING, FS_ERRORS) for arg in argv])
            if env is None:
                envp = self._environ.value   # what Popen's execv passes on: os.environ's
            else:
                envp = self._strings([fsencode(k) + b"=" + fsencode(v) for k, v in env.items()])
            pid = ctypes.c_int()
            if call(ctypes.byref(pid), fsencode(path), actions, self._attr,
                    args, envp):
                return None   # glibc has reaped what it started; Popen says why
            files = [None if fd is None else PipeEnd(fd) for fd in mine]
            mine = []
            return Spawned(pid.value, *files)
        finally:
            for fd in theirs + mine:
                if fd is not None:
                    os.close(fd)

    def _file_actions(self, targets, cwd):
        """The file actions that put `targets` (an fd, or None for /dev/null) on
        0, 1 and 2, chdir to `cwd` and close the rest; None if glibc refuses.
        The thread keeps the last ones made (FileActions), and a child with the
        same descriptors and cwd -- as a warm thread's next short command
        nearly always has -- takes them again, without six more ctypes calls."""
        key = (targets[0], targets[1], targets[2], cwd)
        kept = getattr(self._actions, "kept", None)
        if kept is not None and kept.key == key:
            return kept.buffer
        self._actions.kept = None   # destroyed as it goes
        made = FileActions((self._ctypes.c_char * self.STRUCT_SIZE)(), self._destroy)
        if self._init(made.buffer):
            made.key = None   # never initialized: nothing to destroy
            return None
        actions, devnull = made.buffer, None
        for number, fd in enumerate(targets):
            if fd is None and devnull is None:   # one /dev/null for all, as with Popen
                devnull = number
                failed = self._open(actions, number, b"/dev/null", os.O_RDWR, 0)
            else:
                failed = self._dup2(actions, devnull if fd is None else fd, number)
            if failed:
                return None
        if cwd != "." and self._chdir(actions, fsencode(cwd)) or self._closefrom(actions, 3):
            return None
        made.key = key
        self._actions.kept = made
        return actions

    def _strings(self, items):
        """A C array of the bytes `items` and a NULL.  Its type, one for each
        length, is kept here: ctypes keeps array types only weakly, and one
        made for each child would be cyclic garbage (a type refers to itself)."""
        length = len(items) + 1
        array = self._array_types.get(length)
        if array is None:
            array = self._ctypes.c_char_p * length
            if len(self._array_types) < MAX_KEPT_ARRAY_TYPES:
                self._array_types[length] = array
        return array(*items, None)

    @staticmethod
    def _find(cmd, cwd, env):
        """What Popen's child would exec for `cmd`, a bare name, with env's own
        PATH: the first candidate (os.get_exec_path, as Popen) that is an
        executable file as seen after the chdir to `cwd`; None if none is.  A
        candidate that fails anyway (ENOEXEC) makes posix_spawn fail, and Popen
        start it."""
        for entry in os.get_exec_path(env):
            candidate = os.path.join(entry, cmd)
            there = os.path.join(cwd, candidate)
            if os.access(there, os.X_OK) and os.path.isfile(there):
                return candidate
        return None


def spawn(argv, executable, cwd, env, stdin, stdout, stderr, bufsize=-1):
    """Start a child as subprocess.Popen(argv, ..., close_fds=True,
    start_new_session=True) does -- the same child, the same OSError when it
    cannot start -- with glibc's posix_spawn where it can (PosixSpawn): a
    Spawned, which rexec uses as a Popen; else with Popen itself."""
    fast = PosixSpawn.available() if FAST_SPAWN else None
    child = fast and fast.spawn(argv, executable, cwd, env, stdin, stdout, stderr)
    return child or subprocess.Popen(
        argv, executable=executable, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
        stderr=stderr, bufsize=bufsize, close_fds=True, start_new_session=True)


class Process:
    """One child, its process group and how it ends, as the registry sees them.

    The child leads a new session (start_new_session, never preexec_fn: that
    can deadlock a threaded server), so its pid is the id of its whole group.
    """

    def __init__(self, spec, grace, release, owner=None):
        self.spec = spec
        self.alias = spec.alias
        self.owner = owner           # the name of the token that started it, or None
        self.popen = None
        self.output_fd = None        # the pipe or terminal the stream reads
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.ending = Ending(grace, spec.timeout, lambda: release(self))

    @property
    def pid(self):
        return self.popen.pid if self.popen else None

    def describe(self):
        """What GET /process shows of it (never its environment or stdin)."""
        spec = self.spec
        return {"alias": self.alias, "pid": self.pid, "cmd": spec.cmd, "args": spec.args,
                "cwd": spec.cwd, "started": self.started, "timeout": spec.timeout,
                "tty": spec.tty, "owner": self.owner}

    def start(self, executable=None):
        """Start the child with spawn() (self.popen: a Popen or a Spawned); raises
        OSError when it cannot start.  `executable` is the file to run (argv[0]
        stays spec.cmd); None looks spec.cmd up as Popen does."""
        spec = self.spec
        env = dict(os.environ, **spec.envs) if spec.envs else None   # None: no copying
        stdin = subprocess.DEVNULL if spec.stdin is None else subprocess.PIPE
        try:
            self.ending.prepare()
            if spec.tty:
                self.output_fd, slave = open_pty()
                stderr = subprocess.DEVNULL if spec.stderr == "discard" else slave
                try:
                    self.popen = spawn([spec.cmd] + spec.args, executable, spec.cwd, env,
                                       stdin, slave, stderr)
                finally:
                    os.close(slave)
            else:
                self.popen = spawn([spec.cmd] + spec.args, executable, spec.cwd, env, stdin,
                                   subprocess.PIPE, STDERR_MODES[spec.stderr], bufsize=0)
                self.output_fd = self.popen.stdout.fileno()
            os.set_blocking(self.output_fd, False)
            self.ending.begin(self.popen)
        except BaseException:
            if self.popen is not None:   # it started, but cannot be watched: end it now
                signal_group(self.popen.pid, signal.SIGKILL)
                self.popen.wait()
            self.close()
            raise

    def close(self):
        """Close every descriptor this side holds."""
        self.ending.close()
        if self.spec.tty and self.output_fd is not None:   # a pipe closes with its Popen
            os.close(self.output_fd)
        self.output_fd = None
        if self.popen:
            for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                if pipe:
                    pipe.close()


class StderrLines:
    """A child's stderr ("inherit") into rexec's log, one event per line:
    'stderr alias=A line=TEXT', the text escaped like every field, so a child
    can neither forge a log line nor break --log-format json.

    The stream's selector says when the pipe is readable (ready()); each call
    reads at most READ_SIZE bytes, so a flood cannot starve the output, and
    holds at most a line's MAX_STDERR_LINE bytes from one call to the next.  A
    longer line is logged in pieces (cut=True on all but the last), each cut
    at a UTF-8 character's boundary.  Lines beyond a token bucket of
    STDERR_BURST, refilled at STDERR_LINES_PER_SECOND, are read and dropped:
    one 'stderr-dropped' line says how many, STDERR_DROP_REPORT seconds after
    the first of them (step()) or at the end (finish()).  The pipe is always
    drained, so the child never waits on its stderr for long.
    """

    def __init__(self, fd, alias):
        os.set_blocking(fd, False)
        self.fd = fd
        self.alias = alias
        self.open = True              # False once read to its end, or finished
        self.dropped = 0              # lines dropped and not yet reported
        self._partial = b""           # the start of a line yet to end
        self._tokens = float(STDERR_BURST)
        self._filled_at = time.monotonic()
        self._report_at = None        # when the dropped lines are reported

    def ready(self, mask=None):
        """Read what the pipe holds (up to READ_SIZE) and log its complete lines."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return
        if data:
            self._feed(data)
        else:   # every writer is gone
            self.open = False
            self._end_line()

    def step(self, now):
        """Report dropped lines once due; when that is next due, or None."""
        if self.dropped and now >= self._report_at:
            self._report()
        return self._report_at if self.dropped else None

    def finish(self):
        """The stream ends: log what is left in the pipe (read without waiting
        for a writer that is still there, at most STDERR_DRAIN reads), the last
        line even without its newline, and the dropped count.  Idempotent; the
        pipe itself is closed with the Process."""
        for _ in range(STDERR_DRAIN):
            if not self.open:
                break
            self.ready()
            if self.open and not fionread(self.fd):
                break
        self.open = False
        self._end_line()
        if self.dropped:
            self._report()

    def _feed(self, data):
        buf = self._partial + data if self._partial else data
        start, size = 0, len(buf)
        while True:
            end = buf.find(b"\n", start, start + MAX_STDERR_LINE + 1)
            if end >= 0:
                if self._spend():
                    self._log(buf[start:end])
                    start = end + 1
                    continue
                # Out of budget: the rest of the read's lines are counted at once.
                last = buf.rindex(b"\n")
                self.dropped += buf.count(b"\n", end + 1, last + 1)
                start = last + 1
            elif size - start > MAX_STDERR_LINE:
                cut = start + MAX_STDERR_LINE
                while buf[cut] & 0xC0 == 0x80 and cut > start + MAX_STDERR_LINE - 3:
                    cut -= 1   # not inside a UTF-8 character
                if self._spend():
                    self._log(buf[start:cut], cut=True)
                start = cut
            else:
                break
        self._partial = buf[start:]

    def _end_line(self):
        """A last line without its newline is a line too."""
        if self._partial:
            if self._spend():
                self._log(self._partial)
            self._partial = b""

    def _spend(self):
        """True if the budget allows one more line; else it counts as dropped."""
        now = time.monotonic()
        self._tokens = min(float(STDERR_BURST),
                           self._tokens + (now - self._filled_at) * STDERR_LINES_PER_SECOND)
        self._filled_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        if not self.dropped:
            self._report_at = now + STDERR_DROP_REPORT
        self.dropped += 1
        return False

    def _log(self, line, **extra):
        log_event(logging.INFO, "stderr", alias=self.alias,
                  line=line.decode("utf-8", "backslashreplace"), **extra)

    def _report(self):
        log_event(logging.WARNING, "stderr-dropped", alias=self.alias, lines=self.dropped)
        self.dropped, self._report_at = 0, None


def earliest(when, other):
    """The earlier of two monotonic times, either of which may be None (never)."""
    return other if when is None or other is not None and other < when else when


class Stream:
    """One child's output to one client until the child is gone: an event loop.

    It sleeps in one selector on the child's output, the client's socket, the
    child's stdin, its stderr, its exit and its ending's wake-up channel, and
    hands on what happens: output and a writable socket to the writer, which
    moves the bytes; stderr to its StderrLines, which logs it; the child's
    exit, the timeout and a client gone to the ending, which ends the group.
    Stderr never decides when the stream ends: a grandchild that holds it
    keeps nothing open.  A readable socket while the stream only writes means
    EOF (the client left) or its next request, kept for after the stream.  An
    idle stream costs no CPU.  run() returns once the child is reaped.
    """

    def __init__(self, proc, sock, writer, early):
        self.proc = proc
        self.ending = proc.ending
        self.sock = sock
        self.writer = writer
        self.early = early           # what the client sends meanwhile: its next request
        self.stdin = memoryview(proc.spec.stdin or b"")  # what is still to be fed
        self.stdin_fd = proc.popen.stdin.fileno() if proc.popen.stdin else None
        self.stderr = (StderrLines(proc.popen.stderr.fileno(), proc.alias)
                       if proc.popen.stderr else None)
        self.sock_fd = sock.fileno()
        self.log_due = held_log_due()   # when this thread's held log lines go out
        self.ended = False

    def run(self):
        """Stream until the child is gone and reaped; returns its exit code.

        Each descriptor is registered once and dropped where its end is seen;
        only the output and the socket change what they wait for, as the
        writer goes busy and idle: the output is read while the writer is
        idle, and the socket waited on for room while it is not."""
        ending, writer, stderr = self.ending, self.writer, self.stderr
        output_fd, sock_fd, wake_fd, exit_fd = (self.proc.output_fd, self.sock_fd,
                                                ending.wake_fd, ending.exit_fd)
        stderr_fd = stderr.fd if stderr is not None else None
        poller = new_poller()
        for fd in (wake_fd, exit_fd, stderr_fd):
            if fd is not None:
                poller.register(fd, POLLIN)
        if self.stdin_fd is not None:
            os.set_blocking(self.stdin_fd, False)
            poller.register(self.stdin_fd, POLLOUT)
        output_events = sock_events = 0   # what the two are registered for now
        try:
            due = self._step()
            while not ending.exited or not self._finished():
                # writer.wants_output and writer.idle, without two calls a round
                events = POLLIN if writer.output_open and not writer.pending else 0
                if events != output_events:
                    output_events = self._watch(poller, output_fd, events)
                events = (0 if writer.gone else POLLOUT | POLLIN if writer.pending else POLLIN)
                if events != sock_events:
                    sock_events = self._watch(poller, sock_fd, events)
                for fd, events in poller.poll(poll_ms(
                        MAX_SELECT if due is None else max(0.0, due - time.monotonic()))):
                    if fd == output_fd:
                        self._on_output()
                    elif fd == sock_fd:
                        self._on_socket(events)
                    elif fd == stderr_fd:
                        stderr.ready()
                        if not stderr.open:
                            poller.unregister(fd)
                            stderr_fd = None
                    elif fd == exit_fd:
                        poller.unregister(fd)
                        exit_fd = None
                        ending.child_exited()
                    elif fd == wake_fd:
                        ending.on_wake()
                    elif fd == self.stdin_fd:
                        self._on_stdin(poller)
                due = self._step()
        finally:
            self.end()
        return ending.exit_code

    @staticmethod
    def _watch(poller, fd, events):
        """Have `fd` waited on for `events` (0: not at all); returns them."""
        if events:
            poller.register(fd, events)   # register() also modifies
        else:
            poller.unregister(fd)
        return events

    def lose_client(self):
        if not self.writer.gone:
            self.writer.lose()
            self.ending.ask("disconnect", wake=False)

    def end(self):
        """Kill what is left of the group, reap, log the rest of stderr.  Idempotent.
        The descriptors stay open for the owner's proc.close(), once the body's end
        went out: closing them need not delay it."""
        if self.ended:
            return
        try:
            self.ending.finish()
        finally:
            if self.stderr is not None:
                self.stderr.finish()
        self.ended = True

    def _step(self):
        """Let the ending move on; when anything is next due, or None."""
        now, ending, writer = time.monotonic(), self.ending, self.writer
        slow = ending.exited and bool(writer.pending)   # its client has yet to take the rest
        if slow and now >= writer.progress_at + WRITE_TIMEOUT:
            self.lose_client()   # ... and stopped reading
        due = ending.step(now, self._output_done)
        if writer.timed:   # the held head, an event stream's keep-alive comments
            try:
                due = earliest(due, writer.tick(now))
            except ClientDisconnected:
                self.lose_client()
        if self.log_due is not None:   # the start line, once the process ran a while
            if now >= self.log_due:
                self.log_due = flush_held_log(now)
            else:
                due = earliest(due, self.log_due)
        if self.stderr is not None and self.stderr.dropped:
            due = earliest(due, self.stderr.step(now))
        if slow:
            due = earliest(due, writer.progress_at + WRITE_TIMEOUT)
            if ending.state != ending.REAPED:
                due = earliest(due, now + HANGUP_CHECK)   # see _output_done()
        return due

    def _output_done(self):
        """True once nothing more can come out of the child's output: read to
        its end, or -- with a slow client yet to take what is in the pipe --
        without a writer, so the group need not hold the alias for the grace."""
        writer = self.writer
        return not writer.output_open or (
            not writer.idle and output_hung_up(self.proc.output_fd))

    def _finished(self):
        if not self.ending.exited:
            return False
        if self.writer.gone or not self.writer.output_open:
            return True
        # The child is dead but something (an escaped grandchild) still holds
        # the pipe: once the group is killed, stop when what is in it has gone out.
        return (self.ending.state == self.ending.REAPED and self.writer.idle
                and fionread(self.proc.output_fd) == 0)

    # -- events ------------------------------------------------------------

    def _on_output(self):
        try:
            self.writer.output_ready()
        except ClientDisconnected:
            self.lose_client()

    def _on_socket(self, events):
        """Room to write (or a hang-up: the write will tell), or something to
        read while the stream only writes (see _check_client)."""
        if events & ~POLLIN:
            try:
                self.writer.flush()
            except ClientDisconnected:
                self.lose_client()
        if events & ~POLLOUT and not self.writer.gone:
            self._check_client()

    def _check_client(self):
        """The socket is readable while we only write: EOF means the client left
        (a client that only half-closed its side too: it cannot be told apart).
        Bytes are its next request, kept for after the stream: peeking instead
        would stop the watch for EOF at the first byte, and TLS cannot peek.  A
        client that sends EARLY_LIMIT bytes meanwhile is not pipelining a request
        but flooding: the stream ends, as if it had left."""
        try:
            data = self.sock.recv(EARLY_LIMIT - len(self.early))
        except WOULD_BLOCK:
            return
        except OSError as exc:
            if not is_peer_gone(exc):
                raise
            data = b""
        self.early += data
        if not data or len(self.early) >= EARLY_LIMIT:
            if data:
                log_event(logging.WARNING, "client-flood", alias=self.proc.alias,
                          bytes=len(self.early))
            self.lose_client()

    def _on_stdin(self, poller):
        """Feed the child's stdin what it takes; once all of it is fed (or the
        child will not read it all), close it: the child sees EOF."""
        try:
            written = os.write(self.stdin_fd, self.stdin[:READ_SIZE])
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):  # the child will not read it all
            written = len(self.stdin)
        self.stdin = self.stdin[written:]
        if not self.stdin:
            poller.unregister(self.stdin_fd)
            self.proc.popen.stdin.close()
            self.stdin_fd = None


# --------------------------------------------------------------------------
# Registry and metrics
# --------------------------------------------------------------------------

class Registry:
    """Running processes by alias: one per alias, at most `limit`, none once closed."""

    def __init__(self, limit):
        self.limit = limit
        self._lock = threading.Lock()
        self._procs = {}
        self._closed = False

    def claim(self, proc):
        """Take proc's alias, or raise Refused (409 busy alias, 503 full or closing)."""
        with self._lock:
            if self._closed:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE, "rexec is shutting down")
            if proc.alias in self._procs:
                raise Refused(HTTPStatus.CONFLICT, "alias %r is already running" % proc.alias)
            if len(self._procs) >= self.limit:
                raise Refused(HTTPStatus.SERVICE_UNAVAILABLE,
                              "%d processes are running, the most allowed (--max-procs)"
                              % self.limit, [("Retry-After", "1")])
            self._procs[proc.alias] = proc

    def release(self, proc):
        with self._lock:
            if self._procs.get(proc.alias) is proc:
                del self._procs[proc.alias]

    def get(self, alias):
        with self._lock:
            return self._procs.get(alias)

    def snapshot(self):
        with self._lock:
            return sorted(self._procs.values(), key=lambda p: p.started)

    def close(self):
        """Refuse new processes and return the running ones."""
        with self._lock:
            self._closed = True
        return self.snapshot()

    def __len__(self):
        return len(self._procs)


class Metrics:
    """Counters for GET /metrics, in the Prometheus text format 0.0.4."""

    def __init__(self):
        self._lock = threading.Lock()
        self.started_at = time.time()
        self.started = collections.Counter()   # by the name of the token that started them
        self.spawn_failures = 0
        self.exits = dict.fromkeys(REASONS, 0)
        self.requests = collections.Counter()
        self.bytes = 0

    def count(self, **increments):
        with self._lock:
            for name, value in increments.items():
                setattr(self, name, getattr(self, name) + value)

    def count_exit(self, reason, sent):
        with self._lock:
            self.exits[reason] += 1
            self.bytes += sent

    def count_request(self, status):
        with self._lock:
            self.requests[int(status)] += 1

    def count_start(self, token):
        """A process started by the token named `token` (None: no token is configured)."""
        with self._lock:
            self.started[token] += 1

    def render(self, running, tokens=()):
        """The metrics; `tokens` names the tokens in force, each counted from 0 (a
        token no longer in force keeps its count)."""
        with self._lock:
            started = collections.Counter(dict.fromkeys(tokens, 0))
            started.update(self.started)
            anonymous = started.pop(None, 0)
            # Without a token the sample has no label: an empty label is no label.
            by_token = ([("", anonymous)] if anonymous or not started else []) + [
                ('{token="%s"}' % name, n) for name, n in sorted(started.items())]
            families = [
                ("processes_running", "gauge", "Processes running now.", [("", running)]),
                ("processes_started_total", "counter", "Processes started, by token.", by_token),
                ("process_exits_total", "counter", "Processes ended, by why they ended.",
                 [('{reason="%s"}' % r, n) for r, n in self.exits.items()]),
                ("spawn_failures_total", "counter", "Processes that could not start.",
                 [("", self.spawn_failures)]),
                ("requests_total", "counter", "HTTP requests answered, by status code.",
                 [('{code="%d"}' % c, n) for c, n in sorted(self.requests.items())]),
                ("stream_bytes_total", "counter", "Output bytes streamed to clients.",
                 [("", self.bytes)]),
                ("uptime_seconds", "gauge", "Seconds since rexec started.",
                 [("", round(time.time() - self.started_at, 3))]),
            ]
        lines = []
        for name, kind, help_text, samples in families:
            lines += ["# HELP rexec_%s %s" % (name, help_text), "# TYPE rexec_%s %s" % (name, kind)]
            lines += ["rexec_%s%s %s" % (name, labels, value) for labels, value in samples]
        return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Access: who may do what, by named token (README, Security)
# --------------------------------------------------------------------------

class Credential:
    """One token rexec accepts: its name, the SHA-256 of its value (never the
    value itself), its role, and the cmd values (`allow`) and peer networks
    (`networks`) it is limited to, each None for no limit.  Immutable."""

    __slots__ = ("name", "digest", "role", "allow", "networks")

    def __init__(self, name, digest, role="run", allow=None, networks=None):
        self.name, self.digest, self.role = name, digest, role
        self.allow = frozenset(allow) if allow else None
        self.networks = tuple(networks) if networks else None

    def admits(self, host):
        """True when a request from peer address `host` may use this token.  A
        Unix-socket peer has no address, so it is no peer of any network."""
        if self.networks is None:
            return True
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        address = getattr(address, "ipv4_mapped", None) or address
        return any(address in network for network in self.networks)

    def owns(self, proc):
        """May this token list and end `proc`?  An admin or a read token sees every
        process; a run token only the ones it started."""
        return self.role != "run" or proc.owner == self.name


# The peer when no token is configured (protected mode, --no-auth): it may do everything.
ANONYMOUS = Credential(None, None, "admin")


class Access:
    """The tokens in force, one immutable whole.  The server holds one; a reload
    builds a new one and replaces the server's reference, so a request, which
    takes the reference once, is judged by either the old or the new one whole.

    `required`: requests must carry a token (one is configured, or a tokens
    file is named: an empty one refuses everyone rather than opening protected
    mode)."""

    def __init__(self, credentials=(), required=False):
        self.credentials = tuple(credentials)
        self.required = required or bool(self.credentials)
        self.names = tuple(c.name for c in self.credentials)

    def identify(self, presented):
        """The Credential whose token is the bytes `presented`, or None.  Its hash
        is compared with every entry's in constant time, with no early exit, so
        the time taken tells nothing of which entry came close."""
        digest = hashlib.sha256(presented).digest()
        found = None
        for credential in self.credentials:
            if hmac.compare_digest(digest, credential.digest):
                found = credential
        return found


class TokensFileError(ValueError):
    """A tokens file line rexec cannot take: str() names the file and the line.
    The message never quotes a name or a hash: a token pasted by mistake into
    the file must not reach a log."""

    def __init__(self, path, line, problem):
        super().__init__("--tokens %r line %d: %s" % (path, line, problem))


def parse_tokens(data, path):
    """The Credentials of tokens file `path`, whose bytes are `data`: one token a
    line, `NAME sha256:HEX [OPTION ...]` (shell-like words, quotes allowed),
    `#` comment lines and blank lines; raises TokensFileError."""
    credentials, names, digests = [], {}, {}
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TokensFileError(path, number, "not UTF-8 text")
        line = line[:-1] if line.endswith("\r") else line
        if not line.replace("\t", " ").isprintable():
            raise TokensFileError(path, number, "a control or other unprintable character")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as exc:   # "No closing quotation"
            raise TokensFileError(path, number, str(exc).lower())
        credential = parse_token_words(words, lambda problem: TokensFileError(path, number,
                                                                             problem))
        for seen, key, what in ((names, credential.name, "name"),
                                (digests, credential.digest, "token")):
            if key in seen:
                raise TokensFileError(path, number, "the same %s as line %d" % (what, seen[key]))
            seen[key] = number
        credentials.append(credential)
    return credentials


def parse_token_words(words, error):
    """The Credential that the words of one tokens-file line describe; raises
    error(problem) for words that describe none."""
    if len(words) < 2:
        raise error("expected NAME sha256:HEX [OPTION ...]")
    name, digest = words[0], TOKEN_HASH.fullmatch(words[1])
    if not TOKEN_NAME.fullmatch(name):
        raise error("a name is 1 to 32 letters, digits and . _ @ -, starting with a "
                    "letter or digit")
    if name == LEGACY_TOKEN:
        raise error("the name %r is kept for the token of REXEC_TOKEN or --token-file"
                    % LEGACY_TOKEN)
    if digest is None:
        raise error("the second word must be sha256: and 64 hex digits, the SHA-256 of "
                    "the token (as `rexec.py token` prints it)")
    role, allow, networks = None, [], []
    for position, word in enumerate(words[2:], 3):
        key, _, value = word.partition("=")
        if key == "role" and value in ROLES and role is None:
            role = value
        elif key == "role":
            raise error("role= is given twice" if role else "role= takes run, read or admin")
        elif key == "allow" and value:
            allow.append(value)
        elif key == "from" and value:
            try:
                networks.append(ipaddress.ip_network(value))
            except ValueError as exc:
                raise error("from= takes an address or a network (CIDR): %s" % exc)
        else:
            raise error("word %d is no option: role=, allow= or from= and a value" % position)
    return Credential(name, bytes.fromhex(digest.group(1)), role or "run", allow, networks)


def token_line(name, token, role="run", allow=(), networks=()):
    """The tokens-file line for token `token` (text) named `name`."""
    words = [shlex.quote(name), "sha256:" + hashlib.sha256(token.encode("latin-1")).hexdigest()]
    words += ["role=" + role] + ["allow=" + shlex.quote(cmd) for cmd in allow]
    words += ["from=%s" % network for network in networks]
    return " ".join(words)


# --------------------------------------------------------------------------
# Logging
# --------------------------------------------------------------------------

# Every event a line can be (README, Logging); a test holds each log_event() to it.
LOG_EVENTS = (
    "serving", "protected-mode", "no-auth", "token-file-mode", "token-env-ignored",   # start
    "request", "start", "spawn-failed", "end", "access", "chunk", "stderr",   # a request
    "stderr-dropped",
    "auth-failed", "client-left", "client-flood", "http-error", "connection-ended",
    "internal-error", "connection-error", "accept-paused",                    # trouble
    "signal-ignored", "reloaded", "reload-failed", "no-tokens",               # signals
    "stopping", "stop-now", "stopped",                                        # the stop
)


def one_line(text):
    """`text` with each character that is not printable written as Python writes
    it in a literal (\\n, \\x1b, \\x9b, \\u2028, \\udcff): one line that cannot move a
    terminal's cursor, retitle its window or forge a log line.  Backslashes are
    left alone, so %r-quoted parts are not escaped twice; it is for reading."""
    text = str(text)
    # isprintable() is False for every control, format and separator character
    # but the ASCII space, for lone surrogates and for unassigned code points.
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def printable(value):
    """A log-safe rendering of a field: one_line(), in double quotes (with
    backslashes and quotes escaped) when it is empty, has spaces or had to be escaped."""
    text = str(value)
    if text and text.isprintable() and " " not in text:
        return text
    return '"%s"' % one_line(text.replace("\\", "\\\\").replace('"', '\\"'))


class Duration(str):
    """Seconds to the millisecond as a text line shows them ('0.010s'); in JSON,
    the number (`seconds`).  A str, made once: a line's format takes it as it
    is, where a float's own __str__ would be a call into Python for each line."""

    __slots__ = ()

    @classmethod
    def of(cls, seconds):
        return cls("%.3fs" % seconds)

    @classmethod
    def since(cls, start):
        """The time from monotonic clock reading `start` to now."""
        return cls("%.3fs" % (time.monotonic() - start))

    @property
    def seconds(self):
        return float(self[:-1])


class Event:
    """A log record's message: an event name (one of LOG_EVENTS) and its fields,
    rendered as 'event k=v ...' only when a text handler formats it."""

    __slots__ = ("event", "fields")

    def __init__(self, event, fields):
        self.event, self.fields = event, fields

    def __str__(self):
        return event_text(self.event, self.fields)


_event_forms = {}   # (event, its field names) -> 'event name=%s ...' (see event_text)
MAX_EVENT_FORMS = 256   # kept forms: the code has fewer; past this, each is made each time


def event_text(event, fields):
    """'event k=v ...', each value as printable() writes it."""
    key = (event,) + tuple(fields)
    form = _event_forms.get(key)
    if form is None:
        form = " ".join([event.replace("%", "%%")]
                        + [name.replace("%", "%%") + "=%s" for name in fields])
        if len(_event_forms) < MAX_EVENT_FORMS:
            _event_forms[key] = form
    text = form % tuple(fields.values())
    # Nearly always nothing to escape: the whole line is printable, its only
    # spaces are the ones before each field, and no value is empty.
    if (text.isprintable() and text.count(" ") == len(fields)
            and "= " not in text and text[-1:] != "="):
        return text
    return " ".join([event] + ["%s=%s" % (name, printable(value))
                               for name, value in fields.items()])


def logged_path(path):
    """A request's path as logged: without its query, which may hold secrets, and
    cut to its first LOGGED_PATH characters, then "..."."""
    path = path.partition("?")[0]
    return path if len(path) <= LOGGED_PATH else path[:LOGGED_PATH] + "..."


def log_event(level, event, exc_info=False, **fields):
    """One log line: 'event k=v ...' as text, or one JSON object (see LineFormatter).
    `exc_info`: the exception being handled goes with it, as a traceback.

    A line goes straight to the log's descriptor in one write, past the logging
    module's record, handler and formatter objects: at three lines a request
    they cost a tenth of a short command's server CPU.  The logging module
    still writes the lines with a traceback, and decides which levels log."""
    if not log.isEnabledFor(level):
        return
    out = LineFormatter.direct
    if out is None or exc_info:
        flush_held_log()   # the held lines stay first
        log.log(level, Event(event, fields), exc_info=exc_info)
        return
    _write_events(out, [(None, level, event, fields)])


_held_log = threading.local()   # this thread's lines held for its next write (log_event_soon)


def log_event_soon(level, event, **fields):
    """log_event(), but the line may wait, at most LOG_HOLD, to go out in one
    write with this thread's next one: a short command's start, end and access
    lines cost one write.  It keeps its own time and its place: this thread's
    later lines are written after it, never before."""
    if LineFormatter.direct is None or not log.isEnabledFor(level):
        log_event(level, event, **fields)
        return
    held = getattr(_held_log, "lines", None)
    if held is None:
        held = _held_log.lines = []
        _held_log.due = time.monotonic() + LOG_HOLD
    held.append((time.time(), level, event, fields))


def held_log_due():
    """When this thread's held lines go out (a monotonic time), or None."""
    return _held_log.due if getattr(_held_log, "lines", None) is not None else None


def flush_held_log(now=None):
    """Write this thread's held lines: all of them, or with `now` (a monotonic
    time) those whose time has come.  When the rest is due (None: never)."""
    if getattr(_held_log, "lines", None) is None:
        return None
    if now is not None and now < _held_log.due:
        return _held_log.due
    out = LineFormatter.direct
    if out is not None:
        _write_events(out, [])
    return None


def _write_events(out, entries):
    """Write (time or None for now, level, event, fields) lines in one write,
    after the thread's held lines."""
    held = getattr(_held_log, "lines", None)
    if held is not None:
        _held_log.lines = None
        entries = held + entries
    now = time.time()
    if out.as_json:
        text = "".join([out.line(created or now, level, Event(event, fields)) + "\n"
                        for created, level, event, fields in entries])
    else:   # what line() makes of each
        text = "".join([out.text_line(created or now, level, event_text(event, fields), "\n")
                        for created, level, event, fields in entries])
    with out.lock:   # one line at a time, however long
        try:
            write_fd(out.fd, text.encode(out.encoding, out.errors))
        except OSError:   # a log that cannot be written must not stop a stream
            pass


class LineFormatter(logging.Formatter):
    """The shape of every log line.  Text: 'TIME LEVEL event k=v ...'.  JSON
    (for log shippers): one object of one shape, time (seconds since the
    epoch), level, event, then the event's fields, and `traceback` for an
    ERROR; numbers stay numbers (a Duration is its seconds).  `direct` is the
    formatter log_event() writes with itself, with the descriptor it writes to."""

    direct = None

    def __init__(self, as_json, stream):
        super().__init__()
        self.as_json = as_json
        try:
            self.fd = stream.fileno()
        except (AttributeError, OSError, ValueError):   # not a file: the logging module writes
            self.fd = None
        self.encoding = getattr(stream, "encoding", None) or "utf-8"
        self.errors = getattr(stream, "errors", None) or "backslashreplace"
        self.lock = threading.Lock()
        self._second = (None, "")   # the second of the last text line, and its text
        self._level_names = {}      # level -> its name (logging.getLevelName costs a call)

    def format(self, record):
        traceback = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelno, record.msg, record, traceback)

    def line(self, created, level, msg, record=None, traceback=None):
        if not isinstance(msg, Event):   # a line that did not come through log_event: a bug
            msg = Event("message", {"message": record.getMessage() if record else str(msg)})
        if self.as_json:
            entry = {"time": round(created, 3), "level": logging.getLevelName(level).lower(),
                     "event": msg.event}
            for name, value in msg.fields.items():
                if isinstance(value, Duration):
                    value = value.seconds
                entry.setdefault(name, value)   # a field cannot overwrite time, level, event
            if traceback:
                entry["traceback"] = traceback
            return json.dumps(entry, default=str)
        return self.text_line(created, level, str(msg), "\n" + traceback if traceback else "")

    def text_line(self, created, level, text, end=""):
        """'TIME LEVEL text' and `end`, the time as the logging module writes it."""
        second = int(created)
        made, stamp = self._second
        if made != second:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = (second, stamp)
        name = self._level_names.get(level)
        if name is None:
            name = self._level_names[level] = logging.getLevelName(level)
        return "%s,%03d %s %s%s" % (stamp, (created - second) * 1000, name, text, end)


def setup_logging(verbosity, fmt):
    logging.addLevelName(TRACE, "TRACE")
    handler = logging.StreamHandler(sys.stderr)
    formatter = LineFormatter(fmt == "json", sys.stderr)
    handler.setFormatter(formatter)
    LineFormatter.direct = formatter if formatter.fd is not None else None
    # No line shows the thread, process or source line of a record: don't look
    # them up for each one (the logging HOWTO's "Optimization" section).
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.logAsyncioTasks = False
    logging._srcfile = None
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel([logging.INFO, logging.DEBUG, TRACE][min(verbosity, 2)])


# --------------------------------------------------------------------------
# HTTP handler
# --------------------------------------------------------------------------

def wait_for_socket(sock, exc, writing, deadline):
    """The non-blocking `sock` raised `exc`, one of WOULD_BLOCK, `writing` or
    not: wait until it is ready for what `exc` wants (TLS may have to read to
    write, or write to read), or raise socket.timeout once monotonic
    `deadline` has passed."""
    if ssl is not None and isinstance(exc, (ssl.SSLWantReadError, ssl.SSLWantWriteError)):
        writing = isinstance(exc, ssl.SSLWantWriteError)
    left = deadline - time.monotonic()
    if left <= 0 or not wait_ready(
            sock, POLLOUT if writing else POLLIN, left):
        raise socket.timeout("timed out")


class DeadlineReader(io.RawIOBase):
    """Reads of a non-blocking socket that share one deadline, so a request
    trickled in a byte at a time is cut off as surely as a silent one (a
    socket's own timeout restarts with every byte).  A read tries first and
    waits only when nothing is there: a socket with a timeout would poll(2)
    before every read.  Bytes a stream read off the socket meanwhile (`early`)
    come first."""

    def __init__(self, sock):
        self.sock = sock
        self.deadline = None
        self.early = bytearray()   # the next request, read while a stream ran

    def readable(self):
        return True

    def readinto(self, buffer):
        if self.early:
            count = min(len(buffer), len(self.early))
            buffer[:count] = self.early[:count]
            del self.early[:count]
            return count
        deadline = self.deadline or time.monotonic() + REQUEST_TIMEOUT
        while True:
            if time.monotonic() >= deadline:
                raise socket.timeout("the request took too long to arrive")
            try:
                return self.sock.recv_into(buffer)
            except WOULD_BLOCK as exc:
                wait_for_socket(self.sock, exc, False, deadline)


class SocketWriter(socketserver._SocketWriter):
    """wfile: each write goes out whole on the non-blocking socket, waiting up
    to `timeout` seconds for each pause of the client's."""

    def __init__(self, sock, timeout):
        super().__init__(sock)
        self.timeout = timeout

    def write(self, data):
        with memoryview(data) as view:
            sent = 0
            while sent < len(view):
                try:
                    sent += self._sock.send(view[sent:])
                except WOULD_BLOCK as exc:
                    wait_for_socket(self._sock, exc, True, time.monotonic() + self.timeout)
            return sent


@functools.lru_cache(maxsize=1024)   # asked of every request; peers and hosts repeat
def is_loopback(host):
    """True for a peer on this host: a loopback address, or a Unix-socket peer."""
    if host == UNIX_PEER:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


@functools.lru_cache(maxsize=1024)
def is_literal_host(host):
    """True when a Host header names an IP address or localhost (a port may follow):
    a name that DNS could rebind to 127.0.0.1 is anything else."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::[0-9]*)?|([^:\[\]]+)(?::[0-9]*)?", host.strip())
    if not match:
        return False
    name = match.group(1) or match.group(2)
    if name.lower() == "localhost":
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


# A header field's name: an RFC 9110 token.
# A whole field line, its value without the white space around it (matched
# in linear time: no lazy part before the trailing white space).
FIELD_LINE = re.compile(r"^([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[^\r\n]*[^ \t\r\n])?)[ \t]*\r\n",
                        re.M)


class Headers:
    """A request's header fields, from the lines _read_header_lines() checked:
    names matched without regard to case, values without the white space
    around them, in the order sent.  The part of http.client's HTTPMessage
    that rexec uses, without the email parser behind it (a quarter of a short
    request's parsing).  `fields`: each lower-cased name's values, in the
    order sent; `defects`: the lines that are no field."""

    __slots__ = ("fields", "defects")

    def __init__(self, head):
        self.fields = values = {}
        self.defects = []
        text = head.decode("iso-8859-1")
        fields = FIELD_LINE.findall(text)   # one scan; a line that is no field is not there
        if len(fields) != text.count("\n") - 1:   # the head ends with an empty line
            self.defects = [line for line in head.split(b"\r\n")[:-2]
                            if not FIELD_LINE.match(line.decode("iso-8859-1") + "\r\n")]
        for name, value in fields:
            values.setdefault(name.lower(), []).append(value)

    def get(self, name, default=None):
        values = self.fields.get(name.lower())
        return values[0] if values else default

    def get_all(self, name, default=None):
        values = self.fields.get(name.lower())
        return list(values) if values else default

    def __contains__(self, name):
        return name.lower() in self.fields


class RexecHandler(http.server.BaseHTTPRequestHandler):
    """Serves the rexec API on one connection, one request after another."""

    server_version = "rexec/" + __version__
    protocol_version = "HTTP/1.1"   # keep-alive, and chunked responses with trailers
    default_request_version = "HTTP/1.0"   # refusals of unparsable lines get a status line
    timeout = REQUEST_TIMEOUT       # socket timeout; DeadlineReader bounds a whole request
    unread_body = False             # a refusal left body bytes unread: linger, then close
    fin_sent = False                # the connection's FIN went out with a stream's end
    _stream_heads = {}              # a stream's response head but its first lines, by kind

    def setup(self):
        context = self.server.ssl_context
        if context is not None:  # the handshake runs here, never on the accepting thread
            self.request.settimeout(HANDSHAKE_TIMEOUT)
            self.request = context.wrap_socket(self.request, server_side=True)
        # StreamRequestHandler.setup(), but the socket stays non-blocking: its
        # reader and writer wait themselves, and only when they must.
        self.connection = self.request
        self.connection.setblocking(False)
        try:
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:   # a Unix socket
            pass
        self.reader = DeadlineReader(self.connection)
        self.rfile = io.BufferedReader(self.reader)
        self.wfile = SocketWriter(self.connection, self.timeout)

    def finish(self):
        tls = self.server.ssl_context is not None
        try:
            super().finish()
            if tls:
                self._send_close_notify()
            if self.unread_body:
                self._discard_unread_body()
        finally:
            if tls or self.fin_sent:   # closed here: shutdown_request() has nothing to do
                self.connection.close()

    def _send_close_notify(self):
        """End TLS with a close_notify alert: without it a client cannot tell a
        body that ends with the connection (HTTP/1.0) from one cut off, and
        strict clients report the end as an error.  Not waiting for the peer's
        own alert: the connection is closing either way."""
        with contextlib.suppress(OSError, ValueError):   # SSLWantRead, or the peer is gone
            self.connection.unwrap()   # the socket is non-blocking: no wait

    def _discard_unread_body(self):
        """Closing with unread bytes makes the kernel reset the connection, which
        can destroy the refusal before the client reads it: half-close, then
        discard what arrives for a moment (a lingering close, as Apache does)."""
        deadline = time.monotonic() + LINGER_TIME
        with contextlib.suppress(OSError, ValueError):
            self.connection.shutdown(socket.SHUT_WR)
            while time.monotonic() < deadline:
                self.connection.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.connection.recv(READ_SIZE):
                    break

    def handle_one_request(self):
        """Read one request's head and serve it: the standard library's loop body,
        with the head read and checked here (see parse_request)."""
        self.reader.deadline = time.monotonic() + REQUEST_TIMEOUT
        self.status = None
        self.unread_body = False
        self.sent = 0
        self.alias = None
        self.credential = None   # who the request is from, once _authorize() knows
        self.begun = time.monotonic()
        self.command = self.requestline = ""
        self.request_version = self.default_request_version
        try:
            if self._read_request_line() and self.parse_request():
                method = getattr(self, "do_" + self.command, None)
                if method is None:
                    self.send_error(HTTPStatus.NOT_IMPLEMENTED,
                                    "Unsupported method (%r)" % self.command)
                else:
                    method()
                    self.wfile.flush()
        except socket.timeout as exc:   # the head or body did not arrive in time
            self.log_error("Request timed out: %r", exc)
            self.close_connection = True
        finally:
            if self.status is not None:
                self._log_access()   # with the held start and end lines, in one write
            else:   # the held lines are never lost, even without an answer
                flush_held_log()
        if self.unread_body:
            self.close_connection = True
        elif self.close_connection and self._bytes_waiting():
            self.unread_body = True   # a pipelined request: closing would reset the answer

    def _bytes_waiting(self):
        """True when the kernel holds bytes the client sent that were not read."""
        try:
            return fionread(self.connection.fileno()) > 0   # FIONREAD works on sockets too
        except (OSError, ValueError):
            return False

    def _read_request_line(self):
        """Read the request line into raw_requestline, past up to MAX_EMPTY_LINES
        empty lines (RFC 9112 2.2: old clients send a CRLF after a body).  False
        when the connection ended, or the line was refused (400, 414).  The
        header lines may come with it (_whole_head), for _read_header_lines."""
        self.header_lines = self._whole_head()
        if self.header_lines is not None:
            return True
        for _ in range(MAX_EMPTY_LINES + 1):
            line = self.rfile.readline(MAX_REQUEST_LINE + 1)
            if line != b"\r\n":
                break
        else:
            self.send_error(HTTPStatus.BAD_REQUEST, "more than %d empty lines before the request "
                            "line" % MAX_EMPTY_LINES)
            return False
        self.raw_requestline = line
        if not line:
            self.close_connection = True
            return False
        if len(line) > MAX_REQUEST_LINE:
            self.send_error(HTTPStatus.REQUEST_URI_TOO_LONG)
            return False
        problem = self._line_problem(line, LINE_CONTROL)
        if problem:
            self.send_error(HTTPStatus.BAD_REQUEST, problem)
            return False
        return True

    @staticmethod
    def _line_problem(line, control):
        """Why one line of a request head, as read, cannot be taken; None if it can.
        A proxy in front may split lines at a bare LF or CR, or cut at a NUL,
        where rexec does not: its request would not be rexec's (smuggling)."""
        if not line.endswith(b"\n"):
            return "the request head ended before its empty line"
        if not line.endswith(b"\r\n"):
            return "the request head's lines must end with CRLF, not a bare LF"
        if control.search(line, 0, len(line) - 2):
            return ("control characters (such as NUL or a lone CR) are not accepted in the "
                    "request head")
        return None

    def parse_request(self):
        """Parse raw_requestline, then read the header lines: set command, path,
        request_version and headers (the standard library's HTTPMessage), or
        answer with an error and return False.  The standard parser's contract,
        with one behaviour on every Python: HTTP/0.9 is refused (it has no status
        line to refuse with), the path is taken as sent (3.11+ make "//x" "/x"),
        and a head a proxy could read differently gets 400 (_line_problem)."""
        self.command = None
        self.request_version = self.default_request_version
        self.close_connection = True
        self.requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        words = self.requestline.split()
        if len(words) >= 3:
            match = HTTP_VERSION.fullmatch(words[-1])
            if match is None:
                self.send_error(HTTPStatus.BAD_REQUEST, "Bad request version (%r)" % words[-1])
                return False
            version = int(match.group(1)), int(match.group(2))
            if not (1, 0) <= version < (2, 0):   # 0.9 has no status line: it would get none
                self.send_error(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED,
                                "Invalid HTTP version (%s)" % words[-1][len("HTTP/"):])
                return False
            # As the framing reads it: "HTTP/01.0" is 1.0 (no chunked answer)
            self.request_version = "HTTP/%d.%d" % version
            self.close_connection = version < (1, 1)
        if len(words) == 2:
            self.send_error(HTTPStatus.BAD_REQUEST, "HTTP/0.9 requests are not served")
            return False
        if len(words) != 3:
            self.send_error(HTTPStatus.BAD_REQUEST, "Bad request syntax (%r)" % self.requestline)
            return False
        self.command, self.path = words[:2]
        head = self._read_header_lines()
        if head is None:
            return False
        self.headers = Headers(head)
        fields = self.headers.fields
        # What frames the body, taken once for _handle(), _check_framing() and _body_length()
        self.lengths = fields.get("content-length", ())
        self.chunked = "transfer-encoding" in fields
        connection = fields.get("connection")
        connection = connection[0].lower() if connection else ""
        if connection == "close":
            self.close_connection = True
        elif connection == "keep-alive":
            self.close_connection = False
        self.expectations = self._expectations() if "expect" in fields else []
        if version >= (1, 1) and "100-continue" in self.expectations:
            return self.handle_expect_100()
        return True

    def _read_header_lines(self):
        """The header lines after the request line, the empty one included, as
        bytes; None once refused: 431 for a head over MAX_HEAD bytes in all or
        MAX_HEADER_LINES lines, 400 for a line that _line_problem refuses or a
        folded one (obs-fold, which RFC 9112 5.2 lets a server refuse)."""
        if self.header_lines is not None:   # read with the request line
            return self.header_lines
        lines = []
        size = len(self.raw_requestline)
        while True:
            line = self.rfile.readline(MAX_HEAD - size + 1)
            size += len(line)
            if size > MAX_HEAD:
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                "the request head is larger than %d bytes" % MAX_HEAD)
                return None
            problem = self._line_problem(line, HEAD_CONTROL)
            if problem is None and line[:1] in (b" ", b"\t"):
                problem = "folded header lines (starting with a space or tab) are not accepted"
            if problem:
                self.send_error(HTTPStatus.BAD_REQUEST, problem)
                return None
            lines.append(line)
            if line == b"\r\n":
                return b"".join(lines)
            if len(lines) >= MAX_HEADER_LINES:   # no room left for the empty line
                self.send_error(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE,
                                "more than %d header lines" % (MAX_HEADER_LINES - 1))
                return None

    def _whole_head(self):
        """The request line, into raw_requestline, and the header lines after it,
        returned, all in one piece: when the read buffer holds the whole head
        and it is one that the line-by-line reads take as it is (WHOLE_HEAD,
        and within the limits), as in nearly every request.  Else None, and
        nothing is consumed."""
        data = self.rfile.peek(1)
        match = WHOLE_HEAD.match(data)
        if (match is None or match.end() > MAX_HEAD or match.start(1) > MAX_REQUEST_LINE
                or data.count(b"\n", match.start(1), match.end()) > MAX_HEADER_LINES):
            return None
        head = self.rfile.read(match.end())
        self.raw_requestline = head[:match.start(1)]
        return head[match.start(1):]

    def _expectations(self):
        """The members of the Expect headers, lower-cased."""
        return [member.strip().lower() for value in self.headers.get_all("Expect", [])
                for member in value.split(",") if member.strip()]

    # -- dispatch ------------------------------------------------------------

    def _route(self):
        """The method serving this request, or None (501).  HEAD is served as GET
        is, and send_text leaves the body out."""
        path = self.path.partition("?")[0]
        command = "GET" if self.command == "HEAD" else self.command
        if path == "/process":
            return (self.start_process if command == "POST" else
                    self.list_processes if command == "GET" else None)
        if path.startswith("/process/") and command == "DELETE":
            return self.kill_process
        if command == "GET":
            return (self.serve_metrics if path == "/metrics" else
                    self.serve_health if path == "/health" else None)
        return None

    def _preflight(self):
        """Everything that can refuse a request before its body is read."""
        self._check_framing()
        action = self._route()
        if action != self.serve_health:
            try:
                if "Origin" in self.headers:  # a web page: any site could POST to a loopback rexec
                    raise Refused(HTTPStatus.FORBIDDEN, "requests from web pages (with an Origin "
                                  "header) are refused")
                self._authorize()
                self._permit(action)
            except Refused:
                # Each further try costs an unauthorized client a new connection.
                self.close_connection = True
                raise
        if any(member != "100-continue" for member in self.expectations):
            raise Refused(HTTPStatus.EXPECTATION_FAILED,
                          "the only expectation understood is 'Expect: 100-continue'")
        if action is None:
            raise Refused(HTTPStatus.NOT_IMPLEMENTED, "%s %s is not supported"
                          % (self.command, self.path.partition("?")[0]))
        if action == self.start_process:
            self.body_length = self._body_length()   # refused (411, 413) before it is read
        return action

    def _handle(self):
        self.unread_body = self.chunked or any(length.strip() != "0" for length in self.lengths)
        try:
            self._preflight()()
        except Refused as refusal:
            self.send_text(refusal.status, refusal.message, refusal.headers)
        except ClientDisconnected:
            self.close_connection = True
        except Exception as exc:
            self.close_connection = True
            if is_peer_gone(exc):   # it left before its answer: a probe that hung up, say
                log_event(logging.DEBUG, "client-left", before="answer",
                          error=describe_error(exc))
                return
            log_event(logging.ERROR, "internal-error", exc_info=True, method=self.command,
                      path=logged_path(self.path))   # a query may hold secrets
            if self.status is None:
                self.send_text(HTTPStatus.INTERNAL_SERVER_ERROR,
                               "internal error; see the server log")

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = do_HEAD = do_OPTIONS = _handle

    def handle_expect_100(self):
        """Refuse (401, 403, 413, ...) before the client sends a body it need not send."""
        try:
            self._preflight()
        except Refused as refusal:
            self.unread_body = True
            self.send_text(refusal.status, refusal.message, refusal.headers)
            return False
        return super().handle_expect_100()

    def _check_framing(self):
        """Refuse (400, closing) a head whose end or body length is in doubt."""
        if self.headers.defects:  # e.g. a line without a colon: the rest was not parsed
            self.close_connection = True
            raise Refused(HTTPStatus.BAD_REQUEST, "malformed header line")
        lengths, hosts = self.lengths, self.headers.fields.get("host", ())
        if len(lengths) > 1 or lengths and not CONTENT_LENGTH.fullmatch(lengths[0].strip(" \t")):
            self.close_connection = True
            raise Refused(HTTPStatus.BAD_REQUEST, "Content-Length must be one decimal number")
        if lengths and self.chunked:   # which one frames the body?
            self.close_connection = True
            raise Refused(HTTPStatus.BAD_REQUEST, "Content-Length and Transfer-Encoding conflict")
        if len(hosts) > 1:
            self.close_connection = True
            raise Refused(HTTPStatus.BAD_REQUEST, "more than one Host header")

    def _authorize(self):
        """Set self.credential to who the request is from, or refuse it (401, 403).
        The server's Access is taken once: a reload meanwhile changes nothing here."""
        server, access, peer = self.server, self.server.access, self.client_address[0]
        if not access.required:
            if not (server.no_auth or is_loopback(peer)):
                raise Refused(HTTPStatus.FORBIDDEN,
                              "rexec serves only loopback peers until it has a token: "
                              "start it with REXEC_TOKEN, --token-file or --tokens (or --no-auth)")
            # DNS rebinding: a page from evil.example resolving to 127.0.0.1.  With
            # --no-auth the operator opened the door; hosts are then called by name.
            host = self.headers.get("Host")
            if not server.no_auth and host is not None and not is_literal_host(host):
                raise Refused(HTTPStatus.FORBIDDEN, "without a token, the Host header must be "
                              "an IP address or localhost")
            self.credential = ANONYMOUS
            return
        scheme, _, presented = self.headers.get("Authorization", "").partition(" ")
        credential = None
        if scheme.lower() == "bearer":   # header values are Latin-1 (http.client)
            credential = access.identify(presented.strip().encode("latin-1"))
        if credential is not None and credential.admits(peer):
            self.credential = credential
            return
        if credential is None:
            log_event(logging.WARNING, "auth-failed", peer=peer)
        else:   # the right token from the wrong place: it may have leaked
            log_event(logging.WARNING, "auth-failed", peer=peer, token=credential.name,
                      why="not from its from= networks")
        raise Refused(HTTPStatus.UNAUTHORIZED,
                      "this server wants an 'Authorization: Bearer <token>' header with its token",
                      [("WWW-Authenticate", 'Bearer realm="rexec"')])

    def _permit(self, action):
        """Refuse (403) what the role of an authorized request does not allow."""
        credential = self.credential
        if credential.role == "read" and action in (self.start_process, self.kill_process):
            raise Refused(HTTPStatus.FORBIDDEN, "token %r has role=read: it starts and ends "
                          "nothing" % credential.name)

    def _allowlists(self):
        """The allowlists that apply to this request: (cmd values, what to call it)."""
        credential, lists = self.credential, []
        if self.server.allow is not None:
            lists.append((self.server.allow, "--allow"))
        if credential.allow is not None:
            lists.append((credential.allow, "allow= of token %r" % credential.name))
        return lists

    def _body_length(self):
        if self.chunked:
            raise Refused(HTTPStatus.LENGTH_REQUIRED, "send the body with a Content-Length")
        if not self.lengths:
            raise Refused(HTTPStatus.LENGTH_REQUIRED,
                          "a JSON body with a Content-Length is required")
        length = int(self.lengths[0])   # _check_framing made sure it is digits
        if length > MAX_BODY:
            raise Refused(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          "the body is larger than %d bytes" % MAX_BODY)
        return length

    def _read_body(self):
        length = self.body_length   # _preflight() took it
        try:
            body = self.rfile.read(length)
        except OSError as exc:  # a timeout (DeadlineReader) or a reset: the client is no use
            raise ClientDisconnected("reading the body: %s" % exc) from exc
        if len(body) < length:
            raise ClientDisconnected("the body ended early")
        self.unread_body = False
        return body

    # -- endpoints -----------------------------------------------------------

    def start_process(self):
        """POST /process: run the command and stream its output."""
        server = self.server
        spec = parse_spec(self._read_body())
        self.alias = spec.alias
        allowlists = self._allowlists()
        for names, what in allowlists:   # --allow, then the token's own allow=
            if spec.cmd not in names:
                raise Refused(HTTPStatus.FORBIDDEN, "command %r is not allowed here (%s)"
                              % (spec.cmd, what))
            # The file that runs is found in rexec's own PATH and cwd (resolve_allowed());
            # a request's own PATH or cwd would point at another one, so neither is taken.
            if ("/" not in spec.cmd and "PATH" in spec.envs
                    or "/" in spec.cmd and not os.path.isabs(spec.cmd) and spec.cwd != "."):
                raise Refused(HTTPStatus.FORBIDDEN, "with %s, cmd %r cannot come with its "
                              "own PATH (envs) or cwd; allow an absolute path"
                              % (what, spec.cmd))
        if log.isEnabledFor(logging.DEBUG):   # its fields cost a short command to build
            log_event(logging.DEBUG, "request", alias=spec.alias, cmd=spec.cmd, args=spec.args,
                      cwd=spec.cwd, env_names=sorted(spec.envs), timeout=spec.timeout,
                      stdin_bytes=None if spec.stdin is None else len(spec.stdin),
                      stderr=spec.stderr, tty=spec.tty)
        proc = Process(spec, server.grace, server.registry.release, self.credential.name)
        # Counted from before the claim: a shutdown that comes while Popen runs
        # must wait for this stream, or the child it is starting is orphaned.
        server.stream_begins(self.connection)
        try:
            server.registry.claim(proc)
            self._spawn(proc, allowlisted=bool(allowlists))
            self._stream(proc)
        finally:
            server.stream_ends(self.connection)

    def _spawn(self, proc, allowlisted):
        """Start the claimed proc, or free its alias and refuse with 404.
        `allowlisted`: its cmd passed an allowlist, and runs as resolve_allowed() finds it."""
        server, spec = self.server, proc.spec
        try:
            proc.start(resolve_allowed(spec.cmd) if allowlisted else None)
        except BaseException as exc:
            proc.ending.abandon()   # a DELETE that came between claim and start waits on it
            if not isinstance(exc, OSError):
                raise
            server.metrics.count(spawn_failures=1)
            log_event(logging.INFO, "spawn-failed", alias=spec.alias, cmd=spec.cmd,
                      error=exc.strerror or str(exc))
            raise Refused(HTTPStatus.NOT_FOUND, "cannot start %r: %s" % (spec.cmd, os_reason(exc)))
        server.metrics.count_start(proc.owner)
        log_event_soon(logging.INFO, "start", alias=spec.alias, pid=proc.pid, cmd=spec.cmd,
                       token=proc.owner or "-")

    def _stream(self, proc):
        """Stream proc's output as the Accept header asks (chosen_answer()): the
        raw stream, server-sent events, or one JSON answer at the end.  Whatever
        fails, the group is ended and reaped and its alias freed."""
        writer = None
        try:
            answer = chosen_answer(self.headers.get("Accept"))
            encoder = (EventEncoder() if answer == "events" else
                       OutputCollector(self.server.max_output) if answer == "json" else None)
            framing = (RawWriter if self.request_version == "HTTP/1.0" or answer == "json"
                       else ChunkedWriter)
            writer = framing(self.connection, proc.output_fd, proc.spec.tty, proc.alias, encoder)
            self._pump(Stream(proc, self.connection, writer, self.reader.early))
        finally:
            # Closing and accounting come after the last chunk: the client need not wait.
            ending = proc.ending
            ending.finish()   # the stream did, unless it failed before it ran
            proc.close()
            self.sent = sent = writer.sent if writer is not None else 0
            self.server.metrics.count_exit(ending.reason, sent)
            log_event_soon(  # written with the access line, in one write
                logging.INFO, "end", alias=proc.alias, pid=proc.pid, cmd=proc.spec.cmd,
                exit=ending.exit_code, reason=ending.reason,
                duration=Duration.since(proc.started_mono), bytes=sent,
                token=proc.owner or "-")

    def _pump(self, stream):
        """Send the head (with the first output, see BodyWriter.start), run the
        stream (it reaps the child and frees the alias), then the end of the
        body: the alias is free when the client reads it.  A JSON answer (an
        OutputCollector) is sent whole once the process ended."""
        writer, ending = stream.writer, stream.ending
        collected = writer.encoder if isinstance(writer.encoder, OutputCollector) else None
        try:
            if collected is None:
                self.log_request(HTTPStatus.OK)
                writer.start(self._stream_head(writer))
            stream.run()
        except Exception:
            if writer.holds_head:   # nothing went out yet: the client gets a 500 instead
                self.status = None
            raise
        finally:
            stream.end()   # run() ends it; this covers a failure before or inside run()
        if writer.gone or collected is None and not writer.keeps_connection:
            self.close_connection = True
        if self.close_connection and self.reader.early:   # closing with bytes unread
            self.unread_body = True   # would reset the connection over the stream's end
        try:
            if writer.gone:
                pass
            elif collected is not None:
                self.send_json(HTTPStatus.OK, collected.answer(
                    stream.proc.alias, ending.exit_code, ending.reason))
            else:
                writer.finish(ending.exit_code, ending.reason)
                if self.close_connection and self.server.ssl_context is None:
                    # The client sees the end now, not after the logging and the
                    # clean-up (TLS sends its close_notify first, in finish()).
                    self.connection.shutdown(socket.SHUT_WR)
                    self.fin_sent = True
        except (ClientDisconnected, OSError):
            self.close_connection = True

    def _stream_head(self, writer):
        """A stream's response head: all of it but the Date is the same for
        every stream with the same writer and encoder."""
        kind = (type(writer), type(writer.encoder))
        fields = self._stream_heads.get(kind)
        if fields is None:
            encoder = writer.encoder
            fields = [("Content-Type", getattr(encoder, "content_type",
                                               "application/octet-stream"))]
            fields += getattr(encoder, "headers", ()) + writer.headers
            fields = self._stream_heads[kind] = "".join(
                "%s: %s\r\n" % field for field in fields).encode("latin-1") + b"\r\n"
        second = int(time.time())
        made, first = RexecHandler._stream_first
        if made != second:   # the status, Server and Date lines change once a second
            first = ("%s 200 OK\r\nServer: %s\r\nDate: %s\r\n" % (
                self.protocol_version, self.version_string(), self.date_time_string())
            ).encode("latin-1")
            RexecHandler._stream_first = (second, first)
        return first + fields

    _stream_first = (None, b"")   # (the second, a stream head's first lines then)
    _date = (None, "")   # (the second, its Date header): formatdate() costs more than this

    def date_time_string(self, timestamp=None):
        """The Date header's value, made once a second."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        second = int(time.time())
        made, text = RexecHandler._date
        if made != second:
            text = email.utils.formatdate(second, usegmt=True)
            RexecHandler._date = (second, text)
        return text

    def list_processes(self):
        """GET /process: the running processes, oldest first; a run token's own only."""
        procs = self.server.registry.snapshot()
        self.send_json(HTTPStatus.OK, [p.describe() for p in procs
                                       if p.pid is not None and self.credential.owns(p)])

    def kill_process(self):
        """DELETE /process/ALIAS: end it as a timeout would, answer once it is reaped."""
        try:
            alias = urllib.parse.unquote(self.path.partition("?")[0][len("/process/"):],
                                         errors="strict")
        except UnicodeDecodeError:
            raise Refused(HTTPStatus.BAD_REQUEST, "the alias in the path is not UTF-8")
        self.alias = alias
        proc = self.server.registry.get(alias)
        if proc is None or not self.credential.owns(proc):   # another token's: as if none
            raise Refused(HTTPStatus.NOT_FOUND, "no process with alias %r is running" % alias)
        proc.ending.ask("killed")
        exit_code = proc.ending.wait()
        if exit_code is None:
            raise Refused(HTTPStatus.NOT_FOUND, "process with alias %r did not start" % alias)
        self.send_json(HTTPStatus.OK, {"alias": alias, "exit_code": exit_code})

    def serve_metrics(self):
        body = self.server.metrics.render(len(self.server.registry), self.server.access.names)
        self.send_body(HTTPStatus.OK, body.encode("utf-8"),
                       "text/plain; version=0.0.4; charset=utf-8")

    def serve_health(self):
        self.send_text(HTTPStatus.OK, "ok")

    # -- responses -----------------------------------------------------------

    def send_text(self, status, message, headers=()):
        """A one-line plain-text answer: `message` escaped by one_line(), then a newline.
        Every refusal and error goes this way, whatever text (a path, an OS message,
        a file name) it quotes."""
        self.send_body(status, (one_line(message) + "\n").encode("utf-8"),
                       "text/plain; charset=utf-8", headers)

    def send_body(self, status, body, content_type, headers=()):
        """A complete response with a Content-Length: the bytes `body` as they are."""
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.unread_body or self.close_connection:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
            self.sent = len(body)

    def send_json(self, status, obj):
        self.send_body(status, (json.dumps(obj) + "\n").encode("ascii"), "application/json")

    def send_error(self, code, message=None, explain=None):
        """Refusals of a head that is not read on (a bad request line, 414, 431,
        ...; parse_request's and the standard library's), as plain text, closing."""
        self.close_connection = True
        self.unread_body = True   # the rest of an over-long line, say: close lingering
        phrase = message or HTTPStatus(code).phrase
        self.send_text(code, phrase)

    def log_request(self, code="-", size="-"):
        self.status = code    # the access line is written once the response is done

    def log_message(self, fmt, *args):
        log_event(logging.DEBUG, "http-error", peer=self.address_string(), message=fmt % args)

    def _log_access(self):
        status = int(self.status)
        self.server.metrics.count_request(status)
        log_event(logging.INFO, "access", peer=self.client_address[0],
                  method=self.command or "-",
                  path=logged_path(self.path) if self.command else "-", status=status,
                  bytes=self.sent, duration=Duration.since(self.begun),
                  alias=self.alias or "-", token=self.credential and self.credential.name or "-")


def resolve_allowed(cmd):
    """The absolute path `cmd` runs as under --allow, or FileNotFoundError.

    A bare name is looked up in rexec's own PATH, skipping relative entries
    ("." or "bin"): exec would resolve those after the child's chdir to the
    request's cwd, where a client may have planted its own "ls".  A relative
    path is taken against rexec's cwd (the request's cwd is "." for it).
    """
    if "/" in cmd:
        return os.path.join(os.getcwd(), cmd)
    for entry in os.get_exec_path():
        candidate = os.path.join(entry, cmd)
        if os.path.isabs(entry) and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cmd)


def os_reason(exc):
    """'No such file or directory: /x' from an OSError, without the errno number."""
    reason = exc.strerror or str(exc)
    if exc.filename:   # Python 3.6's subprocess puts it in strerror too, quoted
        return "%s: %s" % (reason.replace(": %r" % (exc.filename,), ""), exc.filename)
    return reason



# --------------------------------------------------------------------------
# Server
# --------------------------------------------------------------------------

try:
    _ThreadingHTTPServer = http.server.ThreadingHTTPServer
except AttributeError:  # Python 3.6
    class _ThreadingHTTPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
        daemon_threads = True


class WarmThreads:
    """A thread for each connection, taken warm when one is idle: starting a
    thread costs more than handing it work, and a burst of short requests
    needs only as many as run at once.  serve(request, client_address) runs on
    it; a thread left without a connection for WARM_IDLE seconds exits, so
    1000 streams are 1000 threads while they run and none soon after."""

    def __init__(self, serve):
        self._serve = serve
        self._idle = []                 # _Handoff of each waiting thread, the warmest last
        self._lock = threading.Lock()

    def submit(self, request, client_address):
        with self._lock:
            handoff = self._idle.pop() if self._idle else None
        if handoff is None:
            threading.Thread(target=self._run, args=(_Handoff(), (request, client_address)),
                             name="rexec-connection", daemon=True).start()
        else:
            handoff.job = (request, client_address)
            handoff.ready.release()

    def idle_count(self):
        with self._lock:
            return len(self._idle)

    def _run(self, handoff, job):
        _wake_channels.kept = True   # its streams keep one wake-up channel (Ending.prepare)
        try:
            while job is not None:
                self._serve(*job)
                with self._lock:
                    self._idle.append(handoff)
                if not handoff.ready.acquire(timeout=WARM_IDLE):
                    with self._lock:
                        if handoff in self._idle:   # nothing came: this thread ends
                            self._idle.remove(handoff)
                            return
                    handoff.ready.acquire()   # submit() took it just now: its job comes
                job, handoff.job = handoff.job, None
        finally:
            channel = getattr(_wake_channels, "channel", None)
            if channel is not None:
                channel.close()


class _Handoff:
    """How WarmThreads hands a connection to a waiting thread: `ready` is
    released once `job` is set."""

    __slots__ = ("job", "ready")

    def __init__(self):
        self.job = None
        self.ready = threading.Lock()
        self.ready.acquire()


class RexecServer(_ThreadingHTTPServer):
    """A thread per connection; processes tracked in a shared registry.

    Built with the parsed command line (see main()); `inherited_fd` is a
    listening socket handed over by systemd, used instead of binding.
    """

    daemon_threads = True          # idle keep-alive connections must not hold up exit
    block_on_close = False         # shutdown() drains streams itself, with a bound
    request_queue_size = LISTEN_BACKLOG   # the default 5 refuses a burst of connects

    def __init__(self, options, inherited_fd=None):
        self.options = options         # what reload() reads the files of again
        self.access = options.access   # replaced whole by reload(), never changed in place
        self.no_auth = options.no_auth
        self.allow = frozenset(options.allow) if options.allow else None
        self.grace = options.grace
        self.max_output = options.max_output
        self.ssl_context = options.ssl_context
        self.registry = Registry(options.max_procs)
        self.metrics = Metrics()
        self._streams = set()          # the connections of the streams in progress
        self.threads = WarmThreads(self.process_request_thread)
        self._streams_lock = threading.Lock()   # a plain lock: taken twice a stream
        self._streams_done = threading.Condition(self._streams_lock)
        self._cutting = False          # drain() waits for the last streams to end
        self._accepted = None          # (family, type, proto) of accepted sockets
        if ":" in options.ip:
            self.address_family = socket.AF_INET6
        if inherited_fd is None:
            super().__init__((options.ip, options.port), RexecHandler)
        else:
            super().__init__((options.ip, options.port), RexecHandler, bind_and_activate=False)
            self.socket.close()
            self.socket = inherited_socket(inherited_fd)
            self.address_family = self.socket.family
            self.server_address = self.socket.getsockname()

    def describe_address(self):
        """(where it listens, as log fields: host and port, or socket; its URL)."""
        scheme = "https" if self.ssl_context else "http"
        if self.address_family == getattr(socket, "AF_UNIX", None):
            path = self.server_address
            path = path.decode("utf-8", "replace") if isinstance(path, bytes) else path
            return {"socket": path}, "%s+unix://%s" % (scheme, urllib.parse.quote(path, ""))
        host, port = self.server_address[:2]
        return ({"host": host, "port": port},
                "%s://%s:%d/" % (scheme, "[%s]" % host if ":" in host else host, port))

    def server_bind(self):
        # HTTPServer.server_bind looks the host name up (getfqdn); rexec has no use for it.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def serve_until(self, stop_fd):
        """Accept connections, each onto a thread of its own, until a stop signal
        comes through `stop_fd` (see take_signals): a stop ends the loop at once,
        where serve_forever() would notice it only at its next half-second poll
        (and wake twice a second).
        While the process is out of descriptors, accepting pauses (ACCEPT_PAUSE)
        instead of spinning on a listener that stays readable."""
        self.socket.setblocking(False)   # a connection reset before accept() is no hang
        listener = self.socket.fileno()
        poller = new_poller()
        poller.register(stop_fd, POLLIN)
        poller.register(listener, POLLIN)
        pause = None
        starved = False   # said once per spell without descriptors
        while True:
            ready = [fd for fd, _ in poller.poll(poll_ms(pause))]
            if stop_fd in ready:   # the signal pipe
                if self.take_signals(stop_fd):
                    return
                continue
            if pause is not None:   # the pause is over: listen again
                poller.register(listener, POLLIN)
                pause = None
                continue
            try:   # one at a time: a second accept() would nearly always fail (EAGAIN)
                request, client_address = self._accept()
                starved = False
                self._process(request, client_address)
            except WOULD_BLOCK + (ConnectionAbortedError,):
                continue
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES_ERRNOS:
                    raise
                if not starved:
                    log_event(logging.WARNING, "accept-paused", error=exc.strerror,
                              pause=Duration.of(ACCEPT_PAUSE))
                starved = True
                poller.unregister(listener)
                pause = ACCEPT_PAUSE

    def _accept(self):
        """socket.accept(), without looking up the listener's family and type
        (enum conversions) for each connection; a Unix socket's peer ("" or b"")
        as (UNIX_PEER, 0)."""
        fd, client_address = self.socket._accept()
        if self._accepted is None:
            listener = self.socket
            self._accepted = (listener.family, listener.type, listener.proto)
        request = socket.socket(*self._accepted, fileno=fd)
        if not isinstance(client_address, tuple):
            client_address = (UNIX_PEER, 0)
        return request, client_address

    def process_request(self, request, client_address):
        """On a thread of its own, warm if one is idle (ThreadingMixIn starts one each time)."""
        self.threads.submit(request, client_address)

    def _process(self, request, client_address):
        """socketserver's own steps for an accepted connection."""
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)

    def shutdown_request(self, request):
        """socketserver's half-close and close, for a connection its handler did
        not close itself (after its stream's FIN, or over TLS)."""
        if request.fileno() != -1:
            super().shutdown_request(request)

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if is_peer_gone(exc) or isinstance(exc, (socket.timeout, ClientDisconnected)):
            log_event(logging.DEBUG, "connection-ended", peer=client_address[0],
                      error=describe_error(exc))
        else:
            log_event(logging.ERROR, "connection-error", exc_info=True, peer=client_address[0])

    def stream_begins(self, connection):
        """Count a stream in progress, for a stop to wait on (and cut off); each
        is followed by stream_ends(), whatever happens in between."""
        with self._streams_lock:
            self._streams.add(connection)

    def stream_ends(self, connection):
        with self._streams_lock:
            self._streams.discard(connection)
            if self._cutting:   # only drain() waits on the condition
                self._streams_done.notify_all()

    def drain(self, signal_fd):
        """The stop: stop listening, end every group, and wait for each stream to
        send its end -- at most the grace and DRAIN_SLACK more.  A second stop
        signal meanwhile SIGKILLs every group at once.  Streams still held up at
        the end (by a client that does not read) are cut off, so that each still
        writes its end and access log lines before rexec exits."""
        self.socket.close()   # new connections are refused, not left to hang
        procs = self.registry.close()
        for proc in procs:
            proc.ending.ask("shutdown")
        deadline = time.monotonic() + self.grace + DRAIN_SLACK
        hurried = False
        while self._streams and time.monotonic() < deadline:
            signalled = wait_ready(signal_fd, POLLIN, DRAIN_POLL)
            if signalled and self.take_signals(signal_fd):
                if not hurried:
                    log_event(logging.WARNING, "stop-now", processes=len(procs))
                    for proc in procs:
                        proc.ending.ask("shutdown", hurry=True)
                hurried = True
        with self._streams_done:
            self._cutting = True
            for connection in self._streams:
                with contextlib.suppress(OSError):
                    # the plain socket's shutdown: an SSLSocket's own would drop its TLS state
                    socket.socket.shutdown(connection, socket.SHUT_RDWR)
            self._streams_done.wait_for(lambda: not self._streams, CUT_WAIT)

    def take_signals(self, signal_fd):
        """Read the signals that came (set_wakeup_fd wrote their numbers); reload
        on SIGHUP; log and drop the ignored ones; True if one asks rexec to stop.
        Runs on the main thread, so reloads never overlap."""
        try:
            numbers = os.read(signal_fd, 512)
        except BlockingIOError:
            return False
        stop = False
        for signum in numbers:
            if signum in STOP_SIGNALS:
                stop = True
            elif signum == RELOAD_SIGNAL:
                self.reload()
            else:
                log_event(logging.WARNING, "signal-ignored", signal=signal_name(signum),
                          why="it has no meaning here")
        return stop

    def reload(self):
        """Read the tokens file, --token-file and the TLS files again, and put what
        they say in force for the requests and handshakes that come next: each
        setting is one reference, replaced whole.  Running processes and their
        streams go on untouched.  If any file fails to load, the configuration
        in force stays, all of it, and one line says why."""
        try:
            access = load_access(self.options)
            ssl_context = load_ssl_context(self.options)
        except ConfigError as exc:
            log_event(logging.ERROR, "reload-failed", error=str(exc),
                      kept="the configuration in force")
            return
        self.access = access
        if ssl_context is not None:
            self.ssl_context = ssl_context
        log_event(logging.INFO, "reloaded", tokens=len(access.credentials),
                  tls=ssl_context is not None)


def signal_name(signum):
    try:
        return signal.Signals(signum).name
    except ValueError:   # a real-time signal
        return "SIGRTMIN+%d" % (signum - signal.SIGRTMIN)


def inherited_socket_fd():
    """The listening socket systemd passed (sd_listen_fds), or None."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or os.environ.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)   # not for the children
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    return SD_LISTEN_FDS_START


def inherited_socket(fd):
    """The socket object for listening descriptor `fd`, of whatever family it is:
    Python 3.6 takes every descriptor for IPv4, and systemd's ListenStream=8910
    is IPv6 (the peer addresses would be garbage, and protected mode refuse all)."""
    sock = socket.socket(fileno=fd)
    family = sock.family
    if hasattr(socket, "SO_DOMAIN"):
        family = socket.AddressFamily(sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN))
    if family != sock.family:
        sock.detach()
        sock = socket.socket(family, socket.SOCK_STREAM, fileno=fd)
    return sock


def raise_fd_limit():
    """Each stream holds several descriptors; the usual soft limit of 1024 is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else max(soft, 65536), hard))


# --------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------

CLIENT_COMMANDS = ("run", "ps", "kill")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument costs one line and exit status 2, which says
    what is wrong and what would be right: the limits of a value, the closest
    name to a mistyped option or command (see unrecognized())."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        self.option_names = []   # for suggestions: argparse keeps its own list private
        self.commands = {}       # a client parser's subcommand parsers, by name
        self.strays = ()         # the words a stray argument may have been meant as
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.option_names.extend(action.option_strings)
        return action

    def parse_args(self, args=None, namespace=None):
        options, extras = self.parse_known_args(args, namespace)
        if extras:   # said by the parser of the subcommand they were given to
            parser = self.commands.get(getattr(options, "command", None), self)
            parser.error(parser.unrecognized(extras))
        return options

    def unrecognized(self, extras):
        """What is wrong with the first of the arguments no option or positional took."""
        word = extras[0]
        if word.startswith("-") and word != "-":
            name = word.split("=", 1)[0]
            return "unknown option %r%s" % (name, did_you_mean(name, self.option_names))
        close = did_you_mean(word, self.strays)
        if close:
            return "unknown command %r%s" % (word, close)
        if self.strays:
            return ("unexpected argument %r (the server takes options only; the client "
                    "commands are %s)" % (word, ", ".join(self.strays)))
        return "unexpected argument %r" % word

    def error(self, message):
        # "argument --grace: must be 0 to 3600 seconds" -> "--grace must be ..."
        message = re.sub(r"\Aargument (\S+): (must )?", lambda match: match.group(1) + (
            " must " if match.group(2) else ": "), message)
        self.exit(2, "%s: %s; see --help\n" % (self.prog, one_line(message)))


SERVER_USAGE = """%(prog)s [-h] [-i IP] [-p PORT] [-v | -vv] [--grace S] [--max-procs N]
             [--max-output BYTES] [--token-file FILE] [--tokens FILE] [--no-auth]
             [--certfile FILE [--keyfile FILE]] [--client-ca FILE] [--allow CMD]...
             [--log-format {text,json}] [--version]"""

SERVER_EXAMPLES = """\
examples:
  rexec.py -i 127.0.0.1                  serve this host only, on port 8910
  REXEC_TOKEN=$(cat /etc/rexec/token) rexec.py
                                         serve whoever sends the token (any address)
  rexec.py --token-file /etc/rexec/token --certfile cert.pem --keyfile key.pem
                                         HTTPS, the token read from a file
  rexec.py -p 0 -v --log-format json     any free port, requests logged, JSON lines
  rexec.py --allow /usr/bin/uptime --allow df
                                         run nothing but these two commands

The client is this file too: rexec.py run|ps|kill --help."""


def server_arguments():
    parser = ArgumentParser(prog="rexec", usage=SERVER_USAGE, epilog=SERVER_EXAMPLES,
                            description="Run processes for HTTP clients and stream their "
                            "stdout (README.md says it all).")
    parser.strays = CLIENT_COMMANDS   # `rexec.py rum`: the client was meant
    parser.add_argument("-i", "--ip", default=DEFAULT_IP,
                        help="address to bind, IPv4 or IPv6 (default %(default)s)")
    parser.add_argument("-p", "--port", type=port_number, default=DEFAULT_PORT,
                        help="port to bind, 0 for any free one (default %(default)s)")
    parser.add_argument("-v", dest="verbosity", action="count", default=0,
                        help="-v also logs each request's details, -vv every chunk too "
                        "(default: start, end and access lines, warnings)")
    parser.add_argument("--grace", type=grace_seconds, default=DEFAULT_GRACE, metavar="S",
                        help="seconds between SIGTERM and SIGKILL, 0 to %d "
                        "(default %%(default)s)" % MAX_GRACE)
    parser.add_argument("--token-file", metavar="FILE", help="file whose first line is the "
                        "bearer token (or set REXEC_TOKEN): a token named legacy, role=admin")
    parser.add_argument("--tokens", metavar="FILE", help="named tokens, one a line: NAME "
                        "sha256:HEX [role=run|read|admin] [allow=CMD]... [from=CIDR]...")
    parser.add_argument("--no-auth", action="store_true",
                        help="serve every peer without a token (dangerous beyond loopback)")
    parser.add_argument("--certfile", metavar="FILE", help="PEM certificate chain: serve HTTPS")
    parser.add_argument("--keyfile", metavar="FILE",
                        help="PEM private key for --certfile (else it is in --certfile)")
    parser.add_argument("--client-ca", metavar="FILE",
                        help="PEM CA bundle: require client certificates it signed")
    parser.add_argument("--allow", action="append", metavar="CMD",
                        help="allow only this cmd, exactly as sent (repeatable)")
    parser.add_argument("--max-procs", type=positive_int, default=DEFAULT_MAX_PROCS,
                        metavar="N", help="processes running at once before 503 "
                        "(default %(default)s)")
    parser.add_argument("--max-output", type=positive_int, default=DEFAULT_MAX_OUTPUT,
                        metavar="BYTES", help="output a JSON answer (Accept: application/json) "
                        "holds; the rest is dropped (default %(default)s)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text: 'TIME LEVEL event key=value ...' lines (the default); "
                        "json: one JSON object a line, {time, level, event, fields...}")
    parser.add_argument("--version", action="version", version="rexec " + __version__)
    return parser


def checked_number(text, convert, accept, must):
    """convert(text), if accept() takes it; else an ArgumentTypeError "must ..., not 'text'"."""
    try:
        value = convert(text)
    except ValueError:
        value = None
    if value is None or not accept(value):
        raise argparse.ArgumentTypeError("%s, not %r" % (must, text))
    return value


def port_number(text):
    return checked_number(text, int, lambda port: 0 <= port <= 65535,
                          "must be a port number, 0 to 65535 (0: any free port)")


def grace_seconds(text):
    return checked_number(text, float, lambda value: 0 <= value <= MAX_GRACE,
                          "must be 0 to %d seconds" % MAX_GRACE)


def timeout_seconds(text):
    """A run --timeout: what parse_spec() takes, so that no request is sent to be refused."""
    return checked_number(text, float, lambda value: 0 < value <= MAX_TIMEOUT,
                          "must be more than 0 and at most %d seconds (365 days)" % MAX_TIMEOUT)


def positive_int(text):
    return checked_number(text, int, lambda value: value >= 1, "must be a whole number, 1 or more")


class ConfigError(Exception):
    """A setting rexec cannot start with; main() prints it as one line."""


MAX_TOKEN_FILE = 64 * 1024   # a token file is one short line: anything bigger is the wrong file
MAX_TOKENS_FILE = 1 << 20    # --tokens: thousands of lines; anything bigger is the wrong file
MAX_PEM_FILE = 1 << 20       # a certificate chain, key or CA bundle (the system one is ~220 KB)


class UnusableFile(Exception):
    """A file named on the command line that rexec will not read; the message is
    one line naming the option and the file."""


def open_regular_file(path, what, limit):
    """A descriptor to read `path` (given as option `what`) once it is known to
    be a regular file of at most `limit` bytes; raises UnusableFile otherwise.

    O_NONBLOCK: a FIFO would block open() until some writer came; on a regular
    file the flag changes nothing.  Devices (/dev/zero) never end: refused too."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise UnusableFile("%s %r: %s" % (what, path, exc.strerror))
    info = os.fstat(fd)
    problem = ("not a regular file" if not stat.S_ISREG(info.st_mode) else
               "larger than %d bytes" % limit if info.st_size > limit else None)
    if problem:
        os.close(fd)
        raise UnusableFile("%s %r: %s" % (what, path, problem))
    return fd


def read_secret_file(path, what):
    """The first line of token file `path` (option `what`), stripped; raises
    UnusableFile.  The line ends at "\n" or "\r", as text-mode readline() ends it."""
    with open(open_regular_file(path, what, MAX_TOKEN_FILE), "rb") as handle:
        try:
            data = handle.read(MAX_TOKEN_FILE + 1)   # it may have grown since the fstat
        except OSError as exc:
            raise UnusableFile("%s %r: %s" % (what, path, exc.strerror))
    if len(data) > MAX_TOKEN_FILE:
        raise UnusableFile("%s %r: larger than %d bytes" % (what, path, MAX_TOKEN_FILE))
    try:
        return data.splitlines()[0].decode("utf-8").strip() if data else ""
    except UnicodeDecodeError:
        raise UnusableFile("%s %r: its first line is not UTF-8 text" % (what, path))


def check_pem_files(*named):
    """Raise UnusableFile unless each (option, path) with a path names a regular
    file of at most MAX_PEM_FILE bytes.  ssl opens the paths again itself: one
    swapped in between is let through, as if it had been named in the first place."""
    for what, path in named:
        if path:
            os.close(open_regular_file(path, what, MAX_PEM_FILE))


def load_token(options):
    """The legacy bearer token as bytes, from --token-file or REXEC_TOKEN (which
    serve() took out of the environment into options.env_token, or every child
    would inherit it); None if neither."""
    env_token = options.env_token
    if options.token_file:
        try:
            token = read_secret_file(options.token_file, "--token-file")
            mode = os.stat(options.token_file).st_mode
        except UnusableFile as exc:
            raise ConfigError("cannot read %s" % exc)
        except OSError as exc:   # it went away just now
            raise ConfigError("cannot read --token-file %r: %s"
                              % (options.token_file, exc.strerror))
        if mode & 0o077:
            log_event(logging.WARNING, "token-file-mode", file=options.token_file,
                      mode="%04o" % stat.S_IMODE(mode), why="readable by group or others; "
                      "chmod 600 it")
        source = "--token-file"
        if env_token is not None:
            log_event(logging.WARNING, "token-env-ignored", why="--token-file holds the token")
    elif env_token is not None:
        token, source = env_token.strip(), "REXEC_TOKEN"
    else:
        return None
    if not token:
        raise ConfigError("%s holds an empty token" % source)
    if options.no_auth:
        raise ConfigError("--no-auth and a token (%s) contradict each other" % source)
    try:
        return token.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError("the token must be ASCII or Latin-1 text")


def has_pem_certificate(path):
    """True if `path` holds a certificate in PEM form that ssl can load."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(path)
    except (OSError, ssl.SSLError):
        return False
    return True


def load_pem_files(context, chain, key, ca=(None, None)):
    """Load a certificate chain with its key, and a CA bundle, into `context`;
    each is (option, path), a path of None for none.  Raises UnusableFile with a
    line that names the option and the file and says what is wrong with it in
    words, where OpenSSL says "[SSL] PEM lib (_ssl.c:3905)"."""
    (chain_option, chain_path), (key_option, key_path), ca_path = chain, key, ca[1]
    asked = []

    def no_password():   # else OpenSSL asks for one on the terminal, and a service hangs
        asked.append(True)
        return b"-"

    if chain_path:
        try:
            context.load_cert_chain(chain_path, key_path, password=no_password)
        except (OSError, ssl.SSLError) as exc:
            if not isinstance(exc, ssl.SSLError):   # gone, or unreadable, just now
                raise UnusableFile("%s %r: %s" % (chain_option, chain_path, describe_error(exc)))
            if not has_pem_certificate(chain_path):
                raise UnusableFile("%s %r: no certificate in PEM form (-----BEGIN CERTIFICATE"
                                   "-----)" % (chain_option, chain_path))
            option, path = key if key_path else chain
            if asked:
                problem = "the private key is encrypted; rexec needs it unencrypted"
            elif getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
                problem = "the private key is not the key of %s's certificate" % chain_option
            elif key_path:
                problem = ("not a private key in PEM form, or not the key of %s"
                           % chain_option)
            else:
                problem = "no private key in PEM form after the certificate (or give %s)" % (
                    key_option)
            raise UnusableFile("%s %r: %s" % (option, path, problem))
    if ca_path:
        try:
            context.load_verify_locations(ca_path)
        except (OSError, ssl.SSLError) as exc:
            raise unusable_ca(ca, exc)


def unusable_ca(ca, exc):
    """The UnusableFile for CA bundle `ca` (option, path) that ssl failed to load with `exc`."""
    option, path = ca
    if not isinstance(exc, ssl.SSLError):   # gone, or unreadable, just now
        return UnusableFile("%s %r: %s" % (option, path, describe_error(exc)))
    return UnusableFile("%s %r: no CA certificate in PEM form (-----BEGIN CERTIFICATE-----)"
                        % (option, path))


def read_tokens_file(path):
    """The Credentials of tokens file `path`; raises ConfigError."""
    try:
        with open(open_regular_file(path, "--tokens", MAX_TOKENS_FILE), "rb") as handle:
            data = handle.read(MAX_TOKENS_FILE + 1)   # it may have grown since the fstat
    except UnusableFile as exc:
        raise ConfigError("cannot read %s" % exc)
    except OSError as exc:
        raise ConfigError("cannot read --tokens %r: %s" % (path, exc.strerror))
    if len(data) > MAX_TOKENS_FILE:
        raise ConfigError("cannot read --tokens %r: larger than %d bytes"
                          % (path, MAX_TOKENS_FILE))
    try:
        return parse_tokens(data, path)
    except TokensFileError as exc:
        raise ConfigError(str(exc))


def load_access(options):
    """Who may do what (an Access), from --tokens, --token-file and REXEC_TOKEN;
    raises ConfigError.  Run at start and again on each reload."""
    credentials = read_tokens_file(options.tokens) if options.tokens else []
    if options.tokens and options.no_auth:
        raise ConfigError("--no-auth and --tokens contradict each other")
    if options.tokens and not credentials:
        log_event(logging.WARNING, "no-tokens", file=options.tokens,
                  why="every request but GET /health is refused")
    token = load_token(options)
    if token is not None:
        legacy = Credential(LEGACY_TOKEN, hashlib.sha256(token).digest(), "admin")
        if any(hmac.compare_digest(legacy.digest, c.digest) for c in credentials):
            raise ConfigError("the token of REXEC_TOKEN or --token-file is also in --tokens: "
                              "give each its own")
        credentials.append(legacy)
    return Access(credentials, required=bool(options.tokens))


def load_ssl_context(options):
    if not options.certfile:
        if options.keyfile or options.client_ca:
            raise ConfigError("--keyfile and --client-ca need --certfile")
        return None
    if ssl is None:
        raise ConfigError("this Python has no ssl module")
    try:
        check_pem_files(("--certfile", options.certfile), ("--keyfile", options.keyfile),
                        ("--client-ca", options.client_ca))
    except UnusableFile as exc:
        raise ConfigError("cannot read %s" % exc)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if hasattr(ssl, "TLSVersion"):   # 3.7+; the OP_NO_* flags are deprecated since 3.10
        context.minimum_version = ssl.TLSVersion.TLSv1_2
    else:
        context.options |= ssl.OP_NO_TLSv1 | ssl.OP_NO_TLSv1_1
    try:
        load_pem_files(context, ("--certfile", options.certfile), ("--keyfile", options.keyfile),
                       ("--client-ca", options.client_ca))
    except UnusableFile as exc:
        raise ConfigError("cannot load %s" % exc)
    if options.client_ca:
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def serve(argv):
    """Run the server until SIGTERM, SIGINT or SIGQUIT; returns the exit status."""
    options = server_arguments().parse_args(argv)
    setup_logging(options.verbosity, options.log_format)
    options.env_token = os.environ.pop("REXEC_TOKEN", None)   # no child may inherit it
    try:
        options.access = load_access(options)
        options.ssl_context = load_ssl_context(options)
    except ConfigError as exc:
        print("rexec: %s" % exc, file=sys.stderr)
        return 2
    raise_fd_limit()
    threading.stack_size(THREAD_STACK_SIZE)
    # The C-level handler writes the signal number to stop_w, on whichever
    # thread the kernel picked. A Python handler would run only on the main
    # thread, and only once its read() returned: under load the signal lands
    # on a spawning thread, read() never sees EINTR, and the stop is lost.
    stop_r, stop_w = os.pipe()
    os.set_blocking(stop_w, False)
    os.set_blocking(stop_r, False)
    for signum in STOP_SIGNALS | IGNORED_SIGNALS | {RELOAD_SIGNAL}:
        signal.signal(signum, lambda *_: None)
    signal.set_wakeup_fd(stop_w)
    try:
        server = RexecServer(options, inherited_socket_fd())
    except (OSError, OverflowError) as exc:
        print("rexec: cannot listen on %s port %s: %s"
              % (options.ip, options.port, getattr(exc, "strerror", None) or exc), file=sys.stderr)
        return 2
    where, url = server.describe_address()
    log_event(logging.INFO, "serving", **dict(where, url=url))
    host = where.get("host", UNIX_PEER)
    if options.no_auth and not is_loopback(host):
        log_event(logging.WARNING, "no-auth",
                  **dict(where, why="anyone who can reach it may run any command"))
    elif not options.access.required and not is_loopback(host):
        log_event(logging.INFO, "protected-mode",
                  why="no token, so only loopback peers are served")
    server.serve_until(stop_r)
    log_event(logging.INFO, "stopping", processes=len(server.registry))
    server.drain(stop_r)
    server.server_close()
    log_event(logging.INFO, "stopped")
    return 0


def token_arguments():
    parser = ArgumentParser(prog="rexec token", description="Make a new random token named "
                            "NAME: print it once, for its holder, and the line that lets "
                            "it in, for the --tokens file (then reload: kill -HUP).")
    parser.add_argument("name", metavar="NAME", help="its name in logs, listings and metrics")
    parser.add_argument("--role", choices=ROLES, default="run",
                        help="run (default): start, list and end its own processes; read: "
                        "list all, start nothing; admin: everything")
    parser.add_argument("--allow", action="append", default=[], metavar="CMD",
                        help="it may start only this cmd (repeatable)")
    parser.add_argument("--from", dest="networks", action="append", default=[],
                        metavar="CIDR", help="it is accepted only from this network (repeatable)")
    return parser


def token_main(argv):
    """rexec.py token NAME ...: the token on stdout's first line, its tokens-file
    line on the second (a note on stderr says which is which); exit status 2
    for arguments that make no valid line."""
    parser = token_arguments()
    options = parser.parse_args(argv)
    networks = []
    for text in options.networks:
        try:
            networks.append(ipaddress.ip_network(text))
        except ValueError as exc:
            parser.error("--from takes an address or a network (CIDR): %s" % exc)
    if "" in options.allow:
        parser.error("--allow takes a cmd, not an empty string")
    token = secrets.token_urlsafe(TOKEN_BYTES)
    line = token_line(options.name, token, options.role, options.allow, networks)
    try:   # the line must be one the server takes, or it is no use printing
        parse_token_words(shlex.split(line), ValueError)
    except ValueError as exc:
        parser.error(str(exc))
    say("the token, shown only this once, then the line for the --tokens file:")
    print(token)
    print(line)
    return 0


# --------------------------------------------------------------------------
# Client: rexec.py run | ps | kill
# --------------------------------------------------------------------------

DEFAULT_URL = "http://127.0.0.1:%d" % DEFAULT_PORT
CONNECT_TIMEOUT = 30.0       # to connect and get an answer's head; a stream may then idle forever
EXIT_USAGE = 2               # a bad argument, file or stdin: nothing was sent
EXIT_REFUSED = 125           # as docker run: the server refused, or none answered
EXIT_CANNOT_START = 127      # as a shell: the command cannot start (404)
EXIT_LOST = 255              # as ssh: the stream broke off before its last chunk
MAX_LINE = 64 * 1024         # a chunk-size or trailer line longer than this is garbage
MAX_HELD_LINE = 1 << 20      # several hosts: a longer line is cut, so memory stays bounded
OUTPUT_LOCK = threading.Lock()   # one host's lines at a time on stdout
# Python 3.6 reports a host name its certificate does not match as a ValueError.
CertificateError = getattr(ssl, "CertificateError", OSError)


class ClientError(Exception):
    """The client cannot go on: `status` is its exit status, the message one line."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; a BaseException, so no `except Exception` stops it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def fsencode(text):
    """os.fsencode() of a str, without its checks for bytes and path objects."""
    return text.encode(FS_ENCODING, FS_ERRORS)


def write_fd(fd, data):
    """All of `data` straight to `fd`: nothing to flush, and no buffer lock that a
    daemon thread could still hold when the interpreter exits."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_output(data):
    """All of `data` to our stdout.  EPIPE (`| head`) stays BrokenPipeError, for
    the caller to stop quietly; any other failure (a full disk) is EXIT_LOST."""
    try:
        write_fd(1, data)
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise ClientError(EXIT_LOST, "cannot write the output: %s" % describe_error(exc))


def say(message):
    """One line on stderr, escaped by one_line(): it may quote what a server said."""
    write_fd(2, ("rexec: %s\n" % one_line(message)).encode("utf-8"))


def describe_error(exc):
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


# -- the chunked stream, read here because http.client discards trailers ----

def from_server(read, size):
    """read(size) from the server's stream; a reset or a TLS failure is EXIT_LOST."""
    try:
        return read(size)
    except OSError as exc:   # ssl.SSLError and socket.timeout are OSErrors too
        raise ClientError(EXIT_LOST, "the connection broke: %s" % describe_error(exc))


def read_line(fp):
    line = from_server(fp.readline, MAX_LINE)
    if not line.endswith(b"\n"):
        raise ClientError(EXIT_LOST, "the stream broke off before its end" if len(line) < MAX_LINE
                          else "the stream is not chunked framing")
    return line


def copy_chunks(fp, write):
    """Pass the data of the chunked body on `fp` to write() as it arrives; return the
    trailers, names lower-cased.  ClientError(EXIT_LOST) if it breaks off or is garbled."""
    while True:
        size = read_line(fp).split(b";", 1)[0].strip()   # chunk extensions are ignored
        if not re.match(rb"\A[0-9A-Fa-f]{1,15}\Z", size):
            raise ClientError(EXIT_LOST, "bad chunk size %r in the stream" % size[:20])
        left = int(size, 16)
        if not left:
            break
        while left:
            data = from_server(fp.read1, min(left, READ_SIZE))   # out as it comes in
            if not data:
                raise ClientError(EXIT_LOST, "the stream broke off in a chunk")
            write(data)
            left -= len(data)
        if read_line(fp).strip():
            raise ClientError(EXIT_LOST, "a chunk is longer than its size says")
    trailers = {}
    while True:
        line = read_line(fp).decode("latin-1").strip()
        if not line:
            return trailers
        name, _, value = line.partition(":")
        trailers[name.strip().lower()] = value.strip()


# -- talking to a server ---------------------------------------------------

def request(url, options, method, path, body=None, answer_within=CONNECT_TIMEOUT):
    """Send one request; return (connection, response) once the answer's head is in,
    connecting within CONNECT_TIMEOUT and answered within `answer_within` seconds.
    ClientError(EXIT_REFUSED) when no server answers."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https":
        if ssl is None:
            raise ClientError(EXIT_USAGE, "this Python has no ssl module")
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT,
                                           context=options.ssl_context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=CONNECT_TIMEOUT)
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if options.token:
        headers["Authorization"] = "Bearer " + options.token
    try:
        conn.connect()
        sock = conn.sock
        sock.settimeout(answer_within)
        conn.request(method, parts.path.rstrip("/") + path, body, headers)
        response = conn.getresponse()
        sock.settimeout(None)   # the process may be silent for as long as it likes
    except (OSError, http.client.HTTPException, CertificateError) as exc:
        conn.close()
        raise ClientError(EXIT_REFUSED, "no answer: %s" % describe_error(exc))
    return conn, response


def refusal(response, status=EXIT_REFUSED):
    """ClientError for an answer other than 200, with the server's one-line message."""
    lines = response.read(MAX_LINE).decode("utf-8", "replace").strip().splitlines()
    return ClientError(status, "%d %s" % (response.status, lines[0] if lines else response.reason))


def run_on(url, spec, options, write):
    """Run `spec` on one server, its output to write(); return the local exit status."""
    conn, response = request(url, options, "POST", "/process", json.dumps(spec).encode("utf-8"))
    with contextlib.closing(conn), contextlib.closing(response):  # closing ends the remote group
        if response.status != HTTPStatus.OK:
            raise refusal(response, EXIT_CANNOT_START if response.status == HTTPStatus.NOT_FOUND
                          else EXIT_REFUSED)
        if not response.chunked:
            raise ClientError(EXIT_LOST, "the answer is not a chunked stream")
        trailers = copy_chunks(response.fp, write)
    code, reason = trailers.get("rexec-exit-code", ""), trailers.get("rexec-reason", "?")
    if not re.match(r"\A-?\d+\Z", code):
        raise ClientError(EXIT_LOST, "the stream ended without an exit code")
    if options.verbose:
        say("%s: %s ended: exit code %s, reason %s" % (url, spec["alias"], code, reason))
    return 128 - int(code) if int(code) < 0 else int(code)   # signal N: 128+N, as a shell says


def run_reporting(url, spec, options, write):
    """run_on(), any failure said in one line; returns the exit status."""
    try:
        return run_on(url, spec, options, write)
    except ClientError as exc:
        say("%s: %s" % (url, exc))
        return exc.status
    except BrokenPipeError:   # our stdout is gone (`| head`): stop quietly, as cat does
        return 128 + signal.SIGPIPE


def host_label(url):
    """'host:port' of `url`: what a line of one of several servers starts with."""
    parts = urllib.parse.urlsplit(url)
    host = "[%s]" % parts.hostname if ":" in parts.hostname else parts.hostname
    return "%s:%d" % (host, parts.port or (443 if parts.scheme == "https" else 80))


class PrefixedLines:
    """One host's output when there are several: whole lines only, each one
    prefixed with `host:port: `, so lines of different hosts never mix."""

    def __init__(self, url):
        self.prefix = ("%s: " % host_label(url)).encode("utf-8")
        self.partial = bytearray()

    def write(self, data):
        lines, newline, rest = data.rpartition(b"\n")
        if newline:
            self._emit(bytes(self.partial) + lines)
            self.partial = bytearray(rest)
        else:
            self.partial += rest
        if len(self.partial) > MAX_HELD_LINE:   # output without newlines: held in pieces
            self.close()

    def close(self):
        """Write a last line that has no newline, with one."""
        if self.partial:
            self._emit(bytes(self.partial))
            self.partial = bytearray()

    def _emit(self, text):
        with OUTPUT_LOCK:
            write_output(self.prefix + text.replace(b"\n", b"\n" + self.prefix) + b"\n")


def on_each(urls, work):
    """work(index, url) for every URL, each on a thread of its own, all at once;
    with one URL, on this thread."""
    if len(urls) == 1:
        work(0, urls[0])
        return
    threads = [threading.Thread(target=work, args=item, daemon=True) for item in enumerate(urls)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()   # a signal still interrupts this wait


def run_everywhere(options):
    """Run on every --url at once; the highest exit status is the result."""
    # The default alias is valid whatever CMD is: its name's printable characters.
    name = "".join(filter(str.isprintable, os.path.basename(options.cmd)))[:40]
    spec = {"alias": options.alias or "%s-%s" % (name or "run", os.urandom(4).hex()),
            "cmd": options.cmd, "args": options.args}
    if options.verbose and not options.alias:
        say("alias %s" % spec["alias"])
    for field, value in (("cwd", options.cwd), ("envs", dict(options.env)),
                         ("stdin", options.stdin_text), ("stderr", options.stderr),
                         ("tty", options.tty), ("timeout", options.timeout)):
        if value:
            spec[field] = value
    if len(options.url) == 1:
        return run_reporting(options.url[0], spec, options, write_output)
    statuses = [EXIT_LOST] * len(options.url)

    def run_one(index, url):
        lines = PrefixedLines(url)
        statuses[index] = run_reporting(url, spec, options, lines.write)
        try:
            lines.close()   # the last line, if it had no newline
        except BrokenPipeError:
            pass
        except ClientError as exc:
            say("%s: %s" % (url, exc))
            statuses[index] = exc.status

    on_each(options.url, run_one)
    return max(statuses)


def ask_each(urls, ask):
    """ask(url) of every server at once: a list, in the order of `urls`, of
    (0, what it returned) or, for a server that refused or did not answer,
    (the exit status, None), its failure said in one line on stderr."""
    answers = [(EXIT_LOST, None)] * len(urls)

    def ask_one(index, url):
        try:
            answers[index] = 0, ask(url)
        except ClientError as exc:
            say("%s: %s" % (url, exc))
            answers[index] = exc.status, None
        except (OSError, http.client.HTTPException) as exc:   # the answer broke off
            say("%s: the connection broke: %s" % (url, describe_error(exc)))
            answers[index] = EXIT_LOST, None

    on_each(urls, ask_one)
    return answers


def process_rows(url, options):
    """GET /process of one server: (alias, pid, age, command) rows, each cell one_line()d."""
    conn, response = request(url, options, "GET", "/process")
    with contextlib.closing(conn), contextlib.closing(response):
        if response.status != HTTPStatus.OK:
            raise refusal(response)
        try:
            now = time.time()
            # Each cell one_line()d: a server's listing must not reach the terminal raw.
            return [tuple(map(one_line, (p["alias"], p["pid"], format_age(now - p["started"]),
                                         " ".join(map(shlex.quote, [p["cmd"]] + p["args"])))))
                    for p in load_json(response.read().decode("utf-8"))]
        except (ValueError, KeyError, TypeError):
            raise ClientError(EXIT_REFUSED, "the answer is not a list of processes")


def list_processes(options):
    """ps: one table of what runs on every --url, with a HOST column when there
    are several; 0 if every server answered, else the worst exit status."""
    answers = ask_each(options.url, lambda url: process_rows(url, options))
    several = len(options.url) > 1
    rows = [("HOST",) * several + ("ALIAS", "PID", "AGE", "COMMAND")]
    for url, (_, found) in zip(options.url, answers):
        if found is not None:
            if options.verbose:
                say("%s: %d process(es)" % (url, len(found)))
            rows.extend((host_label(url),) * several + row for row in found)
    if any(found is not None for _, found in answers):
        last = len(rows[0]) - 1
        widths = [max(len(row[column]) for row in rows) for column in range(last)]
        write_output("".join("  ".join([cell.ljust(width) for cell, width in zip(row, widths)]
                                       + [row[last]]) + "\n" for row in rows).encode("utf-8"))
    return max(status for status, _ in answers)


def format_age(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % max(0, seconds)


def end_on(url, options):
    """DELETE /process/ALIAS on one server: (True, its answer) if the alias ran
    there, (False, its refusal) if not (404)."""
    path = "/process/" + urllib.parse.quote(options.alias, safe="")
    # Answered once the group is dead: after the server's grace, at worst.
    conn, response = request(url, options, "DELETE", path,
                             answer_within=MAX_GRACE + CONNECT_TIMEOUT)
    with contextlib.closing(conn), contextlib.closing(response):
        if response.status == HTTPStatus.NOT_FOUND:
            return False, str(refusal(response, 1))
        if response.status != HTTPStatus.OK:
            raise refusal(response)
        return True, response.read(MAX_LINE).decode("utf-8", "replace").strip()


def kill_process(options):
    """kill: end ALIAS on every --url.  One server: 0 if it ran there, 1 if not
    (said on stderr).  Several: a line per server that answered on stdout ('ended,
    exit code N' or 'not running'); 0 if every server answered and it ran on one
    at least, 1 if it ran on none, else the worst exit status of those that failed."""
    answers = ask_each(options.url, lambda url: end_on(url, options))
    if len(options.url) == 1:
        (status, result), url = answers[0], options.url[0]
        if result is not None and (options.verbose or not result[0]):
            say("%s: %s" % (url, result[1]))   # {"alias": ..., "exit_code": ...}, or why not
        return status if result is None else 0 if result[0] else 1
    lines = []
    for url, (_, result) in zip(options.url, answers):
        if result is not None:
            lines.append("%s: %s\n" % (host_label(url), describe_end(*result)))
    write_output("".join(lines).encode("utf-8"))
    worst = max(status for status, _ in answers)
    return worst or (0 if any(result[0] for _, result in answers) else 1)


def describe_end(ended, answer):
    """A line for one server of several that kill asked: 'ended, exit code -15'."""
    if not ended:
        return "not running"
    try:
        return "ended, exit code %s" % load_json(answer)["exit_code"]
    except (ValueError, KeyError, TypeError):
        return "ended: %s" % one_line(answer)


# -- command line ----------------------------------------------------------

def server_url(text):
    """A --url (or $REXEC_URL): http:// or https://, a host, a port if any that is not 0."""
    parts = urllib.parse.urlsplit(text)
    try:
        good = parts.scheme.lower() in ("http", "https") and parts.hostname and parts.port != 0
    except ValueError:   # a port that is not a number, or above 65535
        good = False
    if not good:
        hint = " (did you mean 'http://%s'?)" % text if "://" not in text and text else ""
        raise argparse.ArgumentTypeError("must be an http:// or https:// URL with a host, "
                                         "such as %s, not %r%s" % (DEFAULT_URL, text, hint))
    return text


def alias_text(text):
    """An --alias or kill's ALIAS: one the server can take (see alias_problem)."""
    problem = alias_problem(text)
    if problem:
        raise argparse.ArgumentTypeError("the alias %s" % problem)
    return text


def env_pair(text):
    name, equals, value = text.partition("=")
    if not name or not equals:
        raise argparse.ArgumentTypeError("must be KEY=VALUE, with a KEY, not %r" % text)
    return name, value


CLIENT_EXAMPLES = """\
examples:
  rexec.py run -- du -h -c /var/log           on $REXEC_URL, else %s
  rexec.py run --url http://web1:8910 --url http://web2:8910 -- uptime
                                              on both at once, each line after host:port:
  git diff | rexec.py run --stdin --cwd /src -- git apply
  rexec.py run --alias nightly --timeout 3600 -- /usr/local/bin/backup
  rexec.py ps --url http://web1:8910 --url http://web2:8910
  rexec.py kill nightly

With a token: export REXEC_TOKEN=... or --token-file FILE.""" % DEFAULT_URL

RUN_EXAMPLES = """\
examples:
  rexec.py run -- du -h -c /var/log
  rexec.py run --url http://web1:8910 --url http://web2:8910 -- uptime
  git diff | rexec.py run --stdin --cwd /src -- git apply
  rexec.py run -v --alias nightly --timeout 3600 -e MODE=full -- /usr/local/bin/backup

exit status: the remote one (128+N for signal N); 2 a bad argument, nothing sent;
125 refused or no answer; 127 the command cannot start there; 255 the stream broke off.
With several --url, the highest of them."""

PS_EXAMPLES = """\
examples:
  rexec.py ps
  rexec.py ps --url http://web1:8910 --url http://web2:8910    one table, a HOST column

exit status: 0 if every server answered, else 125 (refused, no answer) or 255 (broke off)."""

KILL_EXAMPLES = """\
examples:
  rexec.py kill nightly
  rexec.py kill --url http://web1:8910 --url http://web2:8910 nightly

exit status, one server: 0 if ALIAS ran there, 1 if not.  Several: a line per server
('ended, exit code N' or 'not running'); 0 if every server answered and ALIAS ran on
one at least, 1 if it ran on none, else 125 (refused, no answer) or 255 (broke off)."""


def add_client_options(parser, verbose_help):
    """The options every client command takes."""
    parser.add_argument("--url", action="append", type=server_url,
                        help="server (default $REXEC_URL, else %s); repeat for several "
                        "at once" % DEFAULT_URL)
    parser.add_argument("-v", dest="verbose", action="store_true", help=verbose_help)
    parser.add_argument("--token-file", metavar="FILE",
                        help="file whose first line is the token (else $REXEC_TOKEN)")
    parser.add_argument("--cacert", metavar="FILE",
                        help="PEM CA bundle to verify an https:// server with")
    parser.add_argument("--cert", metavar="FILE", help="PEM client certificate, for mutual TLS")
    parser.add_argument("--key", metavar="FILE",
                        help="PEM private key for --cert (else it is in --cert)")


def client_arguments():
    parser = ArgumentParser(prog="rexec", epilog=CLIENT_EXAMPLES,
                            description="The rexec client: run a command on rexec servers, "
                            "list or end what runs there.")
    commands = parser.add_subparsers(dest="command", metavar="{run,ps,kill}")
    run = commands.add_parser("run", help="run a command, stream its stdout", epilog=RUN_EXAMPLES,
                              usage="rexec run [options] -- CMD [ARG...]")
    add_client_options(run, "say the alias it picked, and how the process ended, on stderr")
    run.add_argument("--alias", metavar="A", type=alias_text,
                     help="the process's name there (default: CMD-random)")
    run.add_argument("--cwd", metavar="DIR", help="working directory there")
    run.add_argument("-e", dest="env", action="append", type=env_pair, default=[],
                     metavar="KEY=VALUE", help="add to its environment (repeatable)")
    run.add_argument("--timeout", type=timeout_seconds, metavar="S",
                     help="seconds until it is ended, at most %d (a year)" % MAX_TIMEOUT)
    run.add_argument("--stdin", action="store_true",
                     help="send our stdin (UTF-8 text, read to its end)")
    run.add_argument("--stderr", choices=("merge", "discard"),
                     help="its stderr into the stream, or nowhere (default: the server's log)")
    run.add_argument("--tty", action="store_true", help="run it on a pseudo-terminal")
    # Optional here, so that its absence is said alone (argparse would say "CMD, ARG").
    run.add_argument("cmd", nargs="?", metavar="CMD", help="the command, found in the "
                     "server's PATH; it and its arguments come after --")
    run.add_argument("args", nargs=argparse.REMAINDER, metavar="ARG")
    ps = commands.add_parser("ps", help="list the running processes", epilog=PS_EXAMPLES)
    add_client_options(ps, "also say on stderr how many processes each server runs")
    kill = commands.add_parser("kill", help="end one process", epilog=KILL_EXAMPLES)
    add_client_options(kill, "say the server's answer (the alias, its exit code) on stderr")
    kill.add_argument("alias", type=alias_text, metavar="ALIAS")
    parser.commands = {"run": run, "ps": ps, "kill": kill}
    return parser


def client_options(argv):
    """Parsed arguments, with token, TLS context and stdin loaded; ClientError(EXIT_USAGE)."""
    parser = client_arguments()
    options = parser.parse_args(argv)
    if options.command == "run" and not options.cmd:
        parser.commands["run"].error("the command to run is missing: rexec run [options] -- "
                                     "CMD [ARG...]" if options.cmd is None else
                                     "CMD must not be empty")
    if not options.url:   # checked only when it is used: --url overrides it
        default = os.environ.get("REXEC_URL", DEFAULT_URL)
        try:
            options.url = [server_url(default)]
        except argparse.ArgumentTypeError as exc:
            parser.commands[options.command].error("REXEC_URL %s" % exc)
    options.token = client_token(options)
    options.ssl_context = None
    if ssl is not None and any(urllib.parse.urlsplit(url).scheme == "https"
                               for url in options.url):
        options.ssl_context = client_ssl_context(options)
    options.stdin_text = None
    if getattr(options, "stdin", False):
        if sys.stdin is None:   # Python found descriptor 0 closed
            raise ClientError(EXIT_USAGE, "--stdin: standard input is closed")
        try:
            options.stdin_text = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError:
            raise ClientError(EXIT_USAGE, "--stdin takes UTF-8 text only (it travels as a "
                                          "JSON string), and this input is not")
    return options


def client_token(options):
    if options.token_file:
        try:
            token = read_secret_file(options.token_file, "--token-file")
        except UnusableFile as exc:
            raise ClientError(EXIT_USAGE, "cannot read %s" % exc)
        if not token:   # as the server refuses it: a wrong path, not "no token"
            raise ClientError(EXIT_USAGE, "--token-file %s has no token" % options.token_file)
    else:
        token = os.environ.get("REXEC_TOKEN", "").strip()
    try:
        token.encode("latin-1")
    except UnicodeEncodeError:
        raise ClientError(EXIT_USAGE, "the token must be ASCII or Latin-1 text")
    return token or None


def client_ssl_context(options):
    if options.key and not options.cert:
        raise ClientError(EXIT_USAGE, "--key needs --cert")
    try:
        check_pem_files(("--cacert", options.cacert), ("--cert", options.cert),
                        ("--key", options.key))
    except UnusableFile as exc:
        raise ClientError(EXIT_USAGE, "cannot read %s" % exc)
    try:
        try:   # with a --cacert, the system's CA certificates are not trusted
            context = ssl.create_default_context(cafile=options.cacert)
        except (OSError, ssl.SSLError) as exc:
            raise unusable_ca(("--cacert", options.cacert), exc)
        load_pem_files(context, ("--cert", options.cert), ("--key", options.key))
    except UnusableFile as exc:
        raise ClientError(EXIT_USAGE, "cannot load %s" % exc)
    return context


def occupy_closed_standard_fds():
    """Open /dev/null on whichever of descriptors 0, 1 and 2 is closed, so that
    no connection can take one: with stdout closed, the remote output would go
    into the connection itself, as a request the server runs.  The closed ones."""
    closed = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            closed.append(fd)
    for fd in closed:   # os.open takes the lowest free descriptor: these, in order
        os.open(os.devnull, os.O_RDWR)
    return closed


def client_main(argv):
    """rexec.py run|ps|kill ...; returns the exit status (see README, Client)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, raise_interrupted)
    closed = occupy_closed_standard_fds()
    try:
        if 1 in closed and argv[0] != "kill":
            raise ClientError(EXIT_USAGE, "standard output is closed: the output has nowhere to go")
        options = client_options(argv)
        command = {"run": run_everywhere, "ps": list_processes, "kill": kill_process}
        try:
            return command[options.command](options)
        except BrokenPipeError:   # our stdout closed early
            return 128 + signal.SIGPIPE
    except ClientError as exc:
        say(exc)
        return exc.status
    except Interrupted as exc:   # unwinding closed the connection: the remote group ends
        return 128 + exc.signum


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in CLIENT_COMMANDS:
        return client_main(argv)
    if argv[:1] == ["token"]:
        return token_main(argv[1:])
    return serve(argv)


if __name__ == "__main__":
    sys.exit(main())
