"""`coordinator txn …` and `coordinator topics …`: the operator's commands.

They talk to a running coordinator over its HTTP API (`--server`, or the env
COORDINATOR_SERVER; the token from `--token` or COORDINATOR_SERVER_API_TOKEN), print
aligned tables for people and `--json` for scripts, and exit non-zero with one line
on stderr when something goes wrong: 1 for an answer the server gave (not found,
conflict, refused), 2 for a usage error or a server that cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_SERVER = "http://127.0.0.1:36789"
FINAL = ("succeed", "failed")


class CliError(Exception):
    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


class Client:
    def __init__(self, server: str, token: str, timeout: float = 10.0) -> None:
        self.base = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, query: dict[str, str] | None = None,
             body: dict[str, Any] | None = None) -> Any:
        url = f"{self.base}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v != ""})
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise CliError(_http_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CliError(f"cannot reach {self.base}: {reason}", 2) from None
        return json.loads(raw) if raw else {}

    def api(self, method: str, name: str, **kw: Any) -> Any:
        return self.call(method, f"/api/dtmsvr/{name}", **kw)


def _http_message(exc: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(exc.read()).get("message", "")
    except (ValueError, AttributeError):
        detail = ""
    if exc.code == 401:
        return "the server wants a token: --token or COORDINATOR_SERVER_API_TOKEN"
    return f"HTTP {exc.code}: {detail or exc.reason}".replace("\n", " ")


# -- output ---------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in cells]
    return "\n".join(lines)


def _out(args: argparse.Namespace, data: Any, text: Callable[[], str]) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text())


# -- txn ------------------------------------------------------------------------------------


def txn_list(c: Client, args: argparse.Namespace) -> int:
    reply = c.api("GET", "all", query={"status": args.status or "", "transType": args.type or "",
                                       "limit": str(args.limit)})
    rows = reply.get("transactions", [])
    _out(args, rows, lambda: table(
        ["GID", "TYPE", "STATUS", "CREATED", "NEXT DUE", "REASON"],
        [[t.get("gid"), t.get("trans_type"), t.get("status"), t.get("create_time"),
          "" if t.get("status") in FINAL else t.get("next_cron_time"),
          t.get("rollback_reason", "")] for t in rows]) if rows else "no transactions")
    return 0


def _query(c: Client, gid: str) -> dict[str, Any]:
    reply: dict[str, Any] = c.api("GET", "query", query={"gid": gid})
    if not reply.get("transaction"):
        raise CliError(f"no transaction {gid!r}")
    return reply


def _show_text(reply: dict[str, Any]) -> str:
    t = reply["transaction"]
    head = [f"gid:         {t.get('gid')}", f"type:        {t.get('trans_type')}",
            f"status:      {t.get('status')}", f"created:     {t.get('create_time')}",
            f"updated:     {t.get('update_time')}"]
    if t.get("status") not in FINAL:
        head.append(f"next due:    {t.get('next_cron_time')}")
    if t.get("rollback_reason"):
        head.append(f"reason:      {t.get('rollback_reason')}")
    branches = table(["BRANCH", "OP", "STATUS", "URL", "FINISHED"], [
        [b.get("branch_id"), b.get("op"), b.get("status"), b.get("url"), b.get("finish_time", "")]
        for b in reply.get("branches", [])])
    events = [(t.get("create_time") or "", "created")]
    events += [(b.get("finish_time"), f"branch {b.get('branch_id')} {b.get('op')} "
                f"{b.get('status')}") for b in reply.get("branches", []) if b.get("finish_time")]
    if t.get("rollback_time"):
        events.append((t["rollback_time"], "rollback started"))
    if t.get("finish_time"):
        events.append((t["finish_time"], f"finished {t.get('status')}"))
    timeline = table(["TIME", "EVENT"], sorted(events, key=lambda e: str(e[0])))
    return "\n".join(head) + "\n\n" + branches + "\n\n" + timeline


def txn_show(c: Client, args: argparse.Namespace) -> int:
    reply = _query(c, args.gid)
    _out(args, reply, lambda: _show_text(reply))
    return 0


def txn_force_stop(c: Client, args: argparse.Namespace) -> int:
    c.api("POST", "forceStop", body={"gid": args.gid})
    _out(args, {"gid": args.gid, "result": "force stopped"},
         lambda: f"{args.gid}: force stopped")
    return 0


def txn_retry(c: Client, args: argparse.Namespace) -> int:
    c.api("POST", "resetNextCronTime", body={"gid": args.gid})
    _out(args, {"gid": args.gid, "result": "due now"}, lambda: f"{args.gid}: due now")
    return 0


def txn_watch(c: Client, args: argparse.Namespace) -> int:
    """Print each change of status until the transaction is final (0: succeed, 1: failed)."""
    deadline = time.monotonic() + args.timeout if args.timeout else None
    seen = ""
    while True:
        t = _query(c, args.gid)["transaction"]
        status = t.get("status", "")
        if status != seen:
            seen = status
            line = {"gid": args.gid, "status": status,
                    "rollback_reason": t.get("rollback_reason", "")}
            print(json.dumps(line) if args.json else
                  f"{time.strftime('%H:%M:%S')}  {args.gid}  {status}"
                  + (f"  ({line['rollback_reason']})" if line["rollback_reason"] else ""),
                  flush=True)
        if status in FINAL:
            return 0 if status == "succeed" else 1
        if deadline is not None and time.monotonic() > deadline:
            raise CliError(f"{args.gid} is still {status} after {args.timeout} s")
        time.sleep(args.interval)


# -- topics ---------------------------------------------------------------------------------


def topics_list(c: Client, args: argparse.Namespace) -> int:
    kv = c.api("GET", "scanKV", query={"cat": "topics"}).get("kv", [])
    topics = [{"topic": item["k"], "subscribers": json.loads(item["v"])} for item in kv]
    rows = [[t["topic"], s.get("url", ""), s.get("remark", "")]
            for t in topics for s in t["subscribers"]]
    _out(args, topics, lambda: table(["TOPIC", "URL", "REMARK"], rows) if rows else "no topics")
    return 0


def topics_subscribe(c: Client, args: argparse.Namespace) -> int:
    c.api("GET", "subscribe", query={"topic": args.topic, "url": args.url,
                                      "remark": args.remark or ""})
    _out(args, {"topic": args.topic, "url": args.url, "result": "subscribed"},
         lambda: f"{args.url} subscribed to {args.topic}")
    return 0


def topics_unsubscribe(c: Client, args: argparse.Namespace) -> int:
    c.api("GET", "unsubscribe", query={"topic": args.topic, "url": args.url})
    _out(args, {"topic": args.topic, "url": args.url, "result": "unsubscribed"},
         lambda: f"{args.url} unsubscribed from {args.topic}")
    return 0


def topics_delete(c: Client, args: argparse.Namespace) -> int:
    c.call("DELETE", f"/api/dtmsvr/topic/{urllib.parse.quote(args.topic, safe='')}")
    _out(args, {"topic": args.topic, "result": "deleted"}, lambda: f"topic {args.topic} deleted")
    return 0


# -- argparse -------------------------------------------------------------------------------


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", help=f"coordinator URL (env COORDINATOR_SERVER; "
                   f"default {DEFAULT_SERVER})")
    p.add_argument("--token", help="operator token (env COORDINATOR_SERVER_API_TOKEN)")
    p.add_argument("--json", action="store_true", help="JSON output for scripts")


def add_ops_commands(sub: Any) -> None:
    """Register `txn` and `topics` on the main parser's subcommands."""
    txn = sub.add_parser("txn", help="list, inspect, stop and retry transactions")
    tsub = txn.add_subparsers(dest="action", required=True)
    p = tsub.add_parser("list", help="newest transactions first")
    p.add_argument("--status", choices=["prepared", "submitted", "aborting", "succeed", "failed"])
    p.add_argument("--type", choices=["saga", "msg", "tcc", "xa", "workflow"])
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(ops=txn_list)
    for name, func, text in (
        ("show", txn_show, "one transaction: its branches and timeline"),
        ("force-stop", txn_force_stop, "end an unfinished transaction as failed"),
        ("retry", txn_retry, "make a waiting transaction due now (resetNextCronTime)"),
        ("watch", txn_watch, "follow a transaction until it is final"),
    ):
        p = tsub.add_parser(name, help=text)
        p.add_argument("gid")
        p.set_defaults(ops=func)
        if name == "watch":
            p.add_argument("--interval", type=float, default=1.0, help="seconds between looks")
            p.add_argument("--timeout", type=float, default=0, help="give up after (s); 0: never")
    topics = sub.add_parser("topics", help="message topics and their subscribers")
    psub = topics.add_subparsers(dest="action", required=True)
    psub.add_parser("list", help="every topic with its subscribers").set_defaults(ops=topics_list)
    p = psub.add_parser("subscribe", help="add a subscriber URL to a topic")
    p.add_argument("topic")
    p.add_argument("url")
    p.add_argument("--remark", default="")
    p.set_defaults(ops=topics_subscribe)
    p = psub.add_parser("unsubscribe", help="remove a subscriber URL")
    p.add_argument("topic")
    p.add_argument("url")
    p.set_defaults(ops=topics_unsubscribe)
    p = psub.add_parser("delete", help="delete a topic with its subscribers")
    p.add_argument("topic")
    p.set_defaults(ops=topics_delete)
    for group in (tsub, psub):
        for parser in group.choices.values():
            _connection(parser)


def run_ops(args: argparse.Namespace) -> int:
    server = args.server or os.environ.get("COORDINATOR_SERVER") or DEFAULT_SERVER
    token = args.token or os.environ.get("COORDINATOR_SERVER_API_TOKEN", "")
    try:
        code: int = args.ops(Client(server, token), args)
        return code
    except CliError as exc:
        print(f"coordinator {args.command} {args.action}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
