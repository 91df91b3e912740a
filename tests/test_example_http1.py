"""The flash-sale example's HTTP front reads a request target as urlsplit and parse_qsl
do, its shortcut for plain targets included."""

from __future__ import annotations

import urllib.parse

from hypothesis import given
from hypothesis import strategies as st

from examples.http1 import _target

TARGET_TEXT = st.lists(st.sampled_from([*"ab=&?/x1_.-~%+#;:{}é\t", "%7B", "%zz"]),
                       max_size=20).map("".join)


def long_way(target: str) -> tuple[str, dict[str, str]]:
    split = urllib.parse.urlsplit(target)
    return split.path, dict(urllib.parse.parse_qsl(split.query))


@given(st.sampled_from(["/", "//", ""]), TARGET_TEXT)
def test_target_is_urlsplit_and_parse_qsl(start: str, rest: str) -> None:
    assert _target(start + rest) == long_way(start + rest)


def test_target_common_cases() -> None:
    for target in ("/order?gid=%7B3%7Dabc&trans_type=msg&branch_id=01&op=action",
                   "/buy?user=u17", "/state", "/buy?user=", "/buy?user=a+b&x", "/a?b=1#f"):
        assert _target(target) == long_way(target), target
