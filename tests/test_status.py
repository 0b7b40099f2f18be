"""`witforge status`: the plan it prints is the one the runner follows, with the reasons."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main as cli_main
from pipeline.config import load_build
from pipeline.stage import get_spec, run_stage, stage_dir
from pipeline.status import changes, plan

ROWS = ["http://h.org/1.jpg,a red apple on a wooden table",
        "http://h.org/2.jpg,IMG_1234.jpg",
        "http://h.org/3.jpg,two words",
        "http://h.org/4.jpg,a black cat on a red sofa"]


def _build(tmp_path: Path) -> Path:
    (tmp_path / "m.csv").write_text("url,caption\n" + "\n".join(ROWS) + "\n")
    (tmp_path / "mine.sql").write_text("NOT contains(caption, 'cat')\n")
    y = tmp_path / "build.yaml"
    y.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n  - path: m.csv\n"
                 "text_filter:\n  filters: [caption_length, mine.sql]\n")
    return y


def _by_folder(y: Path) -> dict:
    return {s.folder: s for s in plan(load_build(y))}


def _quiet(_: str) -> None:
    pass


def test_status_says_what_the_runner_will_do_and_why(tmp_path: Path, capsys) -> None:
    y = _build(tmp_path)
    cfg = load_build(y)
    assert all(not s.up_to_date and s.why == ["not run yet"] for s in plan(cfg))
    for name in ("ingest", "text_filter", "url_dedup"):
        run_stage(cfg, name, log=_quiet)
    st = _by_folder(y)
    assert [f for f, s in st.items() if s.up_to_date] == ["01_ingest", "02_text_filter",
                                                          "03_url_dedup"]
    assert st["02_text_filter"].kept == 1 and st["06_crawl"].why == ["not run yet"]

    # a changed setting: that stage and every one after it would run; the reason names the key
    y.write_text(y.read_text().replace("[caption_length, mine.sql]", "[mine.sql]"))
    st = _by_folder(y)
    assert st["01_ingest"].up_to_date and not st["02_text_filter"].up_to_date
    assert st["02_text_filter"].why == [
        "setting text_filter.filters ['caption_length', 'mine.sql'] -> ['mine.sql']"]
    assert st["03_url_dedup"].why == ["its input 02_text_filter changed"]
    # the runner agrees, and says the same when it runs the stage again
    said: list[str] = []
    cfg = load_build(y)
    report = run_stage(cfg, "text_filter", log=said.append, explain=changes)
    assert not report.get("skipped") and report["kept"] == 3
    assert said[0] == ("[02_text_filter] runs again: setting text_filter.filters "
                       "['caption_length', 'mine.sql'] -> ['mine.sql']")
    assert _by_folder(y)["02_text_filter"].up_to_date
    assert not _by_folder(y)["03_url_dedup"].up_to_date

    # an edited filter file and an edited manifest are named as input files
    (tmp_path / "mine.sql").write_text("NOT contains(caption, 'apple')\n")
    (tmp_path / "m.csv").write_text("url,caption\n" + "\n".join(ROWS[:3]) + "\n")
    st = _by_folder(y)
    assert st["01_ingest"].why == [f"changed file {tmp_path / 'm.csv'}"]
    assert st["02_text_filter"].why == ["its input 01_ingest changed", "changed file mine"]

    # through the CLI: a table, and --check fails while anything would run
    assert cli_main(["status", "--build", str(y)]) == 0
    assert cli_main(["status", "--build", str(y), "--check"]) == 1
    out = capsys.readouterr().out
    assert re.search(r"^01_ingest +will run +4 +changed file", out, re.M)
    assert "would run, from 01_ingest" in out


def test_status_names_an_interrupted_stage_and_an_old_report(tmp_path: Path) -> None:
    y = _build(tmp_path)
    cfg = load_build(y)
    for name in ("ingest", "text_filter"):
        run_stage(cfg, name, log=_quiet)
    # a report without recorded inputs (an older witforge) with another fingerprint
    path = stage_dir(cfg, get_spec("ingest")) / "report.json"
    report = json.loads(path.read_text())
    del report["inputs"]
    report["fingerprint"] = "0" + report["fingerprint"]
    path.write_text(json.dumps(report))
    assert _by_folder(y)["01_ingest"].why == [
        "its report predates recorded inputs (written by an older witforge)"]
    # a stage killed mid-run leaves its temp folder and no report
    shutil.rmtree(stage_dir(cfg, get_spec("text_filter")))
    (cfg.run_dir / ".02_text_filter.tmp-4242").mkdir()
    assert _by_folder(y)["02_text_filter"].why == [
        "an earlier run was interrupted; it starts again"]


@pytest.mark.parametrize("argv", [["status"], ["status", "--build"]])
def test_status_without_a_build_is_a_usage_error(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli_main(argv)
    assert e.value.code == 2
