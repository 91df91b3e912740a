"""A small keep-alive HTTP/1.1 client for plain-http branch calls.

Branch calls are the engine's most frequent I/O. aiohttp's client spends several times
the CPU of the call itself on its general machinery (cookie jar, tracing, redirect and
proxy handling, a response object per call); a branch call needs none of it. This client
writes one request, reads the status and the body (Content-Length, chunked, or up to
close), and keeps the connection for the next call. TLS and anything unusual go through
aiohttp instead (see caller.py).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import re
import urllib.parse
from dataclasses import dataclass, field
from types import TracebackType

from coordinator.urls import HOST_NAME, UrlCache

MAX_HEAD = 64 * 1024
MAX_BODY = 8 << 20


class Http1Error(Exception):
    """The exchange failed; the message says how (for the branch's error outcome)."""


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    path: str  # path with its own query string, if any
    # Worked out once per URL rather than per call: the request target up to the branch
    # query ("/p?" or "/p?a=1&") and the Host line.
    query_prefix: str = field(init=False, repr=False, compare=False)
    host_line: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        sep = "&" if "?" in self.path else "?"
        host = f"[{self.host}]" if ":" in self.host else self.host
        object.__setattr__(self, "query_prefix", self.path + sep)
        object.__setattr__(self, "host_line", f"Host: {host}:{self.port}\r\n")

    @classmethod
    def parse(cls, url: str) -> Target:
        """The target of a URL; raises ValueError. A branch's few URLs are called over
        and over, so their targets are kept (within the bounds of a UrlCache)."""
        found = _TARGETS.get(url)
        if found is None:
            found = cls._parse(url)
            _TARGETS.put(url, found)
        return found

    @classmethod
    def _parse(cls, url: str) -> Target:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"not a plain http URL: {url!r}")
        if not HOST_NAME.match(parts.hostname):
            raise ValueError(f"not a valid host name: {parts.hostname!r}")
        # Only URL characters go onto the request line: spaces, non-ASCII and the like
        # are percent-encoded (UTF-8), escapes already present are kept as they are.
        path = urllib.parse.quote(parts.path or "/", safe=_PATH_SAFE)
        if parts.query:
            path += "?" + urllib.parse.quote(parts.query, safe=_QUERY_SAFE)
        return cls(parts.hostname, parts.port or 80, path)


_TARGETS: UrlCache[Target] = UrlCache()
# RFC 3986 pchar (and "/") besides the unreserved set quote() keeps; "%" keeps escapes.
_PATH_SAFE = "/%:@!$&'()*+,;="
_QUERY_SAFE = _PATH_SAFE + "?"
# A header line ends at CR or LF; NUL and other controls have no place in one either.
_HEADER_BREAK = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _head_lines(headers: dict[str, str]) -> str:
    """Header lines, each ending in CRLF, refusing anything that could end a line early
    (validated at submit; this keeps a value stored before that check from splitting
    the request). A transaction's headers are nearly always the same few (often just
    the Content-Type), so the checked lines are kept per set of headers."""
    key = tuple(headers.items())
    found = _HEAD_LINES.get(key)
    if found is not None:
        return found
    lines = []
    for name, value in key:
        if _HEADER_BREAK.search(name) or _HEADER_BREAK.search(value) or ":" in name:
            raise Http1Error(f"header {name[:40]!r} holds control characters; not sent")
        lines.append(f"{name}: {value}\r\n")
    text = "".join(lines)
    if len(_HEAD_LINES) >= 256:  # per-transaction headers (a trace parent) come and go
        _HEAD_LINES.clear()
    _HEAD_LINES[key] = text
    return text


_HEAD_LINES: dict[tuple[tuple[str, str], ...], str] = {}


class _Deadline:
    """asyncio.timeout for one request, its expiry checked by `_Deadlines`."""

    __slots__ = ("cancelling", "expired", "owner", "task")

    def __init__(self, owner: _Deadlines, task: asyncio.Task[object]) -> None:
        self.owner = owner
        self.task: asyncio.Task[object] | None = task
        self.cancelling = task.cancelling()
        self.expired = False

    def expire(self) -> None:
        if self.task is not None:  # still inside the request
            self.expired = True
            self.task.cancel()

    def __enter__(self) -> _Deadline:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # As asyncio.Timeout: our cancel becomes TimeoutError unless the task was also
        # cancelled from elsewhere.
        task, self.task = self.task, None  # the heap keeps no finished task alive
        self.owner.live -= 1
        if (self.expired and task is not None and task.uncancel() <= self.cancelling
                and exc_type is asyncio.CancelledError):
            raise TimeoutError from exc


class _Deadlines:
    """The timeouts of a pool's requests, checked by one loop timer.

    asyncio.timeout arms and cancels a timer of the event loop per request; under uvloop
    that cost about 20-30 µs, a tenth of the coordinator's CPU per delivered message (a
    flash sale's order). Here a heap holds the deadlines and one timer, at most every
    TICK seconds, expires those that have passed: a request times out up to TICK late.
    """

    TICK = 0.05

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _Deadline]] = []
        self._order = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.live = 0  # requests inside their deadline; the heap also holds finished ones
        # The loop of the last request: asking for the current task of a known loop
        # skips get_running_loop, a system call (getpid) each time on 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, seconds: float) -> _Deadline:
        loop = self._loop
        task = asyncio.current_task(loop) if loop is not None else None
        if task is None:  # the first request, or one in a new loop (tests)
            loop = asyncio.get_running_loop()
            task = asyncio.current_task(loop)
            if task is None:
                raise RuntimeError("a request's timeout needs a task")
            if loop is not self._loop:  # the old loop's timer will never fire
                self._loop = loop
                self._heap = []
                self._timer = None
        assert loop is not None
        deadline = _Deadline(self, task)
        self.live += 1
        when = loop.time() + seconds
        if len(self._heap) > 4096 and len(self._heap) > 4 * self.live:
            # Finished requests' entries wait for their deadline to leave the heap: with
            # long timeouts at a high rate, drop them now and then instead.
            self._heap = [e for e in self._heap if e[2].task is not None]
            heapq.heapify(self._heap)
        heapq.heappush(self._heap, (when, next(self._order), deadline))
        if self._timer is None or when < self._timer_at:  # rare: timeouts mostly agree
            if self._timer is not None:
                self._timer.cancel()
            self._arm(loop, when)
        return deadline

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._timer_at = when
        self._timer = loop.call_at(when, self._check)

    def _check(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2].expire()
        self._timer = None
        if heap:
            self._arm(loop, max(heap[0][0], now + self.TICK))


class _Slots:
    """At most `free` requests at a time to one host, the others queued in order.

    asyncio.Semaphore as `async with` costs two coroutine calls and a generator per
    request even when a slot is free, which it nearly always is; here taking a free
    slot is a plain decrement.
    """

    __slots__ = ("free", "waiters")

    def __init__(self, limit: int) -> None:
        self.free = limit
        self.waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def try_take(self) -> bool:
        """Take a free slot at once, unless none is free or others queue before us."""
        if self.free > 0 and not self.waiters:
            self.free -= 1
            return True
        return False

    async def wait(self) -> None:
        """Queue for a slot; `release` hands it over."""
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot, then cancelled: pass it on
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next in line
                return
        self.free += 1


class Http1Pool:
    """Idle keep-alive connections per (host, port), at most `limit_per_host` open."""

    def __init__(self, limit_per_host: int = 256, idle_per_host: int = 256) -> None:
        self.limit_per_host = limit_per_host
        self.idle_per_host = idle_per_host
        self._deadlines = _Deadlines()
        self._idle: dict[tuple[str, int], collections.deque[
            tuple[asyncio.StreamReader, asyncio.StreamWriter]]] = {}
        self._slots: dict[tuple[str, int], _Slots] = {}

    async def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                _, writer = idle.pop()
                writer.close()
        self._idle.clear()

    async def request(
        self, method: str, url: str, query: str, headers: dict[str, str], body: bytes,
        timeout: float,
    ) -> tuple[int, bytes]:
        """One exchange; raises Http1Error or TimeoutError."""
        target = Target.parse(url)
        data = (f"{method} {target.query_prefix}{query} HTTP/1.1\r\n{target.host_line}"
                f"Content-Length: {len(body)}\r\n{_head_lines(headers)}\r\n").encode() + body
        key = (target.host, target.port)
        slots = self._slots.get(key)
        if slots is None:
            slots = self._slots[key] = _Slots(self.limit_per_host)
        # The timeout covers the wait for a free connection too: the engine's lease
        # allows request_timeout for the whole call, queueing included.
        with self._deadlines.start(timeout):
            if not slots.try_take():
                await slots.wait()
            try:
                # A pooled connection may have been closed by the server meanwhile; if it
                # fails before any byte of an answer, try once more on a fresh one. Branch
                # calls may be repeated anyway (participants are idempotent by the barrier).
                for attempt in (0, 1):
                    conn = self._take(key) if attempt == 0 else None
                    reused = conn is not None
                    if conn is None:
                        try:
                            conn = await asyncio.open_connection(target.host, target.port)
                        except OSError as exc:
                            raise Http1Error(f"cannot connect: {exc}") from None
                    reader, writer = conn
                    try:
                        writer.write(data)
                        status, reply, keep = await _read_response(reader, method)
                    except _Stale:
                        writer.close()
                        if reused:
                            continue
                        raise Http1Error("connection closed before an answer") from None
                    except OSError as exc:  # reset, broken pipe
                        writer.close()
                        if reused and attempt == 0:
                            continue
                        raise Http1Error(f"connection failed: {exc!r}") from None
                    except BaseException:
                        writer.close()
                        raise
                    if keep:
                        self._give(key, conn)
                    else:
                        writer.close()
                    return status, reply
            finally:
                slots.release()
        raise Http1Error("connection closed before an answer")

    def _take(
        self, key: tuple[str, int]
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        idle = self._idle.get(key)
        while idle:
            reader, writer = idle.pop()
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    def _give(
        self, key: tuple[str, int], conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    ) -> None:
        idle = self._idle.setdefault(key, collections.deque())
        if len(idle) < self.idle_per_host:
            idle.append(conn)
        else:
            conn[1].close()


# A framing header's line (blanks around the name allowed, as the stripped name of a
# line would be read); the head's own first line is the status line.
_FRAMING = re.compile(r"\r\n[ \t]*(content-length|connection|transfer-encoding)[ \t]*:([^\r\n]*)",
                      re.IGNORECASE)


class _Stale(Exception):
    """The connection ended before the first byte of an answer."""


async def _read_response(reader: asyncio.StreamReader, method: str) -> tuple[int, bytes, bool]:
    # One coroutine for the whole answer: a frame less on every resumption of the call.
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise _Stale from None
            raise Http1Error("connection closed in the middle of an answer") from None
        except asyncio.LimitOverrunError:
            raise Http1Error("answer headers too long") from None
        if len(head) > MAX_HEAD:
            raise Http1Error("answer headers too long")
        text = head.decode("latin-1")
        first, _, _ = text.partition("\r\n")
        status_line = first.split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/"):
            raise Http1Error(f"not an HTTP answer: {first[:80]!r}")
        status = int(status_line[1])
        if 100 <= status < 200 and status != 101:
            continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        # Only the framing headers matter; one scan finds them (the last of a name counts).
        headers = {name.lower(): value.strip() for name, value in _FRAMING.findall(text)}
        keep = status_line[0] == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        try:
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                return status, b"", keep
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return status, await _read_chunked(reader), keep
            if "content-length" in headers:
                length = int(headers["content-length"])
                if length > MAX_BODY:
                    raise Http1Error("answer body too large")
                return status, await reader.readexactly(length), keep
            # No length: the body runs to the end of the connection.
            chunks: list[bytes] = []
            size = 0
            while chunk := await reader.read(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_BODY:
                    raise Http1Error("answer body too large")
            return status, b"".join(chunks), False
        except asyncio.IncompleteReadError:
            raise Http1Error("connection closed in the middle of an answer") from None
        except asyncio.LimitOverrunError:
            raise Http1Error("answer framing line too long") from None
        except ValueError:
            raise Http1Error("malformed answer framing") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    size_total = 0
    while True:
        line = await reader.readuntil(b"\r\n")
        size = int(line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            # Trailers, if any, end with an empty line.
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return b"".join(parts)
        size_total += size
        if size_total > MAX_BODY:
            raise Http1Error("answer body too large")
        parts.append(await reader.readexactly(size))
        await reader.readexactly(2)
