"""The `coordinator` command: serve the API, or run the demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from coordinator import __version__
from coordinator.ops.logs import setup as setup_logs
from coordinator.settings import Settings, SettingsError


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # not available on this platform: asyncio's loop works too
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _settings_from(args: argparse.Namespace) -> Settings:
    return Settings.load(
        config_file=args.config,
        overrides={
            "server.host": args.host,
            "server.port": args.port,
            "redis.url": args.redis_url,
            "server.workers": getattr(args, "workers", None),
            "registry.target": getattr(args, "register", None),
            "server.grpc_port": args.grpc_port,
        },
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (env: COORDINATOR_CONFIG)")
    p.add_argument("--host", help="address to listen on (env: COORDINATOR_HOST)")
    p.add_argument("--port", type=int, help="port to listen on (env: COORDINATOR_PORT)")
    p.add_argument(
        "--grpc-port", type=int,
        help="port of the gRPC API dtmgimp.Dtm, 0 = off (default 36790; "
        "env: COORDINATOR_SERVER_GRPC_PORT)",
    )
    p.add_argument(
        "--redis-url",
        help="Redis to keep state in; without it a private redis-server is started "
        "(env: COORDINATOR_REDIS_URL)",
    )
    p.add_argument("--log-level", default="INFO",
                   help="DEBUG, INFO, WARNING, ERROR; per module too: "
                   "coordinator.engine=DEBUG,INFO")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="text lines, or one JSON object per line")


def serve(settings: Settings) -> None:
    from redis.exceptions import RedisError

    from coordinator.embedded_redis import EmbeddedRedisError
    from coordinator.errors import DataMismatch
    from coordinator.startup import StartupError, describe_listeners, describe_redis, prepare

    if settings.server.workers > 1:
        from coordinator.workers import serve_workers

        # The parent only probes: each child binds the port itself (SO_REUSEPORT).
        for sock in asyncio.run(prepare(settings, reuse_port=True)):
            sock.close()
        try:
            code = serve_workers(settings)
        except EmbeddedRedisError as exc:
            raise StartupError(str(exc)) from None
        sys.exit(code)
    from coordinator.api.app import create_app
    from coordinator.api.server import serve_app
    from coordinator.heap import settle
    from coordinator.lifeline import follow_parent

    follow_parent(settings.engine.shutdown_grace)
    _install_uvloop()
    # The port and the Redis URL are checked before anything starts or claims to be ready.
    sockets = asyncio.run(prepare(settings, reuse_port=settings.server.reuse_port))

    def announce() -> None:
        # Called once the listeners accept connections: start-up is over.
        settle()
        print(f"coordinator: listening on {describe_listeners(sockets)} "
              f"(dtm API at /api/dtmsvr), state in {describe_redis(settings)}", flush=True)

    try:
        # Our own serving loop rather than web.run_app: it adds the connection cap and
        # the keep-alive timeout (api/server.py).
        asyncio.run(serve_app(create_app(settings), settings, sockets, announce))
    except (EmbeddedRedisError, RedisError, DataMismatch) as exc:
        # The private redis-server would not start (locked data directory, …) or the
        # store's scripts could not be loaded: one line, not a traceback.
        raise StartupError(str(exc)) from None


def _redis_cli(argv: Sequence[str]) -> None:
    from coordinator.redis_cli import exec_redis_cli, split_args
    from coordinator.startup import StartupError, exit_with

    try:
        own, rest = split_args(argv)
        settings = Settings.load(
            config_file=own.get("--config"), overrides={"redis.url": own.get("--redis-url")}
        )
        exec_redis_cli(settings, rest)
    except SettingsError as exc:
        exit_with(str(exc), 2)
    except StartupError as exc:
        exit_with(str(exc), exc.exit_code)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="coordinator", description="Redis-backed, dtm-compatible transaction coordinator"
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the coordinator's HTTP API and workers")
    _add_common(p_serve)
    p_serve.add_argument(
        "--workers", type=int, help="processes sharing the port (env: COORDINATOR_SERVER_WORKERS)"
    )
    p_serve.add_argument(
        "--register",
        help="publish the gRPC endpoint in a go-zero registry, e.g. "
        "etcd://127.0.0.1:2379/dtmservice (env: COORDINATOR_REGISTRY_TARGET)",
    )
    p_demo = sub.add_parser("demo", help="run the coordinator with demo services and sagas")
    _add_common(p_demo)
    p_bench = sub.add_parser("bench", help="run a benchmark scenario (source checkout only)")
    p_bench.add_argument("--log-level", default="WARNING")
    sub.add_parser(
        "redis-cli",
        help="run redis-cli against the configured or the private Redis",
        usage="coordinator redis-cli [--config FILE] [--redis-url URL] [--] [redis-cli args…]",
    )
    from coordinator.ops_cli import add_ops_commands, run_ops

    add_ops_commands(sub)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["redis-cli"] and argv[1:2] not in (["-h"], ["--help"]):
        # Everything after the coordinator's own options belongs to redis-cli, so argparse
        # (which would take redis-cli's -h for help) must not see it.
        _redis_cli(argv[1:])
    has_bench = False
    if argv[:1] == ["bench"]:  # imported only when asked for: it pulls in a lot
        try:
            from bench.cli import add_arguments as add_bench_arguments
        except ImportError:  # an installed wheel carries no benchmarks
            pass
        else:
            has_bench = True
            add_bench_arguments(p_bench)
    args = parser.parse_args(argv)
    if args.command in ("txn", "topics"):
        sys.exit(run_ops(args))
    try:
        setup_logs(str(args.log_level), getattr(args, "log_format", "text"))
    except ValueError as exc:
        parser.error(str(exc))
    if args.command == "bench":
        if not has_bench:
            parser.error("the benchmarks live in bench/ of a source checkout")
        from bench.cli import run

        sys.exit(run(args))
    try:
        settings = _settings_from(args)
    except SettingsError as exc:
        print(f"coordinator: {exc}", file=sys.stderr)
        sys.exit(2)
    from coordinator.startup import StartupError, exit_with

    try:
        if args.command == "serve":
            serve(settings)
        elif args.command == "demo":
            from coordinator.demo import main as demo_main

            _install_uvloop()
            sys.exit(demo_main(settings))
    except StartupError as exc:
        exit_with(str(exc), exc.exit_code)
