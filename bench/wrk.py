"""Saga submits and flash-sale buys driven by wrk (a C load generator), with a Lua
script of our own.

The Python load generator shares the two cores with the server under test and costs it
a share of the throughput; wrk costs far less CPU per request. The Lua script posts
`POST /api/dtmsvr/submit` with a gid unique per thread and request (or, for the flash
sale, `POST /buy?user=<unique>`), counts answers by status code (a 200 whose body says
FAILURE counts as failed; an expected refusal, such as the flash sale's 409 "sold out",
is counted apart), counts completions per wall-clock second, notes the wall-clock time
of the first and the last success, and prints one JSON line at the end with wrk's own
latency percentiles. wrk has no warm-up, so a warm-up is a separate, unrecorded wrk run.

Its CPU time comes from wait4's resource usage of the finished process: exact, and
only that process's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Lua of the wrk script; HEAD and TAIL are the JSON body around the gid, RUN the run id;
# with ID_IN_PATH the unique id ends the path instead and the body is empty. An answer
# with status REFUSED_STATUS whose body holds REFUSED_TEXT is a refusal, not a failure.
_SCRIPT = r"""
local head = HEAD
local tail = TAIL
local run = RUN
local id_in_path = ID_IN_PATH
local refused_status = REFUSED_STATUS
local refused_text = REFUSED_TEXT
local path = PATH
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

-- Sub-second wall-clock time of a success (os.time() has whole seconds only).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_usec; } bench_timeval;
int gettimeofday(bench_timeval *tv, void *tz);
]]
local tv = ffi.new("bench_timeval")
local function now_us()
  ffi.C.gettimeofday(tv, nil)
  return tonumber(tv.tv_sec) * 1000000 + tonumber(tv.tv_usec)
end

local threads = {}
local next_id = 1
function setup(thread)
  thread:set("tid", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end

local prefix, n = "", 0
ok, failed, refused, statuses, per_second, samples = 0, 0, 0, {}, {}, {}
first_ok, last_ok = 0, 0
function init(args)
  prefix = run .. "-" .. tid .. "-"
end

function request()
  n = n + 1
  if id_in_path then
    return wrk.format(nil, path .. prefix .. n, nil, "")
  end
  return wrk.format(nil, path, nil, head .. prefix .. n .. tail)
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 and not string.find(body, "FAILURE", 1, true) then
    ok = ok + 1
    local t = now_us()
    if first_ok == 0 then first_ok = t end
    last_ok = t
    local s = math.floor(t / 1000000)
    per_second[s] = (per_second[s] or 0) + 1
  elseif status == refused_status and string.find(body, refused_text, 1, true) then
    refused = refused + 1
    local s = os.time()
    per_second[s] = (per_second[s] or 0) + 1
  else
    failed = failed + 1
    if #samples < 5 then
      table.insert(samples, status .. " " .. string.sub(body, 1, 200))
    end
  end
end

local function quote(s)
  return '"' .. string.gsub(s, '[%c"\\]', function(c)
    return string.format("\\u%04x", string.byte(c))
  end) .. '"'
end

function done(summary, latency, requests)
  local total_ok, total_failed, total_refused, codes, seconds, errs = 0, 0, 0, {}, {}, {}
  local first, last = 0, 0
  for _, t in ipairs(threads) do
    total_ok = total_ok + t:get("ok")
    total_failed = total_failed + t:get("failed")
    total_refused = total_refused + t:get("refused")
    local f, l = t:get("first_ok"), t:get("last_ok")
    if f > 0 and (first == 0 or f < first) then first = f end
    if l > last then last = l end
    for code, count in pairs(t:get("statuses")) do
      codes[code] = (codes[code] or 0) + count
    end
    for s, count in pairs(t:get("per_second")) do
      seconds[s] = (seconds[s] or 0) + count
    end
    for _, e in ipairs(t:get("samples")) do
      if #errs < 5 then table.insert(errs, quote(e)) end
    end
  end
  local parts = {}
  for code, count in pairs(codes) do
    table.insert(parts, '"' .. code .. '":' .. count)
  end
  local secs = {}
  for s, count in pairs(seconds) do
    table.insert(secs, '"' .. s .. '":' .. count)
  end
  local e = summary.errors
  io.write(string.format(
    'WRK-JSON {"ok":%d,"failed":%d,"refused":%d,"first_ok_us":%d,"last_ok_us":%d,' ..
    '"requests":%d,"duration_us":%d,' ..
    '"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"socket_errors":%d,"statuses":{%s},"per_second":{%s},"samples":[%s]}\n',
    total_ok, total_failed, total_refused, first, last, summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max,
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ","),
    table.concat(secs, ","), table.concat(errs, ",")))
end
"""


def wrk_path() -> str | None:
    return shutil.which("wrk")


def lua_string(text: str) -> str:
    """A Lua string literal for any text (a decimal escape for every special byte)."""
    out = []
    for byte in text.encode():
        ch = chr(byte)
        out.append(ch if ch.isalnum() or ch in " {}[]:,._-/" else f"\\{byte:03d}")
    return '"' + "".join(out) + '"'


def script(head: str, tail: str, run: str, path: str, *, id_in_path: bool = False,
           refused: tuple[int, str] = (0, "")) -> str:
    values = {"HEAD": lua_string(head), "TAIL": lua_string(tail), "RUN": lua_string(run),
              "ID_IN_PATH": "true" if id_in_path else "false",
              "REFUSED_STATUS": str(refused[0]), "REFUSED_TEXT": lua_string(refused[1]),
              "PATH": lua_string(path)}
    out = _SCRIPT
    for name, value in values.items():
        out = out.replace(name, value, 1)
    return out


@dataclass
class WrkResult:
    ok: int
    failed: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float
    statuses: dict[str, int]
    # Completions (successes and refusals) per wall-clock second (time.time() seconds),
    # for the timeline.
    per_second: dict[int, int]
    error_samples: list[str] = field(default_factory=list)
    # Expected refusals (see run_wrk's `refused`), counted apart from ok and failed.
    refused: int = 0
    # Wall-clock times (time.time()) of the first and the last success; 0.0 for none.
    first_ok: float = 0.0
    last_ok: float = 0.0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    @property
    def cpu_share(self) -> float:
        """wrk's CPU time as a fraction of the machine's (all cores) over its run."""
        cores = os.cpu_count() or 1
        return self.cpu_seconds / (self.wall_seconds * cores) if self.wall_seconds else 0.0


def _run_wrk(args: list[str]) -> tuple[int, str, float, float]:
    """Run wrk to the end: (exit code, stdout, CPU seconds, wall seconds)."""
    with tempfile.TemporaryFile() as out:
        start = time.monotonic()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return proc.returncode, text, usage.ru_utime + usage.ru_stime, wall


async def run_wrk(
    url: str, head: str, tail: str, *, concurrency: int, duration: float, warmup: float,
    threads: int = 2, path: str = "/api/dtmsvr/submit", id_in_path: bool = False,
    refused: tuple[int, str] = (0, ""),
) -> WrkResult:
    """Warm up (unrecorded), then one measured wrk run of `duration` seconds.

    id_in_path: the unique id ends `path` (`head` and `tail` unused, empty body).
    refused: (status, text) of an answer that is an expected refusal, not a failure.
    """
    binary = wrk_path()
    if binary is None:
        raise RuntimeError("wrk is not installed (Debian: apt-get install wrk)")
    threads = max(1, min(threads, concurrency))
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        lua = Path(tmp) / "submit.lua"
        results = []
        for phase, seconds in (("warmup", warmup), ("measure", duration)):
            if seconds <= 0:
                continue
            run = f"{os.urandom(4).hex()}{phase[0]}"
            lua.write_text(script(head, tail, run, path, id_in_path=id_in_path,
                                  refused=refused))
            args = [binary, f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
                    "--timeout", "10s", "-s", str(lua), url]
            code, text, cpu, wall = await asyncio.to_thread(_run_wrk, args)
            if code != 0 or "WRK-JSON " not in text:
                raise RuntimeError(f"wrk failed ({code}): {text[-2000:]}")
            results.append((text, cpu, wall))
    text, cpu, wall = results[-1]
    data: dict[str, Any] = json.loads(text.split("WRK-JSON ", 1)[1].splitlines()[0])
    measured = data["duration_us"] / 1e6
    samples = list(data["samples"])
    if data["socket_errors"]:
        samples.append(f"{data['socket_errors']} socket errors")
    return WrkResult(
        ok=data["ok"], failed=data["failed"] + data["socket_errors"], seconds=measured,
        p50_ms=data["p50_us"] / 1000, p95_ms=data["p95_us"] / 1000,
        p99_ms=data["p99_us"] / 1000, max_ms=data["max_us"] / 1000,
        statuses=data["statuses"], per_second={int(k): v for k, v in data["per_second"].items()},
        error_samples=samples[:5], cpu_seconds=cpu, wall_seconds=wall,
        refused=data["refused"], first_ok=data["first_ok_us"] / 1e6,
        last_ok=data["last_ok_us"] / 1e6,
    )
