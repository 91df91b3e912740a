"""The service layer: what each API operation does, shared by HTTP and JSON-RPC.

Operations take the typed requests of `coordinator.requests` and either return a typed
answer or raise a typed error from `coordinator.errors`. Each front end (HTTP, JSON-RPC,
gRPC) parses its own wire format and renders the answers: nothing here imports one.
"""

from __future__ import annotations

import asyncio
import functools
import secrets
import string
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson

from coordinator import __version__
from coordinator.engine.engine import Engine
from coordinator.errors import (
    AlreadyExists,
    BadRequest,
    NotFound,
    StatusConflict,
    TransactionFailure,
    TransactionOngoing,
)
from coordinator.fingerprint import fingerprint
from coordinator.machines import msg
from coordinator.machines.base import timeout_of
from coordinator.model import (
    FINISHED,
    UNFINISHED,
    Branch,
    BranchStatus,
    Op,
    Status,
    Trans,
    evolve,
)
from coordinator.requests import GidRequest, RegisterRequest, TransRequest, WorkflowState
from coordinator.settings import Settings
from coordinator.store.base import ListFilter, Page, Transition
from coordinator.store.codec import CorruptRecord
from coordinator.urls import UrlPolicy

_ALPHABET = string.ascii_letters + string.digits
PREPARED = frozenset({Status.PREPARED})
# The resolution of wait_result timeouts (seconds): one timer per grain, not per wait.
WAIT_GRAIN = 0.05


def new_gid() -> str:
    """22 random base62 characters (about 131 bits), like dtm's short UUIDs."""
    return "".join(secrets.choice(_ALPHABET) for _ in range(22))


class Service:
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.store = engine.store
        self.settings = settings
        self.urls = UrlPolicy(settings.engine.allowed_branch_hosts)
        # wait_result requests waiting for their run (see _run_or_stop).
        self._waiters: set[asyncio.Future[None]] = set()
        self._stop_hooked: asyncio.Future[None] | None = None
        # The waiters whose timeout ends in each WAIT_GRAIN, by its number since the
        # loop's epoch (see _run_or_stop).
        self._expiring: dict[int, set[asyncio.Future[None]]] = {}

    # -- creating and finishing ------------------------------------------------------------

    async def _with_branches(self, trans: Trans) -> Trans:
        if trans.trans_type != "msg":
            return trans
        topics: dict[str, list[str]] = {}
        if any((s.get("action") or "").startswith(msg.TOPIC_PREFIX) for s in trans.steps):
            topics = {
                name: [sub["url"] for sub in t.subscribers]
                for name, t in (await self.store.topics()).items()
            }
        try:
            return replace(trans, branches=msg.branches_for(trans.steps, topics))
        except KeyError as exc:
            raise TransactionFailure(f"topic {exc.args[0]!r} has no subscribers") from None

    async def prepare(self, req: TransRequest) -> None:
        self.urls.check_trans(req.trans)
        trans = await self._with_branches(req.trans)
        # A prepared transaction is looked at again when it times out (msg back-check,
        # tcc/xa rollback, workflow recovery).
        due = timeout_of(trans, self.engine.defaults) * 1000
        try:
            await self.store.create(trans, due_in_ms=due)
        except AlreadyExists as exc:
            if exc.status != Status.PREPARED.value:
                raise TransactionFailure(
                    f"transaction {trans.gid} has status '{exc.status}', cannot prepare"
                ) from None

    async def submit(self, req: TransRequest) -> None:
        self.urls.check_trans(req.trans)
        trans = req.trans
        if trans.trans_type == "workflow":
            await self._finish_workflow(trans, req.req_extra)
            return
        if trans.trans_type in ("saga", "msg") and not trans.steps:
            raise BadRequest(f"a {trans.trans_type} needs at least one step", "steps")
        trans = await self._with_branches(trans)
        trans = evolve(trans, fingerprint=fingerprint(trans))
        try:
            task = await self.engine.create_and_run(trans, due_in_ms=0)
        except AlreadyExists as exc:
            if exc.status != Status.PREPARED.value:
                await self._resubmitted(trans, exc)
                return
            # A gid's type never changes, so the create script's word on it cannot go
            # stale: a saga submit must not move a prepared tcc on, nor a tcc submit a
            # prepared workflow (whose client could then neither record its steps nor
            # finish it).
            if exc.trans_type and exc.trans_type != trans.trans_type:
                raise TransactionFailure(
                    f"transaction {trans.gid} is a {exc.trans_type}, not a {trans.trans_type}"
                ) from None
            # A concurrent second submit may have moved it on already: still fine. The
            # submit's content is what a later resubmit is compared with (a tcc/xa
            # submit carries no steps, unlike its prepare).
            task = await self.engine.take_over(
                trans.gid, frozenset({Status.PREPARED, Status.SUBMITTED}), Status.SUBMITTED,
                {"fingerprint": trans.fingerprint},
            )
        if trans.options.wait_result:
            await self._wait(trans.gid, task)

    async def _resubmitted(self, trans: Trans, exc: AlreadyExists) -> None:
        """A submit of a gid that is already past prepared: the client sent it again.

        Other content under the same gid is refused. The same content is idempotent:
        with wait_result it waits for and reports the real outcome, as the first
        submit does (answering at once claimed success for sagas that then rolled back).
        """
        if exc.fingerprint and exc.fingerprint != trans.fingerprint:
            raise TransactionFailure(
                f"gid '{trans.gid}' (the idempotency key) was reused with other content: "
                "its steps, payloads or options differ from the stored transaction"
            )
        if trans.options.wait_result:
            await self._wait(trans.gid, None)
            return
        if exc.status != Status.SUBMITTED.value:
            raise TransactionFailure(
                f"transaction {trans.gid} has status '{exc.status}', cannot submit"
            )

    async def _finish_workflow(self, trans: Trans, extra: Mapping[str, str]) -> None:
        status = extra.get("status", "")
        if status not in (Status.SUCCEED.value, Status.FAILED.value):
            raise BadRequest("req_extra.status must be succeed or failed", "req_extra")
        fields = {k: extra[k] for k in ("rollback_reason", "result") if extra.get(k)}
        # Only a workflow may be finished by its client's word: the same submit on a
        # prepared tcc/xa/msg would end it without any confirm or cancel being called.
        # The status compare-and-set below still guards against a concurrent change.
        stored = await self.store.load(trans.gid)
        if stored is None:
            raise NotFound(f"no transaction with gid '{trans.gid}'")
        if stored.trans_type != "workflow":
            raise TransactionFailure(
                f"transaction {trans.gid} is a {stored.trans_type}, not a workflow"
            )
        await self.store.transition(
            trans.gid, Transition(expected=PREPARED, new_status=Status(status), fields=fields)
        )

    async def _wait(self, gid: str, task: asyncio.Task[Trans] | None) -> None:
        """For wait_result: return on success, raise with the reason otherwise."""
        final: Trans | None = None
        if task is not None:
            # Stop waiting when the server shuts down: the client then gets ONGOING at
            # once instead of a dropped connection, and the exit keeps to the grace
            # period (the server would otherwise wait for this request first).
            await self._run_or_stop(task, self.settings.server.wait_result_timeout)
            if task.done() and not task.cancelled():
                final = task.result()
        else:
            # Driven elsewhere (another process, or later by a worker of this one).
            final = await self._watch(gid)
        if final is None or final.status not in FINISHED:
            final = await self.store.load(gid)
        if final is None:
            raise NotFound(f"no transaction with gid '{gid}'")
        if final.status is Status.FAILED:
            raise TransactionFailure(final.rollback_reason or f"transaction {gid} failed")
        if final.status is not Status.SUCCEED:
            raise TransactionOngoing(
                f"transaction {gid} is {final.status.value}; it will be retried"
            )

    async def _run_or_stop(self, task: asyncio.Task[Trans], timeout: float) -> None:
        """Wait until `task` is done, the engine begins to stop, or `timeout` passed.

        What asyncio.wait with FIRST_COMPLETED does, without its sets and coroutine,
        and without a callback per request on the engine's shared stopping future
        (whose removal scans every other waiter's): that future wakes all waiters at
        once through one callback. Nor a timer per request: a uvloop timer costs a
        handle to open and close each time, so the waits whose timeouts end within
        the same WAIT_GRAIN share one (a wait may last up to a grain longer).
        """
        stopping = self.engine.stopping()
        if task.done() or stopping.done():
            return
        if stopping is not self._stop_hooked:
            self._stop_hooked = stopping
            stopping.add_done_callback(self._wake_waiters)
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        grain = -int(-(loop.time() + timeout) // WAIT_GRAIN)  # rounded up
        expiring = self._expiring.get(grain)
        if expiring is None:
            expiring = self._expiring[grain] = set()
            loop.call_at(grain * WAIT_GRAIN, self._expire, grain)
        expiring.add(waiter)
        task.add_done_callback(waiter_wake := functools.partial(_wake, waiter))
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            expiring.discard(waiter)
            task.remove_done_callback(waiter_wake)
            self._waiters.discard(waiter)

    def _expire(self, grain: int) -> None:
        for waiter in self._expiring.pop(grain, ()):
            _wake(waiter)

    def _wake_waiters(self, _stopping: asyncio.Future[None]) -> None:
        for waiter in self._waiters:
            _wake(waiter)

    async def _watch(self, gid: str) -> Trans | None:
        """Follow a transaction that another run drives until that run's round is over.

        Over means finished, or released by its worker with a retry scheduled for later
        (what makes the driving run's own wait_result answer ONGOING). An owner that
        crashed keeps it owned until its lease runs out and another worker claims it,
        so the watch goes on until `wait_result_timeout`, never answering too early.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.server.wait_result_timeout
        stopping = self.engine.stopping()
        pause = 0.02
        while True:
            trans = await self.store.load(gid)
            if trans is None or trans.status in FINISHED:
                return trans
            released = not trans.owner and trans.next_cron_time > trans.update_time
            if released and trans.status is not Status.PREPARED:
                return trans
            left = deadline - loop.time()
            if left <= 0 or stopping.done():
                return trans
            # Back off to keep a long watch cheap; it is one small read per pause.
            await asyncio.wait({stopping}, timeout=min(pause, left))
            pause = min(pause * 1.5, 0.25)

    async def abort(self, req: GidRequest) -> None:
        gid = req.gid
        trans = await self.store.load(gid)
        if trans is None:
            raise NotFound(f"no transaction with gid '{gid}'")
        if trans.trans_type == "msg" and trans.status is Status.PREPARED:
            await self.store.transition(
                gid, Transition(expected=PREPARED, new_status=Status.FAILED,
                                fields={"rollback_reason": "aborted by the client"})
            )
            return
        if trans.trans_type in ("tcc", "xa") and trans.status in (
            Status.PREPARED, Status.ABORTING
        ):
            reason = req.rollback_reason
            fields = {"rollback_reason": reason} if reason else {}
            task = await self.engine.take_over(
                gid, frozenset({Status.PREPARED, Status.ABORTING}), Status.ABORTING, fields
            )
            if req.wait_result:
                try:
                    await self._wait(gid, task)
                except TransactionFailure:
                    return  # rolled back as asked
            return
        raise TransactionFailure(
            f"{trans.trans_type} transaction {gid} has status '{trans.status.value}', "
            "cannot abort"
        )

    async def force_stop(self, req: GidRequest) -> None:
        await self.store.transition(
            req.gid, Transition(expected=UNFINISHED, new_status=Status.FAILED,
                            fields={"rollback_reason": "force stopped"})
        )

    async def reset_next_cron_time(self, req: GidRequest) -> None:
        try:
            await self.store.transition(req.gid, Transition(expected=UNFINISHED, next_due_ms=0))
        except StatusConflict as exc:
            # dtm answers SUCCESS for a finished one: there is nothing left to bring forward.
            if exc.found not in {s.value for s in FINISHED}:
                raise

    # -- run-time branches ------------------------------------------------------------------

    async def register_branch(self, req: RegisterRequest) -> None:
        # The body does not say the transaction's protocol: a URL is accepted if an
        # HTTP or a gRPC transaction could call it (the grpc rule takes both).
        for key in ("url", "confirm", "cancel"):
            self.urls.check(req.get(key, ""), key, "grpc")
        gid, bid, kind = req.gid, req.branch_id, req.trans_type
        payload = req.get("data", "")
        unique = False
        if kind == "tcc":
            branches = [Branch(bid, Op.CANCEL, req.get("cancel", ""), data=payload),
                        Branch(bid, Op.CONFIRM, req.get("confirm", ""), data=payload)]
        elif kind == "xa":
            url = req.get("url", "")
            branches = [Branch(bid, Op.ROLLBACK, url, data=payload),
                        Branch(bid, Op.COMMIT, url, data=payload)]
        else:
            try:
                op, status = Op(req.get("op", "")), BranchStatus(req.get("status", ""))
            except ValueError:
                raise BadRequest("workflow branches need a valid op and status", "op") from None
            branches = [Branch(bid, op, "", status=status, data=payload)]
            unique = True
        try:
            await self.store.register_branches(gid, branches, expected=PREPARED, unique=unique)
        except NotFound:
            # dtm answers FAILURE here, and clients rely on it to stop the global work.
            raise TransactionFailure(f"no prepared transaction with gid '{gid}'") from None

    async def prepare_workflow(self, req: TransRequest) -> WorkflowState:
        trans = req.trans
        self.urls.check_trans(trans)
        if trans.trans_type != "workflow":
            raise BadRequest("prepareWorkflow needs trans_type workflow", "trans_type")
        due = timeout_of(trans, self.engine.defaults) * 1000
        try:
            now = await self.store.create(trans, due_in_ms=due)
            stored = replace(trans, create_time=now, update_time=now)
            return WorkflowState(stored)
        except AlreadyExists:
            found = await self.store.load(trans.gid)
            if found is None:  # expired in between: the client simply retries
                raise TransactionOngoing(f"transaction {trans.gid} is being replaced") from None
            return WorkflowState(found, found.branches)

    # -- reading ---------------------------------------------------------------------------

    async def query(self, gid: str) -> Trans | None:
        """The transaction, None if unknown; CorruptRecord (with the raw fields) if what
        is stored cannot be read, so a front end can still show it."""
        return await self.store.load(gid)

    async def all(self, position: str, limit: int, where: ListFilter, gid: str) -> Page:
        if gid:
            try:
                found = await self.store.load(gid)
            except CorruptRecord:
                found = None  # left out, as the listing leaves out such records
            return Page([found] if found else [], "")
        if where.status and where.status not in {s.value for s in Status}:
            raise BadRequest(f"unknown status {where.status!r}", "status")
        if position and (len(position) < 15 or position[13] != ":"
                         or not position[:13].isdigit()):
            raise BadRequest("position is not one this server returned", "position")
        return await self.store.list(position, limit, where)

    async def reset_cron_time(self, timeout_s: int, limit: int) -> dict[str, Any]:
        """Bring forward every transaction that would wait longer than `timeout_s`."""
        count, remaining = 0, False
        for partition in range(self.store.partitions):
            # Once the limit is used up, limit 0 only reports whether more qualify: an
            # exactly used-up limit used to claim has_remaining with nothing left.
            n, more = await self.store.reset_due(partition, timeout_s * 1000, limit - count)
            count += n
            remaining = remaining or more
            if remaining:
                break
        return {"has_remaining": remaining, "succeed_count": count}

    # -- topics ----------------------------------------------------------------------------

    async def subscribe(self, topic: str, url: str, remark: str) -> None:
        _check_topic(topic, url)
        self.urls.check(url, "url")
        try:
            await self.store.change_topic(True, topic, url, remark)
        except AlreadyExists:
            raise TransactionFailure(f"{url} is already subscribed to {topic!r}") from None

    async def unsubscribe(self, topic: str, url: str) -> None:
        _check_topic(topic, url)
        await self.store.change_topic(False, topic, url, "")

    async def delete_topic(self, topic: str) -> None:
        if not topic:
            raise BadRequest("topic is required", "topic")
        if not await self.store.delete_topic(topic):
            raise NotFound(f"no topic {topic!r}")

    async def kv(self, cat: str, key: str = "") -> list[dict[str, Any]]:
        if cat != "topics":
            return []
        topics = await self.store.topics()
        return [
            {"cat": "topics", "k": t.name, "v": orjson.dumps(t.subscribers).decode(),
             "version": t.version}
            for name, t in sorted(topics.items()) if not key or name == key
        ]

    @staticmethod
    def version() -> dict[str, str]:
        return {"version": __version__}


def _wake(waiter: asyncio.Future[None], *_done: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _check_topic(topic: str, url: str) -> None:
    if not topic:
        raise BadRequest("topic is required", "topic")
    if not url:
        raise BadRequest("url is required", "url")
