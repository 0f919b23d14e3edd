"""Ray job entrypoint for `mdfer train`, with the same arguments:

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --help

Under `ray job submit`, RAY_ADDRESS is set, so the job joins that cluster instead of starting one.
"""

import sys

from mdfer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
