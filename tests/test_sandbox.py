"""The filter sandbox: user SQL cannot read or write files, reach the network, load
extensions or unlock itself; the error names the filter. Real DuckDB, real files."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa
import pytest

from pipeline.config import load_build
from pipeline.filter import apply_filters, load_filter
from pipeline.sandbox import open_sandbox
from pipeline.stage import StageError, run_stage

ROWS = pa.table({"uid": ["a", "b"], "url": ["http://h.org/1", "http://h.org/2"],
                 "caption": ["a red apple", "a blue sky"], "source": ["s", "s"]})


@pytest.fixture()
def secret(tmp_path: Path) -> Path:
    p = tmp_path / "secret.csv"
    p.write_text("uid,x\na,1\n")
    return p


def _attempts(tmp_path: Path, secret: Path) -> dict[str, str]:
    out = tmp_path / "leak.csv"
    return {
        "read_csv": f"uid IN (SELECT uid FROM read_csv('{secret}'))",
        "passwd": "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
        "read_text": "(SELECT length(content) FROM read_text('/etc/hostname')) > 0",
        "glob": "(SELECT count(*) FROM glob('/etc/*')) > 0",
        "http": "(SELECT count(*) FROM read_parquet('http://127.0.0.1:9/x.parquet')) > 0",
        "copy_to": f"COPY (SELECT uid FROM pairs) TO '{out}'",
        "attach": f"ATTACH '{tmp_path / 'x.duckdb'}' AS x",
        "install": "INSTALL httpfs",
        "load": "LOAD httpfs",
        "unlock": "SET enable_external_access = true",
        "query_read": f"SELECT uid FROM read_csv('{secret}')",
        "python_scan": "uid IN (SELECT uid FROM ROWS)",  # a Python variable of the caller
    }


@pytest.mark.parametrize("name", ["read_csv", "passwd", "read_text", "glob", "http",
                                  "copy_to", "attach", "install", "load", "unlock",
                                  "query_read", "python_scan"])
def test_filter_cannot_escape(tmp_path: Path, secret: Path, name: str) -> None:
    sql = _attempts(tmp_path, secret)[name]
    path = tmp_path / f"evil_{name}.sql"
    path.write_text(sql + "\n")
    con = open_sandbox(None, {"pairs": ROWS})
    with pytest.raises(StageError) as e:
        apply_filters(con, [load_filter(path)], "text_filter")
    assert f"filter evil_{name}" in str(e.value)
    assert str(path) in str(e.value)
    assert not (tmp_path / "leak.csv").exists()
    assert not (tmp_path / "x.duckdb").exists()


def test_file_access_error_says_sandbox(tmp_path: Path) -> None:
    path = tmp_path / "peek.sql"
    path.write_text("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0")
    con = open_sandbox(None, {"pairs": ROWS})
    with pytest.raises(StageError, match="refused by the sandbox"):
        apply_filters(con, [load_filter(path)], "text_filter")


def test_direct_statements_are_refused_and_settings_stay_locked(tmp_path: Path,
                                                                secret: Path) -> None:
    con = open_sandbox(None, {"pairs": ROWS})
    leak = ROWS  # with replacement scans on, "FROM leak" would read this local  # noqa: F841
    for stmt in (f"SELECT * FROM read_csv('{secret}')",
                 f"COPY pairs TO '{tmp_path / 'out.parquet'}'",
                 f"ATTACH '{tmp_path / 'db.duckdb'}'",
                 "SET enable_external_access = true",
                 "SET lock_configuration = false",
                 "SET python_enable_replacements = true",
                 "SET autoinstall_known_extensions = true",
                 "INSTALL httpfs", "LOAD httpfs", "SELECT * FROM leak"):
        with pytest.raises(duckdb.Error):
            con.execute(stmt)
    assert not list(tmp_path.glob("out.parquet")) and not list(tmp_path.glob("db.duckdb"))
    # the registered input and in-memory work still function
    assert con.execute("SELECT count(*) FROM pairs").fetchall() == [(2,)]
    con.execute("CREATE TEMP TABLE t AS SELECT * FROM pairs")


def test_inputs_load_from_parquet_and_spill_within_the_build_limits(tmp_path: Path) -> None:
    src = tmp_path / "in.parquet"
    duckdb.sql(f"COPY (SELECT md5(i::VARCHAR) uid, 'cap ' || i caption FROM range(300000) "
               f"t(i)) TO '{src}'")
    (tmp_path / "m.csv").write_text("url,caption\n")
    (tmp_path / "b.yaml").write_text(
        f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n  - path: m.csv\n"
        f"duckdb:\n  memory_limit: 40MB\n  temp_directory: {tmp_path / 'spill'}\n")
    cfg = load_build(tmp_path / "b.yaml")
    con = open_sandbox(cfg, {"pairs": src})
    # a sort bigger than the memory limit must spill to the temp folder, not fail
    n = con.execute("SELECT count(*) FROM (SELECT DISTINCT ON (caption) * FROM pairs "
                    "ORDER BY uid)").fetchall()[0][0]
    assert n == 300000
    assert con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0] in (
        "38.1 MiB", "40.0 MB", "38.1MiB")


def test_stage_fails_naming_the_filter(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("url,caption\nhttp://h.org/a.jpg,a red apple\n")
    (tmp_path / "steal.sql").write_text("(SELECT count(*) FROM read_csv('/etc/passwd')) > 0\n")
    (tmp_path / "b.yaml").write_text(
        f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n  - path: m.csv\n"
        "text_filter:\n  filters: [caption_length, steal.sql]\n")
    cfg = load_build(tmp_path / "b.yaml")
    run_stage(cfg, "ingest", log=lambda s: None)
    with pytest.raises(StageError, match=r"filter steal \(.*steal.sql\): refused by the sandbox"):
        run_stage(cfg, "text_filter", log=lambda s: None)
    assert not (cfg.run_dir / "02_text_filter").exists()


def test_lang_id_udf_handles_awkward_text() -> None:
    # CLD2 itself refuses control characters; the UDF retries on a cleaned copy
    t = pa.table({"uid": ["1", "2", "3", "4"],
                  "caption": ["a dog running on the beach", "\x00\x1b", None,
                              "a dog\x00 running on the beach at sunset"]})
    con = open_sandbox(None, {"pairs": t})
    got = con.execute("SELECT uid, lang_id(caption) FROM pairs ORDER BY uid").fetchall()
    assert got == [("1", "en"), ("2", "un"), ("3", None), ("4", "en")]
