"""Benchmarks: each bench_<area>.py runs witforge side by side with its peer (bench/run.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_results(path: Path, result: dict[str, Any]) -> None:
    """Write a bench's figures to bench/results/<area>.json and print its summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=1))
