"""witforge search: the ledger's verdict per embedded row, exact kNN as clip-retrieval's back end
answers it (checked against brute force over the stored embeddings and against clip-retrieval's
own ClipClient, in its venv), files outside the build refused on raw HTTP requests, and the
command itself. The browser half is tests/test_search_browser.py."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from bench.peers import PEERS_DIR, peer_python
from pages.search_api import Indices
from pages.search_index import SearchIndex
from pipeline import embeddings
from pipeline.config import load_build
from tests.search_fixtures import HOSTILE, make_search_build, serving
from training.embed import load_embedder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    return make_search_build(tmp_path_factory.mktemp("search"))


@pytest.fixture(scope="module")
def index(build):
    ix = SearchIndex.open(build.cfg)
    yield ix
    ix.close()


@pytest.fixture(scope="module")
def server(index):
    with serving([index]) as s:
        yield s


@pytest.fixture(scope="module")
def stored(build):
    return embeddings.load(build.cfg.run_dir / "10_embed")


def post(server, path: str, body) -> tuple[int, object]:
    req = urllib.request.Request(server.url.rstrip("/") + path, data=json.dumps(body).encode(),
                                 method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def knn(server, **body) -> list[dict]:
    status, out = post(server, "/knn-service", {"indice_name": "t", **body})
    assert status == 200, out
    return out


def raw_get(server, target: str, host: str = "127.0.0.1") -> tuple[int, bytes]:
    """A request line sent byte for byte: no client normalises the path on the way."""
    port = server.server_address[1]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                  .encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def ledger(cfg) -> dict[str, tuple[str, str, str]]:
    out = {}
    for folder in ("11_clip_filter", "12_semantic_dedup", "14_shard"):
        for r in pq.read_table(cfg.run_dir / folder / "dropped.parquet").to_pylist():
            out[r["uid"]] = (folder, r["reason"], r["detail"])
    return out


def test_every_embedded_row_carries_the_ledgers_verdict(build, index, stored):
    assert list(index.uids) == list(stored.uids) and len(index.uids) == len(build.images)
    drops = ledger(build.cfg)
    final = set(pq.read_table(build.cfg.run_dir / "14_shard" / "kept.parquet")
                .column("uid").to_pylist())
    assert drops and final and {r for _, r, _ in drops.values()} == {
        "clip_score_top", "semantic_duplicate"}
    rows = index.metadata(range(len(index.uids)))
    for row in rows:
        if row["uid"] in drops:
            folder, reason, detail = drops[row["uid"]]
            assert (row["status"], row["stage_folder"], row["reason"], row["detail"]) == (
                "dropped", folder, reason, detail)
        else:
            assert row["uid"] in final and row["status"] == "kept" and row["reason"] is None
        assert row["caption"] == build.captions[row["uid"]]
    # the planted exact copy: one of the two is dropped as the other's semantic duplicate
    a, b = build.copy
    dup = [u for u in (a, b) if drops.get(u, ("", ""))[1] == "semantic_duplicate"]
    assert len(dup) == 1 and drops[dup[0]][2].startswith(({a, b} - set(dup)).pop())
    info = index.info()
    assert info["status"] == {"kept": len(final), "dropped": len(drops)}
    assert info["complete"] and info["stages"] == ["10_embed", "11_clip_filter",
                                                   "12_semantic_dedup", "14_shard"]
    assert {s["source"] for s in info["sources"]} == {"cc3m", "laion"}


def test_text_queries_match_brute_force_over_the_stored_embeddings(build, server, stored):
    emb = load_embedder("witforge-tiny", build.cfg.path.parent / "tiny.pt")
    uid = stored.uids[7]
    caption = build.captions[uid]
    image = emb.preprocess(Image.open(io.BytesIO(build.images[uid]))).unsqueeze(0)
    _, q = emb.encode(image, [caption])  # the stage's own encoder, not the server's
    for modality, x in (("text", stored.txt), ("image", stored.img)):
        got = knn(server, text=caption, modality=modality, num_images=10)
        want = np.argsort(-(x @ q[0]), kind="stable")[:10]
        assert [r["id"] for r in got] == want.tolist(), modality
        assert [r["uid"] for r in got] == list(stored.uids[want])
        assert np.allclose([r["similarity"] for r in got], (x @ q[0])[want], atol=1e-4)
    # text -> text: the caption's own row first, at cosine 1
    top = knn(server, text=caption, modality="text", num_images=1)[0]
    assert top["uid"] == uid and top["similarity"] > 0.999 and top["caption"] == caption


def test_an_uploaded_image_finds_itself_first(build, server, stored):
    uid = stored.uids[0]
    b64 = base64.b64encode(build.images[uid]).decode()
    got = knn(server, image=b64, modality="image", num_images=5)
    assert got[0]["uid"] == uid and got[0]["similarity"] > 0.999
    # as a browser's data URL too, and by the row's stored embedding (the page's click)
    assert knn(server, image="data:image/jpeg;base64," + b64, num_images=1)[0]["uid"] == uid
    by_uid = knn(server, uid=uid, num_images=5)
    assert [r["id"] for r in by_uid] == [r["id"] for r in got]
    # the RGBA PNG too; and its thumbnail is a JPEG of at most 256 px
    png = knn(server, image=base64.b64encode(build.images[build.png]).decode(), num_images=1)
    assert png[0]["uid"] == build.png
    thumb = Image.open(io.BytesIO(base64.b64decode(png[0]["image"])))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256


def test_filters_restrict_the_exact_search(build, server, stored, index):
    drops = ledger(build.cfg)
    q = stored.img[3]
    dropped_rows = np.array([u in drops for u in stored.uids])
    got = knn(server, embedding_input=q.tolist(), num_images=100,
              filter={"status": "dropped"})
    sims = stored.img @ q
    want = [i for i in np.argsort(-sims, kind="stable") if dropped_rows[i]]
    assert [r["id"] for r in got] == want and all(r["status"] == "dropped" for r in got)
    for key, value in (("reason", "semantic_duplicate"), ("source", "cc3m"),
                       ("stage", "clip_filter"), ("status", "kept")):
        got = knn(server, embedding_input=q.tolist(), num_images=100, filter={key: value})
        assert got and all(r[key] == value for r in got), key
        n = int((index.facets[key].codes == index.facets[key].values.index(value)).sum())
        assert len(got) == n, key
    status, err = post(server, "/knn-service", {"indice_name": "t", "text": "x",
                                                "filter": {"reason": "nope"}})
    assert status == 400 and "clip_score_top" in err["message"]


def test_deduplicate_and_num_result_ids_as_clip_back(build, server, stored):
    uid = build.copy[0]
    full = knn(server, uid=uid, num_images=len(stored.uids))
    dedup = knn(server, uid=uid, num_images=len(stored.uids), deduplicate=True)
    assert build.copy[1] in {r["uid"] for r in full[:2]}  # the exact copy is a neighbour
    ids = [r["id"] for r in dedup]
    assert ids[0] == full[0]["id"] and set(ids) < {r["id"] for r in full}
    assert ids == [r["id"] for r in full if r["id"] in set(ids)]  # ranking kept
    # clip_back's rule, computed here with scipy: in the graph "cosine > 0.94" over the
    # retrieved results, each connected component keeps only its best-ranked member
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import connected_components

    all_ids = [r["id"] for r in full]
    x = stored.img[all_ids]
    _, comp = connected_components(csr_matrix(x @ x.T > 0.94), directed=False)
    first = {}
    for pos, c in enumerate(comp):
        first.setdefault(c, all_ids[pos])
    assert ids == [i for i in all_ids if i in set(first.values())]
    assert len(ids) < len(all_ids)  # random-weight image embeddings are close: many go
    # num_result_ids beyond num_images: the rest carry id and similarity only
    got = knn(server, uid=uid, num_images=3, num_result_ids=8)
    assert len(got) == 8 and all("caption" in r for r in got[:3])
    assert all(set(r) == {"id", "similarity"} for r in got[3:])


def test_requests_clip_back_refuses_or_we_cannot_answer_get_a_400(server):
    for body, words in (({"image_url": "http://example.com/a.jpg"}, "fetches nothing"),
                        ({}, "must fill one of"),
                        ({"text": "x", "indice_name": "nope"}, "indices: t"),
                        ({"embedding_input": [0.1, 0.2]}, "2 dimensions"),
                        ({"image": base64.b64encode(b"not an image").decode()}, "readable"),
                        ({"text": "x", "num_images": "many"}, "num_images"),
                        ({"text": "x", "modality": "audio"}, "modality"),
                        ({"text": "x", "columns": ["password"]}, "unknown password")):
        status, err = post(server, "/knn-service", {"indice_name": "t", **body})
        assert status == 400 and words in err["message"], (body, err)


def test_indices_list_and_metadata(server, index):
    with pytest.raises(ValueError, match="two builds are named 't'"):
        Indices([index, index])
    with urllib.request.urlopen(server.url + "indices-list") as r:
        assert json.loads(r.read()) == ["t"]
    assert post(server, "/indices-list", {}) == (200, ["t"])
    status, metas = post(server, "/metadata", {"ids": [0, 2], "indice_name": "t"})
    assert status == 200 and [m["id"] for m in metas] == [0, 2]
    assert metas[1]["metadata"]["uid"] == index.uids[2] and "image" in metas[1]["metadata"]


def test_paths_outside_the_build_are_refused(build, server, index, tmp_path):
    link = build.cfg.run_dir / "card-link.txt"
    link.symlink_to("/etc/passwd")
    outside = tmp_path / "secret.txt"
    outside.write_text("secret")
    (build.cfg.run_dir / "escape").symlink_to(tmp_path, target_is_directory=True)
    try:
        assert raw_get(server, "/build/t/14_shard/report.json")[0] == 200
        for target in ("/build/t/../../../../etc/passwd", "/build/t/..%2f..%2f..%2fetc/passwd",
                       "/build/t/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                       "/build/t/%2E%2E%2F%2E%2E%2F%2E%2E%2Fetc%2Fpasswd", "/build/t//etc/passwd",
                       "/build/t/%2Fetc%2Fpasswd", "/build/t/card-link.txt",
                       "/build/t/escape/secret.txt", "/build/t/14_shard/..%5c..%5cb.yaml",
                       "/build/t/14_shard/%00report.json", "/thumb/t/..%2F..%2Fetc%2Fpasswd",
                       "/thumb/t/../../etc/passwd", "/build/../etc/passwd", "/../../etc/passwd",
                       "http://127.0.0.1/build/t/../../etc/passwd"):
            status, body = raw_get(server, target)
            assert status in (403, 404), target
            assert b"root:" not in body and b"secret" not in body, target
    finally:
        link.unlink()
        (build.cfg.run_dir / "escape").unlink()
    # a Host that is not a loopback name (DNS rebinding) is refused
    assert raw_get(server, "/indices-list", host="attacker.example")[0] == 403


def test_a_tar_linked_out_of_the_build_serves_no_thumbnail(build, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(build.cfg.run_dir, runs / "t", symlinks=True)
    (tmp_path / "m.csv").write_text((build.cfg.path.parent / "m.csv").read_text())
    (tmp_path / "b.yaml").write_text(build.cfg.path.read_text().replace(
        str(build.cfg.run_dir.parent), str(runs)))
    cfg = load_build(tmp_path / "b.yaml")
    tar = next((cfg.run_dir / "06_crawl.work" / "attempt_000" / "images").glob("*.tar"))
    shutil.move(tar, tmp_path / "elsewhere.tar")
    tar.symlink_to(tmp_path / "elsewhere.tar")
    ix = SearchIndex.open(cfg, load_model=False)
    rows = ix.metadata(range(len(ix.uids)))
    tars = ix.rows.column("tar").to_pylist()
    inside_uid = next(r["uid"] for r, t in zip(rows, tars, strict=True) if not t.endswith(tar.name))
    out_uid = next(r["uid"] for r, t in zip(rows, tars, strict=True) if t.endswith(tar.name))
    with serving([ix]) as s:
        assert raw_get(s, f"/thumb/t/{inside_uid}")[0] == 200
        assert raw_get(s, f"/thumb/t/{out_uid}")[0] == 403
        # without a model, stored-embedding queries still work; text says why it cannot
        assert knn(s, uid=inside_uid, num_images=1)[0]["uid"] == inside_uid
        status, err = post(s, "/knn-service", {"text": "x"})
        assert status == 400 and "without a model" in err["message"]
    ix.close()


def test_witforge_search_serves_the_build(build):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "search", "--build",
                             str(build.cfg.path), "--port", "0", "--columns", "caption,uid"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        while not any("search page:" in x for x in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-2000:]
            lines.append(line)
        assert re.search(r"index t: 45 rows of 10_embed \(witforge-tiny, 128-d\)", lines[0])
        url = re.search(r"search page: (http://127\.0\.0\.1:\d+/)", lines[-1]).group(1)
        with urllib.request.urlopen(url) as r:
            page = r.read().decode()
            assert "witforge search" in page and "script-src 'sha256-" in r.headers[
                "Content-Security-Policy"]
        req = urllib.request.Request(url + "knn-service", method="POST", data=json.dumps(
            {"text": build.captions["planted-copy"], "modality": "text",
             "num_images": 1}).encode())
        with urllib.request.urlopen(req) as r:
            (top,) = json.loads(r.read())
        assert set(top) == {"caption", "uid", "id", "similarity"}  # --columns
        assert top["uid"] == "planted-copy"
    finally:
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 0


def test_clip_retrievals_own_client_gets_the_nearest_neighbours(build, server, stored):
    python = peer_python("clip_client", log=lambda s: None)
    uid, text_uid = stored.uids[0], stored.uids[9]
    image = build.cfg.path.parent / "query.jpg"
    image.write_bytes(build.images[uid])
    queries = [{"text": build.captions[text_uid], "modality": "text", "num_images": 5},
               {"image": str(image), "num_images": 5, "deduplicate": False},
               {"image": str(image), "num_images": 40},  # ClipClient's defaults: dedup on
               {"text": HOSTILE, "modality": "text", "num_images": 1}]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([str(python), str(PEERS_DIR / "clip_client_run.py"),
                        server.url + "knn-service", "t", json.dumps(queries)],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    by_text, by_image, deduped, hostile = json.loads(r.stdout)
    assert by_text[0]["uid"] == text_uid and by_text[0]["similarity"] > 0.999
    assert by_image[0]["uid"] == uid and by_image[0]["similarity"] > 0.999
    assert {"id", "similarity", "caption", "url", "image"} <= set(by_image[0])
    # the same answers as a direct request with the body ClipClient sends
    direct = knn(server, image=base64.b64encode(build.images[uid]).decode(), num_images=5,
                 num_result_ids=5, deduplicate=False, use_mclip=False, aesthetic_score=9,
                 aesthetic_weight=0.5, use_safety_model=True, use_violence_detector=True,
                 modality="image", text=None, image_url=None, embedding_input=None)
    assert by_image == direct
    assert deduped[0]["uid"] == uid and len(deduped) <= len(stored.uids)
    sims = stored.img[[d["id"] for d in deduped]] @ stored.img[[d["id"] for d in deduped]].T
    assert (sims[np.triu_indices(len(deduped), 1)] <= 0.94 + 1e-4).all()
    assert hostile[0]["caption"] == HOSTILE and hostile[0]["uid"] == build.hostile
