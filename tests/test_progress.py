"""Progress bars redraw rarely in a log file and normally on a terminal."""

from __future__ import annotations

import io

from pipeline.progress import LOG_REDRAW_S, progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _redraws(stream: io.StringIO) -> int:
    return stream.getvalue().count("\r")


def test_a_log_file_gets_few_redraws() -> None:
    log = io.StringIO()
    bar = progress(range(2000), file=log, mininterval=0, miniters=1)
    assert bar.mininterval == LOG_REDRAW_S
    for _ in bar:
        pass
    assert _redraws(log) <= 3  # the first draw and the final count
    assert "2000/2000" in log.getvalue()


def test_a_terminal_keeps_tqdm_redraws() -> None:
    term = _Terminal()
    for _ in progress(range(2000), file=term, mininterval=0, miniters=1):
        pass
    assert _redraws(term) > 1000


def test_a_new_postfix_does_not_force_a_redraw_in_a_log_file() -> None:
    log = io.StringIO()
    bar = progress(total=500, file=log)
    for i in range(500):
        bar.set_postfix(loss=f"{i:.3f}")  # tqdm's default would redraw here every time
        bar.update(1)
    bar.close()
    assert _redraws(log) <= 3
    assert "loss=499.000" in log.getvalue()  # the final draw carries the latest postfix


def test_stage_connections_leave_progress_to_witforge(tmp_path) -> None:
    """DuckDB's own bar writes to stdout, a line per update outside a terminal (191 lines in
    one 10M-row curation run), between the stage summaries: stage connections turn it off."""
    from pipeline.config import load_build
    from pipeline.stage import connect

    (tmp_path / "m.csv").write_text("url,caption\n")
    y = tmp_path / "b.yaml"
    y.write_text(f"name: t\nruns_dir: {tmp_path / 'runs'}\nsources:\n  - path: m.csv\n")
    con = connect(load_build(y))
    assert con.execute("SELECT current_setting('enable_progress_bar')").fetchall() == [(False,)]
