"""The guard's ceiling: requests/s through the guarding proxy on loopback, one process and
several on one port (``crawl.guard_processes``, SO_REUSEPORT, shared per-domain limits).

A fast asyncio origin serves a small PNG; load processes keep C connections each busy with
``GET http://origin/x.png`` through the proxy (``Connection: close``, as urllib and so
img2dataset send it: one TCP connection per request), for D seconds per configuration. Side by
side in one run: the load straight at the origin (``direct``: what the load and the origin
cost on their own, the peer), and through 1, 2, … guard processes. Figures: requests/s, the
guard's CPU seconds per request (its processes' own summary lines), hence requests/s per guard
core, and how many requests failed. All requests go to one host, so every one takes and
releases a per-domain slot (per_domain_concurrency is set high enough never to bind).

    python -m bench.bench_guard_ceiling [--seconds 8] [--processes 1,2] [--quick]
Writes bench/results/guard_ceiling.json.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import write_results
from pipeline.crawl_attempt import guard_summary
from pipeline.guard.hostile import tiny_png
from pipeline.guard.proxy import GuardProxy
from pipeline.guard.server import GuardSettings

RESULTS = Path(__file__).parent / "results" / "guard_ceiling.json"


def _origin(port_out: Any, body: bytes) -> None:
    head = (f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n").encode()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(head + body)
            await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            w.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0, backlog=4096)
        port_out.put(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def _load(target: tuple[str, int], request: bytes, conns: int, seconds: float,
          out: Any) -> None:
    async def one(end: float, counts: dict[str, int]) -> None:
        while time.monotonic() < end:
            try:
                r, w = await asyncio.open_connection(*target)
                w.write(request)
                data = await r.read()
                w.close()
                counts["ok" if data.startswith(b"HTTP/1.1 200") else "failed"] += 1
            except OSError:
                counts["failed"] += 1

    async def main() -> dict[str, int]:
        counts = {"ok": 0, "failed": 0}
        end = time.monotonic() + seconds
        await asyncio.gather(*(one(end, counts) for _ in range(conns)))
        return counts

    out.put(asyncio.run(main()))


def run_load(target: tuple[str, int], request: bytes, procs: int, conns: int,
             seconds: float) -> dict[str, Any]:
    q: Any = mp.Queue()
    workers = [mp.Process(target=_load, args=(target, request, conns, seconds, q))
               for _ in range(procs)]
    t = time.monotonic()
    for p in workers:
        p.start()
    got = [q.get(timeout=seconds + 60) for _ in workers]
    for p in workers:
        p.join()
    wall = time.monotonic() - t
    ok, failed = sum(g["ok"] for g in got), sum(g["failed"] for g in got)
    return {"ok": ok, "failed": failed, "seconds": round(wall, 2),
            "requests_per_s": round(ok / seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_guard_ceiling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="load per configuration")
    p.add_argument("--processes", default="1,2", help="guard processes to try, comma-separated")
    p.add_argument("--load-procs", type=int, default=2, help="load-generating processes")
    p.add_argument("--conns", type=int, default=32, help="connections in flight per load process")
    p.add_argument("--quick", action="store_true", help="2 s per configuration")
    args = p.parse_args(argv)
    seconds = 2.0 if args.quick else args.seconds
    body = tiny_png(size=64)
    q: Any = mp.Queue()
    origin = mp.Process(target=_origin, args=(q, body), daemon=True)
    origin.start()
    oport = q.get(timeout=30)
    url = f"http://127.0.0.1:{oport}/x.png"
    host = f"Host: 127.0.0.1:{oport}\r\nConnection: close\r\n\r\n"
    res: dict[str, Any] = {"area": "guard_ceiling", "cores": os.cpu_count(),
                           "body_bytes": len(body), "seconds_per_config": seconds,
                           "load_procs": args.load_procs, "conns_per_load_proc": args.conns,
                           "runs": {}}
    direct = run_load(("127.0.0.1", oport), f"GET /x.png HTTP/1.1\r\n{host}".encode(),
                      args.load_procs, args.conns, seconds)
    res["runs"]["direct"] = direct
    print(f"direct: {direct}", file=sys.stderr)
    for n in [int(x) for x in args.processes.split(",")]:
        s = GuardSettings(deadline=10, allow_hosts=[f"127.0.0.1:{oport}"],
                          per_domain_concurrency=100_000, processes=n)
        with tempfile.TemporaryDirectory() as tmp:
            with GuardProxy(s, events_path=Path(tmp) / "guard.jsonl") as proxy:
                got = run_load(proxy.address, f"GET {url} HTTP/1.1\r\n{host}".encode(),
                               args.load_procs, args.conns, seconds)
            stats = proxy.stats()
            per_process = [guard_summary(f) or {"summary": {}} for f in proxy.event_files()]
        cpu = stats.get("cpu_seconds") or 0.0
        got.update(guard_processes=n, guard_requests=stats.get("requests"),
                   guard_cpu_seconds=cpu,
                   guard_cpu_ms_per_request=round(1000 * cpu / max(stats.get("ok", 1), 1), 3),
                   requests_per_s_per_guard_core=round(stats.get("ok", 0) / cpu, 1) if cpu
                   else None,
                   # each process's share of a core over the run: ~1.0 = that process capped
                   process_core_use=[round(e.get("cpu_seconds", 0) / got["seconds"], 2)
                                     for e in per_process],
                   process_requests=[e["summary"].get("requests", 0) for e in per_process])
        res["runs"][f"guard_x{n}"] = got
        print(f"guard x{n}: {got}", file=sys.stderr)
    origin.terminate()
    one = res["runs"].get("guard_x1")
    best = max((r for k, r in res["runs"].items() if k != "direct"),
               key=lambda r: r["requests_per_s"])
    res["summary"] = {
        "direct_requests_per_s": direct["requests_per_s"],
        "one_guard_requests_per_s": one and one["requests_per_s"],
        "one_guard_cpu_ms_per_request": one and one["guard_cpu_ms_per_request"],
        "requests_per_s_per_guard_core": one and one["requests_per_s_per_guard_core"],
        "best_guard_processes": best["guard_processes"],
        "best_requests_per_s": best["requests_per_s"],
        "ceiling_moved": round(best["requests_per_s"] / one["requests_per_s"], 2)
        if one else None,
        "one_guard_core_use": one and one["process_core_use"][0],
        "load_average_1m": round(os.getloadavg()[0], 1),
    }
    write_results(RESULTS, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
