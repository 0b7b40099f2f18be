"""kill -9 at random moments changes nothing in a build's ledger (issue 15).

A build is run as a user runs it: ``witforge run`` in its own process group, serving the demo
web (a thread of that process, as in ``make demo``) and starting the guard proxy (a child in
the same group) while img2dataset's worker runs in a session of its own. The test kills it at
seeded moments while shards are in flight, reruns it (the web comes back at the same port, as
a rerun of ``make demo`` brings it back), and compares every stage's kept rows and dropped rows
with their reasons against an uninterrupted build of the same manifest.

The fault is the one of the issue: when the controlling process dies, the web and the guard
die with it, and every request still in flight (or started after) fails at once with
"Remote end closed connection" or "Connection refused". A shard that img2dataset finishes in
that window holds those failures; a resume that took it as finished would record
``connection_error`` for rows an uninterrupted build records as ``deadline_exceeded`` or keeps.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from pipeline.config import load_build
from pipeline.demoweb.pool import FIXTURE_DIR
from pipeline.stage import STAGES, enabled_stages, get_spec
from tests.test_crawl import REPO, _alive, _pool_ids

CRAWL = get_spec("crawl").folder
DEADLINE = 2  # the guard's request deadline; the demo web's /f/slow/ answers after 8 s


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_like_data(root: Path, rows: list[tuple[str, str]], port: int) -> Path:
    """A demo-web data folder (pool, manifest, web.json) whose URLs live on ``port``."""
    data = root / "data"
    (data / "manifests").mkdir(parents=True)
    (data / "pool").symlink_to(FIXTURE_DIR)
    (data / "manifests" / "pairs.tsv").write_text("".join(f"{c}\t{u}\n" for c, u in rows))
    (data / "manifests" / "web.json").write_text(
        json.dumps({"base_url": f"http://127.0.0.1:{port}", "port": port}))
    return data


def demo_like_build(root: Path, label: str, crawl: str) -> Path:
    """A build over ``root/data`` with its own runs folder; the demo web is served by every
    `witforge run` on it (demo_web: true), the crawl goes through the guard."""
    y = root / f"{label}.yaml"
    y.write_text(f"name: k\nruns_dir: {root / ('runs_' + label)}\ndemo_web: true\nsources:\n"
                 "  - {path: data/manifests/pairs.tsv, format: tsv, header: false, "
                 "caption_col: column0, url_col: column1, tag: demo}\n"
                 f"url_dedup: {{enabled: false}}\ncrawl: {crawl}\n")
    return y


def witforge(args: list[str], log: Path) -> subprocess.Popen:
    """A witforge command in a process group of its own (the test kills the group)."""
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                                env={**os.environ, "PYTHONPATH": str(REPO)},
                                start_new_session=True, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT)


def _in_flight(images: Path, since: float) -> bool:
    """A worker started after ``since`` has a shard open (a tar without its stats)."""
    pid_file = images.parent / "worker.pid"
    try:
        if pid_file.stat().st_mtime < since:
            return False
        tars = {p.name[:-4] for p in images.glob("*.tar")}
        done = {p.name[: -len("_stats.json")] for p in images.glob("*_stats.json")}
    except OSError:
        return False
    return bool(tars - done)


def _pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def group_members(pgid: int) -> list[int]:
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                if int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[2]) == pgid:
                    found.append(int(d))
            except (OSError, IndexError, ValueError):
                continue
    return found


# How a build dies: its whole process group (a user's kill -9 of `make demo`: the stage, its
# guard and the demo web thread, but not the worker, which has a session of its own), the
# stage process alone (the OOM killer, a scheduler ending the main pid), or the stage and the
# worker at once, which leaves img2dataset's pool processes running, orphaned, mid-shard.
KILL_MODES = ("group", "controller", "controller+worker")


def kill_during_crawl(proc: subprocess.Popen, images: Path, started: float, delay: float,
                      mode: str, timeout: float = 120) -> list[int] | None:
    """SIGKILL the build ``delay`` s after a shard is first seen in flight (see KILL_MODES);
    the orphaned pool processes, [] if none; None if the command ended before the kill."""
    deadline = time.time() + timeout
    while not _in_flight(images, started):
        if proc.poll() is not None:
            return None
        assert time.time() < deadline, "no shard was ever in flight"
        time.sleep(0.02)
    time.sleep(delay)
    if proc.poll() is not None:
        return None
    worker = int((images.parent / "worker.pid").read_text())
    if mode == "group":
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        os.kill(proc.pid, signal.SIGKILL)
        if mode == "controller+worker":
            os.kill(worker, signal.SIGKILL)
    proc.wait()
    wait_for_worker(images.parent)
    return group_members(worker) if mode == "controller+worker" else []


def wait_for_worker(attempt: Path, timeout: float = 10) -> None:
    """The crawl worker must not outlive its controller (its watchdog kills its group)."""
    try:
        pid = int((attempt / "worker.pid").read_text())
    except (OSError, ValueError):
        return
    deadline = time.time() + timeout
    while _alive(pid):
        assert time.time() < deadline, f"crawl worker {pid} outlived its controller"
        time.sleep(0.05)


def ledger(y: Path) -> dict[str, tuple[list, list]]:
    """Every finished stage's kept uids and dropped (uid, reason), by stage folder."""
    cfg = load_build(y)
    out = {}
    for spec in STAGES:
        d = cfg.run_dir / spec.folder
        if not (d / "_SUCCESS").exists():
            continue
        kept = [r[0] for r in duckdb.sql(
            f"SELECT uid FROM read_parquet('{d}/kept.parquet') ORDER BY uid").fetchall()] \
            if (d / "kept.parquet").exists() else []
        dropped = duckdb.sql(
            f"SELECT uid, reason FROM read_parquet('{d}/dropped.parquet') ORDER BY uid"
        ).fetchall() if (d / "dropped.parquet").exists() else []
        out[spec.folder] = (kept, dropped)
    return out


def ledger_diff(got: dict, want: dict) -> str:
    """What differs, row by row: '06_crawl uid: connection_error, uninterrupted: kept'."""
    lines = [f"stages {sorted(set(got) ^ set(want))} in only one build"] \
        if set(got) != set(want) else []
    for stage in sorted(set(got) & set(want)):
        fate = [{**{u: "kept" for u in b[0]}, **dict(b[1])} for b in (got[stage], want[stage])]
        for uid in sorted(set(fate[0]) | set(fate[1])):
            a, b = (f.get(uid, "absent") for f in fate)
            if a != b:
                lines.append(f"{stage} {uid}: {a}, uninterrupted: {b}")
    return "\n".join(lines)


def crawl_rows(ids: list[str], base: str, slow: int, good: int) -> list[tuple[str, str]]:
    it = iter(ids)
    rows = [(f"slow picture {i}", f"{base}/f/slow/{next(it)}") for i in range(slow)]
    return rows + [(f"good picture {i}", f"{base}/img/{next(it)}") for i in range(good)]


SMALL_CRAWL = (f"{{guard: true, request_deadline: {DEADLINE}, timeout: 2, robots: false, "
               "processes_count: 1, thread_count: 4, number_sample_per_shard: 10, "
               "image_size: 48}")


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The small build's data folder and its uninterrupted ledger."""
    root = tmp_path_factory.mktemp("kill")
    port = _free_port()
    demo_like_data(root, crawl_rows(_pool_ids(), f"http://127.0.0.1:{port}", 12, 18), port)
    y = demo_like_build(root, "whole", SMALL_CRAWL)
    t = time.time()
    proc = witforge(["run", "--build", str(y), "--until", "crawl"], root / "whole.log")
    assert proc.wait(timeout=300) == 0, (root / "whole.log").read_text()[-3000:]
    print(f"uninterrupted: {time.time() - t:.1f}s")
    want = ledger(y)
    assert set(want) == {get_spec(s).folder for s in ("ingest", "text_filter", "crawl")}
    reasons = {r for _, r in want[CRAWL][1]}
    assert reasons == {"deadline_exceeded"} and len(want[CRAWL][0]) == 18
    return root, want


@pytest.mark.parametrize("seed", [1])
def test_a_build_killed_during_the_crawl_keeps_the_same_ledger(small, seed):
    root, want = small
    rng = random.Random(seed)
    y = demo_like_build(root, f"killed{seed}", SMALL_CRAWL)
    images = load_build(y).run_dir / f"{CRAWL}.work" / "attempt_000" / "images"
    log = root / f"killed{seed}.log"
    kills, orphans = 0, []
    for mode in ("group", "controller+worker"):
        started = time.time()
        proc = witforge(["run", "--build", str(y), "--until", "crawl"], log)
        left = kill_during_crawl(proc, images, started, rng.uniform(0, 1.0), mode)
        print(f"{mode} killed after {time.time() - started:.1f}s: {left}")
        kills += left is not None
        orphans += left or []
    assert kills >= 1, "the crawl finished before any kill"
    t = time.time()
    proc = witforge(["run", "--build", str(y), "--until", "crawl"], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    print(f"final run: {time.time() - t:.1f}s")
    got = ledger(y)
    assert got == want, ledger_diff(got, want)
    assert orphans, "killing the stage and the worker left no pool process running"
    assert not [p for p in orphans if _pid_alive(p)], "the resume left old pool processes"


def _guard_of(attempt: Path) -> int | None:
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if b"pipeline.guard" in cmd and str(attempt).encode() in cmd:
                return int(d)
    return None


def test_a_guard_that_dies_mid_crawl_fails_the_stage_and_its_shards_are_redone(small):
    root, want = small
    y = demo_like_build(root, "guardkill", SMALL_CRAWL)
    attempt = load_build(y).run_dir / f"{CRAWL}.work" / "attempt_000"
    log = root / "guardkill.log"
    started = time.time()
    proc = witforge(["run", "--build", str(y), "--until", "crawl"], log)
    deadline = time.time() + 120
    while not _in_flight(attempt / "images", started):
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.02)
    time.sleep(0.3)
    guard = _guard_of(attempt)
    assert guard is not None
    os.kill(guard, signal.SIGKILL)  # the stage lives on; its guard does not
    assert proc.wait(timeout=60) == 2
    err = log.read_text()
    assert f"the guard proxy (pid {guard}) was killed by signal 9" in err, err[-3000:]
    assert str(attempt / "guard.log") in err
    wait_for_worker(attempt)
    proc = witforge(["run", "--build", str(y), "--until", "crawl"], log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    got = ledger(y)
    assert got == want, ledger_diff(got, want)


# --- the demo build, killed at seeded moments in the crawl and after it (make test-slow) ---

SHARD = get_spec("shard").folder


def _demo_builds(root: Path) -> tuple[Path, Path]:
    """manifests/demo.yaml twice over one demo_data folder (one manifest, one port): an
    uninterrupted build and one to kill. The fixture pool's crawl is 151 rows: shards of 25
    (not 500) give it seven, so kills land between and inside shards."""
    (root / "manifests").mkdir()
    shutil.copytree(REPO / "manifests" / "filters", root / "manifests" / "filters")
    text = (REPO / "manifests" / "demo.yaml").read_text()
    for key in ("number_sample_per_shard", "samples_per_shard"):
        assert f"  {key}: 500\n" in text
        text = text.replace(f"  {key}: 500\n", f"  {key}: 25\n")
    out = []
    for label in ("whole", "killed"):
        y = root / "manifests" / f"{label}.yaml"
        y.write_text(text.replace("name: demo\n",
                                  f"name: demo\nruns_dir: {root / ('runs_' + label)}\n"))
        out.append(y)
    return out[0], out[1]


def _kill_later_stage(proc: subprocess.Popen, run_dir: Path, target: str,
                      delay: float) -> bool:
    """Kill the build's process group ``delay`` s after stage folder ``target`` starts (its
    temporary folder appears); False if the build ended first."""
    deadline = time.time() + 600
    while not any(run_dir.glob(f".{target}.tmp-*")):
        if proc.poll() is not None:
            return False
        assert time.time() < deadline
        time.sleep(0.005)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def _shard_tars(y: Path) -> dict[str, str]:
    d = load_build(y).run_dir / SHARD
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.tar"))}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_the_demo_build_killed_at_random_moments_keeps_the_same_ledger_and_shards(
        tmp_path, seed):
    rng = random.Random(seed)
    whole, killed = _demo_builds(tmp_path)
    run = ["run", "--build"]
    log = tmp_path / "build.log"
    # the demo's own start writes the pool, eval sets, metadata, manifests and web.json
    first = witforge(["demo", "--build", str(whole), "--fixture-only", "--no-train",
                      "--until", "ingest"], log)
    assert first.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert witforge([*run, str(whole)], log).wait(timeout=900) == 0, log.read_text()[-3000:]
    want, want_tars = ledger(whole), _shard_tars(whole)
    assert set(want) >= {CRAWL, SHARD} and want_tars
    # three kills in the crawl (as in the issue), one in a later stage
    targets = [(rng.choice(KILL_MODES), rng.uniform(0, 4)) for _ in range(3)]
    after = get_spec("crawl").number
    later = [s.folder for s in enabled_stages(load_build(killed)) if s.number > after]
    targets.append((rng.choice(later), rng.uniform(0, 0.5)))
    run_dir = load_build(killed).run_dir
    images = run_dir / f"{CRAWL}.work" / "attempt_000" / "images"
    kills = []
    for target, delay in targets:
        started = time.time()
        proc = witforge([*run, str(killed)], log)
        if target in KILL_MODES:
            done = kill_during_crawl(proc, images, started, delay, target) is not None
        else:
            done = _kill_later_stage(proc, run_dir, target, delay)
        if done:
            kills.append(target)
        else:
            assert proc.returncode == 0, log.read_text()[-3000:]
    print(f"seed {seed}: killed in {kills}")
    assert set(kills) & set(KILL_MODES), "no kill landed in the crawl"
    assert witforge([*run, str(killed)], log).wait(timeout=900) == 0, log.read_text()[-3000:]
    got = ledger(killed)
    assert got == want, ledger_diff(got, want)
    assert _shard_tars(killed) == want_tars
