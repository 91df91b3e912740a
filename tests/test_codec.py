"""The codec's shortcuts make exactly what the plain ways make."""

from __future__ import annotations

import dataclasses
from dataclasses import replace

import orjson
import pytest

from coordinator.model import Branch, BranchStatus, Op, Options, Status, Trans
from coordinator.store.codec import (
    CorruptRecord,
    branch_from_json,
    options_from_json,
    options_to_json,
    split_hash,
    trans_field_pairs,
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


# -- layout 5: the spec -------------------------------------------------------------------------

MADE = Trans(
    gid="g-5", trans_type="msg", status=Status.SUBMITTED,
    steps=({"action": "http://x/a"}, {"action": "http://x/b"}), payloads=("{}", "[1]"),
    branches=(Branch("01", Op.ACTION, "http://x/a"), Branch("02", Op.ACTION, "http://x/b")),
    custom_data='{"delay":3}', query_prepared="http://x/qp", rollback_reason="why",
    options=Options(wait_result=True, retry_interval=7), ext_headers={"traceparent": "t"},
    next_cron_interval=7, fingerprint="fp",
)


def _stored(trans: Trans, **more: str) -> dict[str, str]:
    """The hash a create of `trans` leaves at 1764557000000 (as lib_create.lua writes it)."""
    pairs = [x.decode() if isinstance(x, bytes) else x for x in trans_field_pairs(trans)]
    fields = dict(zip(pairs[0::2], pairs[1::2], strict=True))
    return {"gid": trans.gid, "status": trans.status, "create_time": "1764557000000",
            "next_cron_time": "1764557007000",
            "created_member": f"1764557000000:{trans.gid}", **fields, **more}


def test_what_a_create_stores_reads_back_as_it_was() -> None:
    read = trans_from_pairs(_flat(_stored(MADE)))
    at = 1764557000000
    assert read == replace(
        MADE, create_time=at, update_time=at, next_cron_time=at + 7000,
        branches=tuple(replace(b, seq=i, create_time=at, update_time=at)
                       for i, b in enumerate(MADE.branches, 1)))
    assert all(b.in_spec for b in read.branches)
    assert {f.name for f in dataclasses.fields(Trans)} <= set(vars(read))
    for b in read.branches:
        assert {f.name for f in dataclasses.fields(Branch)} <= set(vars(b))


def test_a_state_record_changes_only_its_branch_and_a_later_field_wins() -> None:
    read = trans_from_pairs(_flat(_stored(
        MADE, fingerprint="fp-submit", next_cron_interval="0", update_time="1764557000009",
        **{"branch:02:action": '{"status":"succeed","update_time":"1764557000009",'
                               '"finish_time":"1764557000009"}',
           "branch:07:action": '{"status":"failed","update_time":"1"}'})))
    assert (read.fingerprint, read.next_cron_interval) == ("fp-submit", 0)
    assert [(b.key, b.status, b.update_time, b.finish_time) for b in read.branches] == [
        ("01:action", BranchStatus.PREPARED, 1764557000000, 0),
        ("02:action", BranchStatus.SUCCEED, 1764557000009, 1764557000009)]


def test_a_record_of_its_own_takes_the_place_of_its_spec_branch() -> None:
    whole = ('{"branch_id":"01","op":"action","url":"http://y/a","status":"failed",'
             '"seq":9,"create_time":"5"}')
    read = trans_from_pairs(_flat(_stored(MADE, **{"branch:01:action": whole})))
    assert [(b.key, b.url, b.status, b.in_spec) for b in read.branches] == [
        ("01:action", "http://y/a", BranchStatus.FAILED, False),
        ("02:action", "http://x/b", BranchStatus.PREPARED, True)]


@pytest.mark.parametrize("spec", ["[1, 2]", '{"trans_type":"msg"', "not json"])
def test_a_spec_that_cannot_be_read_makes_the_record_unreadable(spec: str) -> None:
    with pytest.raises(CorruptRecord, match="'g-5' cannot be read"):
        trans_from_pairs(_flat(_stored(MADE, spec=spec)))


def test_the_specs_usual_options_are_shared() -> None:
    first, again = (trans_from_pairs(_flat(_stored(MADE))) for _ in range(2))
    assert first.options is again.options
    headers = replace(MADE, options=Options(branch_headers={"a": "b"}))
    assert trans_from_pairs(_flat(_stored(headers))).options == Options(branch_headers={"a": "b"})
