"""``python -m pipeline.guard``: run the guarding forward proxy (pipeline/guard/server.py) in
the foreground. The crawl stage starts it this way, one process per img2dataset run."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from pipeline.guard.server import GuardServer, GuardSettings, serve
from pipeline.guard.wire import TAG


def _peak_rss_kb() -> int | None:
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipeline.guard",
        description="Run the witforge guarding forward proxy in the foreground (the crawl "
        "stage starts it by itself). Prints 'witforge-guard listening HOST:PORT', writes "
        "refusals as JSON lines to --events, and exits on SIGTERM or when stdin closes.")
    p.add_argument("--settings", default="{}",
                   help="GuardSettings as JSON, or @FILE holding that JSON")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--events", default="", help="JSON-lines log of refusals and a summary")
    p.add_argument("--watch-stdin", action="store_true", help="exit when stdin closes")
    p.add_argument("--reuse-port", action="store_true",
                   help="listen with SO_REUSEPORT: several processes share --port")
    p.add_argument("--shared-limits", default="",
                   help="per-domain limits in this shared table (pipeline/guard/shared_limits.py) "
                   "instead of in-process: for several processes on one port")
    args = p.parse_args(argv)
    text = args.settings
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    settings = GuardSettings(**json.loads(text))
    events = open(args.events, "a", buffering=1, encoding="utf-8") if args.events else None

    async def run() -> GuardServer:
        loop = asyncio.get_running_loop()
        # getaddrinfo runs in the default executor: a crawl of many hosts needs more than the
        # default min(32, cpus + 4) lookups in flight.
        loop.set_default_executor(ThreadPoolExecutor(64, thread_name_prefix="dns"))
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if args.watch_stdin:  # the parent died or closed the pipe: do not linger
            def on_stdin() -> None:
                if not os.read(0, 4096):
                    loop.remove_reader(0)
                    stop.set()

            loop.add_reader(0, on_stdin)

        def ready(addr: tuple[str, int]) -> None:
            print(f"{TAG} listening {addr[0]}:{addr[1]}", flush=True)

        return await serve(settings, args.host, args.port, events, stop, ready,
                           shared_limits=args.shared_limits, reuse_port=args.reuse_port)

    guard = asyncio.run(run())
    if events is not None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        events.write(json.dumps({
            "t": round(time.time(), 3), "summary": guard.counts, "settings": {
                **asdict(settings), "domain_intervals": len(settings.domain_intervals)},
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_kb": _peak_rss_kb()}) + "\n")
        events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
