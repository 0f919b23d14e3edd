"""Ray job entrypoint for `mdfer train`, with the same arguments (see _entry.py)."""

from _entry import run

if __name__ == "__main__":
    run("train")
