"""Workflow mode: an async function is the transaction; the coordinator records its steps.

A workflow is ordinary Python code run by the client. Each step's outcome is recorded
with the coordinator (``registerBranch``) as it happens, so the same function, run again
for the same gid, *replays* the finished steps from their records instead of repeating
them and carries on where it stopped. The coordinator only steps in when a workflow is
left unfinished past its ``timeout_to_fail``: it POSTs the workflow's input to the
recovery URL, whose handler (`WorkflowRegistry.recovery_handler`) runs it again.

    workflows = WorkflowRegistry(dtm, "http://orders:8080/workflow/resume")

    @workflows.register("transfer", options=TransOptions(timeout_to_fail=30))
    async def transfer(wf: Workflow, data: bytes) -> bytes:
        req = orjson.loads(data)
        await wf.step(lambda bb: debit(bb, req), compensate=lambda bb: refund(bb, req))
        receipt = await wf.step(lambda bb: credit(bb, req),
                                compensate=lambda bb: uncredit(bb, req))
        return receipt                     # recorded as the workflow's result

    app.router.add_post("/workflow/resume", workflows.recovery_handler())
    receipt = await workflows.execute("transfer", gid, orjson.dumps({"amount": 30}))

How an execution ends:

* the function returns: every ``commit`` callback runs (last step first), then the
  workflow is submitted as ``succeed`` with the returned bytes as its result;
* the function raises `TransactionFailed` (a step's business said no, or the function
  decided so): the ``compensate`` callbacks of the steps that succeeded run, last step
  first, then the workflow is submitted as ``failed`` with the message as its
  rollback reason, and the `TransactionFailed` reaches the caller;
* anything else (a crash, a cancellation, the coordinator unreachable, TransactionOngoing)
  submits nothing: the workflow stays prepared and is finished later, by another
  ``execute`` of the same gid or by the coordinator's recovery call.

Determinism: a replay must ask for the same steps in the same order, because a step is
known by its position (branch ids ``01``, ``02``…, at most 99 per workflow). Branch
on step results, never on the clock or randomness outside a step.

Delivery: a step is recorded after its action returns, so a crash (or a lost
``registerBranch``) in between runs the action again on resume: at least once, like a
saga branch; use the step's barrier for exactly-once effects. One registry runs a gid
once at a time (its recovery handler answers ONGOING meanwhile), but executions of one
gid in two processes are not fenced: keep ``timeout_to_fail`` above a workflow's
normal duration so the recovery call does not start a second copy elsewhere.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, overload

import orjson
from aiohttp import web

from coordinator.client.barrier import BranchBarrier
from coordinator.client.base import BranchIds
from coordinator.client.errors import DtmError, TransactionFailed, TransactionOngoing
from coordinator.client.http import DtmClient, borrow
from coordinator.client.options import TransOptions
from coordinator.client.participant import (
    Handler,
    ongoing_response,
    response_for,
    success_response,
)

__all__ = [
    "Compensation",
    "StepAction",
    "Workflow",
    "WorkflowError",
    "WorkflowFunction",
    "WorkflowRegistry",
]

log = logging.getLogger("coordinator.client.workflow")

TRANS_TYPE: Final = "workflow"
OP_ACTION: Final = "action"
OP_COMPENSATE: Final = "compensate"
OP_COMMIT: Final = "commit"
SUCCEED: Final = "succeed"
FAILED: Final = "failed"
_MAX_REASON = 1000

StepResult = bytes | bytearray | str | None
StepAction = Callable[[BranchBarrier], Awaitable[StepResult]]
"""A step's forward work. It gets the step's barrier (gid, branch id, op ``action``) so
it can make its effects exactly-once with a `SqlBarrier` or send the ids on to a
participant. It returns the step's result (UTF-8 text or bytes; ``None`` is empty), or
raises `TransactionFailed` when the business says no."""

Compensation = Callable[[BranchBarrier], Awaitable[object]]
"""A phase-2 callback (undo on failure, or commit on success). Its barrier carries op
``compensate`` or ``commit``, so the barrier detects a compensation of an action that
never committed. It must eventually succeed: any exception leaves the workflow
unfinished, and the callback is run again on the next execution."""

WorkflowFunction = Callable[["Workflow", bytes], Awaitable[StepResult]]
"""``async def fn(wf, data) -> bytes | str | None``: the workflow's body."""

F = TypeVar("F", bound=WorkflowFunction)


class WorkflowError(DtmError):
    """The workflow cannot run as asked: its name is not registered, the gid belongs to
    another transaction, a compensation raised TransactionFailed, or the coordinator
    refused to record a step because the workflow was finished elsewhere meanwhile.

    Unlike `TransactionFailed` it says nothing about the business outcome."""


def _to_bytes(value: StepResult) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    raise TypeError(f"a workflow step or function must return bytes, str or None, "
                    f"not {type(value).__name__}")


def _b64decode(text: object) -> bytes:
    if not isinstance(text, str) or not text:
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise WorkflowError(f"the coordinator sent data that is not base64: {text[:80]!r}") \
            from None


@dataclass(frozen=True)
class _Record:
    """One recorded branch op, as ``prepareWorkflow`` returned it."""

    status: str
    data: bytes


@dataclass
class _Phase2:
    branch_id: str
    fn: Compensation


@dataclass(frozen=True)
class _Entry:
    fn: WorkflowFunction
    options: TransOptions | None


@dataclass
class _Running:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Workflow:
    """One execution of a registered workflow function; it is created by
    `WorkflowRegistry.execute` and handed to the function as its first argument.

    ``name``, ``gid`` and ``data`` (the workflow's input, as first recorded) are plain
    attributes; ``replayed`` counts the steps restored from records in this execution.
    """

    def __init__(
        self, client: DtmClient, name: str, gid: str, data: bytes,
        progress: Mapping[tuple[str, str], _Record],
    ) -> None:
        self.name = name
        self.gid = gid
        self.data = data
        self.replayed = 0
        self._client = client
        self._progress = dict(progress)
        self._ids = BranchIds()
        self._phase = OP_ACTION
        self._compensations: list[_Phase2] = []
        self._commits: list[_Phase2] = []

    async def step(
        self, action: StepAction, *, compensate: Compensation | None = None,
        commit: Compensation | None = None,
    ) -> bytes:
        """Run one step, or restore it if a previous execution recorded it.

        A step recorded as succeeded is not run again: its recorded result is returned.
        A step recorded as failed raises `TransactionFailed` with the recorded message
        again. Otherwise ``action`` runs and its outcome is recorded: the result (op
        ``action``, status ``succeed``), or, if it raised `TransactionFailed`, the message
        (status ``failed``) before the error propagates. Any other exception propagates
        unrecorded, so the step runs again on the next execution: make steps idempotent
        (the barrier helps).

        ``compensate`` is kept for steps that succeeded and runs if the workflow fails;
        ``commit`` runs if it succeeds. A step that failed is not compensated: its
        business said no, so there is nothing to undo.
        """
        if self._phase != OP_ACTION:
            raise RuntimeError("step() must not be called from a compensate or commit callback")
        branch_id = self._ids.next()
        recorded = self._progress.get((branch_id, OP_ACTION))
        if recorded is not None:
            self.replayed += 1
            if recorded.status == FAILED:
                raise TransactionFailed(recorded.data.decode(errors="replace"))
            self._keep_phase2(branch_id, compensate, commit)
            return recorded.data
        barrier = BranchBarrier(TRANS_TYPE, self.gid, branch_id, OP_ACTION)
        try:
            value = await action(barrier)
        except TransactionFailed as exc:
            await self._record(branch_id, OP_ACTION, FAILED, str(exc).encode())
            raise
        result = _to_bytes(value)
        await self._record(branch_id, OP_ACTION, SUCCEED, result)
        self._keep_phase2(branch_id, compensate, commit)
        return result

    def _keep_phase2(
        self, branch_id: str, compensate: Compensation | None, commit: Compensation | None
    ) -> None:
        if compensate is not None:
            self._compensations.append(_Phase2(branch_id, compensate))
        if commit is not None:
            self._commits.append(_Phase2(branch_id, commit))

    async def _record(self, branch_id: str, op: str, status: str, data: bytes) -> None:
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise ValueError(
                f"step {branch_id} of workflow {self.gid}: the coordinator keeps step results "
                "as text; return UTF-8 (or base64-encode binary data)"
            ) from None
        try:
            await self._client.post("registerBranch", {
                "gid": self.gid, "trans_type": TRANS_TYPE, "branch_id": branch_id,
                "op": op, "status": status, "data": text,
            })
        except TransactionFailed as exc:
            # Not a business "no": the workflow is no longer prepared (finished by another
            # execution, or force-stopped). Nothing may be compensated or submitted here.
            raise WorkflowError(
                f"workflow {self.gid}: the coordinator refused to record {branch_id}/{op}: {exc}"
            ) from exc

    async def _phase2(self, op: str, items: list[_Phase2]) -> None:
        """Run phase-2 callbacks, last step first, skipping those already recorded."""
        self._phase = op
        for item in sorted(items, key=lambda i: i.branch_id, reverse=True):
            recorded = self._progress.get((item.branch_id, op))
            if recorded is not None and recorded.status == SUCCEED:
                continue
            try:
                await item.fn(BranchBarrier(TRANS_TYPE, self.gid, item.branch_id, op))
            except TransactionFailed as exc:
                raise WorkflowError(
                    f"workflow {self.gid}: the {op} callback of step {item.branch_id} raised "
                    f"TransactionFailed ({exc}); phase-2 callbacks must not fail, it is "
                    "retried on the next execution"
                ) from exc
            await self._record(item.branch_id, op, SUCCEED, b"")

    async def _run(self, fn: WorkflowFunction) -> bytes:
        try:
            result = _to_bytes(await fn(self, self.data))
        except TransactionFailed as exc:
            reason = (str(exc) or f"workflow {self.gid} failed")[:_MAX_REASON]
            await self._phase2(OP_COMPENSATE, self._compensations)
            final = await self._submit(FAILED, reason=reason)
            if final is not None:
                return final  # another execution had already finished it as succeeded
            raise
        await self._phase2(OP_COMMIT, self._commits)
        final = await self._submit(SUCCEED, result=result)
        return result if final is None else final

    async def _submit(self, status: str, *, reason: str = "", result: bytes = b"") -> bytes | None:
        """Finish the workflow; None, or the recorded result if it had already succeeded.

        If the coordinator refuses because the workflow is finished already (a
        concurrent execution, or forceStop), the recorded outcome wins.
        """
        extra = {"status": status, "rollback_reason": reason,
                 "result": base64.b64encode(result).decode()}
        try:
            await self._client.post(
                "submit", {"gid": self.gid, "trans_type": TRANS_TYPE, "req_extra": extra}
            )
        except TransactionFailed:
            reply = await self._client.query(self.gid)
            trans = reply.get("transaction")
            if not isinstance(trans, dict):
                raise WorkflowError(f"workflow {self.gid} vanished before its submit") from None
            return _settled(trans)
        return None


def _settled(trans: Mapping[str, Any]) -> bytes:
    """The outcome of a finished workflow: its result, or TransactionFailed."""
    status = trans.get("status")
    if status == SUCCEED:
        return _b64decode(trans.get("result"))
    if status == FAILED:
        gid = trans.get("gid", "")
        raise TransactionFailed(str(trans.get("rollback_reason") or f"workflow {gid} failed"))
    raise WorkflowError(f"workflow {trans.get('gid', '')} has status {status!r}")


def _progress(reply: Mapping[str, Any]) -> dict[tuple[str, str], _Record]:
    """Branch records that count: those that finished (``prepared`` is not an outcome)."""
    out: dict[tuple[str, str], _Record] = {}
    for item in reply.get("progresses") or []:
        if not isinstance(item, dict):
            continue
        status = item.get("status")
        if status in (SUCCEED, FAILED):
            key = (str(item.get("branch_id", "")), str(item.get("op", "")))
            out[key] = _Record(str(status), _b64decode(item.get("bin_data")))
    return out


class WorkflowRegistry:
    """Named workflow functions of one application, and the calls that run them.

    ``dtm`` is a `DtmClient` or the coordinator's URL. ``recovery_url`` is where the
    coordinator reaches `recovery_handler` (sent as the workflow's ``query_prepared``;
    it may be set later, before the first `execute`). ``options`` are the default
    `TransOptions` of every workflow; ``timeout_to_fail`` is how long a workflow may stay
    unfinished before the coordinator calls the recovery URL (its default otherwise),
    ``retry_interval`` how often that call repeats until the workflow is finished.
    """

    def __init__(
        self, dtm: str | DtmClient, recovery_url: str = "", *,
        options: TransOptions | None = None,
    ) -> None:
        self.dtm = dtm
        self.recovery_url = recovery_url
        self.options = options or TransOptions()
        self._entries: dict[str, _Entry] = {}
        self._running: dict[str, _Running] = {}

    @overload
    def register(self, name: str, fn: F, *, options: TransOptions | None = None) -> F: ...

    @overload
    def register(
        self, name: str, fn: None = None, *, options: TransOptions | None = None
    ) -> Callable[[F], F]: ...

    def register(
        self, name: str, fn: F | None = None, *, options: TransOptions | None = None
    ) -> F | Callable[[F], F]:
        """Register ``fn`` under ``name`` (also usable as ``@registry.register(name)``).

        ``options`` replace the registry's default options for this workflow. A name can
        be registered once: the recovery call finds the function by it.
        """
        if not name:
            raise ValueError("a workflow needs a name")

        def add(func: F) -> F:
            if name in self._entries:
                raise ValueError(f"a workflow named {name!r} is already registered")
            self._entries[name] = _Entry(func, options)
            return func

        return add if fn is None else add(fn)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def is_running(self, gid: str) -> bool:
        """Whether this registry is executing ``gid`` right now."""
        return gid in self._running

    @contextlib.asynccontextmanager
    async def _exclusive(self, gid: str) -> AsyncIterator[None]:
        """One execution of a gid at a time in this process; later ones wait, then
        replay what the first one recorded."""
        running = self._running.setdefault(gid, _Running())
        running.users += 1
        try:
            async with running.lock:
                yield
        finally:
            running.users -= 1
            if not running.users:
                del self._running[gid]

    def _prepare_body(self, name: str, gid: str, data: bytes) -> dict[str, Any]:
        entry = self._entries[name]
        custom = {"name": name, "data": base64.b64encode(data).decode()}
        return {
            "gid": gid,
            "trans_type": TRANS_TYPE,
            "custom_data": orjson.dumps(custom).decode(),
            "query_prepared": self.recovery_url,
            **(entry.options or self.options).to_wire(),
        }

    async def execute(self, name: str, gid: str, data: bytes | str = b"") -> bytes:
        """Run workflow ``name`` as global transaction ``gid``, or resume it.

        A new gid is prepared with ``data`` as its input and the function runs from the
        start. For a gid that exists the input recorded first is used (``data`` is then
        ignored) and the recorded steps are replayed; a finished workflow is not run at
        all: its recorded result is returned, or its failure raised again.

        Returns the function's result. Raises `TransactionFailed` (with the rollback
        reason) if the workflow ended failed, `WorkflowError` for misuse, and lets any
        other exception of the function through, leaving the workflow to be resumed.
        """
        entry = self._entries.get(name)
        if entry is None:
            raise WorkflowError(f"no workflow named {name!r} is registered")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        async with self._exclusive(gid), borrow(self.dtm) as client:
            reply = await client.post("prepareWorkflow", self._prepare_body(name, gid, raw))
            trans = reply.get("transaction")
            if not isinstance(trans, dict):
                raise WorkflowError(f"prepareWorkflow of {gid} answered without a transaction")
            recorded_input = _check_owner(trans, name, gid)
            if trans.get("status") != "prepared":
                return _settled(trans)
            wf = Workflow(client, name, gid, raw if recorded_input is None else recorded_input,
                          _progress(reply))
            return await wf._run(entry.fn)

    def recovery_handler(self) -> Handler:
        """The aiohttp handler for ``recovery_url`` (mount it for POST).

        The coordinator calls it for a workflow left unfinished past its timeout, with
        the workflow's name as ``op`` and its gid in the query string; the handler
        executes the workflow again, which replays the recorded steps and finishes it.
        It answers 200 when the workflow succeeded, 409 when it ended failed, 425 while
        this process is still executing that gid, and 500 on any other error (the
        coordinator then calls again later, with back-off).
        """

        async def handle(request: web.Request) -> web.Response:
            name, gid = request.query.get("op", ""), request.query.get("gid", "")
            if not name or not gid:
                return web.json_response(
                    {"message": "a workflow recovery call needs op and gid"}, status=400
                )
            body = await request.read()
            if self.is_running(gid):
                return ongoing_response(f"workflow {gid} is being executed")
            try:
                await self.execute(name, gid, body)
            except (TransactionFailed, TransactionOngoing) as exc:
                return response_for(exc)
            except Exception as exc:
                log.exception("recovering workflow %s (%s) failed", gid, name)
                return response_for(exc)
            return success_response()

        return handle


def _check_owner(trans: Mapping[str, Any], name: str, gid: str) -> bytes | None:
    """Make sure the gid is this workflow's; the input it recorded (None if unreadable)."""
    if trans.get("trans_type") != TRANS_TYPE:
        raise WorkflowError(f"gid {gid} belongs to a {trans.get('trans_type')} transaction")
    try:
        custom = orjson.loads(trans.get("custom_data") or "{}")
    except orjson.JSONDecodeError:
        return None
    if not isinstance(custom, dict):
        return None
    owner = custom.get("name")
    if owner and owner != name:
        raise WorkflowError(f"gid {gid} belongs to workflow {owner!r}, not {name!r}")
    return _b64decode(custom.get("data"))
