"""Submit a ControlNet training job to a Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.train TRAIN.yaml [--set k=v ...]

Everything else is `python -m pipeline train`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
