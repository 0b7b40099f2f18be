"""The demo manifests' files, and the truth table that says what every row is.

truth.parquet has one row per manifest row (exact repeats are rows too, so a uid can appear
twice: once as the original's kind, once as repeat_same_file/repeat_other_file):

  source          cc3m, laion or web: the file the row is in
  url, caption    as written in that file
  kind            'clean', a fault class, a junk kind, 'repeat_*', 'url_variant', or a
                  noise kind (mismatch_*_category, template, placeholder, near_duplicate,
                  head_copy)
  image_id        the image the URL serves in full (a pool image, a 'dv-' copy or a 'ph-'
                  placeholder), NULL when it serves none (404, 500, reset, truncated, html,
                  redirect loop)
  true_image_id   the pool image the caption describes; NULL when it describes none
                  (template, file name, boilerplate, empty, a fixed non-English phrase)
  true_caption    the served image's own caption (the pool caption of the URL's picture, or
                  what a placeholder shows)
  source_image_id the pool image a served 'dv-' copy was made from (= image_id for a pool
                  image, NULL for placeholders and unserved URLs)
  transform       the near-duplicate's transform, else NULL
  aligned         the caption describes the served image (NULL when nothing is served)
  uid             the uid ingest gives the row (captions.ingest_uid)
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.demoweb.captions import JUNK_KINDS, clean_caption, h, ingest_uid

TRUTH_SCHEMA = pa.schema([
    ("source", pa.string()), ("url", pa.string()), ("caption", pa.string()),
    ("kind", pa.string()), ("image_id", pa.string()), ("true_image_id", pa.string()),
    ("true_caption", pa.string()), ("source_image_id", pa.string()),
    ("transform", pa.string()), ("aligned", pa.bool_()), ("uid", pa.string())])
# Rows whose LAION-like `similarity` stand-in is lowered: their caption does not fit.
LOW_SIMILARITY = set(JUNK_KINDS) | {"template", "placeholder", "mismatch_other_category",
                                    "mismatch_same_category"}
FILES = [("cc3m", "cc3m.tsv"), ("laion", "laion.parquet"), ("web", "web.jsonl"),
         ("truth", "truth.parquet"), ("faults", "faults.parquet"), ("junk", "junk.parquet"),
         ("settings", "settings.json")]


def written_caption(x: dict) -> str:
    return clean_caption(x["caption"]) if x["source"] == "cc3m" else x["caption"]


def truth_rows(rows: list[dict]) -> list[dict]:
    out = []
    for x in rows:
        cap = written_caption(x)
        out.append({k: x[k] for k in ("source", "url", "kind", "image_id", "true_image_id",
                                      "true_caption", "source_image_id", "transform",
                                      "aligned")}
                   | {"caption": cap, "uid": ingest_uid(x["url"], cap)})
    return out


def write_files(rows: list[dict], truth: list[dict], faults: list[dict], junk: list[dict],
                settings: dict, out_dir: Path, seed: int) -> dict[str, str]:
    paths = {k: str(out_dir / f) for k, f in FILES}
    by = {s: [x for x in rows if x["source"] == s] for s in ("cc3m", "laion", "web")}
    with open(paths["cc3m"], "w", encoding="utf-8", newline="\n") as f:
        for x in by["cc3m"]:
            f.write(f"{written_caption(x)}\t{x['url']}\n")
    lo = by["laion"]
    sims = [round(0.28 + (h(seed, "sim", x["url"]) % 1200) / 10000
                  - (0.12 if x["kind"] in LOW_SIMILARITY else 0.0), 4) for x in lo]
    pq.write_table(pa.table({
        "URL": [x["url"] for x in lo], "TEXT": [x["caption"] for x in lo],
        "WIDTH": pa.array([x["img"]["width"] for x in lo], pa.float64()),
        "HEIGHT": pa.array([x["img"]["height"] for x in lo], pa.float64()),
        "similarity": pa.array(sims, pa.float64())}), paths["laion"])
    with open(paths["web"], "w", encoding="utf-8", newline="\n") as f:
        for x in by["web"]:
            f.write(json.dumps({"url": x["url"], "alt": x["caption"]}, ensure_ascii=False) + "\n")
    pq.write_table(pa.Table.from_pylist(truth, schema=TRUTH_SCHEMA), paths["truth"])
    pq.write_table(pa.Table.from_pylist(faults, schema=pa.schema(
        [("url", pa.string()), ("fault", pa.string()), ("image_id", pa.string()),
         ("expected", pa.string())])), paths["faults"])
    pq.write_table(pa.Table.from_pylist(junk, schema=pa.schema(
        [("source", pa.string()), ("url", pa.string()), ("caption", pa.string()),
         ("kind", pa.string()), ("repaired", pa.string())])), paths["junk"])
    Path(paths["settings"]).write_text(json.dumps(settings, indent=1, sort_keys=True) + "\n")
    return paths
