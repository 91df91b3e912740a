"""The codec's shortcuts make exactly what the plain ways make."""

from __future__ import annotations

import dataclasses

import orjson
import pytest

from coordinator.model import Branch, BranchStatus, Op, Options, Status, Trans
from coordinator.store.codec import (
    CorruptRecord,
    branch_from_json,
    options_from_json,
    options_to_json,
    split_hash,
    trans_from_hash,
    trans_from_pairs,
)

RECORD = {
    "gid": "g-1", "status": "submitted", "trans_type": "saga", "protocol": "http",
    "options": '{"wait_result":true,"retry_limit":3,"branch_headers":{"a":"b"}}',
    "steps": '[{"action":"http://x/a","compensate":"http://x/c"}]',
    "payloads": '["{}"]', "ext": '{"headers":{"x-t":"1"}}', "custom_data": "cd",
    "create_time": "1764557000000", "update_time": "1764557000001",
    "next_cron_interval": "0", "next_cron_time": "1764557000002", "owner": "w:1",
    "lease_until": "1764557030000", "retry_count": "2", "fingerprint": "f",
    "branch:01:compensate": '{"branch_id":"01","op":"compensate","url":"http://x/c",'
                            '"status":"prepared","seq":2,"create_time":"1764557000000"}',
    "branch:01:action": '{"branch_id":"01","op":"action","url":"http://x/a",'
                        '"status":"succeed","seq":1,"create_time":"1764557000000",'
                        '"update_time":"1764557000003","finish_time":"1764557000003"}',
}


def _flat(record: dict[str, str]) -> list[str]:
    return [text for pair in record.items() for text in pair]


def test_decoded_records_are_those_their_constructors_make() -> None:
    trans = trans_from_pairs(_flat(RECORD))
    made = Trans(
        gid="g-1", trans_type="saga", status=Status.SUBMITTED,
        steps=({"action": "http://x/a", "compensate": "http://x/c"},), payloads=("{}",),
        branches=(
            Branch("01", Op.ACTION, "http://x/a", BranchStatus.SUCCEED, seq=1,
                   create_time=1764557000000, update_time=1764557000003,
                   finish_time=1764557000003),
            Branch("01", Op.COMPENSATE, "http://x/c", seq=2, create_time=1764557000000),
        ),
        custom_data="cd", options=Options(wait_result=True, retry_limit=3,
                                          branch_headers={"a": "b"}),
        ext_headers={"x-t": "1"}, create_time=1764557000000, update_time=1764557000001,
        next_cron_time=1764557000002, retry_count=2, owner="w:1", fingerprint="f",
    )
    assert trans == made
    # Every field is in the instance, as __init__ puts it there (evolve copies them).
    assert vars(trans) == vars(made)
    for got, want in zip(trans.branches, made.branches, strict=True):
        assert vars(got) == vars(want)
        assert {f.name for f in dataclasses.fields(Branch)} <= set(vars(got))
    assert {f.name for f in dataclasses.fields(Trans)} <= set(vars(trans))


def test_one_pass_decoding_agrees_with_the_split_hash() -> None:
    assert trans_from_pairs(_flat(RECORD)) == trans_from_hash(*split_hash(RECORD))
    as_bytes = [text.encode() for text in _flat(RECORD)]
    assert trans_from_pairs(as_bytes) == trans_from_hash(*split_hash(RECORD))


@pytest.mark.parametrize(("field", "value", "detail"), [
    ("status", "bogus", "ValueError: 'bogus' is not a valid Status"),
    ("branch:01:action", '{"branch_id":"01","op":"nope"}', "ValueError: 'nope' is not a valid Op"),
    ("branch:01:action", '{"branch_id":"01","op":["x"]}', "ValueError: ['x'] is not a valid Op"),
    ("branch:01:action", '{"branch_id":"01","op":"action","status":"odd"}',
     "ValueError: 'odd' is not a valid BranchStatus"),
])
def test_unknown_enum_values_fail_as_the_enum_does(field: str, value: str, detail: str) -> None:
    with pytest.raises(CorruptRecord) as caught:
        trans_from_pairs(_flat({**RECORD, field: value}))
    assert str(caught.value) == f"transaction 'g-1' cannot be read: {detail}"
    assert "branch:01:action" not in caught.value.fields


def test_shared_options_equal_fresh_ones() -> None:
    raw = options_to_json(Options(wait_result=True, branch_headers={"k": "v"}))
    assert orjson.loads(raw) == {"wait_result": True, "branch_headers": {"k": "v"}}
    first, again = options_from_json(raw), options_from_json(raw)
    assert first == again == Options(wait_result=True, branch_headers={"k": "v"})
    for garbage in ("", "[]", "{not json"):
        assert options_from_json(garbage) == Options()


def test_a_branch_record_without_optional_fields() -> None:
    branch = branch_from_json('{"branch_id":"02","op":"msg"}')
    assert vars(branch) == vars(Branch("02", Op.MSG, ""))
