"""Driver: alice (MariaDB) sends money to bob (PostgreSQL) as SAGA, TCC and XA, including
transfers the banks refuse, and checks every balance after each one.

    python -m examples.bank_transfer
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import orjson

from coordinator.client import (
    DtmClient,
    Saga,
    TransactionFailed,
    TransOptions,
    local_gid,
    tcc_global,
    xa_global,
)
from examples.bank_transfer import xa_in_bank
from examples.bank_transfer.in_bank import InBank
from examples.bank_transfer.out_bank import OutBank
from examples.bank_transfer.transfer import LIMIT, Transfer
from examples.bank_transfer.xa import prepared_xids, rollback_leftovers
from examples.bank_transfer.xa_in_bank import XaInBank
from examples.common import (
    Checks,
    Server,
    cli,
    describe,
    final_status,
    mysql_connector,
    mysql_pool,
    pg_pool,
    run_example,
)

NAME = "bank_transfer"
START = 1000  # alice's money; bob starts with nothing in both of his banks
WAIT = TransOptions(wait_result=True)


@dataclass
class Banks:
    out: OutBank
    inn: InBank
    xa_in: XaInBank
    out_server: Server
    in_server: Server
    xa_in_server: Server

    async def money(self) -> dict[str, int]:
        out, inn, xa_in = (await self.out.accounts(), await self.inn.accounts(),
                           await self.xa_in.accounts())
        return {"alice": out["alice"][0], "bob": inn["bob"][0], "bob-xa": xa_in["bob"]}

    async def holds(self) -> dict[str, int]:
        """Money a TCC try set aside but no confirm or cancel settled yet."""
        out, inn = await self.out.accounts(), await self.inn.accounts()
        return {"alice frozen": out["alice"][1], "bob incoming": inn["bob"][1]}



def tcc_urls(server: Server, op: str) -> tuple[str, str, str]:
    """Try, Confirm and Cancel of one TCC branch."""
    return (server.url(f"tcc/{op}Try"), server.url(f"tcc/{op}Confirm"),
            server.url(f"tcc/{op}Cancel"))


async def saga_transfer(dtm: DtmClient, banks: Banks, amount: int) -> tuple[str, str]:
    """One saga; its gid and the rollback reason ("" if it succeeded)."""
    gid = local_gid("bank-saga-")
    saga = Saga(dtm, gid, WAIT)
    saga.add(banks.out_server.url("saga/TransOut"),
             banks.out_server.url("saga/TransOutCompensate"), Transfer("alice", amount).body())
    saga.add(banks.in_server.url("saga/TransIn"),
             banks.in_server.url("saga/TransInCompensate"), Transfer("bob", amount).body())
    try:
        await saga.submit()
    except TransactionFailed as exc:
        return gid, str(exc)
    return gid, ""


async def sagas(dtm: DtmClient, checks: Checks, banks: Banks) -> None:
    checks.section("SAGA: alice sends 300 to bob")
    gid, reason = await saga_transfer(dtm, banks, 300)
    checks.note(await describe(dtm, gid))
    checks.equal("status", await final_status(dtm, gid), "succeed")
    checks.equal("money", await banks.money(), {"alice": 700, "bob": 300, "bob-xa": 0})

    # The coordinator delivers at least once; the barrier makes a repeat a no-op.
    await dtm.call_branch(
        banks.in_server.url("saga/TransIn"),
        body=orjson.dumps(Transfer("bob", 300).body()).decode(),
        params={"gid": gid, "trans_type": "saga", "branch_id": "02", "op": "action"})
    checks.equal("TransIn delivered again: the bank saw", banks.inn.journal.of(gid),
                 ["TransIn: applied", "TransIn: duplicate"])
    checks.equal("money after the repeat", await banks.money(),
                 {"alice": 700, "bob": 300, "bob-xa": 0})

    checks.section(f"SAGA: alice sends 450 to bob, over bob's bank limit of {LIMIT}")
    gid, reason = await saga_transfer(dtm, banks, 450)
    checks.note(await describe(dtm, gid))
    checks.check("submit raised TransactionFailed: over the limit", "over the limit" in reason,
                 reason)
    checks.equal("status", await final_status(dtm, gid), "failed")
    checks.equal("alice's bank saw", banks.out.journal.of(gid),
                 ["TransOut: applied", "TransOutCompensate: applied"])
    checks.equal("bob's bank saw", banks.inn.journal.of(gid),
                 ["TransIn: refused", "TransInCompensate: null_compensation"])
    checks.equal("money", await banks.money(), {"alice": 700, "bob": 300, "bob-xa": 0})

    checks.section("SAGA: alice sends 5000 to bob, more than she has")
    gid, reason = await saga_transfer(dtm, banks, 5000)
    checks.note(await describe(dtm, gid))
    checks.equal("status", await final_status(dtm, gid), "failed")
    checks.equal("alice's bank saw", banks.out.journal.of(gid),
                 ["TransOut: refused", "TransOutCompensate: null_compensation"])
    checks.equal("bob's bank saw", banks.inn.journal.of(gid), [])
    checks.equal("money", await banks.money(), {"alice": 700, "bob": 300, "bob-xa": 0})


async def tccs(dtm: DtmClient, checks: Checks, banks: Banks) -> None:
    checks.section("TCC: alice sends 200 to bob (try freezes, confirm pays)")
    gid = local_gid("bank-tcc-")
    async with tcc_global(dtm, gid, WAIT) as tcc:
        await tcc.call_branch(Transfer("alice", 200).body(),
                              *tcc_urls(banks.out_server, "TransOut"))
        await tcc.call_branch(Transfer("bob", 200).body(), *tcc_urls(banks.in_server, "TransIn"))
        checks.equal("after both tries, held", await banks.holds(),
                     {"alice frozen": 200, "bob incoming": 200})
        checks.equal("after both tries, money", await banks.money(),
                     {"alice": 700, "bob": 300, "bob-xa": 0})
    checks.note(await describe(dtm, gid))
    checks.equal("status", await final_status(dtm, gid), "succeed")
    checks.equal("money", await banks.money(), {"alice": 500, "bob": 500, "bob-xa": 0})
    checks.equal("held", await banks.holds(), {"alice frozen": 0, "bob incoming": 0})

    checks.section(f"TCC: alice sends 450 to bob, over the limit of {LIMIT} (cancel unfreezes)")
    gid = local_gid("bank-tcc-")
    reason = ""
    try:
        async with tcc_global(dtm, gid, WAIT) as tcc:
            for server, account, op in ((banks.out_server, "alice", "TransOut"),
                                        (banks.in_server, "bob", "TransIn")):
                await tcc.call_branch(Transfer(account, 450).body(),
                                      *tcc_urls(server, op))
    except TransactionFailed as exc:
        reason = str(exc)
    checks.note(await describe(dtm, gid))
    checks.check("the TransIn try raised TransactionFailed", "over the limit" in reason, reason)
    checks.equal("status", await final_status(dtm, gid), "failed")
    checks.equal("alice's bank saw", banks.out.journal.of(gid),
                 ["TransOutTry: applied", "TransOutCancel: applied"])
    checks.equal("bob's bank saw", banks.inn.journal.of(gid),
                 ["TransInTry: refused", "TransInCancel: null_compensation"])
    checks.equal("money", await banks.money(), {"alice": 500, "bob": 500, "bob-xa": 0})
    checks.equal("held", await banks.holds(), {"alice frozen": 0, "bob incoming": 0})


async def xas(dtm: DtmClient, checks: Checks, banks: Banks, pg_setting: str) -> None:
    checks.section("XA: alice sends 50 to bob, both branches on MariaDB")
    checks.note(f"PostgreSQL max_prepared_transactions = {pg_setting}, so it cannot prepare; "
                f"bob's XA account is in MariaDB database {xa_in_bank.DATABASE}")
    gid = local_gid("bank-xa-")
    async with xa_global(dtm, gid, WAIT) as xa:
        await xa.call_branch(Transfer("alice", 50).body(), banks.out_server.url("xa/TransOut"))
        await xa.call_branch(Transfer("bob", 50).body(), banks.xa_in_server.url("xa/TransIn"))
        prepared = sorted(b for _, b in await prepared_xids(banks.out.connect, gid))
        checks.equal("before the commit, prepared XA branches", prepared, ["01", "02"])
        checks.equal("before the commit, money", await banks.money(),
                     {"alice": 500, "bob": 500, "bob-xa": 0})
    checks.note(await describe(dtm, gid))
    checks.equal("status", await final_status(dtm, gid), "succeed")
    checks.equal("money", await banks.money(), {"alice": 450, "bob": 500, "bob-xa": 50})

    checks.section(f"XA: alice sends 420 to bob, over the limit of {LIMIT} (rollback)")
    gid = local_gid("bank-xa-")
    reason = ""
    try:
        async with xa_global(dtm, gid, WAIT) as xa:
            await xa.call_branch(Transfer("alice", 420).body(),
                                 banks.out_server.url("xa/TransOut"))
            await xa.call_branch(Transfer("bob", 420).body(),
                                 banks.xa_in_server.url("xa/TransIn"))
    except TransactionFailed as exc:
        reason = str(exc)
    checks.note(await describe(dtm, gid))
    checks.check("the TransIn action raised TransactionFailed", "over the limit" in reason,
                 reason)
    checks.equal("status", await final_status(dtm, gid), "failed")
    checks.equal("alice's bank saw", banks.out.journal.of(gid),
                 ["TransOut XA prepared", "TransOut XA rollback"])
    checks.equal("bob's XA bank saw", banks.xa_in.journal.of(gid), ["TransIn XA refused"])
    checks.equal("money", await banks.money(), {"alice": 450, "bob": 500, "bob-xa": 50})
    checks.equal("prepared XA branches left", await prepared_xids(banks.out.connect, "bank-xa-"),
                 [])


async def scenario(dtm: DtmClient, checks: Checks) -> None:
    async with contextlib.AsyncExitStack() as stack:
        mysql = await stack.enter_async_context(mysql_pool())
        await xa_in_bank.create_database(mysql)
        xa_mysql = await stack.enter_async_context(mysql_pool(xa_in_bank.DATABASE))
        pg = await stack.enter_async_context(pg_pool())
        out = OutBank(mysql, mysql_connector())
        inn = InBank(pg)
        xa_in = XaInBank(xa_mysql, mysql_connector(xa_in_bank.DATABASE))
        await rollback_leftovers(out.connect, "bank-xa-")
        await out.reset({"alice": START})
        await inn.reset({"bob": 0})
        await xa_in.reset({"bob": 0})
        banks = Banks(out, inn, xa_in,
                      await stack.enter_async_context(Server(out.app())),
                      await stack.enter_async_context(Server(inn.app())),
                      await stack.enter_async_context(Server(xa_in.app())))
        print(f"alice's bank (MariaDB) {banks.out_server.url()}, bob's bank (PostgreSQL) "
              f"{banks.in_server.url()}, bob's XA bank (MariaDB) {banks.xa_in_server.url()}")
        await sagas(dtm, checks, banks)
        await tccs(dtm, checks, banks)
        await xas(dtm, checks, banks, str(await pg.fetchval("SHOW max_prepared_transactions")))

        checks.section("Totals")
        money = await banks.money()
        checks.equal("money in all three databases together", sum(money.values()), START)
        checks.equal("final balances", money, {"alice": 450, "bob": 500, "bob-xa": 50})


async def main() -> bool:
    return await run_example(NAME, scenario)


if __name__ == "__main__":
    cli(main)
