"""Ray job entrypoint for `mdfer pipeline`, with the same arguments (see _entry.py)."""

from _entry import run

if __name__ == "__main__":
    run("pipeline")
