"""Settings: one frozen dataclass tree, from defaults, a TOML file, env vars and flags.

Precedence, lowest first: built-in defaults, the config file (``--config`` or
``COORDINATOR_CONFIG``), ``COORDINATOR_*`` environment variables, command-line flags.
Every value is checked once at start-up; a bad one stops the server with a message
naming it, rather than surfacing later as an odd failure.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from coordinator.machines.base import Defaults
from coordinator.registry.target import TargetError, parse_etcd_target
from coordinator.urls import HostAllowlist


class SettingsError(ValueError):
    pass


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 36789
    # dtm's gRPC API (dtmgimp.Dtm) on the same host, as dtm does; 0 turns it off.
    grpc_port: int = 36790
    max_body_bytes: int = 1 << 20
    # Longest a submit with wait_result waits for the outcome before answering ONGOING.
    wait_result_timeout: float = 30.0
    # Processes serving one port (SO_REUSEPORT); each runs its own engine.
    workers: int = 1
    reuse_port: bool = False
    # Bearer token for operator routes (and the admin page); empty: no token required.
    api_token: str = ""
    # A file holding the token (for secrets mounted as files); read once at start-up.
    api_token_file: str = ""
    # Require the token on the transaction routes too (dtm's clients cannot send one).
    protect_transaction_routes: bool = False
    # Require the token on /api/metrics (open by default so Prometheus can scrape it).
    protect_metrics: bool = False
    # Prometheus metrics at /api/metrics; false removes the route and every hook's cost.
    metrics: bool = True
    # Seconds between reads of the Redis-derived gauges (backlog, oldest due, unfinished).
    metrics_refresh: float = 5.0
    # OpenTelemetry spans (needs the `otel` extra); the exporter reads OTEL_* variables.
    tracing: bool = False
    # Seconds a connection may sit without a complete request head, whether fresh, idle
    # between keep-alive requests or half-way through sending its headers; then closed.
    keepalive_timeout: float = 15.0
    # Seconds a client has to send a whole request body once its head arrived.
    body_timeout: float = 30.0
    # Open client connections per process; more are closed at once.
    max_connections: int = 1024
    # Answer plain JSON POSTs of the transaction routes without aiohttp's request and
    # response objects (api/fast.py); everything else is aiohttp's either way.
    fast_http: bool = True


@dataclass(frozen=True)
class RedisSettings:
    # Empty: start a private redis-server with AOF persistence in data_dir.
    url: str = ""
    data_dir: str = ".coordinator"
    key_prefix: str = "coord"
    # 63: the {pN} slots of 63 partitions land 20/20/23 on a 3-primary cluster (16
    # would give 4/5/7); see the README's cluster section for larger clusters.
    partitions: int = 63
    # Send script calls of concurrent transactions together (one round trip per batch).
    pipeline: bool = True
    # Run the script calls of one batch (one slot on a cluster) as one script call.
    batch_scripts: bool = True
    # Redis Cluster: "auto" (ask the server), "true" or "false".
    cluster: str = "auto"
    # More cluster seeds, "host:port,host:port" (redis.url may list several hosts too).
    cluster_nodes: str = ""
    # Replicas that must have each acknowledged change before the answer (WAIT).
    wait_replicas: int = 0
    # Longest WAIT for them (s); a change they did not confirm in time answers 503.
    wait_timeout: float = 1.0


@dataclass(frozen=True)
class EngineSettings:
    concurrency: int = 512
    poll_interval: float = 0.2
    lease_seconds: float = 15.0
    finished_ttl: int = 86_400
    shutdown_grace: float = 10.0
    retry_interval: int = 10
    max_retry_interval: int = 3600
    timeout_to_fail: int = 35
    request_timeout: int = 3
    sweep_interval: float = 30.0
    # Hosts branch, compensation, query_prepared and subscriber URLs may target: names,
    # host:port, *.domain wildcards, CIDRs. Empty allows every host.
    allowed_branch_hosts: tuple[str, ...] = ()

    def defaults(self) -> Defaults:
        return Defaults(
            retry_interval=self.retry_interval,
            max_retry_interval=self.max_retry_interval,
            timeout_to_fail=self.timeout_to_fail,
            request_timeout=self.request_timeout,
        )


@dataclass(frozen=True)
class RegistrySettings:
    # go-zero registry to publish the coordinator in, e.g. etcd://127.0.0.1:2379/dtmservice.
    target: str = ""
    # The gRPC address published there; empty: <server.host>:<server.grpc_port>.
    endpoint: str = ""
    # PEM files for etcd with TLS client certificates (registering and resolving).
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = field(default_factory=ServerSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    registry: RegistrySettings = field(default_factory=RegistrySettings)

    def advertised_endpoint(self) -> str:
        """The gRPC address other services are told to use for this coordinator."""
        if self.registry.endpoint:
            return self.registry.endpoint
        if not self.server.grpc_port:
            return ""  # no gRPC API to point at
        host = self.server.host
        return f"[{host}]:{self.server.grpc_port}" if ":" in host else (
            f"{host}:{self.server.grpc_port}"
        )

    @classmethod
    def load(
        cls,
        config_file: str | None = None,
        env: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings; `overrides` maps "section.name" to a value (from flags)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        path = config_file or env.get("COORDINATOR_CONFIG")
        if path:
            try:
                data = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as exc:
                raise SettingsError(f"cannot read config file {path}: {exc}") from exc
            for section, items in data.items():
                if not isinstance(items, dict):
                    raise SettingsError(f"config file {path}: [{section}] must be a table")
                for name, value in items.items():
                    values[f"{section}.{name}"] = value
        for key, (section, name) in _ENV_NAMES.items():
            if key in env:
                values[f"{section}.{name}"] = env[key]
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        return cls._build(values)

    @classmethod
    def _build(cls, values: Mapping[str, Any]) -> Settings:
        sections: dict[str, Any] = {}
        known = {f.name: f.type for f in dataclasses.fields(cls)}
        for key in values:
            section, _, name = key.partition(".")
            if section not in known or name not in _field_types(section):
                raise SettingsError(f"unknown setting '{key}'")
        for f in dataclasses.fields(cls):
            sub_cls = _SECTIONS[f.name]
            kwargs = {}
            for sub in dataclasses.fields(sub_cls):
                key = f"{f.name}.{sub.name}"
                if key in values:
                    kwargs[sub.name] = _cast(key, values[key], type(getattr(sub_cls(), sub.name)))
            sections[f.name] = sub_cls(**kwargs)
        settings = cls(**sections)
        settings.validate()
        return settings.with_token_file()

    def with_token_file(self) -> Settings:
        """Read `server.api_token_file` into `server.api_token`, once, at load time."""
        path = self.server.api_token_file
        if not path:
            return self
        try:
            token = Path(path).read_text().strip()
        except OSError as exc:
            raise SettingsError(f"server.api_token_file: cannot read {path}: {exc}") from exc
        if not token:
            raise SettingsError(f"server.api_token_file: {path} is empty")
        return dataclasses.replace(
            self, server=dataclasses.replace(self.server, api_token=token)
        )

    def validate(self) -> None:
        checks = [
            (0 < self.server.port < 65536, "server.port must be 1..65535"),
            (0 <= self.server.grpc_port < 65536, "server.grpc_port must be 0..65535"),
            (self.server.max_body_bytes >= 1024, "server.max_body_bytes must be >= 1024"),
            (1 <= self.server.workers <= 256, "server.workers must be 1..256"),
            (self.server.metrics_refresh > 0, "server.metrics_refresh must be > 0"),
            (1 <= self.redis.partitions <= 4096, "redis.partitions must be 1..4096"),
            (bool(self.redis.key_prefix), "redis.key_prefix must not be empty"),
            (self.redis.cluster in ("auto", "true", "false"),
             "redis.cluster must be auto, true or false"),
            (0 <= self.redis.wait_replicas <= 16, "redis.wait_replicas must be 0..16"),
            (self.redis.wait_timeout > 0, "redis.wait_timeout must be > 0"),
            (self.engine.concurrency >= 1, "engine.concurrency must be >= 1"),
            (self.engine.poll_interval > 0, "engine.poll_interval must be > 0"),
            (
                self.engine.lease_seconds >= self.engine.request_timeout + 2,
                "engine.lease_seconds must exceed engine.request_timeout by 2 s or more",
            ),
            (self.engine.retry_interval >= 1, "engine.retry_interval must be >= 1"),
            (self.engine.request_timeout >= 1, "engine.request_timeout must be >= 1"),
            (self.engine.finished_ttl >= 1, "engine.finished_ttl must be >= 1"),
            (self.server.keepalive_timeout > 0, "server.keepalive_timeout must be > 0"),
            (self.server.body_timeout > 0, "server.body_timeout must be > 0"),
            (self.server.max_connections >= 1, "server.max_connections must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise SettingsError(message)
        try:
            HostAllowlist(self.engine.allowed_branch_hosts)
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
        self._validate_registry()

    def _validate_registry(self) -> None:
        registry = self.registry
        for path in (registry.etcd_ca, registry.etcd_cert, registry.etcd_key):
            if path and not Path(path).is_file():
                raise SettingsError(f"registry: etcd TLS file {path} does not exist")
        if bool(registry.etcd_cert) != bool(registry.etcd_key):
            raise SettingsError("registry.etcd_cert and registry.etcd_key go together")
        if not registry.target:
            return
        try:
            parse_etcd_target(registry.target)
        except TargetError as exc:
            raise SettingsError(f"registry.target: {exc}") from None
        if registry.endpoint:
            return
        if self.server.host in ("0.0.0.0", "::", "", "[::]"):
            raise SettingsError(
                f"registry.endpoint is required with server.host {self.server.host!r}: "
                "other services cannot dial a wildcard address"
            )
        if not self.server.grpc_port:
            raise SettingsError("registry.endpoint is required when server.grpc_port is 0")


_SECTIONS: dict[str, type[Any]] = {
    "server": ServerSettings,
    "redis": RedisSettings,
    "engine": EngineSettings,
    "registry": RegistrySettings,
}


def _field_types(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(_SECTIONS[section])}


# COORDINATOR_<NAME> for the common ones, COORDINATOR_<SECTION>_<NAME> for every one.
_ENV_NAMES: dict[str, tuple[str, str]] = {
    "COORDINATOR_HOST": ("server", "host"),
    "COORDINATOR_PORT": ("server", "port"),
    "COORDINATOR_REDIS_URL": ("redis", "url"),
    "COORDINATOR_DATA_DIR": ("redis", "data_dir"),
}
for _section, _cls in _SECTIONS.items():
    for _f in dataclasses.fields(_cls):
        _ENV_NAMES[f"COORDINATOR_{_section.upper()}_{_f.name.upper()}"] = (_section, _f.name)


def _cast(key: str, value: Any, kind: type[Any]) -> Any:
    if kind is tuple:
        # A TOML array, or a comma-separated string from the environment.
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
            raise SettingsError(f"setting '{key}': expected a list of strings, got {value!r}")
        return tuple(i.strip() for i in items if i.strip())
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind is int:
            # A TOML float (port = 4000.5) must not be truncated silently.
            if isinstance(value, bool | float):
                raise ValueError(value)
            return int(value)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting '{key}': cannot read {value!r} as {kind.__name__}") from exc


def env_names() -> dict[str, str]:
    """Environment variable → setting, for the README's table."""
    return {k: f"{s}.{n}" for k, (s, n) in _ENV_NAMES.items()}
