"""Stage image_dedup: exact (sha256) and near (perceptual hash) duplicate images.

1. pHash every crawled image (``dedup.phash``: in parallel over the crawl's tars, cached in
   the stage's work folder). An image whose bytes are missing or do not decode is dropped as
   ``unreadable_image`` — it could not be trained on anyway.
2. Exact duplicates: equal ``sha256`` (of the stored bytes, as img2dataset wrote them); the
   smallest uid of each group survives; the others are ``duplicate_image_sha256``.
3. Near duplicates: pHash Hamming distance ≤ ``image_dedup.phash_max_distance``; candidate
   pairs from banded LSH as a DuckDB join (``dedup.lsh``), clusters are connected components,
   each keeps its smallest uid; the others are ``near_duplicate_image``. Clustering is
   transitive: a chain a–b–c keeps a and drops c even if c is farther than k from a.

Every drop records the kept uid in ``detail``. kept.parquet = every input column + ``phash``
(UBIGINT, the 64-bit pHash; ``f"{phash:016x}"`` is imagehash's hex string).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dedup.lsh import components, near_pairs
from dedup.phash import attach_phash
from pipeline.stage import StageContext

_SQL = Path(__file__).parent / "sql"


def _sql(name: str) -> str:
    return (_SQL / name).read_text()


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.image_dedup
    con = ctx.connect()
    cols = [r[0] for r in con.execute(
        f"DESCRIBE SELECT * FROM read_parquet('{ctx.input_path}')").fetchall()]
    exclude = " EXCLUDE (phash)" if "phash" in cols else ""
    con.execute(f"CREATE TEMP TABLE src AS SELECT *{exclude} "
                f"FROM read_parquet('{ctx.input_path}')")
    report: dict[str, Any] = {}
    started = time.time()
    if cfg.phash:
        report.update(attach_phash(con, ctx.cfg.run_dir, ctx.work_dir / "phash", cfg.workers,
                                   decode=cfg.phash_decode))
        report["phash_seconds"] = round(time.time() - started, 2)
    else:
        con.execute("CREATE TEMP TABLE hashed AS SELECT *, NULL::UBIGINT AS phash, "
                    "NULL::VARCHAR AS phash_error FROM src")
    # without pHash nothing decoded the images, so none is known to be unreadable
    con.execute("CREATE TEMP VIEW readable AS SELECT * FROM hashed"
                + ("" if not cfg.phash else " WHERE phash IS NOT NULL"))

    if cfg.sha256 and "sha256" in cols:
        con.execute(_sql("image_sha256.sql"))
    else:
        con.execute("CREATE TEMP TABLE sha_drop (uid VARCHAR, kept_uid VARCHAR)")

    con.execute("CREATE TEMP TABLE near_drop (uid VARCHAR, kept_uid VARCHAR)")
    if cfg.phash:
        t0 = time.time()
        con.execute(_sql("image_phash_values.sql"))
        lsh: dict[str, Any] = {}
        pairs = near_pairs(con, "hv", None, cfg.phash_max_distance, cfg.phash_bands, "ph_pairs",
                           max_bucket=cfg.lsh_max_bucket, stats=lsh)
        edges = con.execute("SELECT a, b FROM ph_pairs").fetchnumpy()
        nodes, roots = components(edges["a"], edges["b"])
        con.register("comp_arrow", {"id": nodes, "root": roots})
        con.execute("CREATE TEMP TABLE comp AS SELECT * FROM comp_arrow")
        con.execute(_sql("image_phash_drop.sql"))
        report.update({
            "phash_max_distance": cfg.phash_max_distance, "lsh_bands": lsh["blocks"],
            "lsh_tables": lsh["tables"], "lsh_hot_buckets": lsh["hot_buckets"],
            "lsh_hot_rows": lsh["hot_rows"],
            # pigeonhole: every pair within k shares a table's blocks, unless a bucket was capped
            "lsh_recall_complete": lsh["recall_complete"],
            "distinct_phashes": con.execute("SELECT count(*) FROM hv").fetchall()[0][0],
            "near_pairs": pairs, "near_clusters": int(len(set(roots.tolist()))),
            "lsh_seconds": round(time.time() - t0, 2),
        })

    stage = ctx.spec.name
    con.execute(f"""
        CREATE TEMP TABLE dropped AS
        SELECT uid, '{stage}' AS stage, 'unreadable_image' AS reason, phash_error AS detail
        FROM hashed WHERE phash IS NULL AND $on
        UNION ALL
        SELECT uid, '{stage}', 'duplicate_image_sha256', kept_uid FROM sha_drop
        UNION ALL
        SELECT uid, '{stage}', 'near_duplicate_image', kept_uid FROM near_drop
    """, {"on": cfg.phash})
    con.execute(f"COPY (SELECT * FROM dropped ORDER BY uid) TO '{ctx.dropped_path}' "
                "(FORMAT parquet)")
    excluded = "phash_error" if cfg.phash else "phash_error, phash"
    con.execute(f"COPY (SELECT * EXCLUDE ({excluded}) FROM hashed "
                f"WHERE uid NOT IN (SELECT uid FROM dropped) ORDER BY uid) "
                f"TO '{ctx.kept_path}' (FORMAT parquet)")
    con.close()
    return report
