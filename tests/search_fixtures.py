"""A small real build for the search tests: real images, real stages, a real server.

The committed fixture pool's clip art and emoji plus the seven openclipart PNGs (RGBA, P, LA)
go into crawl-style tars; the real embed stage embeds them with witforge-tiny (random weights,
seeded: embeddings of a random model are still deterministic, so who is whose nearest neighbour
is checkable), then the real clip_filter (clip_score_top), semantic_dedup (an exact copy of
one image is planted) and shard stages write the ledger the page reports. One pair carries a
hostile caption.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pages.search import SearchServer
from pages.search_api import Indices
from pages.search_index import SearchIndex
from pipeline.config import BuildConfig
from pipeline.stage import run_stage
from tests.curation_fixtures import crawl_run, make_build, mark_done
from tests.test_embed import fixture_pairs, random_checkpoint

REAL_IMAGES = Path(__file__).parent / "data" / "real_images"
HOSTILE = '<img src=x onerror="window.__pwned=1">'
STAGES = ("embed", "clip_filter", "semantic_dedup", "shard")


@dataclass
class SearchBuild:
    cfg: BuildConfig
    images: dict[str, bytes]  # uid -> the bytes the crawl stored
    captions: dict[str, str]
    hostile: str  # uid of the pair with the hostile caption
    copy: tuple[str, str]  # (original uid, uid of its planted exact copy)
    png: str  # uid of an RGBA openclipart PNG


def make_search_build(tmp: Path) -> SearchBuild:
    ckpt = random_checkpoint(tmp / "tiny.pt", "witforge-tiny", seed=0)
    cfg = make_build(tmp, f"embed:\n  model: witforge-tiny\n  checkpoint: {ckpt}\n"
                          "  batch_size: 16\n  workers: 1\n"
                          "clip_filter:\n  filters: [clip_score_top]\n  fraction: 0.8\n"
                          "semantic_dedup:\n  enabled: true\n  eps: 0.0002\n")
    pairs = fixture_pairs(36)
    for p in sorted(REAL_IMAGES.glob("*.png")):
        words = [w for w in p.stem.split("_") if w and not w.isdigit()]
        pairs.append((f"oc-{p.stem}", " ".join(words), p.read_bytes()))
    pairs.append(("hostile-caption", HOSTILE, fixture_pairs(1, start=60)[0][2]))
    original = pairs[5]
    pairs.append(("planted-copy", "a copy of " + original[1], original[2]))
    rows = crawl_run(cfg, pairs, upstream="image_dedup", per_tar=16)
    for i, r in enumerate(rows):  # two sources, for the source filter
        r["source"] = "cc3m" if i % 3 == 0 else "laion"
    mark_done(cfg, "image_dedup", rows)
    for stage in STAGES:
        run_stage(cfg, stage, log=lambda s: None)
    return SearchBuild(cfg, {u: d for u, _, d in pairs}, {u: c for u, c, _ in pairs},
                       "hostile-caption", (original[0], "planted-copy"),
                       "oc-chemistry_flask_matthew__01")


@contextmanager
def serving(indices: list[SearchIndex], host: str = "127.0.0.1") -> Iterator[SearchServer]:
    """A real server on a free port, in a thread; shut down on exit."""
    server = SearchServer(Indices(indices), host, 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
