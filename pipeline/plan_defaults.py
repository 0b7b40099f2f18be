"""What `witforge plan` assumes where a pilot measured nothing: each default with its source,
and the two inputs a person gives it (the target size, and a prices file with a date).

Every figure here is a published one, quoted with where it was published, or (the guard's
ceiling) measured by one of witforge's benches, named; the planner prints the ones it used
under its table, so no projection leans on a number nobody can look up.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

IMG2DATASET_README = ("img2dataset README, 'Benchmarks' and 'Architecture notes' "
                      "(github.com/rom1504/img2dataset)")


@dataclass(frozen=True)
class Default:
    name: str
    value: float
    unit: str
    source: str

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "unit": self.unit,
                "source": self.source}


# The crawl's rate on the real web: "1350 images/s is the currently observed performance"
# (18M images in 3.7 h), and the LAION-400M example "at 1300 sample/s ... with one 16 cores
# 2Gbps machine" (dataset_examples/laion400m.md).
CRAWL_RATE = Default("crawl_images_per_s_per_node", 1350.0, "images/s per 16-core 2 Gbps node",
                     IMG2DATASET_README + ": 1,350 images/s observed (18M images in 3.7 h); "
                     "laion400m.md: 1,300 samples/s on one 16-core 2 Gbps machine")
CRAWL_NODE_CORES = 16
# Measured, not published: one guard proxy process's ceiling on loopback
# (bench/bench_guard_ceiling.py; its CPU seconds per request, http, a 64x64 PNG).
GUARD_RATE = Default("guard_requests_per_s_per_process", 3400.0,
                     "requests/s per guard process (one core)",
                     "witforge bench/bench_guard_ceiling.py, 2026-12-02, quiet 2-core VM: "
                     "3,387-3,676 requests/s per guard core over 3 runs, the process at "
                     "94-97 % of a core (http on loopback, 64x64 PNG)")
# "downloading a thousand average image per second requires about 130MB/s"
DOWNLOAD_BYTES = Default("downloaded_bytes_per_image", 130e3, "bytes",
                         IMG2DATASET_README + ": 'a thousand average image per second "
                         "requires about 130MB/s' (witforge records stored bytes, not "
                         "downloaded ones)")
# clip-retrieval README: "clip inference allows you to quickly (1500 sample/s on a 3080)"
EMBED_RATE = Default("embed_samples_per_s_per_gpu", 1500.0, "samples/s per GPU (ViT-B/32)",
                     "clip-retrieval README (github.com/rom1504/clip-retrieval): clip "
                     "inference at 1,500 samples/s on one RTX 3080")
EPOCHS = Default("train_epochs", 32.0, "epochs",
                 "open_clip's LAION-400M models are the 32-epoch runs (pretrained tag "
                 "laion400m_e32; docs/PRETRAINED.md, github.com/mlfoundations/open_clip)")
# open_clip docs/PRETRAINED.md, LAION-400M section: A100 (40 GB) GPU-hours for 32 epochs of
# LAION-400M (~12.8B samples seen).
LAION400M_SAMPLES_SEEN = 32 * 400e6
_PRETRAINED = "open_clip docs/PRETRAINED.md (github.com/mlfoundations/open_clip), LAION-400M: "
TRAIN_GPU_HOURS: dict[str, Default] = {
    "ViT-B-32": Default("train_gpu_hours_laion400m_32ep", 4600.0, "A100-40GB GPU-hours",
                        _PRETRAINED + "ViT-B/32, 128 A100 (40 GB) for ~36 h, 4,600 GPU-hours"),
    "ViT-B-16": Default("train_gpu_hours_laion400m_32ep", 10700.0, "A100-40GB GPU-hours",
                        _PRETRAINED + "ViT-B/16, 176 A100 (40 GB) for ~61 h, 10,700 GPU-hours"),
    "ViT-L-14": Default("train_gpu_hours_laion400m_32ep", 50800.0, "A100-40GB GPU-hours",
                        _PRETRAINED + "ViT-L/14, 400 A100 (40 GB) for ~127 h, 50,800 "
                        "GPU-hours"),
}

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_rows(text: str) -> int:
    """'400M' -> 400_000_000; also 100k, 1.6B, 3e6, 1_000_000, 12,800,000."""
    s = str(text).strip().replace("_", "").replace(",", "")
    m = re.fullmatch(r"(\d+(?:\.\d*)?(?:e\d+)?)\s*([kKmMbBgGtT]?)", s)
    if not m:
        raise ValueError(f"--rows {text!r}: give a count such as 400M, 1.6B, 100k or 3000000")
    n = float(m.group(1)) * _SUFFIX[m.group(2).lower()]
    if n < 1 or not math.isfinite(n):
        raise ValueError(f"--rows {text!r}: must be at least 1")
    return int(round(n))


PRICE_KEYS = {
    "date": "the day these prices were read (required: prices change)",
    "currency": "e.g. USD (shown beside every cost)",
    "source": "where the prices come from (a URL, a quote)",
    "core_hour": "one CPU core for one hour",
    "node_hour": "one node of --cores cores for one hour (instead of core_hour)",
    "gpu_hour": "one GPU for one hour",
    "network_gb": "per GB downloaded by the crawl",
}


@dataclass(frozen=True)
class Prices:
    path: str
    date: str
    currency: str
    source: str
    core_hour: float | None
    node_hour: float | None
    gpu_hour: float | None
    network_gb: float | None

    def as_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("path", "date", "currency", "source",
                                              "core_hour", "node_hour", "gpu_hour",
                                              "network_gb")}


def load_prices(path: str | Path) -> Prices:
    """A YAML or JSON file of per-hour prices with the date they were read; unknown keys and
    a missing date are errors that name the file and the key."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) if p.suffix != ".json" \
            else json.loads(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, json.JSONDecodeError) as e:
        raise ValueError(f"--prices {p}: cannot read it: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"--prices {p}: expected a mapping of keys "
                         f"({', '.join(PRICE_KEYS)})")
    unknown = sorted(set(data) - set(PRICE_KEYS))
    if unknown:
        raise ValueError(f"--prices {p}: unknown key {unknown[0]!r} (keys: "
                         f"{', '.join(PRICE_KEYS)})")
    if not data.get("date"):
        raise ValueError(f"--prices {p}: no 'date': say when these prices were read")
    nums: dict[str, float | None] = {}
    for k in ("core_hour", "node_hour", "gpu_hour", "network_gb"):
        v = data.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0):
            raise ValueError(f"--prices {p}: {k} must be a number >= 0, not {v!r}")
        nums[k] = None if v is None else float(v)
    if nums["core_hour"] is not None and nums["node_hour"] is not None:
        raise ValueError(f"--prices {p}: give core_hour or node_hour, not both")
    return Prices(path=str(p), date=str(data["date"]), currency=str(data.get("currency", "")),
                  source=str(data.get("source", "")), **nums)
