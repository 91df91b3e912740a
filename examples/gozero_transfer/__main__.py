"""Driver: alice (MariaDB) sends money to bob (PostgreSQL) through go-zero-style gRPC
services found in etcd, with a coordinator found in etcd too, and checks every balance.

    python -m examples.gozero_transfer

The coordinator runs in-process with ``registry.target = etcd://…/dtmservice`` (what
``coordinator serve --register etcd://…/dtmservice`` sets) and its gRPC API on a free
port; the driver knows only the etcd address: ``DtmGrpcClient("etcd://…/dtmservice")``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from coordinator.client import (
    DtmClient,
    DtmGrpcClient,
    Msg,
    Saga,
    TransactionFailed,
    TransOptions,
    local_gid,
    tcc_global,
)
from coordinator.registry.resolver import Resolver
from examples.bank_transfer import in_bank, out_bank
from examples.bank_transfer.in_bank import InBank
from examples.bank_transfer.out_bank import OutBank
from examples.bank_transfer.transfer import LIMIT, Transfer
from examples.common import (
    Checks,
    Scenario,
    cli,
    describe,
    driver,
    final_status,
    mysql_connector,
    mysql_pool,
    pg_pool,
    run_example,
)
from examples.gozero_transfer.etcd import etcd_endpoint, free_port
from examples.gozero_transfer.services import TransService

NAME = "gozero_transfer"
START = 1000
WAIT = TransOptions(wait_result=True)
DTM_KEY = "dtmservice"  # go-zero yaml: DtmServer.Target: etcd://<etcd>/dtmservice


@dataclass
class Banks:
    etcd: str
    out: OutBank
    inn: InBank

    def url(self, key: str, method: str) -> str:
        """A branch URL as a go-zero client writes it: etcd://<etcd>/<key>/pb.Trans/<m>."""
        return f"etcd://{self.etcd}/{key}/pb.Trans/{method}"

    def out_url(self, method: str) -> str:
        return self.url("transout.rpc", method)

    def in_url(self, method: str) -> str:
        return self.url("transin.rpc", method)

    async def money(self) -> dict[str, int]:
        return {"alice": (await self.out.accounts())["alice"][0],
                "bob": (await self.inn.accounts())["bob"][0]}

    async def holds(self) -> dict[str, int]:
        return {"alice frozen": (await self.out.accounts())["alice"][1],
                "bob incoming": (await self.inn.accounts())["bob"][1]}


async def saga_transfer(dtm: DtmGrpcClient, banks: Banks, amount: int) -> tuple[str, str]:
    gid = local_gid("gozero-saga-")
    saga = Saga(dtm, gid, WAIT)
    saga.add(banks.out_url("TransOut"), banks.out_url("TransOutCompensate"),
             Transfer("alice", amount).body())
    saga.add(banks.in_url("TransIn"), banks.in_url("TransInCompensate"),
             Transfer("bob", amount).body())
    try:
        await saga.submit()
    except TransactionFailed as exc:
        return gid, str(exc)
    return gid, ""


async def tcc_transfer(dtm: DtmGrpcClient, banks: Banks, amount: int) -> tuple[str, str]:
    gid = local_gid("gozero-tcc-")
    try:
        async with tcc_global(dtm, gid, WAIT) as tcc:
            await tcc.call_branch(Transfer("alice", amount).body(), banks.out_url("TransOutTry"),
                                  banks.out_url("TransOutConfirm"),
                                  banks.out_url("TransOutCancel"))
            await tcc.call_branch(Transfer("bob", amount).body(), banks.in_url("TransInTry"),
                                  banks.in_url("TransInConfirm"), banks.in_url("TransInCancel"))
    except TransactionFailed as exc:
        return gid, str(exc)
    return gid, ""


async def sagas(dtm: DtmGrpcClient, http: DtmClient, checks: Checks, banks: Banks) -> None:
    checks.section("SAGA over gRPC: alice sends 300 to bob")
    gid, reason = await saga_transfer(dtm, banks, 300)
    checks.note(await describe(http, gid))
    checks.equal("status", await final_status(http, gid), "succeed")
    trans = (await http.query(gid))["transaction"]
    checks.equal("protocol", trans["protocol"], "grpc")
    checks.equal("alice's bank saw", banks.out.journal.of(gid), ["TransOut: applied"])
    checks.equal("bob's bank saw", banks.inn.journal.of(gid), ["TransIn: applied"])
    checks.equal("money", await banks.money(), {"alice": 700, "bob": 300})

    checks.section(f"SAGA over gRPC: alice sends 450, over bob's bank limit of {LIMIT}")
    gid, reason = await saga_transfer(dtm, banks, 450)
    checks.note(await describe(http, gid))
    checks.check("submit raised TransactionFailed: over the limit (gRPC ABORTED)",
                 "over the limit" in reason, reason)
    checks.equal("status", await final_status(http, gid), "failed")
    checks.equal("alice's bank saw", banks.out.journal.of(gid),
                 ["TransOut: applied", "TransOutCompensate: applied"])
    checks.equal("bob's bank saw", banks.inn.journal.of(gid),
                 ["TransIn: refused", "TransInCompensate: null_compensation"])
    checks.equal("money", await banks.money(), {"alice": 700, "bob": 300})


async def tccs(dtm: DtmGrpcClient, http: DtmClient, checks: Checks, banks: Banks) -> None:
    checks.section("TCC over gRPC: alice sends 200 to bob")
    gid, reason = await tcc_transfer(dtm, banks, 200)
    checks.note(await describe(http, gid))
    checks.equal("status", await final_status(http, gid), "succeed")
    checks.equal("alice's bank saw", banks.out.journal.of(gid),
                 ["TransOutTry: applied", "TransOutConfirm: applied"])
    checks.equal("money", await banks.money(), {"alice": 500, "bob": 500})
    checks.equal("held", await banks.holds(), {"alice frozen": 0, "bob incoming": 0})

    checks.section(f"TCC over gRPC: alice sends 450, over the limit of {LIMIT} (cancel)")
    gid, reason = await tcc_transfer(dtm, banks, 450)
    checks.note(await describe(http, gid))
    checks.check("the TransIn try raised TransactionFailed", "over the limit" in reason, reason)
    checks.equal("status", await final_status(http, gid), "failed")
    checks.equal("alice's bank saw", banks.out.journal.of(gid),
                 ["TransOutTry: applied", "TransOutCancel: applied"])
    checks.equal("bob's bank saw", banks.inn.journal.of(gid),
                 ["TransInTry: refused", "TransInCancel: null_compensation"])
    checks.equal("money", await banks.money(), {"alice": 500, "bob": 500})
    checks.equal("held", await banks.holds(), {"alice frozen": 0, "bob incoming": 0})


async def msgs(dtm: DtmGrpcClient, http: DtmClient, checks: Checks, banks: Banks) -> None:
    checks.section("MSG over gRPC: alice's debit commits with the message; TransIn delivered")
    gid = local_gid("gozero-msg-")
    withdraw = out_bank.withdraw
    msg = Msg(dtm, gid, WAIT).add(banks.in_url("TransIn"), Transfer("bob", 100).body())
    alice = Transfer("alice", 100)
    await msg.do_and_submit(banks.out_url("QueryPrepared"), banks.out.barrier,
                            lambda conn: withdraw(conn, alice, banks.out.table))
    checks.note(await describe(http, gid))
    checks.equal("status", await final_status(http, gid), "succeed")
    checks.equal("bob's bank saw", banks.inn.journal.of(gid), ["TransIn: applied"])
    checks.equal("money", await banks.money(), {"alice": 400, "bob": 600})

    checks.section("MSG over gRPC: the sender stops after its commit; the gRPC back-check")
    gid = local_gid("gozero-msg-")
    msg = Msg(dtm, gid, TransOptions(timeout_to_fail=1)).add(
        banks.in_url("TransIn"), Transfer("bob", 50).body())
    await msg.prepare(banks.out_url("QueryPrepared"))
    alice = Transfer("alice", 50)
    await banks.out.barrier.call(msg.barrier(),
                                 lambda conn: withdraw(conn, alice, banks.out.table))
    # No submit: after timeout_to_fail the coordinator calls QueryPrepared over gRPC,
    # which finds the barrier row of the committed local transaction.
    checks.equal("status", await final_status(http, gid), "succeed")
    checks.note(await describe(http, gid))
    checks.equal("bob's bank saw", banks.inn.journal.of(gid), ["TransIn: applied"])
    checks.equal("money", await banks.money(), {"alice": 350, "bob": 650})


def scenario_in(etcd: str) -> Scenario:
    async def scenario(http: DtmClient, checks: Checks) -> None:
        async with contextlib.AsyncExitStack() as stack:
            mysql = await stack.enter_async_context(mysql_pool())
            pg = await stack.enter_async_context(pg_pool())
            banks = Banks(etcd, OutBank(mysql, mysql_connector(), table="ex_gozero_out"),
                          InBank(pg, table="ex_gozero_in"))
            await banks.out.reset({"alice": START})
            await banks.inn.reset({"bob": 0})
            for key, bank, operations in (
                ("transout.rpc", banks.out, out_bank.OPERATIONS),
                ("transin.rpc", banks.inn, in_bank.OPERATIONS),
            ):
                service = TransService(key, bank.journal, bank.barrier, bank.table, operations)
                await service.start(etcd)
                stack.push_async_callback(service.stop)
                print(f"{key}: pb.Trans on {service.endpoint}, registered in etcd {etcd}")

            checks.section("Finding each other in etcd")
            target = f"etcd://{etcd}/{DTM_KEY}"
            resolver = Resolver(target)
            stack.push_async_callback(resolver.close)
            found = await resolver.wait_for(bool, 10)
            checks.check(f"the coordinator registered itself under {DTM_KEY}: "
                         f"{', '.join(resolver.endpoints)}", found)
            dtm = DtmGrpcClient(target)
            await stack.enter_async_context(dtm)
            checks.check(f"DtmGrpcClient({target!r}) reaches it: NewGid",
                         bool((await dtm.get("newGid"))["gid"]))

            await sagas(dtm, http, checks, banks)
            await tccs(dtm, http, checks, banks)
            await msgs(dtm, http, checks, banks)

            checks.section("Totals")
            money = await banks.money()
            checks.equal("money in both databases together", sum(money.values()), START)
            checks.equal("final balances", money, {"alice": 350, "bob": 650})

    return scenario


async def main() -> bool:
    for name in ("asyncpg", "aiomysql"):
        driver(name)  # a missing one is named before any etcd is started
    async with etcd_endpoint() as etcd:
        print(f"etcd at {etcd}")
        return await run_example(NAME, scenario_in(etcd), {
            "server.grpc_port": free_port(),
            "registry.target": f"etcd://{etcd}/{DTM_KEY}",
        })


if __name__ == "__main__":
    cli(main)
