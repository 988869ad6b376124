"""Submit a pipeline job to a Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.run CONFIG.yaml [--set k=v ...]

Inside a Ray job the supervisor sets RAY_ADDRESS, so the run joins the cluster it was submitted to;
everything else is `python -m pipeline run`.
"""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
