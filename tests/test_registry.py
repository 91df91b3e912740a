"""go-zero's etcd registry against a real etcd: target formats, the coordinator's own
registration (key, lease, keep-alive, revoke on SIGTERM, again after an etcd restart),
the resolver's fail-over, etcd down at start, and etcd with TLS client certificates."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from coordinator.client import register_service, resolve_target
from coordinator.registry.publisher import Publisher
from coordinator.registry.resolver import Resolver
from coordinator.registry.target import (
    EtcdTarget,
    TargetError,
    parse_etcd_target,
    split_server_method,
    validate_grpc_target,
)
from coordinator.settings import Settings, SettingsError
from tests.etcd_support import EtcdServer, etcd_server
from tests.grpc_participant import GrpcParticipant
from tests.support import Api, CoordinatorProcess, free_port, wait_for


def test_registry_targets_as_go_zero_reads_them() -> None:
    assert parse_etcd_target("etcd://127.0.0.1:2379/dtmservice") == EtcdTarget(
        ("127.0.0.1:2379",), "dtmservice")
    assert parse_etcd_target("etcd://h1:2379,h2:2379/trans.rpc?user=u&password=p") == (
        EtcdTarget(("h1:2379", "h2:2379"), "trans.rpc", "u", "p"))
    assert parse_etcd_target("etcd:///h1:2379,h2:2379?key=dtmservice") == EtcdTarget(
        ("h1:2379", "h2:2379"), "dtmservice")
    assert parse_etcd_target("discov://h1:2379/dtmservice").key == "dtmservice"
    # etcd only: go-zero's k8s:// and direct:// targets and other registries are refused.
    for bad in ("http://h:1/k", "etcd://h1:2379", "etcd://h1/k", "etcd:///h1:2379",
                "dtmservice", "etcd://u:p@h:1/k", "k8s://ns/svc:8080",
                "direct://127.0.0.1:1,127.0.0.1:2", "consul://h:8500/svc"):
        with pytest.raises(TargetError):
            parse_etcd_target(bad)


def test_branch_urls_split_as_parse_server_method() -> None:
    assert split_server_method("etcd://127.0.0.1:2379/trans.rpc/pb.Trans/TransOut") == (
        "etcd://127.0.0.1:2379/trans.rpc", "/pb.Trans/TransOut")
    assert split_server_method("discov://h1:1,h2:2/trans.rpc/pb.Trans/TransIn") == (
        "discov://h1:1,h2:2/trans.rpc", "/pb.Trans/TransIn")
    assert split_server_method("localhost:58081/busi.Busi/TransIn") == (
        "localhost:58081", "/busi.Busi/TransIn")
    assert validate_grpc_target("http://h/x") is None
    assert validate_grpc_target("") is None
    for bad in ("localhost:58081", "localhost/busi.Busi/TransIn", "etcd://h:1/key",
                "etcd://h:1/key/NoMethod", "ftp://h:1/a/b.C/D", "h:1/not a method",
                "k8s://ns/svc:8080/pb.T/M", "direct://127.0.0.1:1/pb.T/M"):
        assert validate_grpc_target(bad), bad


def test_registry_section_of_a_config_file(tmp_path: Path) -> None:
    """dtm's conf.yml MicroService Target/EndPoint, as the coordinator's TOML has them."""
    config = tmp_path / "coordinator.toml"
    config.write_text('[registry]\ntarget = "etcd://127.0.0.1:2379/dtmservice"\n'
                      'endpoint = "10.0.0.5:36790"\n\n[server]\ngrpc_port = 36790\n')
    settings = Settings.load(str(config), env={})
    assert settings.registry.target == "etcd://127.0.0.1:2379/dtmservice"
    assert settings.advertised_endpoint() == "10.0.0.5:36790"


def test_settings_refuse_a_wildcard_endpoint() -> None:
    target = {"registry.target": "etcd://127.0.0.1:2379/dtmservice"}
    with pytest.raises(SettingsError, match=r"registry\.endpoint"):
        Settings.load(env={}, overrides={**target, "server.host": "0.0.0.0"})
    with pytest.raises(SettingsError, match=r"registry\.endpoint"):
        Settings.load(env={}, overrides={**target, "server.host": "::"})
    ok = Settings.load(env={}, overrides={**target, "server.host": "0.0.0.0",
                                          "registry.endpoint": "10.0.0.5:36790"})
    assert ok.advertised_endpoint() == "10.0.0.5:36790"
    assert Settings.load(env={}, overrides=target).advertised_endpoint() == "127.0.0.1:36790"
    with pytest.raises(SettingsError, match=r"registry\.target"):
        Settings.load(env={}, overrides={"registry.target": "etcd://127.0.0.1:2379"})
    env = {"COORDINATOR_REGISTRY_TARGET": "etcd://127.0.0.1:2379/dtm",
           "COORDINATOR_SERVER_GRPC_PORT": "4000"}
    assert Settings.load(env=env).advertised_endpoint() == "127.0.0.1:4000"
    assert Settings.load(env={"COORDINATOR_SERVER_GRPC_PORT": "0"}).advertised_endpoint() == ""
    with pytest.raises(SettingsError, match=r"grpc_port is 0"):
        Settings.load(env={**env, "COORDINATOR_SERVER_GRPC_PORT": "0"})


async def _keys(server: EtcdServer, prefix: str) -> dict[str, tuple[str, int]]:
    client = server.client()
    try:
        result = await client.get_prefix(prefix.encode())
        return {kv.key.decode(): (kv.value.decode(), kv.lease) for kv in result}
    finally:
        await client.close_quietly()


async def _wait_keys(server: EtcdServer, prefix: str,
                     timeout: float) -> dict[str, tuple[str, int]]:
    """The keys under `prefix` once there are any."""
    keys: dict[str, tuple[str, int]] = {}

    async def some() -> bool:
        nonlocal keys
        keys = await _keys(server, prefix)
        return bool(keys)

    await wait_for(some, timeout, 0.1, f"keys under {prefix}")
    return keys


async def _lease_ttl(server: EtcdServer, lease: int) -> tuple[int, int]:
    """(remaining, granted) seconds of a lease."""
    client = server.client()
    try:
        info = await client.get_lease_info(lease, keys=False)
        return info.TTL, info.grantedTTL
    finally:
        await client.close_quietly()


@pytest.fixture
async def registered(etcd: EtcdServer, redis_url: str, prefix: str
                     ) -> AsyncIterator[tuple[CoordinatorProcess, str]]:
    proc = CoordinatorProcess(redis_url, prefix)
    proc.extra_args = ["--register", etcd.target("dtmservice"), "--log-level", "INFO"]
    await proc.start()
    yield proc, f"127.0.0.1:{proc.grpc_port}"
    await proc.aclose()


async def test_coordinator_registers_keeps_alive_and_revokes_on_sigterm(
    etcd: EtcdServer, registered: tuple[CoordinatorProcess, str]
) -> None:
    proc, endpoint = registered
    keys = await _wait_keys(etcd, "dtmservice/", 10)
    ((key, (value, lease)),) = keys.items()
    assert key == f"dtmservice/{lease}"  # go-zero's <key>/<lease id in decimal>
    assert value == endpoint
    remaining, granted = await _lease_ttl(etcd, lease)
    assert granted <= 10
    assert 0 < remaining <= 10
    # Without keep-alive 7 s would leave at most 3 s; refreshed every ~3.3 s it stays high.
    await asyncio.sleep(7)
    remaining, _ = await _lease_ttl(etcd, lease)
    assert remaining >= 5, remaining
    assert await _keys(etcd, "dtmservice/") == keys
    assert f"key 'dtmservice/{lease}'" in proc.log_tail(200)
    assert await proc.signal_and_wait(signal.SIGTERM, 20) is not None
    # Revoked at once, not left to expire with the TTL.
    assert await _keys(etcd, "dtmservice/") == {}
    remaining, _ = await _lease_ttl(etcd, lease)
    assert remaining == -1  # etcd's answer for a lease that no longer exists


async def test_registers_again_after_etcd_restarts_without_its_data(
    etcd: EtcdServer, registered: tuple[CoordinatorProcess, str]
) -> None:
    _, endpoint = registered
    ((first_key, _),) = (await _wait_keys(etcd, "dtmservice/", 10)).items()
    etcd.stop()
    await etcd.start(fresh=True)  # the lease and the key are gone with the data
    after = await _wait_keys(etcd, "dtmservice/", 15)
    ((key, (value, lease)),) = after.items()
    assert value == endpoint
    assert key == f"dtmservice/{lease}"
    assert (await _lease_ttl(etcd, lease))[0] > 0
    assert first_key.startswith("dtmservice/")


async def test_coordinator_serves_while_etcd_is_down_and_registers_when_it_comes(
    redis_url: str, prefix: str
) -> None:
    async with etcd_server() as server:
        server.stop()
        proc = CoordinatorProcess(redis_url, prefix)
        proc.extra_args = ["--register", server.target("dtmservice"), "--log-level", "INFO"]
        await proc.start()  # answers /api/ping although etcd is down
        try:
            await wait_for(lambda: "cannot register" in proc.log_tail(200), 10, 0.1,
                           "the warning about etcd")
            await server.start()
            await _wait_keys(server, "dtmservice/", 15)
            assert proc.log_tail(400).count("cannot register") <= 2  # once per interval
        finally:
            await proc.aclose()


async def test_resolver_fails_over_when_a_service_stops(etcd: EtcdServer) -> None:
    one = await register_service(etcd.target("trans.rpc"), "127.0.0.1:1001")
    two = await register_service(etcd.target("trans.rpc"), "127.0.0.1:1002")
    resolver = Resolver(f"discov://{etcd.endpoint}/trans.rpc")
    try:
        assert one.registered.is_set()
        assert two.registered.is_set()
        assert await resolver.wait_for(lambda e: len(e) == 2, 5)
        picks = {resolver.pick() for _ in range(4)}
        assert picks == {"127.0.0.1:1001", "127.0.0.1:1002"}  # spread over both
        assert sorted(await resolve_target(etcd.target("trans.rpc"))) == sorted(picks)
        await one.stop()
        assert await resolver.wait_for(lambda e: e == ("127.0.0.1:1002",), 3)
        assert {resolver.pick() for _ in range(4)} == {"127.0.0.1:1002"}
        # The newer go-zero target form finds the same service.
        assert await resolve_target(f"etcd:///{etcd.endpoint}?key=trans.rpc") == [
            "127.0.0.1:1002"]
    finally:
        await resolver.close()
        await one.stop()
        await two.stop()


async def test_etcd_with_tls_client_certificates(redis_url: str, prefix: str) -> None:
    async with etcd_server(tls=True) as server:
        assert server.certs is not None
        tls = server.certs.client_tls
        # Without a client certificate etcd refuses us.
        plain = Publisher(server.target("dtmservice"), "127.0.0.1:36790", retry_interval=0.2)
        plain.start()
        assert not await plain.wait_registered(1.5)
        await plain.stop()
        publisher = await register_service(server.target("dtmservice"), "127.0.0.1:36790", tls)
        try:
            assert publisher.registered.is_set()
            assert await resolve_target(server.target("dtmservice"), tls) == ["127.0.0.1:36790"]
            keys = await _keys(server, "dtmservice/")
            assert list(keys) == [publisher.key]
        finally:
            await publisher.stop()
        assert await _keys(server, "dtmservice/") == {}
        # The coordinator registers itself through the same certificates (settings).
        proc = CoordinatorProcess(
            redis_url, prefix,
            COORDINATOR_REGISTRY_TARGET=server.target("dtmservice"),
            COORDINATOR_REGISTRY_ENDPOINT="127.0.0.1:36999",
            COORDINATOR_REGISTRY_ETCD_CA=tls.ca,
            COORDINATOR_REGISTRY_ETCD_CERT=tls.cert,
            COORDINATOR_REGISTRY_ETCD_KEY=tls.key,
        )
        await proc.start()
        busi = await GrpcParticipant().start()
        branch = await register_service(server.target("trans.rpc"), busi.address, tls)
        try:
            keys = await _wait_keys(server, "dtmservice/", 10)
            assert [value for value, _ in keys.values()] == ["127.0.0.1:36999"]
            # …and resolves etcd:// branch targets through them too.
            url = f"etcd://{server.endpoint}/trans.rpc/busi.Busi/TransOut"
            async with aiohttp.ClientSession() as session:
                api = Api(session, proc.api)
                status, reply = await api.post("submit", {
                    "gid": "g-tls", "trans_type": "saga", "protocol": "grpc",
                    "steps": [{"action": url, "compensate": ""}], "payloads": ["x"]})
                assert status == 200, reply
                await api.wait_status("g-tls", "succeed")
            assert [c.body for c in busi.calls_to("TransOut")] == [b"x"]
        finally:
            await branch.stop()
            await busi.stop()
            await proc.aclose()
        assert await _keys(server, "dtmservice/") == {}


async def test_fails_over_to_the_next_etcd_member(etcd: EtcdServer) -> None:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    target = f"etcd://{dead},{etcd.endpoint}/trans.rpc"
    publisher = Publisher(target, "127.0.0.1:1001", retry_interval=0.2)
    publisher.start()
    try:
        assert await publisher.wait_registered(10)
        assert publisher.client.member == etcd.endpoint
        assert await resolve_target(target, timeout=10) == ["127.0.0.1:1001"]
    finally:
        await publisher.stop()


async def test_user_and_password_from_the_target(etcd: EtcdServer) -> None:
    from aetcd import rpc

    admin = etcd.client()
    await admin.connect()
    auth = rpc.AuthStub(admin.channel)
    await auth.RoleAdd(rpc.AuthRoleAddRequest(name="root"))
    await auth.UserAdd(rpc.AuthUserAddRequest(name="root", password="s3cret"))
    await auth.UserGrantRole(rpc.AuthUserGrantRoleRequest(user="root", role="root"))
    await auth.AuthEnable(rpc.AuthEnableRequest())
    await admin.close_quietly()
    anonymous = Publisher(etcd.target("dtmservice"), "127.0.0.1:1001", retry_interval=0.2)
    anonymous.start()
    assert not await anonymous.wait_registered(1.5)  # etcd refuses writes without a user
    await anonymous.stop()
    target = etcd.target("dtmservice") + "?user=root&password=s3cret"
    publisher = await register_service(target, "127.0.0.1:1001")
    try:
        assert publisher.registered.is_set()
        assert await resolve_target(target) == ["127.0.0.1:1001"]
    finally:
        await publisher.stop()
