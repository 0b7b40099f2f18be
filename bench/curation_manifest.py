"""The curation bench's generated manifest (bench_curation, bench_plan): url, caption rows."""

from __future__ import annotations

from pathlib import Path

import duckdb


def _cap_sql(i: str, h: str) -> str:
    """SQL for the caption of row ``i`` (hash ``h``): 3-14 word draws, each hashing (i, j)."""
    return (f"array_to_string(list_transform(range(3 + ({h} % 12)::INT), "
            f"lambda j: words[1 + (hash({i}, j) % 65536)::INT]), ' ')")


def _url_sql(i: str, h: str) -> str:
    """SQL for the URL of row ``i`` (hash ``h``)."""
    return (f"'http://' || CASE WHEN {h} % 97 = 0 THEN 'IMG' ELSE 'img' END || ({h} % 5000) "
            f"|| '.example' || (['.com', '.org', '.net'])[1 + ({h} % 3)::INT] || '/p/' "
            f"|| ({i} * 7919 % 1000003) || '/' || md5({i}::VARCHAR)[1:10] || '.jpg'")


def make_manifest(n: int, path: Path) -> Path:
    """Generate the manifest with DuckDB (deterministic: every draw hashes the row number).

    One streaming query, in row order (preserve_insertion_order), so memory stays flat at any
    n. A repeat takes the previous row's pair, recomputed from i - 1 (only for those rows);
    the rows are the same as those of the earlier ``lag() OVER (ORDER BY i)`` form, on which
    the committed 10M figures were measured, without its window and sort over all n rows
    (checked: byte-identical files at 200k and 2M rows; the window form's peak RSS grew with
    n, 1.14 GiB at 2M rows, this one stays near 0.17 GiB).
    """
    if path.exists():
        return path
    from wordfreq import top_n_list, word_frequency

    words = top_n_list("en", 30000)
    freqs = [word_frequency(w, "en") for w in words]
    total = sum(freqs)  # wordfreq's top-30k English words, renormalized
    cum, acc = [], 0.0
    for f in freqs:
        acc += f / total
        cum.append(acc)
    path.parent.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect()
    con.execute("SET memory_limit='4GB'; SET preserve_insertion_order=true")
    # 2^16 quantiles of the word distribution: a word draw is then one list index
    import bisect

    words_q = [words[min(bisect.bisect_left(cum, (q + 0.5) / 65536), len(words) - 1)]
               for q in range(65536)]
    con.execute("CREATE TABLE wl AS SELECT ?::VARCHAR[] AS words", [words_q])
    prev_u = f"CASE WHEN i > 0 THEN {_url_sql('(i - 1)', 'hp')} END"  # NULL for row 0
    prev_cap = f"CASE WHEN i > 0 THEN {_cap_sql('(i - 1)', 'hp')} END"
    con.execute(f"""
    COPY (
      WITH base AS (
        SELECT i, hash(i, 'row') AS h, hash(i - 1, 'row') AS hp, words
        FROM range({n}) t(i), wl
      ), gen AS (
        SELECT i, h, hp, words, {_cap_sql('i', 'h')} AS cap, {_url_sql('i', 'h')} AS u
        FROM base
      )
      SELECT
        -- ~10 %: repeat the previous row's pair under a changed URL form
        CASE
          WHEN h % 20 = 1 THEN replace({prev_u}, 'http://img', 'http://IMG') || '?utm_source=x'
          WHEN h % 20 = 2 THEN replace({prev_u}, '.example.com/', '.example.com:80/') || '#top'
          ELSE u END AS url,
        CASE
          WHEN h % 20 IN (1, 2) THEN {prev_cap}
          WHEN h % 100 = 3 THEN 'IMG_' || (h % 10000) || '.jpg'
          WHEN h % 100 = 4 THEN 'click here to enlarge ' || cap
          WHEN h % 100 = 5 THEN (h % 100000)::VARCHAR
          WHEN h % 100 = 6 THEN split_part(cap, ' ', 1)
          WHEN h % 200 = 7 THEN cap || ' café crème brûlée'
          WHEN h % 200 = 8 THEN cap || ' cafÃ© crÃ¨me'  -- mojibake for ftfy
          WHEN h % 200 = 9 THEN cap || ' — “quoted” naïve'
          WHEN h % 200 = 10 THEN cap || ' â€œquotedâ€\x9d'
          WHEN h % 200 = 11 THEN '東京 ' || cap
          WHEN h % 200 = 12 THEN cap || ' ½ €'
          ELSE cap END AS caption
      FROM gen
    ) TO '{path}.tmp' (FORMAT parquet, ROW_GROUP_SIZE 122880)""")
    Path(f"{path}.tmp").rename(path)
    return path
