"""`make bench`: run every benchmark, each side by side with its peer, in one go.

Each bench/bench_<area>.py has main(argv) and writes bench/results/<area>.json.
`python -m bench.run [--quick] [area ...]` runs all (or the named) areas and prints
one summary table from the JSON files.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).parent
RESULTS = BENCH_DIR / "results"


def areas() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="make bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("areas", nargs="*", help=f"subset of: {', '.join(areas())}")
    p.add_argument("--quick", action="store_true", help="smaller inputs (a smoke run)")
    args = p.parse_args(argv)
    chosen = args.areas or areas()
    failed = []
    for area in chosen:
        print(f"\n=== bench {area} ===", flush=True)
        t0 = time.time()
        mod = importlib.import_module(f"bench.bench_{area}")
        try:
            rc = mod.main(["--quick"] if args.quick else [])
        except Exception as e:  # one broken bench must not hide the others' figures
            print(f"bench {area} failed: {type(e).__name__}: {e}", file=sys.stderr)
            rc = 1
        if rc:
            failed.append(area)
        print(f"=== bench {area}: {time.time() - t0:.0f}s ===", flush=True)
    print("\nresults:")
    for area in chosen:
        f = RESULTS / f"{area}.json"
        if f.exists():
            data = json.loads(f.read_text())
            print(f"  {f}: {json.dumps(data.get('summary', data))[:300]}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
