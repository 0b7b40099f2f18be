"""The demo web: pool assembly (fixture and package layouts), the fault server, the manifests."""

from __future__ import annotations

import http.client
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import duckdb
import ftfy
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.demoweb import pool as poolmod
from pipeline.demoweb.manifests import FAULTS, JUNK_KINDS, write_manifests
from pipeline.demoweb.pool import SourceRoots, assemble_pool, select, split_of
from pipeline.demoweb.server import ROBOTS_TXT, DemoWeb
from pipeline.demoweb.sources import Candidate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assemble_pool(tmp_path_factory.mktemp("demo"), prefer_system=False)


@pytest.fixture(scope="module")
def rows(pool_dir: Path) -> list[dict]:
    return pq.read_table(pool_dir / "pool.parquet").to_pylist()


@pytest.fixture(scope="module")
def web(pool_dir: Path):
    with DemoWeb(pool_dir, slow_seconds=2.0) as w:
        yield w


def _web_row(rows: list[dict], ext: str | None = None) -> dict:
    return next(r for r in rows if r["split"] == "web" and (ext is None
                                                             or r["file"].endswith(ext)))


def _get(url: str, timeout: float = 1.0) -> tuple[int, dict, bytes, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read(), r.url


# ---------------------------------------------------------------- pool


def test_fixture_pool_has_real_images_captions_and_a_heldout_split(pool_dir, rows):
    assert {"image_id", "file", "caption", "category", "origin", "split", "license"} <= set(
        rows[0])
    assert len(rows) >= 200
    assert {r["origin"] for r in rows} == {"openclipart", "emoji"}
    for r in rows:
        assert r["split"] == split_of(r["image_id"])
        assert r["category"].startswith(r["origin"] + "/")
        with Image.open(pool_dir / r["file"]) as im:
            im.load()
            assert im.size == (r["width"], r["height"])
    held = sum(r["split"] == "heldout" for r in rows)
    assert 0.04 < held / len(rows) < 0.2
    assert len({r["image_id"] for r in rows}) == len(rows)
    assert not any("mnist" in r["category"] or "fashion" in r["category"] for r in rows)
    # Other tests serve the committed fixture folder itself as a pool: its split must agree.
    fx = pq.read_table(poolmod.FIXTURE_DIR / "pool.parquet").to_pylist()
    assert [(r["image_id"], r["split"]) for r in fx] == [(r["image_id"], r["split"]) for r in rows]


def test_pool_build_is_idempotent_and_rebuilds_on_new_settings(tmp_path, capsys):
    p1 = assemble_pool(tmp_path, prefer_system=False)
    stamp = (p1 / "pool.parquet").stat().st_mtime_ns
    assert assemble_pool(tmp_path, prefer_system=False) == p1
    assert (p1 / "pool.parquet").stat().st_mtime_ns == stamp
    assemble_pool(tmp_path, prefer_system=False, max_side=128)
    assert (p1 / "pool.parquet").stat().st_mtime_ns != stamp
    assert json.loads((p1 / "settings.json").read_text())["max_side"] == 128


def test_empty_package_roots_fall_back_to_fixture_and_say_so(tmp_path, capsys):
    none = tmp_path / "absent"
    p = assemble_pool(tmp_path / "o", roots=SourceRoots(none, none, none / "f.ttf", none / "t"))
    assert "FELL BACK" in capsys.readouterr().err
    assert json.loads((p / "settings.json").read_text())["source"] == "fixture"
    assert pq.read_metadata(p / "pool.parquet").num_rows == pq.read_metadata(
        poolmod.FIXTURE_DIR / "pool.parquet").num_rows


def _package_trees(tmp_path: Path, rows: list[dict], pool_dir: Path) -> SourceRoots:
    """Debian's layouts (openclipart png/+svg/, tuxpaint stamps with .txt) from fixture images,
    upscaled so the downscaling is exercised."""
    oc, tp = tmp_path / "openclipart", tmp_path / "stamps"
    clips = [r for r in rows if r["origin"] == "openclipart"][:6]
    for i, r in enumerate(clips):
        cat = ["animals", "food"][i % 2]
        png = oc / "png" / cat / f"thing_{i}_01.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        Image.open(pool_dir / r["file"]).resize((400, 300)).save(png)
        svg = oc / "svg" / cat / f"thing_{i}_01.svg"
        svg.parent.mkdir(parents=True, exist_ok=True)
        title = f"<dc:title>Title &amp; {i}</dc:title>" if i % 3 else ""
        svg.write_text(f"<svg><metadata>{title}<dc:description></dc:description></metadata>"
                       "</svg>")
    (oc / "png" / "food" / "link.png").symlink_to(oc / "png" / "food" / "thing_1_01.png")
    for i, r in enumerate([r for r in rows if r["origin"] == "emoji"][:3]):
        d = tp / "animals" / "pets"
        d.mkdir(parents=True, exist_ok=True)
        Image.open(pool_dir / r["file"]).convert("RGBA").save(d / f"pet{i}.png")
        (d / f"pet{i}.txt").write_text(f"A pet number {i}.\nde.utf8=Ein Haustier {i}.\n")
    (tp / "animals" / "pets" / "orphan.txt").write_text("No image here.\n")
    return SourceRoots(oc, tp, tmp_path / "no-font.ttf", tmp_path / "no-test.txt")


def test_package_layouts_give_captions_categories_and_downscaled_images(tmp_path, rows,
                                                                        pool_dir):
    roots = _package_trees(tmp_path, rows, pool_dir)
    p = assemble_pool(tmp_path / "out", roots=roots, max_side=64, workers=1)
    got = {r["caption"]: r for r in pq.read_table(p / "pool.parquet").to_pylist()}
    assert set(got) == {"thing 0 01", "Title & 1", "Title & 2", "thing 3 01", "Title & 4",
                        "Title & 5", "A pet number 0.", "A pet number 1.", "A pet number 2."}
    assert got["Title & 1"]["category"] == "openclipart/food"
    assert got["A pet number 2."]["category"] == "tuxpaint/animals"
    assert got["A pet number 2."]["file"].endswith(".jpg")
    assert got["Title & 2"]["file"].endswith(".png")
    for r in got.values():
        with Image.open(p / r["file"]) as im:
            assert max(im.size) <= 64 and im.mode == "RGB"
    again = assemble_pool(tmp_path / "again", roots=roots, max_side=64, workers=1)
    assert pq.read_table(again / "pool.parquet").column("sha256").to_pylist() == \
        pq.read_table(p / "pool.parquet").column("sha256").to_pylist()


def test_select_balances_origins_and_categories():
    def cands(origin: str, cat: str, n: int) -> list[Candidate]:
        return [Candidate(f"{origin}-{cat}-{i}", origin, f"{origin}/{cat}", "c", "")
                for i in range(n)]

    pool = cands("openclipart", "computer", 100) + cands("openclipart", "animals", 5) \
        + cands("tuxpaint", "food", 3) + cands("emoji", "face", 50)
    picked = select(pool, 20)
    cats = [c.category for c in picked]
    assert len(picked) == 20
    assert cats.count("tuxpaint/food") == 3  # a small origin gives its spare share away
    assert cats.count("openclipart/animals") == 5
    assert cats.count("emoji/face") + cats.count("openclipart/computer") == 12
    assert select(list(reversed(pool)), 20) == picked


def test_demo_data_cli_fixture_only(tmp_path, capsys):
    assert poolmod.main(["--out", str(tmp_path), "--fixture-only"]) == 0
    out = capsys.readouterr().out
    assert "emoji/web=" in out and (tmp_path / "pool" / "pool.parquet").is_file()


# ---------------------------------------------------------------- server


def test_serves_web_images_byte_exact_and_hides_heldout(web, rows, pool_dir):
    for ext, ctype in ((".png", "image/png"), (".jpg", "image/jpeg")):
        r = _web_row(rows, ext)
        code, headers, body, _ = _get(f"{web.base_url}/img/{Path(r['file']).name}")
        assert code == 200 and headers["Content-Type"] == ctype
        assert body == (pool_dir / r["file"]).read_bytes()
    held = next(r for r in rows if r["split"] == "heldout")
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(f"{web.base_url}/img/{Path(held['file']).name}")
    assert e.value.code == 404
    assert web.base_url == f"http://127.0.0.1:{web.port}" and web.host_port.endswith(
        f":{web.port}")


@pytest.mark.parametrize("code", [404, 500])
def test_error_status_faults(web, rows, code):
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(f"{web.base_url}/f/{code}/{_web_row(rows)['image_id']}")
    assert e.value.code == code


def test_slow_times_out_without_blocking_other_requests(web, rows):
    iid = _web_row(rows)["image_id"]
    errors: list[BaseException] = []

    def slow() -> None:
        try:
            _get(f"{web.base_url}/f/slow/{iid}", timeout=1.0)
        except BaseException as e:  # noqa: BLE001 - collected for the assertion below
            errors.append(e)

    t = threading.Thread(target=slow)
    t0 = time.monotonic()
    t.start()
    time.sleep(0.1)
    assert _get(f"{web.base_url}/img/{iid}")[0] == 200
    assert time.monotonic() - t0 < 0.9  # served while the slow one is still waiting
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], (TimeoutError, urllib.error.URLError))
    assert _get(f"{web.base_url}/f/slow/{iid}", timeout=5)[0] == 200  # it does answer, late


def test_reset_breaks_the_connection(web, rows):
    with pytest.raises((ConnectionError, http.client.IncompleteRead, urllib.error.URLError)):
        _get(f"{web.base_url}/f/reset/{_web_row(rows)['image_id']}")


def test_truncated_jpeg_has_honest_length_and_fails_to_decode(web, rows):
    r = _web_row(rows, ".png")  # PNGs are transcoded to JPEG first
    code, headers, body, _ = _get(f"{web.base_url}/f/truncated/{r['image_id']}.jpg")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert int(headers["Content-Length"]) == len(body) and body[:2] == b"\xff\xd8"
    with pytest.raises(OSError):
        Image.open(io.BytesIO(body)).load()


def test_html_noai_redirect_loop_alias_private_robots(web, rows, pool_dir):
    r = _web_row(rows)
    iid, name = r["image_id"], Path(r["file"]).name
    data = (pool_dir / r["file"]).read_bytes()
    code, headers, body, _ = _get(f"{web.base_url}/f/html/{name}")
    assert code == 200 and headers["Content-Type"].startswith("text/html") and b"<html" in body
    code, headers, body, _ = _get(f"{web.base_url}/f/noai/{iid}")
    assert headers["X-Robots-Tag"] == "noai" and body == data
    code, _, body, final = _get(f"{web.base_url}/r/{iid}")
    assert body == data and final == f"{web.base_url}/img/{name}"
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(f"{web.base_url}/loop/a/{iid}")
    assert e.value.code == 302 and "loop" in str(e.value.reason)
    assert {_get(f"{web.base_url}/alias/{n}/{name}")[2] for n in (1, 2, 3)} == {data}
    assert _get(f"{web.base_url}/robots.txt")[2] == ROBOTS_TXT
    assert _get(f"{web.base_url}/private/{iid}")[2] == data
    assert web.hits[f"/loop/b/{iid}"] >= 1


def test_exit_frees_the_port_promptly_even_with_a_slow_request_in_flight(pool_dir, rows):
    iid = _web_row(rows)["image_id"]
    web = DemoWeb(pool_dir, slow_seconds=30)
    with web:
        port = web.port
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(f"GET /f/slow/{iid} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        time.sleep(0.2)
        t0 = time.monotonic()
    assert time.monotonic() - t0 < 3
    s.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1)
    assert not any(t.name == f"demoweb:{port}" for t in threading.enumerate())
    with socket.socket() as b:  # and the port can be bound again
        b.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        b.bind(("127.0.0.1", port))


def test_refuses_non_loopback_host(pool_dir):
    with pytest.raises(ValueError, match="loopback"):
        DemoWeb(pool_dir, host="0.0.0.0")


def test_demo_web_cli_names_a_missing_pool(tmp_path):
    from pipeline.config import ConfigError
    from pipeline.demoweb import server

    with pytest.raises(ConfigError, match="demo-data"):
        server.main(["--pool", str(tmp_path)])


def test_demo_web_cli_serves_until_ctrl_c(pool_dir):
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.demoweb.server", "--pool",
                             str(pool_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        url = line.split(" at ")[1].split()[0]
        assert _get(f"{url}/robots.txt", timeout=5)[2] == ROBOTS_TXT
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- manifests


@pytest.fixture(scope="module")
def manifests(web, pool_dir, tmp_path_factory) -> dict:
    return write_manifests(pool_dir, web.base_url, tmp_path_factory.mktemp("manifests"))


def test_manifests_read_with_duckdb_in_their_source_shapes(manifests):
    p = manifests["paths"]
    cc = duckdb.sql(f"SELECT * FROM read_csv('{p['cc3m']}', delim='\t', header=false, "
                    "quote='', escape='')").fetchall()
    assert len(cc[0]) == 2 and len(cc) == manifests["rows"]["cc3m"]
    assert all(u.startswith("http://127.0.0.1:") for _, u in cc)
    lo = duckdb.sql(f"SELECT * FROM read_parquet('{p['laion']}')")
    assert lo.columns == ["URL", "TEXT", "WIDTH", "HEIGHT", "similarity"]
    assert len(lo.fetchall()) == manifests["rows"]["laion"]
    wj = duckdb.sql(f"SELECT url, alt FROM read_json('{p['web']}')").fetchall()
    assert len(wj) == manifests["rows"]["web"]


def _all_rows(paths: dict) -> list[tuple[str, str]]:
    return duckdb.sql(
        f"SELECT column1, coalesce(column0, '') FROM read_csv('{paths['cc3m']}', delim='\t', "
        f"header=false, quote='', escape='') UNION ALL SELECT URL, TEXT FROM "
        f"read_parquet('{paths['laion']}') UNION ALL SELECT url, alt FROM "
        f"read_json('{paths['web']}')").fetchall()


def test_manifests_contain_every_fault_and_junk_kind_and_no_heldout(manifests, rows):
    faults = pq.read_table(manifests["paths"]["faults"]).to_pylist()
    assert {f["fault"] for f in faults} == set(FAULTS)
    junk = pq.read_table(manifests["paths"]["junk"]).to_pylist()
    assert set(JUNK_KINDS) <= {j["kind"] for j in junk}
    urls = [u for u, _ in _all_rows(manifests["paths"])]
    assert {f["url"] for f in faults} <= set(urls)
    lossy = sum(f["fault"] not in ("alias",) for f in faults)
    assert 0.08 <= lossy / manifests["images"] <= 0.2  # fault_rate is a share of images
    assert len(urls) > len(set(_all_rows(manifests["paths"])))  # exact repeats exist
    held = {r["image_id"] for r in rows if r["split"] == "heldout"}
    assert not any(u.rsplit("/", 1)[1].split(".")[0] in held for u in urls)
    for j in junk:
        if j["kind"] == "mojibake":
            assert "Ã" in j["caption"] or "â" in j["caption"]
            assert ftfy.fix_text(j["caption"]) == j["repaired"]
        if j["kind"] == "non_english":
            assert any(ord(c) > 127 for c in j["caption"]) or j["caption"] != ""


def test_fault_truth_table_matches_what_the_server_does(manifests, web):
    expected = {"http_404": 404, "http_500": 500, "redirect_loop": 302}
    for f in pq.read_table(manifests["paths"]["faults"]).to_pylist():
        try:
            code, headers, body, _ = _get(f["url"], timeout=1.0)
        except urllib.error.HTTPError as e:
            assert e.code == expected[f["fault"]], f
            continue
        except (TimeoutError, ConnectionError, http.client.IncompleteRead,
                urllib.error.URLError):
            assert f["fault"] in ("slow", "reset"), f
            continue
        assert f["fault"] not in ("slow", "reset", *expected), f
        if f["fault"] == "truncated":
            with pytest.raises(OSError):
                Image.open(io.BytesIO(body)).load()
        elif f["fault"] == "html":
            assert headers["Content-Type"].startswith("text/html")
        else:
            assert (headers.get("X-Robots-Tag") == "noai") == (f["fault"] == "noai")
            Image.open(io.BytesIO(body)).load()


def test_manifests_are_deterministic_per_seed(manifests, pool_dir, web, tmp_path):
    again = write_manifests(pool_dir, web.base_url, tmp_path / "a")
    other = write_manifests(pool_dir, web.base_url, tmp_path / "b", seed=1)
    for key in ("cc3m", "web"):
        assert Path(again["paths"][key]).read_bytes() == Path(
            manifests["paths"][key]).read_bytes()
    assert Path(other["paths"]["cc3m"]).read_bytes() != Path(
        manifests["paths"]["cc3m"]).read_bytes()
    shutil.rmtree(tmp_path / "a")
