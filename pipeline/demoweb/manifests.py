"""Write the pool's web split as URL–caption manifests shaped like the real sources.

  cc3m.tsv       CC3M-like: no header, caption<TAB>url (like Train_GCC-training.tsv)
  laion.parquet  LAION-like: URL, TEXT, WIDTH, HEIGHT, similarity
  web.jsonl      {"url": ..., "alt": ...}
  faults.parquet the truth table: url, fault, image_id, expected (one row per injected URL)
  junk.parquet   rows whose caption (not URL) is the problem: source, url, caption, kind, repaired

Everything is drawn by hashing (seed, purpose, image_id): the same pool and seed give
byte-identical manifests on every machine. `similarity` is a stand-in score (hash-based),
not a CLIP score: no model runs here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# fault class -> (URL pattern, expected outcome of a correct pipeline)
FAULTS: dict[str, tuple[str, str]] = {
    "http_404": ("/f/404/{file}", "crawl fails: HTTP 404"),
    "http_500": ("/f/500/{file}", "crawl fails: HTTP 500"),
    "slow": ("/f/slow/{file}", "crawl fails: timeout"),
    "reset": ("/f/reset/{file}", "crawl fails: connection reset"),
    "truncated": ("/f/truncated/{id}.jpg", "crawl or decode fails: truncated JPEG"),
    "html": ("/f/html/{file}", "crawl fails: not an image (text/html)"),
    "noai": ("/f/noai/{file}", "crawl skips: X-Robots-Tag noai"),
    "redirect_loop": ("/loop/a/{id}", "crawl fails: redirect loop"),
    "robots": ("/private/{file}", "robots stage drops: Disallow /private/"),
    "redirect": ("/r/{id}", "kept: 302 to the image, downloaded"),
    "alias": ("/alias/{n}/{file}", "downloaded; image dedup drops all but one copy"),
}
# Faults that replace an image's only row (the image is lost, as behind a dead link).
LOSSY = [f for f in FAULTS if f not in ("redirect", "alias")]
JUNK_KINDS = ["filename", "boilerplate", "empty", "non_english", "mojibake"]
FILENAMES = ["IMG_2041.JPG", "DSC01234.jpg", "image0001.png", "photo (3).jpeg",
             "Screenshot 2019-03-02 at 10.41.22.png", "P1010037.JPG"]
BOILERPLATE = ["click here", "image", "untitled", "Download", "thumbnail", "logo",
               "Click to enlarge", "null"]
# Used for non-emoji images; emoji use the emoji package's own translations.
NON_ENGLISH = ["Ein schönes Bild für die ganze Familie", "高清图片免费下载", "Картинка для детей",
               "Bild herunterladen", "一只可爱的动物", "Красивая иллюстрация"]
LANGS = ["de", "zh", "ru"]


def _h(seed: int, purpose: str, key: str) -> int:
    return int(hashlib.md5(f"{seed}:{purpose}:{key}".encode()).hexdigest()[:12], 16)


def mojibake(text: str) -> str:
    """UTF-8 bytes read as Windows-1252: the classic 'cafÃ©' that ftfy repairs."""
    return text.encode("utf-8").decode("cp1252")


def _non_english(seed: int, image_id: str, origin: str, caption: str) -> str:
    if origin == "emoji":
        import emoji

        emoji.config.load_language(LANGS)
        seq = "".join(chr(int(x, 16)) for x in image_id[3:].split("-"))
        data = emoji.EMOJI_DATA.get(seq) or emoji.EMOJI_DATA.get(seq + "\ufe0f") or {}
        name = data.get(LANGS[_h(seed, "lang", image_id) % len(LANGS)])
        if name:
            return name.strip(":").replace("_", " ")
    return NON_ENGLISH[_h(seed, "nonen", image_id) % len(NON_ENGLISH)]


def _junk(kind: str, seed: int, row: dict) -> tuple[str, str]:
    """(junk caption, what a repair should give back or '' when it cannot be repaired)."""
    iid = row["image_id"]
    if kind == "filename":
        return FILENAMES[_h(seed, kind, iid) % len(FILENAMES)], ""
    if kind == "boilerplate":
        return BOILERPLATE[_h(seed, kind, iid) % len(BOILERPLATE)], ""
    if kind == "empty":
        return "", ""
    if kind == "non_english":
        return _non_english(seed, iid, row["origin"], row["caption"]), ""
    text = row["caption"] if any(ord(c) > 127 for c in row["caption"]) else \
        f"{row['caption']} – café crème"
    try:
        return mojibake(text), text
    except UnicodeDecodeError:  # a byte cp1252 lacks (rare): fall back to a plain case
        text = f"{row['caption']} – café"
        return mojibake(text), text


def _clean_caption(text: str) -> str:
    return " ".join(text.replace("\t", " ").split())


def write_manifests(pool_dir: Path, base_url: str, out_dir: Path, seed: int = 0,
                    fault_rate: float = 0.12, junk_rate: float = 0.05,
                    alias_rate: float = 0.03, repeat_rate: float = 0.02) -> dict:
    """Write cc3m.tsv, laion.parquet, web.jsonl, faults.parquet, junk.parquet into out_dir.

    Returns {"paths": {...}, "rows": {source: n}, "faults": {class: n}, "junk": {kind: n},
    "repeats": n, "images": n}. Every fault class and junk kind appears at least once.
    """
    pool_dir, out_dir = Path(pool_dir), Path(out_dir)
    base = base_url.rstrip("/")
    table = pq.read_table(pool_dir / "pool.parquet")
    imgs = [r for r in table.to_pylist() if r["split"] == "web"]
    if not imgs:
        raise ValueError(f"{pool_dir / 'pool.parquet'}: no images with split='web'")
    imgs.sort(key=lambda r: _h(seed, "order", r["image_id"]))
    n = len(imgs)
    per_fault = max(1, round(fault_rate * n / len(FAULTS)))
    per_junk = max(1, round(junk_rate * n / len(JUNK_KINDS)))
    n_alias = max(1, round(alias_rate * n))
    n_repeat = max(1, round(repeat_rate * n))

    def url(pattern: str, r: dict, k: int = 1) -> str:
        return base + pattern.format(file=Path(r["file"]).name, id=r["image_id"], n=k)

    def source_of(r: dict) -> str:
        b = _h(seed, "source", r["image_id"]) % 10
        return "cc3m" if b < 4 else "laion" if b < 8 else "web"

    rows: list[dict] = []  # source, url, caption, image_id, similarity bias
    faults: list[dict] = []
    junk: list[dict] = []
    cursor = 0
    for fault in LOSSY + ["redirect"]:
        for r in imgs[cursor: cursor + per_fault]:
            u = url(FAULTS[fault][0], r)
            rows.append({"source": source_of(r), "url": u, "caption": r["caption"], "img": r})
            faults.append({"url": u, "fault": fault, "image_id": r["image_id"],
                           "expected": FAULTS[fault][1]})
        cursor += per_fault
    for kind in JUNK_KINDS:
        for r in imgs[cursor: cursor + per_junk]:
            cap, repaired = _junk(kind, seed, r)
            u = url("/img/{file}", r)
            rows.append({"source": source_of(r), "url": u, "caption": cap, "img": r})
            junk.append({"source": source_of(r), "url": u, "caption": cap, "kind": kind,
                         "repaired": repaired})
        cursor += per_junk
    clean = imgs[cursor:]
    for r in clean:
        rows.append({"source": source_of(r), "url": url("/img/{file}", r),
                     "caption": r["caption"], "img": r})
    # The same image under 2-3 more URLs, with its caption (what image dedup must catch).
    for r in sorted(clean, key=lambda r: _h(seed, "alias", r["image_id"]))[:n_alias]:
        for k in range(1, 2 + _h(seed, "nalias", r["image_id"]) % 2 + 1):
            u = url(FAULTS["alias"][0], r, k)
            src = ["cc3m", "laion", "web"][(_h(seed, "asrc", u)) % 3]
            rows.append({"source": src, "url": u, "caption": r["caption"], "img": r})
            faults.append({"url": u, "fault": "alias", "image_id": r["image_id"],
                           "expected": FAULTS["alias"][1]})
    # Exact repeated rows: half within the same file, half in another source file.
    clean_ids = {r["image_id"] for r in clean}
    repeats = sorted((x for x in rows if x["img"]["image_id"] in clean_ids),
                     key=lambda x: _h(seed, "repeat", x["url"]))[:n_repeat]
    for i, x in enumerate(repeats):
        other = x["source"] if i % 2 == 0 else {"cc3m": "laion", "laion": "web",
                                                 "web": "cc3m"}[x["source"]]
        rows.append({**x, "source": other})
        junk.append({"source": other, "url": x["url"], "caption": x["caption"],
                     "kind": "repeat_same_file" if i % 2 == 0 else "repeat_other_file",
                     "repaired": ""})
    # The same pair again behind a tracked or fragment URL, as link shorteners and share
    # buttons write them: only URL canonicalization (url_dedup) sees they are one pair.
    variants = ["?utm_source=newsletter&utm_medium=email", "#gallery", "?fbclid=IwAR0x"]
    for i, r in enumerate(sorted(clean, key=lambda r: _h(seed, "variant", r["image_id"]))
                          [:n_repeat]):
        u = url("/img/{file}", r) + variants[i % len(variants)]
        rows.append({"source": source_of(r), "url": u, "caption": r["caption"], "img": r})
        junk.append({"source": source_of(r), "url": u, "caption": r["caption"],
                     "kind": "url_variant", "repaired": ""})
    rows.sort(key=lambda x: _h(seed, "row", x["source"] + x["url"] + x["caption"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = _write_files(rows, faults, junk, out_dir, seed)
    counts: dict[str, dict[str, int]] = {"rows": {}, "faults": {}, "junk": {}}
    for x in rows:
        counts["rows"][x["source"]] = counts["rows"].get(x["source"], 0) + 1
    for f in faults:
        counts["faults"][f["fault"]] = counts["faults"].get(f["fault"], 0) + 1
    for j in junk:
        counts["junk"][j["kind"]] = counts["junk"].get(j["kind"], 0) + 1
    return {"paths": paths, **counts, "repeats": len(repeats), "images": n}


def _write_files(rows: list[dict], faults: list[dict], junk: list[dict], out_dir: Path,
                 seed: int) -> dict[str, str]:
    paths = {k: str(out_dir / f) for k, f in [
        ("cc3m", "cc3m.tsv"), ("laion", "laion.parquet"), ("web", "web.jsonl"),
        ("faults", "faults.parquet"), ("junk", "junk.parquet")]}
    by = {s: [x for x in rows if x["source"] == s] for s in ("cc3m", "laion", "web")}
    with open(paths["cc3m"], "w", encoding="utf-8", newline="\n") as f:
        for x in by["cc3m"]:
            f.write(f"{_clean_caption(x['caption'])}\t{x['url']}\n")
    lo = by["laion"]
    junk_urls = {(j["url"], j["caption"]) for j in junk if not j["kind"].startswith("repeat")}
    sims = [round(0.28 + (_h(seed, "sim", x["url"]) % 1200) / 10000
                  - (0.12 if (x["url"], x["caption"]) in junk_urls else 0.0), 4) for x in lo]
    pq.write_table(pa.table({
        "URL": [x["url"] for x in lo], "TEXT": [x["caption"] for x in lo],
        "WIDTH": pa.array([x["img"]["width"] for x in lo], pa.float64()),
        "HEIGHT": pa.array([x["img"]["height"] for x in lo], pa.float64()),
        "similarity": pa.array(sims, pa.float64())}), paths["laion"])
    with open(paths["web"], "w", encoding="utf-8", newline="\n") as f:
        for x in by["web"]:
            f.write(json.dumps({"url": x["url"], "alt": x["caption"]}, ensure_ascii=False) + "\n")
    pq.write_table(pa.Table.from_pylist(faults, schema=pa.schema(
        [("url", pa.string()), ("fault", pa.string()), ("image_id", pa.string()),
         ("expected", pa.string())])), paths["faults"])
    pq.write_table(pa.Table.from_pylist(junk, schema=pa.schema(
        [("source", pa.string()), ("url", pa.string()), ("caption", pa.string()),
         ("kind", pa.string()), ("repaired", pa.string())])), paths["junk"])
    return paths
