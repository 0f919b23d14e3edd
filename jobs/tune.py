"""Ray job entrypoint for `mdfer tune`, with the same arguments (see _entry.py)."""

from _entry import run

if __name__ == "__main__":
    run("tune")
