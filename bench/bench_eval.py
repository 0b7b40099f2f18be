"""`witforge evaluate` against CLIP_benchmark (its own venv) on the demo's checkpoint and sets.

Not a speed figure: an agreement figure. For each demo eval set, both tools score
runs/demo/train/model.pt; fp32 on both sides (CLIP_benchmark's --no_amp) must give the same
numbers, and CLIP_benchmark's default (amp: bf16 autocast on a CPU) is run too, to show how
far bf16 alone moves them. Needs a finished `make demo`.

    python -m bench.bench_eval [--quick] [--build manifests/demo.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from bench.peers.agreement import compare

RESULTS = Path(__file__).parent / "results" / "eval.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fp32 only (no amp run)")
    p.add_argument("--build", default="manifests/demo.yaml")
    a = p.parse_args(argv)
    from pipeline.config import load_build
    from pipeline.demo import apply_demo_settings

    cfg = load_build(a.build)
    apply_demo_settings(cfg)
    ckpt = cfg.run_dir / "train" / "model.pt"
    sets = [cfg.resolve(s) for s in [*cfg.eval.zeroshot, *cfg.eval.retrieval]]
    if not ckpt.is_file() or not sets:
        print(f"bench eval: no {ckpt} or no eval sets: run `make demo` first", file=sys.stderr)
        return 1
    runs = []
    for amp in ([False] if a.quick else [False, True]):
        for s in sets:
            t0 = time.time()
            r = compare(ckpt, cfg.train.model, s, amp=amp)
            r["seconds"] = round(time.time() - t0, 1)
            runs.append(r)
            worst = max(abs(x["diff_in_items"]) for x in r["rows"])
            print(f"{s.name:<26} clip_benchmark {'amp (bf16)' if amp else 'fp32      '} "
                  f"equal={r['equal']!s:<5} largest difference {worst} of {r['n']} items")
    fp32 = [r for r in runs if not r["amp"]]
    summary = {"fp32_sets_equal": sum(r["equal"] for r in fp32), "sets": len(fp32),
               "amp_max_diff_items": max((abs(x["diff_in_items"]) for r in runs if r["amp"]
                                          for x in r["rows"]), default=None)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"checkpoint": str(ckpt), "model": cfg.train.model,
                                   "summary": summary, "runs": runs}, indent=1))
    print(f"wrote {RESULTS}: {summary}")
    return 0 if summary["fp32_sets_equal"] == len(fp32) else 1


if __name__ == "__main__":
    sys.exit(main())
