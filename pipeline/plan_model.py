"""The parts of `witforge plan`'s model that belong to one stage: the crawl's shard queue and
its floors (politeness, from the busiest host), robots.txt per origin, the timing rows of a
resumed stage, training, and the cost of a line (pipeline/plan.py puts them together)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipeline import plan_defaults as D
from pipeline import plan_keep
from pipeline.plan_measure import CrawlFacts, Pilot, StageMeasure


def sig(x: float, digits: int = 6) -> float:
    """x to `digits` significant digits (hours of a tiny pilot and of 400M rows alike)."""
    return float(f"{x:.{digits}g}")


@dataclass
class Cluster:
    nodes: int
    cores: int  # per node
    gpus: int  # per node
    nic_gbps: float | None
    disk_mbps: float | None


def timed_rows(m: StageMeasure, notes: list[str]) -> int:
    """The rows a pilot stage's seconds were spent on: a crawl resumed from its work folder
    downloaded only some of them, an embed stage reused some parts."""
    done = {"crawl": "downloaded_samples", "embed": "images_embedded"}.get(m.name)
    n = m.report.get(done) if done else None
    if n is None or n >= m.rows_in:
        return m.rows_in
    notes.append(f"the pilot's {m.name} worked on {n:,} of its {m.rows_in:,} rows (the rest "
                 "came from its work folder, done before): its time is theirs. For a plan, "
                 "run the pilot from scratch (remove runs/<build>/*.work)")
    return max(int(n), 1)


def makespan(rows: float, per_shard: int, slots: int) -> float:
    """Rows the busiest img2dataset process downloads: shards of per_shard rows (the last one
    shorter) go, in order, to the first free process, each taking time in proportion to its
    rows. A shard queue far longer than the processes is rows / processes."""
    per_shard, slots = max(per_shard, 1), max(slots, 1)
    full, last = divmod(int(round(rows)), per_shard)
    if full + (last > 0) > 1000 * slots:
        return rows / slots
    free = [0.0] * slots
    for size in [per_shard] * full + ([last] if last else []):
        i = min(range(slots), key=free.__getitem__)
        free[i] += size
    return max(max(free), 1.0)


# img2dataset's multiprocessing distributor replaces each download process after 5 shards
# (Pool(maxtasksperchild=5) in img2dataset/distributor.py): each new process imports it again.
SHARDS_PER_PROCESS_LIFE = 5


def process_lives(shards: float, processes: int) -> tuple[int, int]:
    """(all, the busiest process's) img2dataset download processes started for ``shards``
    shards on ``processes`` processes: each starts at its first shard, lives 5 shards."""
    shards = max(1, math.ceil(shards))
    used = max(1, min(processes, shards))
    per = math.ceil(math.ceil(shards / used) / SHARDS_PER_PROCESS_LIFE)
    return used * per, per


def crawl_time(m: StageMeasure, cr: CrawlFacts, rows_in: float, timed: int, cl: Cluster,
               per_node: int, fit: tuple[float, ...], cpu_total: float,
               notes: list[str]) -> tuple[float, float]:
    """(wall, cpu) of the crawl. Wall: the pilot's shards, from the first start to the last
    end in img2dataset's stats, grow with the busiest process's rows (``makespan``); the rest
    of the pilot's time (start-up, merging) is fixed. CPU: each download process imports
    img2dataset once per life (measured by the calibration); the rest is fixed or per row."""
    wf, wv, cf, cv = fit
    cal = m.calibration or {}
    busiest = (makespan(rows_in, cr.per_shard, per_node * cl.nodes)
               / makespan(timed, cr.per_shard, cr.processes))
    start_cpu, start_s = cal.get("worker_start_cpu_seconds"), cal.get("worker_start_seconds")
    if start_cpu is None or start_s is None:
        return wf + (m.seconds - wf) * busiest, cf + cv * rows_in
    shards_t = rows_in / max(cr.per_shard, 1) / cl.nodes  # per node
    lives_p, busy_p = process_lives(cr.shards or 1, cr.processes)
    lives_t, busy_t = process_lives(shards_t, per_node)
    span = cr.shard_span_seconds
    if 0 < span < m.seconds:
        work = max(0.0, span - (busy_p - 1) * start_s)  # the pilot's own restarts aside
        wall = m.seconds - span + work * busiest + (busy_t - 1) * start_s
    else:
        wall = wf + (m.seconds - wf) * busiest + (busy_t - busy_p) * start_s
    fixed = max(0.0, cf - start_cpu)  # the calibration's one row started one process
    per_row = max(0.0, cpu_total - fixed - lives_p * start_cpu) / max(timed, 1)
    cpu = fixed + lives_t * cl.nodes * start_cpu + per_row * rows_in
    notes.append(f"img2dataset starts {lives_t * cl.nodes:,} download processes at this size "
                 f"(one per {SHARDS_PER_PROCESS_LIFE} shards of each, its maxtasksperchild; "
                 f"{lives_p} in the pilot), {start_cpu:.2f} CPU-s each as measured here")
    return wall, cpu


# DuckDB splits a scan among its threads by row group (122,880 rows by default, and in every
# Parquet file witforge writes): a stage over fewer row groups than cores runs on fewer threads.
ROW_GROUP_ROWS = 122_880
# Stages whose per-row work is DuckDB's, spread that way (ingest's ftfy part aside).
DUCKDB_THREADED = {"ingest", "text_filter", "url_dedup", "precrawl_balance", "image_filter",
                   "clip_filter", "balance"}


def speedup(m: StageMeasure, rows_in: float, cl: Cluster, timed: int) -> float:
    """How much faster the target runs a row than the pilot did: its cores over the pilot's,
    and for a DuckDB stage the threads its row groups can keep busy (a 100k-row pilot is one
    row group, one thread; its 1M-row target keeps both cores of this machine busy for all
    but the last of its 9 row groups)."""
    if m.name not in DUCKDB_THREADED:
        return cl.cores / m.cores
    return _threads(rows_in, cl.cores) / _threads(timed, m.cores)


def _threads(rows: float, cores: int) -> float:
    """The threads' effective parallelism over ``rows``: the row groups over the busiest
    thread's share of them (9 row groups on 2 cores are 5 rounds of work, 1.8x, not 2x)."""
    groups = max(1, math.ceil(rows / ROW_GROUP_ROWS))
    return groups / math.ceil(groups / max(cores, 1))


def per_key(m: StageMeasure, rows_in: float, fit: tuple[float, ...],
            part: tuple[float, float, int], exponent: float,
            faster: float) -> tuple[float, float, float]:
    """(wall, cpu, keys) of a stage part of whose time is spent once per distinct key (a
    robots.txt per origin, ftfy per distinct caption), on one core: that part (pilot
    seconds, CPU seconds, keys) follows the keys, keys ~ rows^exponent; the rest of the
    stage's fit (fixed wall, wall per row, fixed CPU, CPU per row) follows the rows, run
    ``faster`` times faster than in the pilot (``speedup``)."""
    wf, wv, cf, cv = fit
    secs, cpu_s, keys = part
    n = max(m.rows_in, 1)
    at = keys * (rows_in / n) ** exponent
    wall = wf + max(0.0, wv - secs / n) * rows_in / faster + secs / keys * at
    return wall, cf + max(0.0, cv - cpu_s / n) * rows_in + cpu_s / keys * at, at


def robots(m: StageMeasure, pilot: Pilot, rows_in: float, faster: float,
           fit: tuple[float, ...], notes: list[str],
           linear: tuple[float, float]) -> tuple[float, float]:
    """robots.txt is fetched once per origin: that part of the stage's time follows the
    origins (origins ~ rows^e, fit on random halves of the pilot's input), the rest of its
    fit (fixed, per row) the rows."""
    fetch, fetched = m.report.get("robots_fetch_seconds"), m.report.get("robots_fetched")
    i = pilot.stages.index(m)
    prev = pilot.cfg.run_dir / pilot.stages[i - 1].folder / "kept.parquet" if i else None
    g = plan_keep.origin_growth(prev) if fetch and fetched and prev else None
    if g is None or not m.seconds:
        return linear
    cpu = (m.cpu_seconds if m.cpu_seconds is not None else m.seconds)
    share = min(1.0, fetch / m.seconds)
    wall, cpu_s, origins = per_key(m, rows_in, fit, (fetch, cpu * share, fetched),
                                   g["exponent"], faster)
    notes.append(f"robots.txt once per origin: {g['keys']:,} in the pilot, ~{origins:,.0f} at "
                 f"this size (origins ~ rows^{g['exponent']:.2f}, fit on random halves of the "
                 f"pilot's input), {fetch / fetched:.3g} s each as in the pilot")
    return wall, cpu_s


def ftfy(m: StageMeasure, pilot: Pilot, rows_in: float, faster: float,
         fit: tuple[float, ...], notes: list[str]) -> tuple[float, float] | None:
    """ingest's ftfy repair runs once per distinct caption that may need it, in Python on
    one core, and web captions repeat: that part follows the distinct captions (~ rows^e,
    fit on random halves of the pilot's kept rows), the rest of ingest the rows."""
    r = m.report
    secs, cpu_s, keys = (r.get("ftfy_seconds"), r.get("ftfy_cpu_seconds"),
                         r.get("ftfy_distinct_captions"))
    if not secs or not keys:
        return None
    g = plan_keep.caption_growth(pilot.cfg.run_dir / m.folder / "kept.parquet")
    if g is None:
        return None
    wall, cpu, at = per_key(m, rows_in, fit, (secs, cpu_s, keys), g["exponent"], faster)
    notes.append(f"ftfy once per distinct caption: {keys:,} in the pilot ({secs:.3g} s), "
                 f"~{at:,.0f} at this size (~ rows^{g['exponent']:.2f}, fit on random halves "
                 "of the pilot's kept rows)")
    return wall, cpu


def phash_pool(m: StageMeasure, pilot: Pilot, rows_in: float, cl: Cluster, faster: float,
               fit: tuple[float, ...], notes: list[str]) -> tuple[float, float] | None:
    """image_dedup hashes a pilot's few tars in its own process, but 16 MiB of tars or more
    in a pool of image_dedup.workers spawned processes: when the target crosses that line,
    its pHash part (the pilot's phash_seconds, per row) runs on the pool. Each process costs
    what the calibration's run of the pool on the pilot's tars took beyond those seconds
    (its start, its first image), and the pool's wall is its busiest process's tars; without
    that run, each process costs its measured start alone. The rest follows the rows."""
    from dedup.phash import pool_size

    r, cal = m.report, m.calibration or {}
    secs, start_cpu = r.get("phash_seconds"), cal.get("worker_start_cpu_seconds")
    if not secs or r.get("phash_processes") != 1 or start_cpu is None or not m.rows_in:
        return None
    scale = rows_in / m.rows_in
    workers = pilot.cfg.image_dedup.workers
    tars_p = max(1, int(r.get("tars", 1)))
    tars_t = math.ceil(tars_p * scale)
    procs = pool_size(int(r.get("phash_bytes", 0) * scale), tars_t, workers)
    if procs == 1:
        return None
    wf, wv, cf, cv = fit
    n = m.rows_in
    share = min(secs / n, wv)  # pHash seconds per row, one process
    slots = min(procs, cl.cores)
    per_proc, pool_fixed = start_cpu, cal.get("worker_start_seconds", 0.0)
    busiest = rows_in / slots
    pool = cal.get("phash_pool") or {}
    if pool.get("processes", 0) > 1:
        per_proc = max(start_cpu, (pool["cpu_seconds"] - share * n) / pool["processes"])
        pool_fixed = max(0.0, pool["seconds"] - share * makespan(n, math.ceil(n / tars_p),
                                                                 pool["processes"]))
        busiest = makespan(rows_in, math.ceil(rows_in / tars_t), slots)
    wall = wf + (wv - share) * rows_in / faster + pool_fixed + share * busiest
    cpu = cf + max(0.0, cv - share) * rows_in + share * rows_in + procs * per_proc
    notes.append(f"pHash on a pool of {procs} processes at this size (the pilot's "
                 f"{r.get('phash_bytes', 0) / 2**20:.1f} MiB of tars took one; the pool starts "
                 f"at 16 MiB), {per_proc:.2f} CPU-s per process (its start: {start_cpu:.2f}) "
                 "and its busiest process's tars, as measured here; raise image_dedup.workers "
                 "on a bigger node")
    return wall, cpu


def url_split(m: StageMeasure, pilot: Pilot, rows_in: float, faster: float,
              notes: list[str]) -> tuple[float, float]:
    """(wall, cpu) that url_dedup adds where the target's candidates (rows whose hash
    repeats) outgrow half the memory limit and are written out in hash parts, a step a
    pilot's few candidates never take: per candidate, what the calibration's run of the
    pilot input split in parts took beyond the same run in one part."""
    from pipeline import parts
    from pipeline.config import parse_size

    split, cands = (m.calibration or {}).get("split"), m.report.get("candidates")
    if not split or not cands or m.report.get("compare_parts", 1) > 1 or not m.rows_in:
        return 0.0, 0.0
    try:
        memory = parse_size(pilot.cfg.duckdb.memory_limit)
    except ValueError:
        return 0.0, 0.0
    prev = pilot.stages[pilot.stages.index(m) - 1]
    per_row = 2 * parts.bytes_per_row(pilot.cfg.run_dir / prev.folder / "kept.parquet",
                                      ["uid", "url", "caption"])
    at = cands / m.rows_in * rows_in
    n = parts.part_count(int(at), per_row, memory)
    one = split["parts_1"]
    many = next(v for k, v in split.items() if k != "parts_1")
    timed = many.get("candidates") or 0
    if n == 1 or not timed:
        return 0.0, 0.0
    wall = max(0.0, many["seconds"] - one["seconds"]) / timed * at / faster
    cpu = max(0.0, (many["cpu_seconds"] or 0.0) - (one["cpu_seconds"] or 0.0)) / timed * at
    notes.append(f"~{at:,.0f} candidates at this size: compared in {n} hash parts, written out "
                 f"first (the pilot's {cands:,} took one); {cpu / at * 1e6:.2f} CPU-us per "
                 f"candidate for that, as its calibration measured on {timed:,} of them")
    return wall, cpu


def crawl_floors(m: StageMeasure, pilot: Pilot, cl: Cluster, rows_in: float, keep: float,
                  floors: dict[str, float], notes: list[str],
                  used: dict[str, D.Default]) -> None:
    """The politeness floor: the busiest host's rows over its rate (each node's guard keeps
    the per-domain limits, so a domain's global rate is nodes x the per-node rate)."""
    cr, c = pilot.crawl, pilot.cfg.crawl
    assert cr is not None
    if cr.loopback:
        notes.append("the pilot crawled the demo web on 127.0.0.1: its rate is a loopback "
                     f"rate; on the real web img2dataset reports {D.CRAWL_RATE.value:,.0f} "
                     f"images/s per {D.CRAWL_NODE_CORES}-core 2 Gbps node")
        used[D.CRAWL_RATE.name] = D.CRAWL_RATE
    if c.guard:  # every request passes one guard process of its node (or guard_processes)
        procs = c.guard_processes
        floors[f"guard ({procs} process{'es' if procs > 1 else ''} per node)"] = (
            rows_in / (D.GUARD_RATE.value * procs * cl.nodes))
        used[D.GUARD_RATE.name] = D.GUARD_RATE
        notes.append(f"guard ceiling: {D.GUARD_RATE.value:,.0f} requests/s per guard process "
                     f"x crawl.guard_processes ({procs}) x nodes, one request per row "
                     "(redirects add more); raise crawl.guard_processes where it binds")
    if not c.guard or not cr.hosts:
        notes.append("no politeness floor: crawl.guard is off (img2dataset has no per-domain "
                     "limit)" if not c.guard else "no politeness floor: no hosts")
        return
    total = sum(n for _, n in cr.hosts) or 1
    worst, worst_host = 0.0, ""
    for host, n in cr.hosts:
        rates = []
        if c.per_domain_rps > 0:
            rates.append(c.per_domain_rps)
        if cr.crawl_delays.get(host):
            rates.append(1.0 / cr.crawl_delays[host])
        if cr.mean_request_s:
            rates.append(c.per_domain_concurrency / cr.mean_request_s)
        if not rates:
            continue
        secs = n / m.rows_in * rows_in / (min(rates) * cl.nodes)
        if secs > worst:
            worst, worst_host = secs, host
    if worst_host:
        floors[f"politeness ({worst_host})"] = worst
        share = dict(cr.hosts)[worst_host] / total
        notes.append(f"politeness floor from {worst_host} ({share:.0%} of the pilot's rows, "
                     f"{cr.host_count:,} hosts): the pilot's host shares are assumed to hold "
                     "at scale; rate = min(per_domain_rps, 1/Crawl-delay, "
                     "per_domain_concurrency / the mean request time) x nodes")


def train_row(pilot: Pilot, rows: float, cl: Cluster, epochs: float, model: str,
               used: dict[str, D.Default]) -> dict[str, Any] | None:
    samples = rows * epochs
    row: dict[str, Any] = {"stage": "train", "rows_in": round(rows), "keep_ratio": None,
                           "rows_out": None, "samples_seen": round(samples), "nodes": cl.nodes}
    if cl.gpus > 0:
        d = D.TRAIN_GPU_HOURS[model]
        used[d.name] = d
        gpu_h = d.value * samples / D.LAION400M_SAMPLES_SEEN
        wall = gpu_h / (cl.nodes * cl.gpus)
        row.update(rows_per_s=round(samples / (wall * 3600), 1), core_hours=None,
                   gpu_hours=sig(gpu_h), wall_hours=sig(wall), bottleneck="GPU",
                   basis=f"default: {model}, {d.value:,.0f} A100 GPU-hours per 12.8B samples")
    elif pilot.train and pilot.train.get("samples_per_s"):
        sps = float(pilot.train["samples_per_s"])
        wall = samples / (sps * cl.nodes * cl.cores / pilot.cores) / 3600
        row.update(rows_per_s=round(sps * cl.nodes * cl.cores / pilot.cores, 1),
                   core_hours=sig(samples / sps * pilot.cores / 3600), gpu_hours=None,
                   wall_hours=sig(wall), bottleneck="CPU",
                   basis=f"measured: the pilot's training, {sps:,.0f} samples/s on "
                   f"{pilot.cores} cores (its own model)")
    else:
        return None
    row.update(disk_written_bytes=0, peak_temp_bytes=0, network_bytes=0,
               notes=[f"{epochs:g} epochs over the last stage's rows"])
    return row


def cost(row: dict[str, Any], cl: Cluster, prices: D.Prices) -> float | None:
    cost = 0.0
    if row.get("gpu_hours") and prices.gpu_hour is not None:
        cost += row["gpu_hours"] * prices.gpu_hour
    elif row.get("wall_hours") and not row.get("gpu_hours"):
        held = row["wall_hours"] * row.get("nodes", 1)  # a stage holds its nodes' cores
        if prices.node_hour is not None:
            cost += held * prices.node_hour
        elif prices.core_hour is not None:
            cost += held * cl.cores * prices.core_hour
    if row.get("network_bytes") and prices.network_gb is not None:
        cost += row["network_bytes"] / 1e9 * prices.network_gb
    return sig(cost)
