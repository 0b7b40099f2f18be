"""What bench_crawl and bench_guard share: the demo manifests as build sources, and
img2dataset.download as the peer, in a fresh process, on the stage's url list and arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

PEER = """\
import json, sys
from img2dataset import download
if __name__ == "__main__":
    download(**json.load(open(sys.argv[1])))
"""


def demo_sources_yaml(manifests: Path) -> str:
    """The `sources:` block reading the demo web's three manifests."""
    return (
        "sources:\n"
        f"  - {{path: {manifests}/cc3m.tsv, format: tsv, header: false, caption_col: column0, "
        "url_col: column1, tag: cc3m}\n"
        f"  - {{path: {manifests}/laion.parquet, url_col: URL, caption_col: TEXT, tag: laion}}\n"
        f"  - {{path: {manifests}/web.jsonl, url_col: url, caption_col: alt, tag: web}}\n")


def write_peer_job(cfg: Any, folder: Path, timeout: float | None = None) -> list[str]:
    """Write the uid-sorted url list the crawl stage would write and img2dataset's arguments
    into ``folder``; returns the command that runs img2dataset on them."""
    import sys

    from pipeline.crawl_attempt import Attempt, download_kwargs
    from pipeline.stage import kept_of

    urls = folder / "urls.parquet"
    duckdb.sql(f"COPY (SELECT uid, url, caption FROM '{kept_of(cfg, 'text_filter')}' "
               f"ORDER BY uid) TO '{urls}' (FORMAT parquet)")
    kwargs = download_kwargs(cfg, Attempt(0, folder))
    if timeout is not None:
        kwargs["timeout"] = timeout
    (folder / "job.json").write_text(json.dumps(kwargs))
    (folder / "peer.py").write_text(PEER)
    return [sys.executable, str(folder / "peer.py"), str(folder / "job.json")]


def successes(folder: Path) -> int:
    """Images img2dataset reports as downloaded in ``folder``."""
    return duckdb.sql(f"SELECT count(*) FROM '{folder}/images/*.parquet' "
                      "WHERE status = 'success'").fetchall()[0][0]
