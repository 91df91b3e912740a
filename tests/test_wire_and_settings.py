"""Validation of dtm's transaction JSON (api/wire.py) and of the settings (settings.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import orjson
import pytest

from coordinator.api.wire import MAX_STEPS, TransRequest, check_gid, parse_register, parse_trans
from coordinator.errors import BadRequest
from coordinator.model import BranchStatus, Op, Status, Trans
from coordinator.settings import Settings, SettingsError

# -- wire -------------------------------------------------------------------------------


def saga_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "gid": "g-1",
        "trans_type": "saga",
        "steps": [
            {"action": "http://svc/a1", "compensate": "http://svc/c1"},
            {"action": "http://svc/a2", "compensate": "http://svc/c2"},
        ],
        "payloads": ['{"n":1}', '{"n":2}'],
    }
    body.update(extra)
    return body


def parse(body: Any, status: Status = Status.SUBMITTED) -> TransRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_trans(raw, status)


def bad_field(body: Any) -> str | None:
    with pytest.raises(BadRequest) as info:
        parse(body)
    return info.value.field


def test_parse_saga_builds_the_transaction() -> None:
    req = parse(
        saga_body(
            custom_data='{"concurrent":true,"orders":{"1":[0]}}',
            timeout_to_fail=60, retry_interval=5, retry_limit=3, request_timeout=2,
            wait_result=True, branch_headers={"X-Trace": "t1"}, req_extra={"k": "v"},
            query_prepared="http://svc/query", rollback_reason="",
        ),
        Status.PREPARED,
    )
    t = req.trans
    assert (t.gid, t.trans_type, t.status) == ("g-1", "saga", Status.PREPARED)
    assert t.payloads == ('{"n":1}', '{"n":2}')
    assert t.steps[1] == {"action": "http://svc/a2", "compensate": "http://svc/c2"}
    assert [(b.branch_id, b.op, b.url) for b in t.branches] == [
        ("01", Op.COMPENSATE, "http://svc/c1"), ("01", Op.ACTION, "http://svc/a1"),
        ("02", Op.COMPENSATE, "http://svc/c2"), ("02", Op.ACTION, "http://svc/a2"),
    ]
    assert all(b.status is BranchStatus.PREPARED for b in t.branches)
    o = t.options
    assert (o.timeout_to_fail, o.retry_interval, o.retry_limit, o.request_timeout) == (
        60, 5, 3, 2,
    )
    assert o.wait_result
    assert o.branch_headers == {"X-Trace": "t1"}
    assert t.query_prepared == "http://svc/query"
    assert t.protocol == "http"
    assert req.req_extra == {"k": "v"}


def test_parsed_transaction_is_the_one_its_constructor_makes() -> None:
    """parse_trans copies a blank record instead of calling Trans(...): the result must
    be equal, and own its mutable fields (ext_headers)."""
    ordered = '{"concurrent":false}'
    for body in (saga_body(), saga_body(custom_data=ordered, wait_result=True, retry_limit=3),
                 {"gid": "g-2", "trans_type": "tcc"}):
        one, two = parse(body).trans, parse(body).trans
        fields = {f.name: getattr(one, f.name) for f in dataclasses.fields(Trans)}
        assert one == Trans(**fields)
        assert one.ext_headers is not two.ext_headers
    # Any other field with a per-record default would be shared between records.
    assert [f.name for f in dataclasses.fields(Trans)
            if f.default_factory is not dataclasses.MISSING] == ["ext_headers"]


def test_non_saga_modes_carry_no_branches_and_need_no_steps() -> None:
    msg = parse({"gid": "m1", "trans_type": "msg", "steps": [{"action": "http://x"}],
                 "payloads": ["{}"], "query_prepared": "http://q"})
    assert msg.trans.branches == ()
    assert msg.trans.steps == ({"action": "http://x"},)
    tcc = parse({"gid": "t1", "trans_type": "tcc"})
    assert tcc.trans.steps == ()
    assert tcc.trans.payloads == ()


def test_nulls_are_tolerated() -> None:
    # What dtm clients send for absent strings and obsolete fields.
    body = saga_body(
        custom_data=None, query_prepared=None, rollback_reason=None, protocol=None,
        passthrough_headers=None, branch_headers=None, req_extra=None, wait_result=None,
        timeout_to_fail=None, retry_interval=None, retry_limit=None, request_timeout=None,
        concurrent=None,
    )
    body["steps"][1]["compensate"] = None
    body["payloads"] = [None, '{"n":2}']
    t = parse(body).trans
    assert t.custom_data == ""
    assert t.protocol == "http"
    assert t.options.timeout_to_fail == 0
    assert not t.options.wait_result
    assert t.payloads == ("", '{"n":2}')
    assert t.steps[1] == {"action": "http://svc/a2"}
    assert t.branches[2].url == ""  # 02:compensate without a URL
    empty = parse({"gid": "n", "trans_type": "saga", "steps": None, "payloads": None})
    assert empty.trans.steps == ()


def test_old_steps_data_form_becomes_payloads() -> None:
    body: dict[str, Any] = {
        "gid": "old", "trans_type": "saga",
        "steps": [
            {"action": "http://a1", "compensate": "http://c1", "data": '{"x":1}'},
            {"action": "http://a2", "compensate": "http://c2", "data": '{"x":2}'},
        ],
    }
    t = parse(body).trans
    assert t.payloads == ('{"x":1}', '{"x":2}')
    assert t.steps[0] == {"action": "http://a1", "compensate": "http://c1"}
    # Only some steps with data: ambiguous, refused.
    body["steps"][1].pop("data")
    assert bad_field(body) == "steps"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"gid": None}, "gid"),
        ({"gid": ""}, "gid"),
        ({"gid": 12}, "gid"),
        ({"gid": "has space"}, "gid"),
        ({"gid": "x" * 129}, "gid"),
        ({"trans_type": None}, "trans_type"),
        ({"trans_type": "2pc"}, "trans_type"),
        ({"steps": {"action": "x"}}, "steps"),
        ({"steps": ["http://a"]}, "steps[0]"),
        ({"steps": [{"action": "a"}, {"action": 5}]}, "steps[1].action"),
        ({"steps": [{"action": "a", "try": "t"}], "payloads": ["{}"]}, "steps[0]"),
        ({"payloads": "{}"}, "payloads"),
        ({"payloads": ["{}", 2]}, "payloads"),
        ({"payloads": ["{}"]}, "payloads"),  # two steps, one payload
        ({"payloads": ["{}", "{}", "{}"]}, "payloads"),
        ({"custom_data": {"concurrent": True}}, "custom_data"),
        ({"custom_data": "{oops"}, "custom_data"),
        ({"custom_data": '{"concurrent":true,"orders":{"1":[2]}}'}, "custom_data"),
        ({"custom_data": '{"concurrent":true,"orders":{"5":[0]}}'}, "custom_data"),
        ({"custom_data": '{"concurrent":true,"orders":{"0":[0]}}'}, "custom_data"),
        ({"timeout_to_fail": "30"}, "timeout_to_fail"),
        ({"timeout_to_fail": -1}, "timeout_to_fail"),
        ({"timeout_to_fail": 1.5}, "timeout_to_fail"),
        ({"retry_interval": -5}, "retry_interval"),
        ({"retry_limit": True}, "retry_limit"),
        ({"request_timeout": -1}, "request_timeout"),
        ({"wait_result": "yes"}, "wait_result"),
        ({"concurrent": 1}, "concurrent"),
        ({"branch_headers": {"X-A": 1}}, "branch_headers"),
        ({"branch_headers": ["X-A"]}, "branch_headers"),
        ({"req_extra": "status=x"}, "req_extra"),
        ({"protocol": "smtp"}, "protocol"),
        ({"protocol": 3}, "protocol"),
        ({"query_prepared": 7}, "query_prepared"),
        ({"rollback_reason": ["x"]}, "rollback_reason"),
    ],
)
def test_bad_field_is_named(change: dict[str, Any], field: str) -> None:
    body = saga_body()
    body.update(change)
    assert bad_field(body) == field


def test_too_many_steps() -> None:
    steps = [{"action": "http://svc/a", "compensate": "http://svc/c"}] * (MAX_STEPS + 1)
    assert bad_field({"gid": "big", "trans_type": "saga", "steps": steps}) == "steps"
    ok = parse({"gid": "big", "trans_type": "saga", "steps": steps[:MAX_STEPS]})
    assert len(ok.trans.branches) == 2 * MAX_STEPS


@pytest.mark.parametrize("raw", [b"", b"{not json", b"[1, 2]", b'"gid"'])
def test_malformed_body_is_a_bad_request(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse(raw)


# -- settings ----------------------------------------------------------------------------


def write_toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "coordinator.toml"
    path.write_text(text)
    return str(path)


def test_defaults_need_nothing_configured() -> None:
    s = Settings.load(env={})
    assert (s.server.host, s.server.port) == ("127.0.0.1", 36789)
    assert s.redis.url == ""
    assert s.redis.partitions == 63
    assert s.redis.key_prefix == "coord"
    assert s.engine.lease_seconds == 15.0
    assert s.engine.finished_ttl == 86_400
    d = s.engine.defaults()
    assert (d.retry_interval, d.timeout_to_fail, d.request_timeout) == (10, 35, 3)


def test_toml_file_sets_values(tmp_path: Path) -> None:
    path = write_toml(
        tmp_path,
        '[server]\nport = 4000\nhost = "0.0.0.0"\n'
        '[redis]\nurl = "redis://db:6379/2"\npartitions = 8\n'
        "[engine]\nlease_seconds = 20.5\nretry_interval = 2\n",
    )
    s = Settings.load(config_file=path, env={})
    assert (s.server.host, s.server.port) == ("0.0.0.0", 4000)
    assert (s.redis.url, s.redis.partitions) == ("redis://db:6379/2", 8)
    assert s.engine.lease_seconds == 20.5
    assert s.engine.defaults().retry_interval == 2
    # The file may also be named by COORDINATOR_CONFIG.
    assert Settings.load(env={"COORDINATOR_CONFIG": path}).server.port == 4000


def test_env_vars_set_values() -> None:
    env = {
        "COORDINATOR_PORT": "4100",
        "COORDINATOR_REDIS_URL": "redis://env:6379/0",
        "COORDINATOR_ENGINE_LEASE_SECONDS": "9.5",
        "COORDINATOR_REDIS_PARTITIONS": "32",
        "COORDINATOR_UNRELATED": "ignored",
    }
    s = Settings.load(env=env)
    assert s.server.port == 4100
    assert s.redis.url == "redis://env:6379/0"
    assert s.engine.lease_seconds == 9.5
    assert s.redis.partitions == 32
    # The long form names every setting.
    assert Settings.load(env={"COORDINATOR_SERVER_PORT": "4200"}).server.port == 4200


def test_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\nport = 4000\n[redis]\nurl = "redis://file/0"\n')
    env = {"COORDINATOR_PORT": "5000"}
    assert Settings.load(config_file=path, env={}).server.port == 4000
    both = Settings.load(config_file=path, env=env)
    assert both.server.port == 5000
    assert both.redis.url == "redis://file/0"  # untouched by env: the file's value
    flags = Settings.load(config_file=path, env=env,
                          overrides={"server.port": 6000, "redis.url": None})
    assert flags.server.port == 6000
    assert flags.redis.url == "redis://file/0"  # an absent flag (None) changes nothing


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"COORDINATOR_PORT": "http"}, "server.port"),
        ({"COORDINATOR_PORT": "70000"}, "server.port"),
        ({"COORDINATOR_PORT": "0"}, "server.port"),
        ({"COORDINATOR_ENGINE_LEASE_SECONDS": "soon"}, "engine.lease_seconds"),
        ({"COORDINATOR_ENGINE_LEASE_SECONDS": "3"}, "engine.lease_seconds"),
        ({"COORDINATOR_REDIS_PARTITIONS": "0"}, "redis.partitions"),
        ({"COORDINATOR_REDIS_KEY_PREFIX": ""}, "redis.key_prefix"),
        ({"COORDINATOR_ENGINE_CONCURRENCY": "-1"}, "engine.concurrency"),
        ({"COORDINATOR_ENGINE_RETRY_INTERVAL": "1.5"}, "engine.retry_interval"),
    ],
)
def test_bad_env_value_names_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(SettingsError, match=setting.replace(".", r"\.")):
        Settings.load(env=env)


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        ('[server]\nport = "eighty"\n', "server.port"),
        ("[server]\nport = true\n", "server.port"),
        ("[server]\nport = 4000.5\n", "server.port"),
        ("[engine]\nlease_seconds = 0.5\n", "engine.lease_seconds"),
    ],
)
def test_bad_file_value_names_the_setting(tmp_path: Path, toml: str, setting: str) -> None:
    path = write_toml(tmp_path, toml)
    with pytest.raises(SettingsError, match=setting.replace(".", r"\.")):
        Settings.load(config_file=path, env={})


def test_unknown_settings_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"server\.prot"):
        Settings.load(config_file=write_toml(tmp_path, "[server]\nprot = 1\n"), env={})
    with pytest.raises(SettingsError, match=r"database\.url"):
        Settings.load(config_file=write_toml(tmp_path, '[database]\nurl = "x"\n'), env={})
    with pytest.raises(SettingsError, match="must be a table"):
        Settings.load(config_file=write_toml(tmp_path, "port = 1\n"), env={})
    with pytest.raises(SettingsError, match=r"engine\.speed"):
        Settings.load(env={}, overrides={"engine.speed": 3})


def test_unreadable_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read config file"):
        Settings.load(config_file=str(tmp_path / "missing.toml"), env={})
    with pytest.raises(SettingsError, match="cannot read config file"):
        Settings.load(config_file=write_toml(tmp_path, "[server\nport = 1\n"), env={})


@pytest.mark.parametrize("gid", ["order-1\n", "order-1\r\n", "\norder-1"])
def test_a_gid_with_a_line_break_is_refused(gid: str) -> None:
    # "$" in a pattern also matches before a final newline: such a gid used to pass,
    # then broke every gRPC metadata value and log line it went into.
    with pytest.raises(BadRequest):
        check_gid(gid)
    with pytest.raises(BadRequest):
        parse_trans(orjson.dumps({"gid": gid, "trans_type": "tcc"}), Status.PREPARED)


def test_a_branch_id_with_a_line_break_is_refused() -> None:
    body = {"gid": "g1", "trans_type": "tcc", "branch_id": "01\n", "confirm": "", "cancel": ""}
    with pytest.raises(BadRequest, match="branch_id"):
        parse_register(orjson.dumps(body))
    assert parse_register(orjson.dumps({**body, "branch_id": "01"})).branch_id == "01"
