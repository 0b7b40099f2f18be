"""`witforge demo`: the demo build end to end on a local demo web of real images.

Assembles the pool (Debian packages, or the committed fixture), starts the demo
web on 127.0.0.1, writes the manifests as real sources come, runs every enabled
stage, then trains and evaluates, and prints the funnel and the results.
The web lives only as long as this command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import BuildConfig, load_build
from pipeline.ledger import print_audit
from pipeline.stage import STAGE_NAMES, StageError, enabled_stages, run_stage
from pipeline.status import changes

# A fixed preferred port keeps the manifests (and so every stage's fingerprint) stable
# between runs; a busy port falls back to a free one and the manifests follow.
PREFERRED_PORT = 47811
# Bump when training/evalsets.py writes different sets, so every demo makes them again.
EVALSETS_VERSION = 3


def _free(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        # As the server does: a port in TIME_WAIT from the last run is free to reuse.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _write_if_changed(src_dir: Path, dst_dir: Path) -> None:
    """Copy generated manifests only where bytes differ, so unchanged sources keep mtimes."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        target = dst_dir / f.name
        if not target.exists() or target.read_bytes() != f.read_bytes():
            shutil.copyfile(f, target)


def data_dir_for(cfg: BuildConfig) -> Path:
    """The demo data folder: the folder holding the manifests' `manifests/` folder."""
    return cfg.resolve(cfg.sources[0].path).parent.parent


def drop_missing_eval_sets(cfg: BuildConfig) -> None:
    """Leave out the eval sets that could not be made here (no Fashion-MNIST package): in
    `witforge demo` and in every other command on a demo build alike, so `witforge status` or
    `witforge run` sees the build the demo ran."""
    have = lambda p: (cfg.resolve(p) / "test").is_dir()  # noqa: E731
    cfg.decontaminate.eval_sets = [p for p in cfg.decontaminate.eval_sets if have(p)]
    cfg.eval.zeroshot = [p for p in cfg.eval.zeroshot if have(p)]
    cfg.eval.retrieval = [p for p in cfg.eval.retrieval if have(p)]


def apply_demo_settings(cfg: BuildConfig) -> None:
    """The settings `witforge demo` runs a demo build with, for every other command on it
    (`witforge status`, `run`, one stage): the same eval sets, and the crawl guard open to the
    demo web's recorded address, so their fingerprints match the demo's."""
    drop_missing_eval_sets(cfg)
    info = data_dir_for(cfg) / "manifests" / "web.json"
    if info.is_file():
        cfg.crawl.allow_hosts = [urlsplit(json.loads(info.read_text())["base_url"]).netloc]


def _side_data_key(pool_dir: Path, **parts: bool) -> str:
    """What the eval sets and the metadata are made from: the pool's settings and which
    optional Debian data is on this machine. A change (a package installed since, a new pool)
    makes them again, so a demo never keeps sets from a fixture pool or a metadata list
    without WordNet once the real data is here."""
    pool = (pool_dir / "settings.json").read_text() if (pool_dir / "settings.json").is_file() \
        else ""
    return json.dumps({"pool": pool, **parts}, sort_keys=True)


def prepare_side_data(cfg: BuildConfig, pool_dir: Path, data_dir: Path) -> None:
    """Eval sets (held out from the web) and the balance metadata, made again only when what
    they are made from changed."""
    from pipeline import metadata
    from training.evalsets import FASHION_ROOT, write_demo_eval_sets

    eval_dir = data_dir / "eval"
    key = _side_data_key(pool_dir, fashion_mnist=(FASHION_ROOT / "t10k-labels-idx1-ubyte.gz")
                         .is_file(), version=EVALSETS_VERSION)
    marker = eval_dir / "made_from.json"
    if not marker.is_file() or marker.read_text() != key:
        made = write_demo_eval_sets(pool_dir, eval_dir)
        marker.write_text(key)
        print(f"demo eval sets: {', '.join(made) or 'none'} in {eval_dir}")
    drop_missing_eval_sets(cfg)
    if cfg.balance.enabled and cfg.balance.metadata:
        meta = cfg.resolve(cfg.balance.metadata)
        wordnet = Path(metadata.DEFAULT_WORDNET).is_dir()
        marker = meta.with_name(meta.name + ".made_from.json")
        key = json.dumps({"wordnet": wordnet}, sort_keys=True)
        if not meta.exists() or not marker.is_file() or marker.read_text() != key:
            args = ["--out", str(meta)] + ([] if wordnet else ["--no-wordnet"])
            if metadata.main(args) != 0:
                raise StageError(f"could not build the demo metadata {meta}")
            marker.write_text(key)


@contextlib.contextmanager
def serving_demo_web(cfg: BuildConfig) -> Iterator[None]:
    """Serve a demo build's web while a single stage runs outside `witforge demo`.

    The web comes back at the address its manifests were written for (recorded in
    manifests/web.json by `witforge demo`); :func:`apply_demo_settings` has already let
    exactly that address through the crawl guard.
    """
    from pipeline.demoweb.server import DemoWeb

    data_dir = data_dir_for(cfg)
    info = data_dir / "manifests" / "web.json"
    if not info.is_file():
        raise StageError(f"{cfg.path}: demo_web is on but {info} is missing: run `make demo` "
                         "(or `witforge demo --until ingest`) once to write the demo manifests")
    port = int(json.loads(info.read_text())["port"])
    if not _free(port):
        raise StageError(f"the demo web's port {port} (from {info}) is in use: stop what holds "
                         "it, or rerun `make demo`, which picks a free port")
    with DemoWeb(data_dir / "pool", port=port):
        yield


@contextlib.contextmanager
def compare_context(cfg: BuildConfig) -> Iterator[None]:
    """What `witforge compare` needs around it: on a demo build, the demo's settings and its web
    (the raw arm crawls the rows curation dropped before the crawl); elsewhere nothing."""
    if not cfg.demo_web:
        yield
        return
    apply_demo_settings(cfg)
    with serving_demo_web(cfg):
        yield


def run_demo(cfg: BuildConfig, until: str | None = None, train: bool = True,
             fixture_only: bool = False) -> int:
    from pipeline.demoweb.manifests import write_manifests
    from pipeline.demoweb.packages import ensure_installed, missing_lines
    from pipeline.demoweb.pool import assemble_pool
    from pipeline.demoweb.server import DemoWeb
    from pipeline.truth_report import truth_path, write_report, write_truth

    t0 = time.time()
    data_dir = data_dir_for(cfg)
    # One apt-get call for every package the default demo reads (as root, where apt exists);
    # what stays missing is said at the end, where a person reads.
    still_missing = {} if fixture_only else ensure_installed()
    pool_dir = assemble_pool(data_dir, prefer_system=not fixture_only)
    prepare_side_data(cfg, pool_dir, data_dir)
    # the port the manifests were last written for, else the preferred one, else any: a rerun
    # keeps its manifests (and every stage) when another demo holds the preferred port
    last = data_dir / "manifests" / "web.json"
    ports = [int(json.loads(last.read_text())["port"])] if last.is_file() else []
    port = next((p for p in [*ports, PREFERRED_PORT] if _free(p)), 0)
    with DemoWeb(pool_dir, port=port) as web:
        print(f"demo web serving {pool_dir} at {web.base_url}")
        with tempfile.TemporaryDirectory() as tmp:
            write_manifests(pool_dir, web.base_url, Path(tmp))
            _write_if_changed(Path(tmp), data_dir / "manifests")
        manifest_truth = data_dir / "manifests" / "truth.parquet"
        if manifest_truth.is_file():  # what every row is: the bootstrap's AUC, the truth report
            write_truth(manifest_truth, truth_path(cfg))
        (data_dir / "manifests" / "web.json").write_text(
            json.dumps({"base_url": web.base_url, "port": web.port}))
        # The demo web is on loopback: let exactly its host:port through the crawl guard.
        cfg.crawl.allow_hosts = [web.host_port]
        for spec in enabled_stages(cfg):
            run_stage(cfg, spec.name, explain=changes)
            if spec.name == until:
                break
        ok = print_audit(cfg)
        truth_md = write_report(cfg)
        if truth_md is not None:
            print(f"\ncuration against the demo web's truth ({truth_md}):\n"
                  + truth_md.read_text().split("\n", 2)[2])
        if train and until is None:
            # inside the web: the raw arm crawls the rows curation dropped before the crawl
            from training.demo import train_and_evaluate

            train_and_evaluate(cfg, data_dir)
    if until is None:
        # after training: a card that fails (loudly) loses none of the results above
        from pages.card import write_card
        from pipeline.plan import demo_projection

        projection = demo_projection(cfg)  # runs/<b>/plan.json first, so the card shows it
        write_card(cfg)
        print(f"\n{projection}")
    print(f"\nmake demo finished in {time.time() - t0:.0f}s; outputs under {cfg.run_dir}")
    lines = missing_lines(still_missing)
    if fixture_only:
        lines.insert(0, "NOTE the pool is the small committed fixture (--fixture-only), not the "
                     "Debian packages: the funnel and the eval table are not the README's")
    for line in lines:
        print(line)
    if lines:
        print("(the rest of the demo ran; install the missing packages and rerun `make demo` "
              "for the README's output)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="witforge demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build", default="manifests/demo.yaml", help="the demo build YAML")
    p.add_argument("--until", choices=STAGE_NAMES, help="stop after this data stage")
    p.add_argument("--no-train", action="store_true", help="skip training and evaluation")
    p.add_argument("--fixture-only", action="store_true",
                   help="use the small committed fixture pool, not the Debian packages")
    p.add_argument("--steps", type=int, help="override train.steps (a quick look)")
    args = p.parse_args(argv)
    cfg = load_build(args.build)
    if args.steps:
        cfg.train.steps = args.steps
    return run_demo(cfg, until=args.until, train=not args.no_train,
                    fixture_only=args.fixture_only)
