"""`coordinator redis-cli [args…]`: redis-cli against the Redis this coordinator uses.

The private redis-server listens only on a unix socket in the data directory, so a bare
``redis-cli`` (port 6379) never reaches it. This command reads the same settings as
``coordinator serve`` (``--config``, ``--redis-url``, ``COORDINATOR_*``) and runs
redis-cli with the matching connection options, so the README's commands work whichever
Redis holds the state. A password is passed through ``REDISCLI_AUTH``, never on the
command line, where any user could read it in the process list.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from coordinator.embedded_redis import SOCKET_NAME, EmbeddedRedisError, find_redis_cli
from coordinator.settings import Settings
from coordinator.startup import StartupError, check_redis_url

USAGE = "coordinator redis-cli [--config FILE] [--redis-url URL] [--] [redis-cli args…]"


def split_args(argv: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """The coordinator's own options that may come first, and redis-cli's arguments."""
    own: dict[str, str] = {}
    rest = list(argv)
    while rest:
        head = rest[0]
        name, eq, value = head.partition("=")
        if head == "--":
            rest.pop(0)
            break
        if name not in ("--config", "--redis-url"):
            break
        rest.pop(0)
        if not eq:
            if not rest:
                raise StartupError(f"{name} needs a value; usage: {USAGE}", 2)
            value = rest.pop(0)
        own[name] = value
    return own, rest


def connection_args(settings: Settings) -> tuple[list[str], dict[str, str]]:
    """redis-cli options (and extra environment) that reach the configured Redis."""
    url = settings.redis.url
    if not url:
        socket_path = Path(settings.redis.data_dir).expanduser().absolute() / SOCKET_NAME
        if not socket_path.exists():
            raise StartupError(
                f"no private redis-server is running: {socket_path} does not exist "
                "(start `coordinator serve` first, or pass --redis-url)"
            )
        return ["-s", str(socket_path)], {}
    check_redis_url(url)
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    args: list[str] = []
    env: dict[str, str] = {}
    db = query.get("db", [""])[0]
    if parts.scheme == "unix":
        args += ["-s", unquote(parts.path)]
    else:
        args += ["-h", parts.hostname or "127.0.0.1", "-p", str(parts.port or 6379)]
        db = parts.path.lstrip("/") or db
        if parts.scheme == "rediss":
            args.append("--tls")
    if db:
        args += ["-n", db]
    if parts.username:
        args += ["--user", unquote(parts.username)]
    password = parts.password or query.get("password", [""])[0]
    if password:
        env["REDISCLI_AUTH"] = unquote(password)
    return args, env


def exec_redis_cli(settings: Settings, args: Sequence[str]) -> None:
    """Replace this process with redis-cli (so an interactive session behaves as usual)."""
    try:
        binary = find_redis_cli()
    except EmbeddedRedisError as exc:
        raise StartupError(str(exc)) from None
    conn, extra_env = connection_args(settings)
    env = {**os.environ, **extra_env}
    os.execve(binary, [binary, *conn, *args], env)
