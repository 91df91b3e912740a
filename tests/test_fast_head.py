"""fast.parse_head reads every head as the per-line parser before it did: the same
heads refused, the same fields read from the others."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.api.fast import Request, parse_head
from coordinator.api.routes import BODY_ROUTES, BodyHandler
from coordinator.ops.metrics import api_label

ROUTES: dict[bytes, tuple[BodyHandler, str, str]] = {
    path.encode(): (handler, access, api_label(path))
    for path, (handler, access) in BODY_ROUTES.items()
}
MAX_BODY = 1000

# The head syntax as the parser before checked it: one match for the request line, one
# per field line.
_REQUEST_LINE = re.compile(rb"POST (/[!-~]*) HTTP/1\.1")
_FIELD = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[!-~\x80-\xff]|[ \t]+[!-~\x80-\xff])*)[ \t]*"
)


def canonical(head: bytes) -> bytes | None:
    """The head with each field as `name: value` (what the per-line matches took out
    of it), or None if those matches refused it."""
    lines = head.split(b"\r\n")
    line = _REQUEST_LINE.fullmatch(lines[0])
    if line is None:
        return None
    out = [b"POST " + line.group(1) + b" HTTP/1.1"]
    for raw in lines[1:]:
        field = _FIELD.fullmatch(raw)
        if field is None:
            return None
        out.append(field.group(1) + b": " + field.group(2))
    return b"\r\n".join(out)


def fields_of(req: Request | None) -> dict[str, object] | None:
    return None if req is None else {k: getattr(req, k) for k in Request.__slots__}


def same(head: bytes) -> None:
    """Refused where the per-line matches refused it; else read as its canonical form."""
    plain = canonical(head)
    got = fields_of(parse_head(head, ROUTES, MAX_BODY))
    if plain is None:
        assert got is None, head
    else:
        assert got == fields_of(parse_head(plain, ROUTES, MAX_BODY)), head


NAMES = st.sampled_from([b"Host", b"Content-Length", b"content-length", b"Authorization",
                         b"Connection", b"Content-Encoding", b"Transfer-Encoding", b"Expect",
                         b"Upgrade", b"X-A", b"Bad Name", b"", b"A:B", b"\xe9"])
VALUES = st.lists(st.sampled_from([b"", b" ", b"\t", b"12", b"0", b"1001", b"x", b"close",
                                   b"Keep-Alive, Close", b"identity", b"gzip", b"Bearer t",
                                   b"\xe9", b"\x00", b"\r", b"\n", b":", b"1 2",
                                   b"0123456789012"]), max_size=4).map(b"".join)
LINES = st.one_of(st.tuples(NAMES, st.sampled_from([b":", b": ", b":\t", b" :"]), VALUES)
                  .map(b"".join), st.binary(max_size=12))
FIRST = st.sampled_from([b"POST /api/dtmsvr/submit HTTP/1.1",
                         b"POST /api/dtmsvr/abort?x=1 HTTP/1.1",
                         b"POST /api/dtmsvr/nope HTTP/1.1", b"GET /api/dtmsvr/submit HTTP/1.1",
                         b"POST /api/dtmsvr/submit HTTP/1.0", b"POST /api/dtmsvr/submit  HTTP/1.1"])


@settings(max_examples=1500)
@given(FIRST, st.lists(LINES, max_size=5), st.sampled_from([b"\r\n", b"\n", b"\r"]))
def test_head_parsing_is_unchanged(first: bytes, lines: list[bytes], sep: bytes) -> None:
    same(sep.join([first, *lines]))


def test_common_heads() -> None:
    base = b"POST /api/dtmsvr/submit HTTP/1.1\r\nHost: h:1\r\nContent-Type: application/json"
    for extra in (b"Content-Length: 160", b"Content-Length:  160 \t", b"Content-Length: 1 60",
                  b"Content-Length: 160\r\nContent-Length: 160", b"Connection: close",
                  b"Authorization: Bearer  a b ", b"X-Folded: a\r\n b", b"Content-Length: 2000",
                  b"Content-Encoding: identity", b"Content-Encoding: gzip", b"X-E: \xe9t\xe9"):
        same(base + b"\r\n" + extra)
    same(b"POST /api/dtmsvr/submit HTTP/1.1")
    req = parse_head(base + b"\r\nContent-Length:  160 \t\r\nAuthorization: Bearer a b",
                     ROUTES, MAX_BODY)
    assert req is not None
    assert (req.length, req.authorization, req.close) == (160, "Bearer a b", False)
