"""Calls branch URLs over one shared keep-alive session and classifies the answer."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable

import aiohttp
import orjson
import yarl

from coordinator.engine.grpc_caller import GrpcBranchCaller
from coordinator.engine.http1 import Http1Error, Http1Pool
from coordinator.machines.base import SUCCESS, Outcome, OutcomeKind
from coordinator.model import Branch, Trans

_MAX_MESSAGE = 300
# What quote_plus leaves as it is (urllib's always-safe set): such a value goes into
# the query string unchanged, and gids, branch ids, types and ops nearly always are.
_URL_SAFE = re.compile(r"[0-9A-Za-z_.~-]*")
# A gid that names its partition ("{3}..."): only the braces need escaping.
_TAGGED = re.compile(r"\{([0-9]*)\}([0-9A-Za-z_.~-]*)")
_JSON_HEADERS = {"Content-Type": "application/json"}


def _quoted(value: str) -> str:
    if _URL_SAFE.fullmatch(value):
        return value
    tagged = _TAGGED.fullmatch(value)
    if tagged is not None:
        return f"%7B{tagged[1]}%7D{tagged[2]}"
    return urllib.parse.quote_plus(value)


def branch_query(trans: Trans, branch: Branch) -> str:
    """The query string of a branch call, byte for byte what `urllib.parse.urlencode`
    makes of the four fields, at a quarter of its cost."""
    # All but the gid come from a few values (saga, 01, action…): kept once made.
    key = (trans.trans_type, branch.branch_id, branch.op_name)
    rest = _QUERY_RESTS.get(key)
    if rest is None:
        rest = (f"&trans_type={_quoted(key[0])}&branch_id={_quoted(key[1])}"
                f"&op={_quoted(key[2])}")
        if len(_QUERY_RESTS) >= 4096:  # many-step sagas or odd branch ids: start over
            _QUERY_RESTS.clear()
        _QUERY_RESTS[key] = rest
    return f"gid={_quoted(trans.gid)}{rest}"


_QUERY_RESTS: dict[tuple[str, str, str], str] = {}


class BranchCaller:
    """dtm's branch protocol over HTTP.

    POST when there is a body (always for xa), else GET; query gid, trans_type,
    branch_id and op; 200 is success, 409 or FAILURE in the body is failure, 425 or
    ONGOING in the body is ongoing, anything else (or no answer) is an error.
    """

    def __init__(
        self, session: aiohttp.ClientSession, default_timeout: float,
        pool: Http1Pool | None = None, grpc: GrpcBranchCaller | None = None,
        may_call: Callable[[str, str], bool] | None = None,
    ) -> None:
        self.session = session
        self.default_timeout = default_timeout
        # Plain-http calls go through the lean keep-alive client; https through aiohttp.
        self.pool = pool
        # Branches of transactions with protocol grpc whose URL is not http(s)://.
        self.grpc = grpc
        # (url, protocol) → may it be called; URLs are checked at submit, this catches
        # ones stored before the allowlist was narrowed.
        self.may_call = may_call

    async def call(self, trans: Trans, branch: Branch) -> Outcome:
        if not branch.url:
            return SUCCESS
        if self.may_call is not None and not self.may_call(branch.url, trans.protocol):
            return Outcome(OutcomeKind.ERROR, "URL outside engine.allowed_branch_hosts; not called")
        if not branch.url.startswith(("http://", "https://")):
            if trans.protocol == "grpc" and self.grpc is not None:
                # The bytes go out exactly as they were stored (raw for gRPC submits).
                return await self.grpc.call(trans, branch, trans.payload_bytes(branch))
            return Outcome(OutcomeKind.ERROR, f"unsupported branch URL {branch.url!r}")
        if trans.protocol == "json-rpc" and "method=" in branch.url:
            return await self._call_json_rpc(trans, branch, trans.payload_of(branch))
        # The exact bytes: a gRPC-submitted transaction keeps its raw payload bytes.
        raw_body = trans.payload_bytes(branch)
        method = "POST" if raw_body or trans.trans_type == "xa" else "GET"
        extra = trans.options.branch_headers
        if trans.ext_headers or extra:
            headers = {"Content-Type": "application/json", **trans.ext_headers, **extra}
        else:
            headers = _JSON_HEADERS  # the common case: only read, never changed
        seconds = trans.options.request_timeout or self.default_timeout
        if self.pool is not None and branch.url.startswith("http://"):
            try:
                status, raw = await self.pool.request(
                    method, branch.url, branch_query(trans, branch), headers, raw_body,
                    seconds,
                )
            except (Http1Error, TimeoutError, ValueError, OSError) as exc:
                kind = "TimeoutError" if isinstance(exc, TimeoutError) else type(exc).__name__
                return Outcome(OutcomeKind.ERROR, f"{kind}: {exc}"[:_MAX_MESSAGE])
            return classify(status, raw.decode(errors="replace"))
        params = {
            "gid": trans.gid,
            "trans_type": trans.trans_type,
            "branch_id": branch.branch_id,
            "op": branch.op_name,
        }
        timeout = aiohttp.ClientTimeout(total=seconds)
        try:
            async with self.session.request(
                method,
                branch.url,
                params=params,
                data=raw_body if raw_body else None,
                headers=headers,
                timeout=timeout,
                # A redirect is an answer (an error), never followed: following it could
                # reach a host outside engine.allowed_branch_hosts, and count the other
                # host's 200 as this branch's success. The http:// pool does the same.
                allow_redirects=False,
            ) as resp:
                text = await resp.text(errors="replace")
                return classify(resp.status, text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Outcome(OutcomeKind.ERROR, f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE])


    async def _call_json_rpc(self, trans: Trans, branch: Branch, body: str) -> Outcome:
        """A branch that speaks JSON-RPC: the method comes from the URL's query string."""
        url = yarl.URL(branch.url)
        try:
            params = orjson.loads(body) if body else {}
        except orjson.JSONDecodeError:
            params = {}
        if not isinstance(params, dict):
            params = {"data": params}
        params.update(gid=trans.gid, trans_type=trans.trans_type,
                      branch_id=branch.branch_id, op=branch.op_name)
        request = {"jsonrpc": "2.0", "method": url.query.get("method", ""),
                   "params": params, "id": f"{trans.gid}-{branch.key}"}
        headers = {"Content-Type": "application/json", **trans.ext_headers,
                   **trans.options.branch_headers}
        timeout = aiohttp.ClientTimeout(
            total=trans.options.request_timeout or self.default_timeout
        )
        try:
            async with self.session.post(
                branch.url, data=orjson.dumps(request), headers=headers, timeout=timeout,
                allow_redirects=False,
            ) as resp:
                text = await resp.text(errors="replace")
                outcome = classify(resp.status, text)
                if outcome.kind is not OutcomeKind.SUCCESS:
                    return outcome
                reply = orjson.loads(text) if text else {}
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return Outcome(OutcomeKind.ERROR, f"{type(exc).__name__}: {exc}"[:_MAX_MESSAGE])
        error = reply.get("error") if isinstance(reply, dict) else None
        if not error:
            return SUCCESS
        code = error.get("code") if isinstance(error, dict) else None
        message = str(error)[:_MAX_MESSAGE]
        if code == JSON_RPC_FAILURE:
            return Outcome(OutcomeKind.FAILURE, message)
        if code == JSON_RPC_ONGOING:
            return Outcome(OutcomeKind.ONGOING, message)
        return Outcome(OutcomeKind.ERROR, message)


JSON_RPC_FAILURE = -32901
JSON_RPC_ONGOING = -32902


def classify(status: int, text: str) -> Outcome:
    if status == 425 or "ONGOING" in text:
        return Outcome(OutcomeKind.ONGOING, text[:_MAX_MESSAGE], status)
    if status == 409 or "FAILURE" in text:
        return Outcome(OutcomeKind.FAILURE, text[:_MAX_MESSAGE], status)
    if status == 200:
        return SUCCESS
    return Outcome(OutcomeKind.ERROR, f"HTTP {status}: {text[:_MAX_MESSAGE]}", status)
