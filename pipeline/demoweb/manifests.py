"""Write the pool's web split as URL–caption manifests shaped like the real sources.

  cc3m.tsv       CC3M-like: no header, caption<TAB>url (like Train_GCC-training.tsv)
  laion.parquet  LAION-like: URL, TEXT, WIDTH, HEIGHT, similarity
  web.jsonl      {"url": ..., "alt": ...}
  truth.parquet  one row per manifest row: what it is (kind), what the URL serves, what the
                 caption describes, and the uid ingest gives it (see truth.py)
  faults.parquet url, fault, image_id, expected (one row per injected fault URL)
  junk.parquet   rows whose caption (not URL) is junk: source, url, caption, kind, repaired
  settings.json  the seed and every rate, and the counts they gave

Besides the download faults and junk captions, the web's curation problems are mixed in:
captions of other images, template captions, near-duplicate copies (noise.py), placeholder
images under hundreds of URLs, and a heavier head of popular categories. Everything is drawn
by hashing (seed, purpose, image_id): the same pool and seed give byte-identical manifests on
every machine. `similarity` is a stand-in score (hash-based), not a CLIP score.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.demoweb import noise
from pipeline.demoweb.captions import JUNK_KINDS, decorate, h, junk, template
from pipeline.demoweb.pool import FIXTURE_DIR
from pipeline.demoweb.truth import truth_rows, write_files

__all__ = ["DEFAULT_RATES", "FAULTS", "JUNK_KINDS", "LOSSY", "NOISE_KINDS", "write_manifests"]

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
# Fault URLs whose response still carries the whole image (a correct pipeline drops them).
SERVING_FAULTS = {"slow", "noai", "robots", "redirect", "alias"}
NOISE_KINDS = ["mismatch_other_category", "mismatch_same_category", "template", "placeholder",
               "near_duplicate", "head_copy"]
# Where each default comes from: docs/demo.md ("The noise and its rates").
DEFAULT_RATES: dict[str, float] = {
    "fault_rate": 0.12,          # rows behind a download fault (the image is lost)
    "junk_rate": 0.05,           # obvious junk captions
    "alias_rate": 0.03,          # images also under 2-3 byte-identical /alias/ URLs
    "repeat_rate": 0.02,         # exact repeated rows; as many URL variants
    "mismatch_rate": 0.10,       # another category's image's caption
    "mismatch_same_rate": 0.05,  # another image's caption from the same category
    "template_rate": 0.05,       # shop/CMS template captions, some repeated many times
    "placeholder_rate": 0.03,    # rows whose URL serves a placeholder image
    "near_dup_rate": 0.20,       # images with 1-2 near-duplicate copies under new URLs
    "head_share": 0.10,          # the most common categories, as a share of categories ...
    "head_extra": 0.25,          # ... whose images get this many extra rows each, on average
}


def write_manifests(pool_dir: Path, base_url: str, out_dir: Path, seed: int = 0,
                    fault_rate: float = 0.12, junk_rate: float = 0.05,
                    alias_rate: float = 0.03, repeat_rate: float = 0.02,
                    mismatch_rate: float = 0.10, mismatch_same_rate: float = 0.05,
                    template_rate: float = 0.05, placeholder_rate: float = 0.03,
                    near_dup_rate: float = 0.20, head_share: float = 0.10,
                    head_extra: float = 0.25) -> dict:
    """Write the manifests and truth tables into out_dir; near-duplicate copies go to
    `<pool_dir>/derived/` (noise.ensure_derived), where the demo web finds them.

    Returns {"paths", "rows": {source: n}, "faults": {class: n}, "junk": {kind: n},
    "kinds": {truth kind: n}, "repeats", "images", "head": {...}}. Every fault class, junk
    kind and noise kind whose rate is above 0 appears at least once.
    """
    rates = {k: v for k, v in locals().items() if k in DEFAULT_RATES}
    for k, v in rates.items():
        if not 0 <= v <= (10 if k == "head_extra" else 1):
            raise ValueError(f"write_manifests: {k}={v} is out of range")
    pool_dir, out_dir = Path(pool_dir), Path(out_dir)
    writes_pool = near_dup_rate > 0 or placeholder_rate > 0
    if writes_pool and pool_dir.resolve() == FIXTURE_DIR.resolve():
        raise ValueError(f"write_manifests: {pool_dir} is the committed fixture, and the "
                         "near-duplicate copies and placeholders are written into the pool "
                         "folder: assemble a copy with assemble_pool(<dir>, "
                         "prefer_system=False), or pass near_dup_rate=0, placeholder_rate=0")
    base = base_url.rstrip("/")
    table = pq.read_table(pool_dir / "pool.parquet")
    imgs = [r for r in table.to_pylist() if r["split"] == "web"]
    if not imgs:
        raise ValueError(f"{pool_dir / 'pool.parquet'}: no images with split='web'")
    imgs.sort(key=lambda r: _order(seed, "order", r))
    by_id = {r["image_id"]: r for r in imgs}
    n = len(imgs)

    def count(rate: float, parts: int = 1) -> int:
        return max(1, round(rate * n / parts)) if rate > 0 else 0

    def url(pattern: str, r: dict, k: int = 1) -> str:
        return base + pattern.format(file=Path(r["file"]).name, id=r["image_id"], n=k)

    def source_of(key: str, purpose: str = "source") -> str:
        b = h(seed, purpose, key) % 10
        return "cc3m" if b < 4 else "laion" if b < 8 else "web"

    def row(kind: str, r: dict, u: str, caption: str, **kw: object) -> dict:
        """A manifest row; by default the URL serves r and the caption is r's own."""
        x = {"source": kw.pop("source", None) or source_of(r["image_id"]), "url": u,
             "caption": caption, "kind": kind, "img": r, "image_id": r["image_id"],
             "true_image_id": r["image_id"], "true_caption": r["caption"],
             "source_image_id": r["image_id"], "transform": None, "aligned": True}
        x.update(kw)
        return x

    rows: list[dict] = []
    faults: list[dict] = []
    junk_rows: list[dict] = []
    rest = list(imgs)

    def take(k: int, ok: Callable[[dict], bool] = lambda r: True) -> list[dict]:
        """The first k images left (in hash order) that `ok` accepts; they are used up."""
        got = [r for r in rest if ok(r)][:k]
        ids = {r["image_id"] for r in got}
        rest[:] = [r for r in rest if r["image_id"] not in ids]
        return got

    for fault in LOSSY + ["redirect"]:
        for r in take(count(fault_rate, len(FAULTS))):
            u = url(FAULTS[fault][0], r)
            served = {} if fault in SERVING_FAULTS else {"image_id": None, "aligned": None,
                                                         "source_image_id": None}
            rows.append(row(fault, r, u, r["caption"], **served))
            faults.append({"url": u, "fault": fault, "image_id": r["image_id"],
                           "expected": FAULTS[fault][1]})
    for kind in JUNK_KINDS:
        for r in take(count(junk_rate, len(JUNK_KINDS))):
            cap, repaired, describes = junk(kind, seed, r)
            x = row(kind, r, url("/img/{file}", r), cap, aligned=describes)
            if not describes:
                x["true_image_id"] = None
            rows.append(x)
            junk_rows.append({"source": x["source"], "url": x["url"], "caption": cap,
                              "kind": kind, "repaired": repaired})
    _mismatches(seed, imgs, take, count(mismatch_rate), count(mismatch_same_rate), rows, row,
                url)
    for r in take(count(template_rate)):
        rows.append(row("template", r, url("/img/{file}", r), template(seed, r["image_id"]),
                        true_image_id=None, aligned=False))
    for r in take(count(placeholder_rate)):
        pid = noise.placeholder_of(r["image_id"])
        rows.append(row("placeholder", r, url("/media/{file}", r), r["caption"],
                        image_id=pid, source_image_id=None, aligned=False,
                        true_caption=noise.PLACEHOLDERS[pid]))
    clean = rest
    for r in clean:
        rows.append(row("clean", r, url("/img/{file}", r), r["caption"]))
    # The same image under 2-3 more URLs, with its caption (what image dedup must catch).
    for r in sorted(clean, key=lambda r: _order(seed, "alias", r))[:count(alias_rate)]:
        for k in range(1, 2 + h(seed, "nalias", r["image_id"]) % 2 + 1):
            u = url(FAULTS["alias"][0], r, k)
            rows.append(row("alias", r, u, r["caption"],
                            source=["cc3m", "laion", "web"][h(seed, "asrc", u) % 3]))
            faults.append({"url": u, "fault": "alias", "image_id": r["image_id"],
                           "expected": FAULTS["alias"][1]})
    # Exact repeated rows: half within the same file, half in another source file.
    repeats = sorted((x for x in rows if x["kind"] in ("clean", "alias")),
                     key=lambda x: h(seed, "repeat", x["url"]))[:count(repeat_rate)]
    for i, x in enumerate(repeats):
        other = x["source"] if i % 2 == 0 else {"cc3m": "laion", "laion": "web",
                                                 "web": "cc3m"}[x["source"]]
        kind = "repeat_same_file" if i % 2 == 0 else "repeat_other_file"
        rows.append({**x, "source": other, "kind": kind})
        junk_rows.append({"source": other, "url": x["url"], "caption": x["caption"],
                          "kind": kind, "repaired": ""})
    # The same pair again behind a tracked or fragment URL, as link shorteners and share
    # buttons write them: only URL canonicalization (url_dedup) sees they are one pair.
    variants = ["?utm_source=newsletter&utm_medium=email", "#gallery", "?fbclid=IwAR0x"]
    for i, r in enumerate(sorted(clean, key=lambda r: _order(seed, "variant", r))
                          [:count(repeat_rate)]):
        x = row("url_variant", r, url("/img/{file}", r) + variants[i % len(variants)],
                r["caption"])
        rows.append(x)
        junk_rows.append({"source": x["source"], "url": x["url"], "caption": x["caption"],
                          "kind": "url_variant", "repaired": ""})
    copies = _near_duplicates(seed, imgs, count(near_dup_rate))
    made = noise.ensure_derived(pool_dir, [c for c, _ in copies]) if writes_pool else {}
    for c, k in copies:
        r = by_id[c.source_id]
        key = f"{c.source_id}:{k}"
        # Half the copies keep the source's caption as it is, half get a reposting site's
        # decoration of it: either way the caption describes the copy.
        cap = r["caption"] if h(seed, "ndcap", key) % 2 == 0 else \
            decorate(seed, key, r["caption"])
        d = made[c.image_id]
        img = {**r, "width": d["width"], "height": d["height"]}
        rows.append(row("near_duplicate", img, f"{base}/img/{c.image_id}.jpg", cap,
                        image_id=c.image_id, transform=c.transform,
                        source=source_of(key, "ndsrc")))
    head = _head_copies(seed, imgs, head_share, head_extra)
    for r, k in head["copies"]:
        key = f"{r['image_id']}:{k}"
        rows.append(row("head_copy", r, url("/p/{n}/{file}", r, k),
                        decorate(seed, "head:" + key, r["caption"]),
                        source=source_of(key, "headsrc")))
    rows.sort(key=lambda x: h(seed, "row", x["source"] + x["url"] + x["caption"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    truth = truth_rows(rows)
    kinds = Counter(t["kind"] for t in truth)
    head_info = {"categories": len(head["sizes"]), "head_categories": head["head"],
                 "top10pct_share_images": top_share(head["sizes"]),
                 "top10pct_share_rows": top_share(Counter(x["img"]["category"]
                                                          for x in rows))}
    counts: dict[str, dict[str, int]] = {"rows": {}, "faults": {}, "junk": {}}
    for x in rows:
        counts["rows"][x["source"]] = counts["rows"].get(x["source"], 0) + 1
    for f in faults:
        counts["faults"][f["fault"]] = counts["faults"].get(f["fault"], 0) + 1
    for j in junk_rows:
        counts["junk"][j["kind"]] = counts["junk"].get(j["kind"], 0) + 1
    settings = {"seed": seed, "rates": rates, "images": n, "manifest_rows": len(rows),
                "kinds": dict(sorted(kinds.items())),
                "head": head_info}
    paths = write_files(rows, truth, faults, junk_rows, settings, out_dir, seed)
    return {"paths": paths, **counts, "kinds": dict(kinds), "repeats": len(repeats),
            "images": n, "head": head_info}


def _order(seed: int, purpose: str, r: dict) -> int:
    return h(seed, purpose, r["image_id"])


def top_share(sizes: Counter[str], share: float = 0.10) -> float:
    """The share of all counts held by the largest `share` of the categories (MetaCLIP's
    head-heaviness measure, on categories instead of metadata entries)."""
    ranked = sorted(sizes.values(), reverse=True)
    k = max(1, round(share * len(ranked)))
    return round(sum(ranked[:k]) / max(1, sum(ranked)), 4)


def _norm(caption: str) -> str:
    return " ".join(caption.lower().split())


def _mismatches(seed: int, imgs: list[dict], take: Callable[..., list[dict]], n_other: int,
                n_same: int, rows: list[dict], row: Callable[..., dict],
                url: Callable[..., str]) -> None:
    """Rows whose image is served as usual under another image's caption: first from another
    category (easy to see), then from the same category (a CLIP score tells them apart less
    well). The donor's caption differs from the image's own (many clip-art titles repeat)."""
    by_cat: dict[str, list[dict]] = defaultdict(list)
    for r in sorted(imgs, key=lambda r: r["image_id"]):
        by_cat[r["category"]].append(r)
    distinct = {c: len({_norm(r["caption"]) for r in v}) for c, v in by_cat.items()}
    for r in take(n_other, lambda r: len(by_cat) > 1):
        start = h(seed, "donor", r["image_id"]) % len(imgs)
        d = next(imgs[(start + j) % len(imgs)] for j in range(len(imgs))
                 if imgs[(start + j) % len(imgs)]["category"] != r["category"])
        rows.append(row("mismatch_other_category", r, url("/img/{file}", r), d["caption"],
                        true_image_id=d["image_id"], aligned=False))
    for r in take(n_same, lambda r: distinct[r["category"]] > 1):
        mates = by_cat[r["category"]]
        start = h(seed, "donor_same", r["image_id"]) % len(mates)
        own = _norm(r["caption"])
        d = next(mates[(start + j) % len(mates)] for j in range(len(mates))
                 if _norm(mates[(start + j) % len(mates)]["caption"]) != own)
        rows.append(row("mismatch_same_category", r, url("/img/{file}", r), d["caption"],
                        true_image_id=d["image_id"], aligned=False))


def _near_duplicates(seed: int, imgs: list[dict], k: int) -> list[tuple[noise.Copy, int]]:
    """1-2 copies of each of k images, each copy with another transform."""
    out = []
    for r in sorted(imgs, key=lambda r: _order(seed, "neardup", r))[:k]:
        iid = r["image_id"]
        t0 = h(seed, "ndt", iid)
        for j in range(1, 2 + h(seed, "ndn", iid) % 2):
            t = noise.TRANSFORMS[(t0 + j) % len(noise.TRANSFORMS)]
            out.append((noise.Copy(iid, r["file"], t, h(seed, "ndp", f"{iid}:{j}")), j))
    return out


def _head_copies(seed: int, imgs: list[dict], head_share: float, head_extra: float) -> dict:
    """The head: the largest `head_share` of the categories (by web images; ties by name).
    Each of its images gets int(head_extra) extra rows, and one more with the probability
    of head_extra's fraction: popular concepts are posted again and again."""
    sizes = Counter(r["category"] for r in imgs)
    ranked = sorted(sizes, key=lambda c: (-sizes[c], c))
    head = ranked[:max(1, round(head_share * len(ranked)))] if head_share > 0 else []
    heads = set(head)
    whole, frac = int(head_extra), round((head_extra - int(head_extra)) * 10000)
    copies = []
    for r in imgs:
        if r["category"] in heads:
            e = whole + (1 if h(seed, "head", r["image_id"]) % 10000 < frac else 0)
            copies.extend((r, k) for k in range(1, e + 1))
    return {"sizes": sizes, "head": head, "copies": copies}
