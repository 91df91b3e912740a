"""The `coordinator` command: serve the API, or run the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from coordinator import __version__
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
        },
    )


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML settings file (env: COORDINATOR_CONFIG)")
    p.add_argument("--host", help="address to listen on (env: COORDINATOR_HOST)")
    p.add_argument("--port", type=int, help="port to listen on (env: COORDINATOR_PORT)")
    p.add_argument(
        "--redis-url",
        help="Redis to keep state in; without it a private redis-server is started "
        "(env: COORDINATOR_REDIS_URL)",
    )
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")


def serve(settings: Settings) -> None:
    if settings.server.workers > 1:
        from coordinator.workers import serve_workers

        sys.exit(serve_workers(settings))
    from coordinator.api.app import create_app
    from coordinator.api.server import serve_app

    _install_uvloop()
    # Our own serving loop rather than web.run_app: it adds the connection cap and the
    # keep-alive timeout (api/server.py).
    asyncio.run(serve_app(create_app(settings), settings))


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
    p_demo = sub.add_parser("demo", help="run the coordinator with demo services and sagas")
    _add_common(p_demo)
    p_bench = sub.add_parser("bench", help="run a benchmark scenario (source checkout only)")
    p_bench.add_argument("--log-level", default="WARNING")
    argv = list(sys.argv[1:] if argv is None else argv)
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
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
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
    if args.command == "serve":
        serve(settings)
    elif args.command == "demo":
        from coordinator.demo import run_demo

        _install_uvloop()
        sys.exit(asyncio.run(run_demo(settings)))
