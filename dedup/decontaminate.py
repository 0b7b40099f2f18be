"""Stage decontaminate: drop training images that are near-copies of evaluation images.

The build's ``decontaminate.eval_sets`` are folders in CLIP_benchmark's WebDataset layout
(``<set>/<split>/<n>.tar`` whose members are ``<key>.webp|.png|.jpg`` with ``.cls``/``.txt``);
every image member of every tar under the folder is pHashed (cached in the stage's work
folder). A training row whose pHash is within ``decontaminate.max_distance`` of any eval
image is dropped as ``eval_contamination``; detail = ``<set>/<tar>:<key>`` of the closest one.
The training pHash comes from image_dedup's ``phash`` column, or is computed here when that
stage ran without pHash (then rows whose image does not decode drop as ``unreadable_image``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from dedup.lsh import default_bands, near_pairs
from dedup.phash import attach_phash, hash_tars
from pipeline.config import BuildConfig
from pipeline.stage import StageContext, StageError, StageSpec

_MATCH_SQL = (Path(__file__).parent / "sql" / "decontaminate_match.sql").read_text()


def eval_tars(cfg: BuildConfig) -> list[tuple[str, Path, Path]]:
    """(set name, set folder, tar) for every tar of every eval set's test split, in a stable
    order. A set's train/ split (a linear probe's training images) is not what a model is
    scored on, so training on such images is no contamination; a set laid out without
    split folders has all its tars checked."""
    out = []
    for i, entry in enumerate(cfg.decontaminate.eval_sets):
        folder = cfg.resolve(entry)
        if not folder.is_dir():
            raise StageError(f"{cfg.path}: decontaminate.eval_sets[{i}]: {folder} is not a folder")
        tars = sorted((folder / "test").rglob("*.tar")) if (folder / "test").is_dir() else \
            sorted(folder.rglob("*.tar"))
        if not tars:
            raise StageError(f"{cfg.path}: decontaminate.eval_sets[{i}]: no .tar files under "
                             f"{folder} (expected CLIP_benchmark's webdataset layout)")
        out += [(folder.name, folder, t) for t in tars]
    return out


def fingerprint_inputs(cfg: BuildConfig, spec: StageSpec) -> dict:
    """Changing an eval set's tars re-runs the stage."""
    files = []
    for name, _, tar in eval_tars(cfg):
        st = os.stat(tar)
        files.append([name, str(tar), st.st_size, st.st_mtime_ns])
    return {"eval_tars": files, "phash_decode": cfg.image_dedup.phash_decode}


def run(ctx: StageContext) -> dict[str, Any]:
    cfg = ctx.cfg.decontaminate
    con = ctx.connect()
    started = time.time()
    con.execute(f"CREATE TEMP TABLE src AS SELECT * FROM read_parquet('{ctx.input_path}')")
    cols = [r[0] for r in con.execute("DESCRIBE src").fetchall()]
    report: dict[str, Any] = {}
    if "phash" in cols:
        con.execute("CREATE TEMP TABLE hashed AS SELECT *, NULL::VARCHAR AS phash_error FROM src")
    else:
        report.update(attach_phash(con, ctx.cfg.run_dir, ctx.work_dir / "phash",
                                   ctx.cfg.image_dedup.workers,
                                   decode=ctx.cfg.image_dedup.phash_decode))

    # eval images: pHash every image member of every eval tar
    tars = eval_tars(ctx.cfg)
    # eval images are hashed as the training rows were (image_dedup's decode)
    files = hash_tars([str(t) for _, _, t in tars], ctx.work_dir / "phash_eval",
                      ctx.cfg.image_dedup.workers, desc="pHash eval",
                      decode=ctx.cfg.image_dedup.phash_decode)
    meta = pa.table({
        "abs": [str(t) for _, _, t in tars], "set_name": [n for n, _, _ in tars],
        "tar_rel": [str(t.relative_to(f)) for _, f, t in tars],
    })
    con.register("eval_tar_meta", meta)
    con.execute("CREATE TEMP TABLE eval_all AS SELECT m.set_name, m.tar_rel, p.key, p.phash, "
                "p.error FROM read_parquet($files) p JOIN eval_tar_meta m ON p.tar = m.abs",
                {"files": [str(f) for f in files]})
    con.execute("CREATE TEMP TABLE eval_h AS SELECT row_number() OVER (ORDER BY set_name, "
                "tar_rel, key) AS id, phash AS h, set_name, tar_rel, key FROM eval_all "
                "WHERE phash IS NOT NULL")
    con.execute("CREATE TEMP TABLE train_h AS SELECT row_number() OVER (ORDER BY uid) AS id, "
                "uid, phash AS h FROM hashed WHERE phash IS NOT NULL")
    bands = default_bands(cfg.max_distance)
    # no hot-bucket cap: a contaminated row must never be missed
    near_pairs(con, "train_h", "eval_h", cfg.max_distance, bands, "dc_pairs", max_bucket=0)
    con.execute(_MATCH_SQL)

    stage = ctx.spec.name
    con.execute(f"""
        CREATE TEMP TABLE dropped AS
        SELECT uid, '{stage}' AS stage, 'unreadable_image' AS reason, phash_error AS detail
        FROM hashed WHERE phash IS NULL
        UNION ALL
        SELECT uid, '{stage}', 'eval_contamination', detail FROM contaminated
    """)
    con.execute(f"COPY (SELECT * FROM dropped ORDER BY uid) TO '{ctx.dropped_path}' "
                "(FORMAT parquet)")
    con.execute(f"COPY (SELECT * EXCLUDE (phash_error) FROM hashed "
                f"WHERE uid NOT IN (SELECT uid FROM dropped) ORDER BY uid) "
                f"TO '{ctx.kept_path}' (FORMAT parquet)")
    per_set = dict(con.execute("SELECT set_name, count(*) FROM eval_h GROUP BY 1 "
                               "ORDER BY 1").fetchall())
    hits = dict(con.execute("SELECT split_part(detail, '/', 1), count(*) FROM contaminated "
                            "GROUP BY 1 ORDER BY 1").fetchall())
    report.update({
        "eval_images_checked": sum(per_set.values()),
        "eval_images_unreadable": con.execute(
            "SELECT count(*) FROM eval_all WHERE phash IS NULL").fetchall()[0][0],
        "eval_images_by_set": per_set, "contaminated_by_set": hits,
        "max_distance": cfg.max_distance, "lsh_bands": bands,
        "decontaminate_seconds": round(time.time() - started, 2),
    })
    con.close()
    return report
