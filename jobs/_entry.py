"""What every jobs/<command>.py does: run `mdfer <command>` with the job's own arguments.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/train.py --help

Under `ray job submit`, RAY_ADDRESS is set, so the job joins that cluster instead of starting one.
"""

import sys
from pathlib import Path

# The job runs from the uploaded working dir; make its mdfer importable even where the
# cluster's image does not have mdfer installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run(command: str) -> None:
    from mdfer.cli import main
    sys.exit(main([command, *sys.argv[1:]]))
