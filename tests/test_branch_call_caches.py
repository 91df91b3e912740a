"""The shortcuts of the branch-call path answer exactly as the long way does: the query
string as urlencode writes it, cached targets and URL verdicts as a fresh parse gives
them, and the caches stay bounded."""

from __future__ import annotations

import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coordinator.engine.caller import branch_query
from coordinator.engine.http1 import Target
from coordinator.errors import BadRequest
from coordinator.model import Branch, Op, Status, Trans
from coordinator.urls import MAX_CACHED_URL, UrlCache, UrlPolicy

# Anything a stored record could hold, escapes, spaces, "+", "&", "=", "%" and
# non-ASCII included (check_gid keeps new gids printable ASCII, old records need not be).
ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
URL_TEXT = st.sampled_from(["", "a", "Ab3_-.~z", "a b", "a+b", "x&y=z", "100%", "é", "/?#"])


def query_of(gid: str, trans_type: str, branch_id: str, op: Op, wire_op: str) -> tuple[str, str]:
    trans = Trans(gid=gid, trans_type=trans_type, status=Status.SUBMITTED)
    branch = Branch(branch_id, op, "http://h/x", wire_op=wire_op)
    expected = urllib.parse.urlencode({"gid": gid, "trans_type": trans_type,
                                       "branch_id": branch_id, "op": branch.op_name})
    return branch_query(trans, branch), expected


@given(ANY_TEXT | URL_TEXT, ANY_TEXT | URL_TEXT, ANY_TEXT | URL_TEXT,
       st.sampled_from(list(Op)), ANY_TEXT | URL_TEXT)
def test_branch_query_is_urlencode(gid: str, trans_type: str, branch_id: str, op: Op,
                                   wire_op: str) -> None:
    got, expected = query_of(gid, trans_type, branch_id, op, wire_op)
    assert got == expected


def test_branch_query_common_cases() -> None:
    for gid in ("Ab3kdfjK39dkfjKDJ3kd0a", "g-1.2_3~", "a b+c", "x&y=z#1", "100%", "é/ü",
                "{3}0af9", "{12}", "{}x", "{3}a b", "{x}1", "{3}{4}", "{٣}1"):
        got, expected = query_of(gid, "saga", "01", Op.ACTION, "")
        assert got == expected, gid


def test_url_cache_is_bounded() -> None:
    cache: UrlCache[int] = UrlCache(size=3)
    for i in range(5):
        cache.put(f"http://h/{i}", i)
    assert len(cache) == 3
    assert cache.get("http://h/0") is None
    assert cache.get("http://h/4") == 4
    long_url = "http://h/" + "x" * MAX_CACHED_URL
    cache.put(long_url, 9)
    assert cache.get(long_url) is None


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:8081/api/busi/TransOut",
    "http://h/a b?x=1 2&y=é",
    "http://[::1]:9000/p",
    "http://h",
    "http://h/" + "x" * (MAX_CACHED_URL + 10),
])
def test_cached_target_is_the_parsed_one(url: str) -> None:
    first = Target.parse(url)
    assert Target.parse(url) == first == Target._parse(url)


def test_bad_target_still_raises_each_time() -> None:
    for _ in range(2):
        with pytest.raises(ValueError, match="not a plain http URL"):
            Target.parse("https://h/x")


def test_url_verdicts_are_remembered_only_for_passing_urls() -> None:
    policy = UrlPolicy(["127.0.0.1:8081"])
    good, bad = "http://127.0.0.1:8081/a", "http://127.0.0.1:6379/a"
    for _ in range(2):
        policy.check(good, "f")
        assert policy.allows(good, "http")
        assert policy.allows(good, "grpc")
        with pytest.raises(BadRequest, match=r"steps\[3\]\.action: host"):
            policy.check(bad, "steps[3].action")
        assert not policy.allows(bad, "http")
    # A verdict is per protocol: a gRPC target is no URL for an http transaction.
    target = "127.0.0.1:8081/pkg.Svc/Method"
    policy.check(target, "f", "grpc")
    with pytest.raises(BadRequest):
        policy.check(target, "f", "http")
    # Too long is refused every time, never remembered.
    with pytest.raises(BadRequest, match="longer"):
        policy.check("http://127.0.0.1:8081/" + "x" * 9000, "f")
