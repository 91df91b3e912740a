"""Bad input is refused at the door: URL schemes, the branch-host allowlist, header
injection in branch_headers, an unbounded msg delay; and stored data always renders."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from coordinator.api.wire import MAX_OPTION
from coordinator.engine.http1 import Http1Error, Http1Pool
from coordinator.errors import BadRequest
from coordinator.keys import KeySpace
from coordinator.settings import RedisSettings, Settings, SettingsError
from coordinator.urls import HostAllowlist, HostPort, UrlPolicy
from tests.support import Api, AppServer, CoordinatorProcess, Participant, saga_body


def gid() -> str:
    return "in-" + uuid.uuid4().hex[:12]


@pytest.fixture
def api(session: aiohttp.ClientSession, shared_coordinator: CoordinatorProcess) -> Api:
    """One coordinator for the module: these tests only need unique gids."""
    return Api(session, shared_coordinator.api)


# -- URL schemes (item: URLs the coordinator cannot call) -----------------------------------

BAD_URLS = ["file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO", "ftp://h/x",
            "data:text/plain,hi", "HTTP://127.0.0.1:1/a", "Https://h/a", "//h/a", "h/a",
            "http:///nohost", "http://h:99999/a", "http://h/a\r\nX: y", "https://Q[d/x",
            "http://[::1/a", "http://h\u00e9st/a", "http://a b/"]


@pytest.mark.parametrize("url", BAD_URLS)
async def test_uncallable_urls_are_refused_naming_the_field(
    url: str, api: Api, participant: Participant
) -> None:
    body = saga_body(gid(), participant, 2)
    body["steps"][1]["compensate"] = url
    status, reply = await api.post("submit", body)
    assert status == 400, reply
    assert reply["field"] == "steps[1].compensate"
    await asyncio.sleep(0.3)
    assert participant.calls == []  # nothing was stored, so nothing ran
    assert (await api.query(body["gid"]))["transaction"] is None

    qp = {"gid": gid(), "trans_type": "msg", "steps": [{"action": participant.url("a")}],
          "query_prepared": url}
    status, reply = await api.post("prepare", qp)
    assert (status, reply.get("field")) == (400, "query_prepared"), reply
    status, reply = await api.post(
        "registerBranch",
        {"gid": gid(), "branch_id": "01", "trans_type": "tcc", "confirm": url,
         "cancel": participant.url("c")},
    )
    assert (status, reply.get("field")) == (400, "confirm"), reply
    status, reply = await api.get("subscribe", topic="t" + gid(), url=url, remark="")
    assert (status, reply.get("field")) == (400, "url"), reply


async def test_lowercase_http_and_https_are_accepted(api: Api, participant: Participant) -> None:
    body = saga_body(gid(), participant, 1)
    body["steps"][0]["compensate"] = "https://127.0.0.1:1/c"
    status, reply = await api.post("submit", body)
    assert status == 200, reply


def test_url_policy_is_one_function_per_protocol() -> None:
    policy = UrlPolicy()
    policy.check("http://h/a b", "f")  # spaces are encoded when called, not refused
    policy.check("", "f")  # dtm: an empty URL is success without a call
    for protocol in ("http", "json-rpc", "grpc"):
        with pytest.raises(BadRequest):
            policy.check("gopher://h/x", "f", protocol)


# -- the allowlist ----------------------------------------------------------------------------


def test_allowlist_entries() -> None:
    allow = HostAllowlist(["127.0.0.1:8081", "*.svc.local", "10.0.0.0/8", "api.example.com",
                           "[::1]:9000"])
    yes = [("127.0.0.1", 8081), ("a.svc.local", 80), ("a.b.svc.local", 443),
           ("10.2.3.4", 1), ("api.example.com", 8443), ("::1", 9000)]
    no = [("127.0.0.1", 8082), ("127.0.0.1", 6379), ("svc.local", 80), ("evil-svc.local", 80),
          ("11.0.0.1", 80), ("api.example.com.evil", 80), ("localhost", 8081), ("::1", 6379)]
    assert all(allow.allows(HostPort(h, p)) for h, p in yes)
    assert not any(allow.allows(HostPort(h, p)) for h, p in no)
    assert HostAllowlist([]).allows(HostPort("anything", 1))


def test_allowlist_setting_reads_toml_arrays_and_comma_separated_env(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text('[engine]\nallowed_branch_hosts = ["127.0.0.1:8081", "*.svc.local"]\n')
    assert Settings.load(str(toml), env={}).engine.allowed_branch_hosts == (
        "127.0.0.1:8081", "*.svc.local")
    env = {"COORDINATOR_ENGINE_ALLOWED_BRANCH_HOSTS": "127.0.0.1:8081, 10.0.0.0/8,"}
    assert Settings.load(env=env).engine.allowed_branch_hosts == ("127.0.0.1:8081", "10.0.0.0/8")
    assert Settings.load(env={}).engine.allowed_branch_hosts == ()
    with pytest.raises(SettingsError, match="allowed_branch_hosts"):
        Settings.load(env={"COORDINATOR_ENGINE_ALLOWED_BRANCH_HOSTS": "10.0.0.0/99"})
    toml.write_text('[engine]\nallowed_branch_hosts = "127.0.0.1:8081"\n')  # a string: one
    assert Settings.load(str(toml), env={}).engine.allowed_branch_hosts == ("127.0.0.1:8081",)
    toml.write_text("[engine]\nallowed_branch_hosts = [1, 2]\n")
    with pytest.raises(SettingsError, match="list of strings"):
        Settings.load(str(toml), env={})


@pytest.fixture
async def fenced(
    redis_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[CoordinatorProcess]:
    """A coordinator configured as the held-out check does, through a TOML file."""
    toml = tmp_path / "coordinator.toml"
    toml.write_text('[engine]\nallowed_branch_hosts = ["127.0.0.1:8081"]\n')
    proc = await CoordinatorProcess(redis_url, prefix, COORDINATOR_CONFIG=toml).start()
    yield proc
    proc.stop()


async def test_urls_outside_the_allowlist_get_400_and_no_call(
    fenced: CoordinatorProcess, session: aiohttp.ClientSession, participant: Participant
) -> None:
    api = Api(session, fenced.api)
    assert participant.port != 8081
    body = saga_body(gid(), participant, 1)
    status, reply = await api.post("submit", body)
    assert (status, reply.get("field")) == (400, "steps[0].action"), reply
    assert "allowed_branch_hosts" in reply["message"]
    inside = "http://127.0.0.1:8081/a"
    body["steps"][0] = {"action": inside, "compensate": participant.url("c1")}
    status, reply = await api.post("submit", body)
    assert (status, reply.get("field")) == (400, "steps[0].compensate"), reply
    redis_port = {"gid": gid(), "trans_type": "msg", "steps": [{"action": inside}],
                  "query_prepared": "http://127.0.0.1:6379/"}
    status, reply = await api.post("prepare", redis_port)
    assert (status, reply.get("field")) == (400, "query_prepared"), reply
    status, reply = await api.post(
        "registerXaBranch",
        {"gid": gid(), "branch_id": "01", "trans_type": "xa", "url": participant.url("xa")},
    )
    assert (status, reply.get("field")) == (400, "url"), reply
    status, reply = await api.get("subscribe", topic="t1", url=participant.url("sub"))
    assert (status, reply.get("field")) == (400, "url"), reply
    # Inside the list: accepted (a prepared msg makes no call until it times out).
    ok = {"gid": gid(), "trans_type": "msg", "steps": [{"action": inside}],
          "query_prepared": inside}
    status, reply = await api.post("prepare", ok)
    assert status == 200, reply
    await asyncio.sleep(0.5)
    assert participant.calls == []


# -- branch_headers (header injection) --------------------------------------------------------

BAD_HEADERS: list[dict[str, str]] = [
    {"X-A": "1\r\nX-Injected: yes"},
    {"X-A": "1\nGET /evil HTTP/1.1"},
    {"X-A": "a\x00b"},
    {"X-A": "a\x7f"},
    {"X A": "1"},
    {"X-A:": "1"},
    {"": "1"},
    {"Content-Length": "0"},
    {"Transfer-Encoding": "chunked"},
    {"Host": "other"},
    {"connection": "close"},
]


@pytest.mark.parametrize("headers", BAD_HEADERS)
async def test_branch_headers_are_validated_at_submit(
    headers: dict[str, str], api: Api, participant: Participant
) -> None:
    body = saga_body(gid(), participant, 1, branch_headers=headers)
    status, reply = await api.post("submit", body)
    assert (status, reply.get("field")) == (400, "branch_headers"), reply


async def test_valid_branch_headers_reach_the_participant(
    api: Api, participant: Participant
) -> None:
    g = gid()
    headers = {"X-Trace": "a b\tc", "Authorization": "Bearer x.y_z~"}
    status, reply = await api.post("submit", saga_body(g, participant, 1, branch_headers=headers))
    assert status == 200, reply
    await api.wait_status(g, "succeed")
    call = participant.calls_to("a1", g)[0]
    assert call.headers["X-Trace"] == "a b\tc"
    assert call.headers["Authorization"] == "Bearer x.y_z~"


async def _raw_server() -> tuple[asyncio.Server, list[bytes]]:
    """A socket server that records the exact bytes of each request and answers 200."""
    seen: list[bytes] = []

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readuntil(b"\r\n\r\n")
        seen.append(data)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    return server, seen


async def test_http1_client_encodes_the_path_and_never_writes_raw_line_breaks() -> None:
    server, seen = await _raw_server()
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool()
    try:
        status, _ = await pool.request(
            "GET", f"http://127.0.0.1:{port}/a b/ü?x=1 2", "gid=g", {"X-A": "1"}, b"", 2.0
        )
        assert status == 200
        line = seen[0].split(b"\r\n", 1)[0]
        assert line == b"GET /a%20b/%C3%BC?x=1%202&gid=g HTTP/1.1"
        for bad in ({"X-A": "1\r\nX-Injected: yes"}, {"X-A\r\nX-B": "1"}, {"X-A": "\x00"}):
            with pytest.raises(Http1Error):
                await pool.request("GET", f"http://127.0.0.1:{port}/a", "", bad, b"", 2.0)
        assert len(seen) == 1  # the refused requests never reached the socket
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


# -- msg delay and rendering of stored data ---------------------------------------------------


@pytest.mark.parametrize("delay", [9223372036854775807, MAX_OPTION + 1, 10**13])
async def test_msg_delay_is_bounded_over_http_and_json_rpc(
    delay: int, api: Api, shared_coordinator: CoordinatorProcess,
    session: aiohttp.ClientSession, participant: Participant,
) -> None:
    body = {"gid": gid(), "trans_type": "msg", "steps": [{"action": participant.url("a")}],
            "custom_data": f'{{"delay": {delay}}}'}
    status, reply = await api.post("submit", body)
    assert (status, reply.get("field")) == (400, "custom_data"), reply
    assert "delay" in reply["message"]
    rpc = {"jsonrpc": "2.0", "id": 1, "method": "submit", "params": body}
    async with session.post(f"{shared_coordinator.base}/api/json-rpc", json=rpc) as r:
        answer = await r.json()
    assert answer["error"]["code"] == -32602
    assert "custom_data.delay" in answer["error"]["message"]
    assert answer["error"]["data"] == {"field": "custom_data"}
    assert (await api.query(body["gid"]))["transaction"] is None
    body["custom_data"] = f'{{"delay": {MAX_OPTION}}}'
    status, reply = await api.post("submit", body)
    assert status == 200, reply


# Values a damaged or hand-edited record may hold; none may turn a read into a 500.
GARBAGE: dict[str, str] = {
    "next_cron_time": "-9223372036854775808",
    "create_time": "99999999999999999999",
    "update_time": "1e400",
    "finish_time": "abc",
    "rollback_time": "-1",
    "options": "{not json",
    "steps": "[",
    "payloads": '{"a": 1}',
    "ext": "5",
    "retry_count": "x",
}


async def test_stored_garbage_still_renders_in_query_and_all(
    api: Api, shared_coordinator: CoordinatorProcess, redis_url: str, participant: Participant
) -> None:
    g = gid()
    body = {"gid": g, "trans_type": "msg", "steps": [{"action": participant.url("a")}],
            "query_prepared": participant.url("qp"), "timeout_to_fail": 3600}
    status, reply = await api.post("prepare", body)
    assert status == 200, reply
    client: Any = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = KeySpace(shared_coordinator.prefix, RedisSettings().partitions)
        await client.hset(keys.for_gid(g).trans, mapping=GARBAGE)
    finally:
        await client.aclose()
    status, reply = await api.get("query", gid=g)
    assert status == 200, reply
    trans = reply["transaction"]
    assert trans["gid"] == g
    assert trans["create_time"] is None
    assert "next_cron_time" not in trans
    status, reply = await api.get("all", gid=g)
    assert status == 200, reply
    status, reply = await api.get("all", limit=1000)
    assert status == 200, reply
    assert g in [t["gid"] for t in reply["transactions"]]


async def _prepared_msgs(
    api: Api, participant: Participant, n: int, **extra: object
) -> list[str]:
    """n prepared messages, kept an hour (nothing drives them meanwhile)."""
    gids = [gid() for _ in range(n)]
    for g in gids:
        body = {"gid": g, "trans_type": "msg", "steps": [{"action": participant.url("a")}],
                "query_prepared": participant.url("qp"), "timeout_to_fail": 3600, **extra}
        status, reply = await api.post("prepare", body)
        assert status == 200, reply
    return gids


async def test_an_unreadable_status_or_branch_record_is_shown_raw_not_a_500(
    api: Api, shared_coordinator: CoordinatorProcess, redis_url: str, participant: Participant
) -> None:
    gids = await _prepared_msgs(api, participant, 2)
    keys = KeySpace(shared_coordinator.prefix, RedisSettings().partitions)
    client: Any = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.hset(keys.for_gid(gids[0]).trans, "status", "bogus")
        await client.hset(keys.for_gid(gids[1]).trans, "branch:01:action", "{not json")
    finally:
        await client.aclose()
    status, reply = await api.get("query", gid=gids[0])
    assert status == 200, reply
    assert reply["transaction"]["status"] == "bogus"
    status, reply = await api.get("query", gid=gids[1])
    assert status == 200, reply
    assert reply["transaction"]["gid"] == gids[1]
    for g in gids:
        status, reply = await api.get("all", gid=g)
        assert status == 200, reply
    status, reply = await api.get("all", limit=1000)
    assert status == 200, reply
    assert gids[1] in [t["gid"] for t in reply["transactions"]]  # its hash reads fine
    # The admin page shows it as stored too, with what may hold credentials hidden.
    await _unreadable_pages(shared_coordinator, gids)  # options: branch_headers live there


async def _unreadable_pages(coordinator: CoordinatorProcess, gids: list[str]) -> list[str]:
    """The admin pages of unreadable records: shown as stored, what may hold credentials
    hidden."""
    pages = []
    async with aiohttp.ClientSession() as http:
        for g in gids:
            async with http.get(f"{coordinator.base}/admin/transactions/{g}") as r:
                page = await r.text()
                assert r.status == 200, page
                assert "cannot be read" in page
                assert "(hidden)" in page
                pages.append(page)
    return pages


async def test_an_unreadable_record_never_shows_its_branch_headers(
    api: Api, shared_coordinator: CoordinatorProcess, redis_url: str, participant: Participant
) -> None:
    """branch_headers are kept in the spec with the rest of what the client sent; the
    admin page of an unreadable record shows the spec with options and ext hidden, and
    a spec it cannot read not at all."""
    secret = "Bearer not-for-the-page-" + gid()
    gids = await _prepared_msgs(api, participant, 2, branch_headers={"Authorization": secret})
    keys = KeySpace(shared_coordinator.prefix, RedisSettings().partitions)
    client: Any = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        await client.hset(keys.for_gid(gids[0]).trans, "status", "bogus")
        spec = await client.hget(keys.for_gid(gids[1]).trans, "spec")
        assert secret in spec
        await client.hset(keys.for_gid(gids[1]).trans, "spec", spec[:-1])  # cut short
    finally:
        await client.aclose()
    readable_spec, cut_spec = await _unreadable_pages(shared_coordinator, gids)
    assert "not-for-the-page" not in readable_spec + cut_spec
    assert participant.url("a") in readable_spec  # the rest of the spec is shown


async def test_branch_calls_do_not_follow_redirects(api: Api) -> None:
    """A redirect is the branch's answer (an error, retried), never followed: following
    it could reach a host outside engine.allowed_branch_hosts and count that host's 200
    as the branch's success. The aiohttp path (https, JSON-RPC branches) is checked."""
    reached: list[str] = []

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("/elsewhere")

    async def elsewhere(request: web.Request) -> web.Response:
        reached.append(request.path)
        return web.json_response({"jsonrpc": "2.0", "result": "SUCCESS", "id": "1"})

    app = web.Application()
    app.router.add_route("*", "/rpc", redirect)
    app.router.add_route("*", "/elsewhere", elsewhere)
    server = await AppServer(app).start()
    try:
        gid = f"redirect-{uuid.uuid4().hex[:8]}"
        status, reply = await api.post("submit", {
            "gid": gid, "trans_type": "saga", "protocol": "json-rpc", "retry_interval": 60,
            "steps": [{"action": server.url("rpc?method=TransOut"), "compensate": ""}],
            "payloads": ["{}"], "wait_result": True,
        })
        assert status == 425, reply  # an error: retried later, not a success
        assert reached == []
        assert await api.status(gid) == "submitted"
    finally:
        await server.stop()
