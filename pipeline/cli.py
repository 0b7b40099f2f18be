"""`witforge`: one subcommand per stage, plus run, status, audit, explain and the tools.

Library code raises; this module is the only place that turns errors into
messages and exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys

import duckdb

from pipeline import status
from pipeline.config import BuildConfig, ConfigError, load_build
from pipeline.stage import STAGES, StageError, disk_full, enabled_stages, run_stage

# Commands that own their argument parsing: name -> (module with main(argv), one-line help).
TOOLS: dict[str, tuple[str, str]] = {
    "demo": ("pipeline.demo", "run the demo build end to end on the local demo web"),
    "demo-data": ("pipeline.demoweb.pool", "assemble the demo pool of real images"),
    "demo-web": ("pipeline.demoweb.server", "serve the demo web in the foreground"),
    "preview": ("pipeline.filter", "preview a SQL filter's kept/dropped rows on a build"),
    "metadata": ("pipeline.metadata", "build the MetaCLIP-style metadata entry list"),
    "train": ("training.train", "train a CLIP model on a build's shards"),
    "evaluate": ("training.evaluate", "zero-shot and retrieval evaluation of a checkpoint"),
    "classify": ("training.classify", "label probabilities for images, like CLIP's README"),
    "compare": ("training.compare", "raw vs curated vs ablations at equal compute, with seeds"),
    "search": ("pages.search", "search page + clip-retrieval knn API over a build's embeddings"),
    "card": ("pages.card", "write the build's HTML data card (runs/<build>/card/index.html)"),
    "plan": ("pipeline.plan", "project a bigger build's time, disk and cost from a pilot"),
}

STAGE_HELP = {
    "ingest": "read the manifests into uid-keyed pairs (ftfy, URL checks, exact repeats)",
    "text_filter": "named SQL filters on captions, before any download",
    "url_dedup": "canonicalize URLs and drop repeated url+caption pairs",
    "precrawl_balance": "optional looser MetaCLIP balance before the crawl",
    "robots": "fetch each domain's robots.txt once and drop disallowed URLs",
    "crawl": "download the images with img2dataset and join the results back to uid",
    "image_filter": "named SQL filters on image sizes and hashes",
    "image_dedup": "drop exact (sha256) and near (pHash) duplicate images",
    "decontaminate": "drop training images that are near-duplicates of eval images",
    "balance": "MetaCLIP metadata matching and balanced sampling (final t)",
    "shard": "write the kept samples as WebDataset tars with sizes.json and an index",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="witforge",
        description="Build clean, balanced, WIT-style CLIP corpora from URL-caption manifests, "
        "stage by stage. Each stage writes runs/<build>/<NN_stage>/ (kept.parquet, "
        "dropped.parquet, report.json) and is skipped when its inputs and settings are unchanged.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for spec in STAGES:
        sp = sub.add_parser(spec.name, help=STAGE_HELP.get(spec.name, ""),
                            description=STAGE_HELP.get(spec.name, ""))
        sp.add_argument("--build", required=True, help="the build YAML, e.g. manifests/demo.yaml")
        sp.add_argument("--force", action="store_true", help="run even if up to date")
        if spec.name == "crawl":
            sp.add_argument("--retry-failed", action="store_true",
                            help="download again only the samples that failed last time")
    build_help = "the build YAML, e.g. manifests/demo.yaml"
    rp = sub.add_parser("run", help="run every enabled stage in order (skips finished ones)",
                        description="Run every enabled stage in order, skipping the ones whose "
                        "inputs, settings and code are unchanged, then print the funnel. "
                        "`witforge status` shows beforehand which stages would run and why.")
    rp.add_argument("--build", required=True, help=build_help)
    rp.add_argument("--until", choices=[s.name for s in STAGES], help="stop after this stage")
    rp.add_argument("--force", action="store_true",
                    help="run every stage again, even the up-to-date ones")
    st = sub.add_parser("status", help="which stages are up to date, which would run, and why",
                        description=status.__doc__.split("\n\n")[0] if status.__doc__ else "")
    status.add_arguments(st)
    ap = sub.add_parser("audit", help="check rows in = kept + dropped for every stage; "
                        "print the funnel")
    ap.add_argument("--build", required=True, help=build_help)
    ep = sub.add_parser("explain", help="show one pair's path through the build")
    ep.add_argument("key", help="a uid, or a URL")
    ep.add_argument("--build", required=True, help=build_help)
    for name, (_, help_text) in TOOLS.items():
        tp = sub.add_parser(name, help=help_text, add_help=False)
        tp.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv else ""
    try:
        if command in TOOLS:
            return int(importlib.import_module(TOOLS[command][0]).main(argv[1:]) or 0)
        return _command(argv)
    except (ConfigError, StageError) as e:
        print(f"witforge {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"witforge {command}: interrupted; nothing half-written was kept, "
              "rerun to continue", file=sys.stderr)
        return 130
    except (OSError, duckdb.IOException) as e:
        if not disk_full(e):
            raise
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"witforge {command}: error: no space left on device{where} ({e}); nothing "
              "half-written was kept: free some space and rerun", file=sys.stderr)
        return 2


def _command(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.command:
        _parser().print_help()
        return 0
    cfg = load_build(args.build)
    if cfg.demo_web:
        from pipeline.demo import apply_demo_settings

        apply_demo_settings(cfg)
    if args.command == "audit":
        from pipeline import ledger

        return 0 if ledger.print_audit(cfg) else 1
    if args.command == "status":
        ok = status.print_status(cfg)
        return 1 if args.check and not ok else 0
    if args.command == "explain":
        from pipeline import ledger

        return 0 if ledger.print_explain(cfg, args.key) else 1
    web = contextlib.nullcontext()
    if cfg.demo_web and args.command in ("run", "robots", "crawl"):
        from pipeline.demo import serving_demo_web

        web = serving_demo_web(cfg)  # the demo build's URLs live on the local demo web
    with web:
        return _run_stages(cfg, args)


def _run_stages(cfg: BuildConfig, args: argparse.Namespace) -> int:
    if args.command == "run":
        for spec in enabled_stages(cfg):
            run_stage(cfg, spec.name, force=args.force, explain=status.changes)
            if spec.name == args.until:
                break
        from pipeline import ledger

        ok = ledger.print_audit(cfg)
        if args.until is None:  # a full run ends with its data card (pages/, the top floor)
            from pages.card import write_card

            write_card(cfg)
        return 0 if ok else 1
    options = {"retry_failed": getattr(args, "retry_failed", False)}
    run_stage(cfg, args.command, force=args.force, options=options, explain=status.changes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
