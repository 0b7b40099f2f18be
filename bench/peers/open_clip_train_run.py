"""Run open_clip's own trainer (`python -m open_clip_train.main ...`) inside its venv.

    .venv-peers/open_clip_train/bin/python bench/peers/open_clip_train_run.py CONFIG_DIR -- \
        --train-data 'shards/shard-{000000..000002}.tar' --dataset-type webdataset ...

The one thing added before its main runs: our model configs (training/model_configs, passed as
CONFIG_DIR: this venv cannot import witforge) are registered with open_clip, so
``--model witforge-tiny`` names the same architecture as in our venv.
"""

import sys


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        sys.exit(__doc__)
    import open_clip

    open_clip.add_model_config(sys.argv[1])
    from open_clip_train.main import main as train_main

    train_main(sys.argv[3:])


if __name__ == "__main__":
    main()
