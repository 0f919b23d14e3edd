"""The `mdfer` command: one subcommand per step of the data flow.

Errors a user can fix print as one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from mdfer.errors import MdferError
from mdfer.logs import redact, setup_logging

log = logging.getLogger("mdfer")
DEFAULT_STORE = "mdfer-home/store"
DEFAULT_DATA = "mdfer-home/data"


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (default: the embedded default.yaml)")
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=PATH",
                   help="root folder or s3:// prefix of dataset NAME (repeatable)")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=DEFAULT_STORE,
                   help=f"local folder or s3://bucket/prefix (default: {DEFAULT_STORE})")


def _load(args: argparse.Namespace):
    from mdfer.config import load_config, parse_data_roots
    return load_config(args.config, parse_data_roots(args.data_root))


# ---------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    from mdfer import synth
    fer = synth.write_fer_like(f"{args.out}/fer2013", args.per_class, max(2, args.per_class // 4), seed=args.seed)
    fane = synth.write_fane_like(f"{args.out}/fane", args.per_class, seed=args.seed)
    print(json.dumps({"fer2013": f"{args.out}/fer2013", "fane": f"{args.out}/fane",
                      "counts": {"fer2013": fer, "fane": fane}}, indent=2))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mdfer.ingest import prepare, summary_lines
    from mdfer.storage import Store
    manifest = prepare(_load(args), Store(args.store))
    for line in summary_lines(manifest):
        print(line)
    state = "already complete, nothing written" if manifest["skipped"] else "written"
    print(f"{args.store}/datasets/{manifest['dataset_id']}: {state}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mdfer.stages import train_run
    from mdfer.storage import Store
    config = _load(args)
    if args.workers:
        config.train.workers = args.workers
    summary = train_run(config, Store(args.store), args.run_id, args.dataset_id, args.address)
    print(json.dumps({k: summary[k] for k in ("run_id", "dataset_id", "final_stage", "val_macro_f1")}, indent=2))
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "synth": (cmd_synth, "write small generated FER-like and FANE-like datasets"),
    "prepare": (cmd_prepare, "validate, de-duplicate and split datasets into Parquet shards"),
    "train": (cmd_train, "train the stages of a run on Ray Train (resumes or skips finished stages)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mdfer", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}

    p = parsers["synth"]
    p.add_argument("--out", default=DEFAULT_DATA, help="folder to write into")
    p.add_argument("--per-class", type=int, default=60, help="training images per class")
    p.add_argument("--seed", type=int, default=0)

    p = parsers["prepare"]
    _config_args(p)
    _store_arg(p)

    p = parsers["train"]
    _config_args(p)
    _store_arg(p)
    p.add_argument("--dataset-id", required=True, help="a prepared dataset in the store (see prepare)")
    p.add_argument("--run-id", required=True, help="names the run; rerun the same id to resume")
    p.add_argument("--workers", type=int, help="Ray Train workers (overrides train.workers)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    handler = COMMANDS[args.command][0]
    try:
        return handler(args)
    except MdferError as exc:
        if args.debug:
            raise
        print(f"mdfer {args.command}: error: {redact(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mdfer {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug or an environment problem we did not foresee
        if args.debug:
            raise
        print(f"mdfer {args.command}: unexpected error: {type(exc).__name__}: "
              f"{redact(str(exc)).splitlines()[0] if str(exc) else ''} (rerun with --debug for details)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
