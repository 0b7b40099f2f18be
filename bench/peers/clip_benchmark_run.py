"""Run CLIP_benchmark's own `clip_benchmark eval` inside its venv on one of our checkpoints.

    .venv-peers/clip_benchmark/bin/python bench/peers/clip_benchmark_run.py CONFIG_DIR -- \
        --dataset wds/x --dataset_root DIR --task zeroshot_classification --model witforge-tiny \
        --pretrained runs/demo/train/model.pt --output out.json --no_amp

Two things only are added, both before CLIP_benchmark's main runs: our model configs
(training/model_configs, passed as CONFIG_DIR: this venv cannot import witforge) are registered
with open_clip, and CLIP_benchmark 1.6.2's ``accuracy``, which calls float() on a 1-element
numpy array and fails on numpy 2, is replaced by the same count taken with ``.item()``.
"""

import sys


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit(__doc__)
    import open_clip

    open_clip.add_model_config(sys.argv[1])
    import clip_benchmark.metrics.zeroshot_classification as zc

    def accuracy(output, target, topk=(1,)):
        best = output.topk(max(topk), 1, True, True)[1].t()
        hits = best.eq(target.view(1, -1).expand_as(best))
        return [hits[:k].sum().item() / len(target) for k in topk]

    zc.accuracy = accuracy
    from clip_benchmark.cli import main as clip_benchmark_main

    sys.argv = ["clip_benchmark", *sys.argv[3:]]
    clip_benchmark_main()


if __name__ == "__main__":
    main()
