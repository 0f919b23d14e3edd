"""The `mdfer` command: one subcommand per step of the data flow.

Errors a user can fix print as one line and exit 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable

from mdfer.config import DEFAULT_CONFIG, DEMO_CONFIG, load_config
from mdfer.errors import TRAIN_EXTRA, ConfigError, MdferError, signal_handler_kept, stop_on_sigterm
from mdfer.logs import NORMAL, QUIET, VERBOSE, redact, setup_logging

log = logging.getLogger("mdfer")
DEFAULT_STORE = "mdfer-home/store"
DEFAULT_DATA = "mdfer-home/data"


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's default in its help, unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("(default" not in text and action.option_strings and default is not None and default is not False
                and default != [] and default is not argparse.SUPPRESS):
            text += f" (default: {action.default})"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse with mdfer's conventions: a usage mistake is one line and exit 2, like every other
    user error, and the defaults are in the help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not between 0 and 1")
    return value


def _config_args(p: argparse.ArgumentParser, embedded: str = DEFAULT_CONFIG) -> None:
    p.add_argument("--config", help=f"YAML config (default: the embedded {embedded}, mdfer/configs/{embedded})")
    _set_arg(p)
    p.add_argument("--data-root", action="append", default=[], metavar="NAME=PATH",
                   help="root folder or s3:// prefix of dataset NAME (repeatable)")


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="set one config option, checked as the file is: a dotted key, list items by number, "
                        "a YAML value (train.stages.0.epochs=3, model.stride1_blocks=[4]); repeatable")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=DEFAULT_STORE,
                   help=f"local folder or s3://bucket/prefix (default: {DEFAULT_STORE})")


def _address_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a private local Ray)")


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--require-hef", action="store_true",
                   help="fail unless the Hailo Dataflow Compiler is found and compiles the HEF")
    p.add_argument("--hailo-python", help="Python of the Hailo Dataflow Compiler's environment "
                                          "(default: $MDFER_HAILO_PYTHON, else the `hailo` command's)")


def _load(args: argparse.Namespace, embedded: str = DEFAULT_CONFIG):
    from mdfer.config import parse_name_paths
    overrides = list(args.set)
    if getattr(args, "workers", None):
        overrides.append(f"train.workers={args.workers}")
    return load_config(args.config, parse_name_paths(args.data_root), embedded, overrides)


# ---------------------------------------------------------------- commands


def cmd_synth(args: argparse.Namespace) -> int:
    from mdfer import synth
    counts = synth.write_demo(args.out, args.per_class, seed=args.seed)
    print(json.dumps({"fer2013": f"{args.out}/fer2013", "fane": f"{args.out}/fane", "counts": counts}, indent=2))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from mdfer.ingest import prepare
    from mdfer.storage import Store
    manifest = prepare(_load(args), Store(args.store))
    for line in manifest.summary_lines():
        print(line)
    state = "already complete, nothing written" if manifest.skipped else "written"
    print(f"{args.store}/datasets/{manifest.dataset_id}: {state}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from mdfer.stages import train_run
    from mdfer.storage import Store
    config = _load(args)
    summary = train_run(config, Store(args.store), args.run_id, args.dataset_id, args.address)
    print(json.dumps({k: summary[k] for k in ("run_id", "dataset_id", "final_stage", "val_macro_f1")}, indent=2))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from mdfer.storage import Store
    from mdfer.sweep_spaces import load_sweeps
    from mdfer.layout import sweep_key
    from mdfer.tune import sweep_dataset, tune_sweep
    config = _load(args)
    load_sweeps(config, args.spaces)  # a bad space fails here, before any data or cluster work
    store = Store(args.store)
    dataset_id = sweep_dataset(config, store, args.sweep_id, args.dataset_id)
    summary = tune_sweep(config, store, args.sweep_id, dataset_id, args.spaces, args.address)
    print(json.dumps({k: summary[k] for k in ("run_id", "dataset_id", "final_stage", "val_macro_f1")}, indent=2))
    print(f"sweep: {store.key_uri(sweep_key(args.sweep_id))}/ (export it with: mdfer export --sweep-id {args.sweep_id})")
    return 0


MAX_LISTED_REJECTS = 20  # beyond this, rejected files are counted by reason (all are in metrics.json)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from mdfer.config import parse_name_paths
    from mdfer.evaluate import evaluate_model_file, evaluate_run, evaluate_run_on_folders
    from mdfer.layout import METRICS_FILE
    from mdfer.storage import Store
    store = Store(args.store)
    data = parse_name_paths(args.data, "--data")
    if args.model and not data:
        raise ConfigError("--model needs --data NAME=PATH (the class folders to score it on)")
    if data and (args.split != "test" or args.inference_lowpass is not None):
        raise ConfigError("--split and --inference-lowpass score a run's own dataset; they do not go with --data")
    if args.model and args.weights:
        raise ConfigError("--weights is for --run-id; an exported model carries its weights")
    if args.run_id and args.config:
        raise ConfigError("--config is for --model; a run is scored with its own config")
    if args.set and not args.config:
        raise ConfigError("--set changes the --config file's options; it goes with --config")
    if args.model:
        config = load_config(args.config, overrides=args.set) if args.config else None
        result = evaluate_model_file(store, args.model, data, config, args.flip_tta)
    elif data:
        result = evaluate_run_on_folders(store, args.run_id, data, args.weights, args.flip_tta)
    else:
        result = evaluate_run(store, args.run_id, args.split, args.weights, args.inference_lowpass, args.flip_tta)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if data:
        for line in result["summary"]:
            print(line)
        for rejected in result["rejected"][:MAX_LISTED_REJECTS]:
            print(f"  rejected {rejected['domain']}: {rejected['path']}: {rejected['reason']}")
        if len(result["rejected"]) > MAX_LISTED_REJECTS:
            print(f"  ... and {len(result['rejected']) - MAX_LISTED_REJECTS} more (counted by reason above; "
                  f"every one in {METRICS_FILE})")
    _print_headline(result)
    print(f"report: {result['report']}/")
    return 0


def _print_headline(result: dict) -> None:
    print(f"{'head':<12} {'n':>6} {'accuracy':>9} {'macro-F1':>9}")
    for head, metrics in result["heads"].items():
        print(f"{head:<12} {metrics['n']:>6} {metrics['accuracy']:>9.4f} {metrics['macro_f1']:>9.4f}")
    print(f"{'mean':<12} {'':>6} {'':>9} {result['macro_f1']:>9.4f}")


def _synthetic_roots(config, data_dir: str, per_class: int) -> None:
    """The embedded default: generated FER-like and FANE-like data, written once per size
    (a folder per size, so a different size never mixes with an earlier one)."""
    from pathlib import Path

    from mdfer import synth
    folder = Path(data_dir) / f"synth-{per_class}"
    done = folder / ".complete"
    if not done.exists():
        log.info("generating synthetic data in %s (%d images per class)", folder, per_class)
        synth.write_demo(folder, per_class)
        done.touch()
    config.domain("fer2013").root = str(folder / "fer2013")
    config.domain("fane").root = str(folder / "fane")


def cmd_pipeline(args: argparse.Namespace) -> int:
    import time

    from mdfer.evaluate import evaluate_run
    from mdfer.export import export_run
    from mdfer.export import export_summary_lines
    from mdfer.ingest import prepare
    from mdfer.layout import CURVES_FILE, METRICS_FILE, confusion_file, export_key, run_key
    from mdfer.runs import derived_run_id
    from mdfer.stages import check_store_shared, ensure_ray, train_run
    from mdfer.storage import Store
    started = time.perf_counter()
    config = _load(args, embedded=DEMO_CONFIG)
    store = Store(args.store)
    store.check_writable()  # a bad store fails now, not after the data is generated
    if args.address or os.environ.get("RAY_ADDRESS"):  # a cluster's nodes must all see the store
        ensure_ray(args.address)
        check_store_shared(store)
    if args.config is None and not any(d.root for d in config.data.domains):  # no --data-root, no --set of a root
        _synthetic_roots(config, args.data_dir, args.synth_per_class)
    manifest = prepare(config, store)
    for line in manifest.summary_lines():
        print(line)
    run_id = args.run_id or derived_run_id(config, manifest.dataset_id)
    train_run(config, store, run_id, manifest.dataset_id, args.address)
    result = evaluate_run(store, run_id, "test")
    exported = export_run(store, run_key(run_id), args.require_hef, args.hailo_python)
    print(f"\nrun {run_id} on dataset {manifest.dataset_id}, test split:")
    _print_headline(result)
    print(f"\nreport: {result['report']}/ ({METRICS_FILE}, {confusion_file('*')}, {CURVES_FILE})")
    print(f"export: {store.key_uri(export_key(run_key(run_id)))}/")
    for line in export_summary_lines(exported):
        print(f"  {line}")
    print(f"\npipeline finished in {time.perf_counter() - started:.0f} s")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from mdfer.export import export_run, export_summary_lines
    from mdfer.layout import export_key, source_prefix
    from mdfer.storage import Store
    store = Store(args.store)
    prefix = source_prefix(args.run_id, args.sweep_id)
    manifest = export_run(store, prefix, args.require_hef, args.hailo_python)
    for line in export_summary_lines(manifest):
        print(line)
    state = "already complete, nothing written" if manifest.get("skipped") else "written"
    print(f"{store.key_uri(export_key(prefix))}: {state}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """A line per image, or with --detect-faces per face (its box), with its top class and
    probability per head; with --json every probability. An input with no prediction (not
    readable, a link not followed, no face found) is one line on stderr (and its JSON entry
    says why), the others are predicted, and the exit code is 2."""
    from mdfer.faces import FACE_MARGIN, MIN_FACE, FaceDetector
    from mdfer.predict import predict_files
    if not args.detect_faces and (args.min_face is not None or args.face_margin is not None):
        raise ConfigError("--min-face and --face-margin go with --detect-faces")
    if args.annotate_head and not args.annotate:
        raise ConfigError("--annotate-head goes with --annotate OUT_DIR")
    detector = FaceDetector(args.min_face or MIN_FACE) if args.detect_faces else None
    margin = FACE_MARGIN if args.face_margin is None else args.face_margin
    results = predict_files(args.model, args.images, detector, margin, args.annotate, args.annotate_head)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for row in results:
            tops = "  ".join(f"{head} {entry['top']} {entry['probabilities'][entry['top']]:.2f}"
                             for head, entry in row.get("heads", {}).items())
            face = " face {} at {},{} {}x{}".format(row["face"], *row["box"]) if "box" in row else ""
            print(f"{row['image']}{face}: {tops or 'not predicted (see the error)'}")
        annotated = {row["annotated"] for row in results if "annotated" in row}
        if annotated:
            print(f"annotated: {len(annotated)} PNG{'s' * (len(annotated) > 1)} in {args.annotate}/")
    failed = [row for row in results if "error" in row]
    for row in failed:
        print(f"mdfer predict: error: {redact(row['error'])}", file=sys.stderr)
    if not results:
        print(f"mdfer predict: error: no image files in {', '.join(args.images)}", file=sys.stderr)
    return 2 if failed or not results else 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mdfer import artifacts
    export, source, raw = artifacts.open_export(args.store, args.run_id, args.sweep_id)
    if args.action == "list":
        if args.json:
            print(json.dumps(export.manifest, indent=2))
            return 0
        for line in artifacts.list_lines(export):
            print(line)
        return 0
    result = artifacts.fetch(export, source, raw, Path(args.dest or f"{args.run_id or args.sweep_id}-export"))
    print(f"{len(result.downloaded)} downloaded, {len(result.present)} already present "
          f"({result.size:,} bytes, sha256 verified) in {result.dest}")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "synth": (cmd_synth, "write small generated FER-like and FANE-like datasets"),
    "prepare": (cmd_prepare, "validate, de-duplicate and split datasets into Parquet shards"),
    "train": (cmd_train, "train the stages of a run on Ray Train (resumes or skips finished stages)"),
    "tune": (cmd_tune, "Ray Tune sweep per stage, each trial a Ray Train run (resumes or skips finished stages)"),
    "evaluate": (cmd_evaluate, "score a run or an exported model on a prepared split or labelled class folders: "
                               "metrics.json and confusion-matrix PNGs"),
    "pipeline": (cmd_pipeline, "prepare -> train -> evaluate -> export in one command (no arguments: generated demo data)"),
    "export": (cmd_export, "export a run's model: .keras, .tflite (float32, optimized, int8), ONNX, Hailo bundle/HEF"),
    "predict": (cmd_predict, "run an exported model (.keras, .tflite, .onnx) on image files or folders"),
    "artifacts": (cmd_artifacts, "list or fetch (sha256-verified) the exported model files of a run or sweep"),
}


def build_parser() -> argparse.ArgumentParser:
    from mdfer import __version__
    from mdfer.faces import FACE_MARGIN, MIN_FACE
    parser = _Parser(prog="mdfer", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mdfer {__version__}")
    common = _Parser(add_help=False)  # also accepted after the command: `mdfer train ... --debug`
    for p, unset in ((parser, None), (common, argparse.SUPPRESS)):  # after the command: no default,
        p.add_argument("--debug", action="store_true", default=unset or False,  # or it would reset
                       help="show tracebacks and debug logs (implies --verbose)")
        loudness = p.add_mutually_exclusive_group()
        loudness.add_argument("-v", "--verbose", dest="verbosity", action="store_const", const=VERBOSE,
                              default=unset or NORMAL,
                              help="everything on the console: Ray's, Ray Data's and TensorFlow's own output, "
                                   "every Ray worker's (default: those go to the log files)")
        loudness.add_argument("-q", "--quiet", dest="verbosity", action="store_const", const=QUIET,
                              default=unset or NORMAL, help="only the final tables and errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    parsers = {name: sub.add_parser(name, help=text, description=text, parents=[common])
               for name, (_, text) in COMMANDS.items()}

    p = parsers["synth"]
    p.add_argument("--out", default=DEFAULT_DATA, help="folder to write into")
    p.add_argument("--per-class", type=_positive_int, default=60, help="training images per class")
    p.add_argument("--seed", type=int, default=0, help="the generator's seed: the same seed writes the same files")

    p = parsers["prepare"]
    _config_args(p)
    _store_arg(p)

    p = parsers["train"]
    _config_args(p)
    _store_arg(p)
    p.add_argument("--dataset-id", required=True, help="a prepared dataset in the store (see prepare)")
    p.add_argument("--run-id", required=True, help="names the run; rerun the same id to resume")
    p.add_argument("--workers", type=_positive_int, help="Ray Train workers (the same as --set train.workers=N)")
    _address_arg(p)

    p = parsers["tune"]
    _config_args(p)
    _store_arg(p)
    p.add_argument("--sweep-id", required=True, help="names the sweep; rerun the same id to resume")
    p.add_argument("--dataset-id", help="a prepared dataset (default: the sweep's own, else prepare it)")
    p.add_argument("--spaces", default="tune_spaces", help="folder of <stage>.yaml search spaces (default: tune_spaces)")
    _address_arg(p)

    p = parsers["evaluate"]
    _store_arg(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="a finished run (its final weights)")
    source.add_argument("--model", help="an exported .keras, .tflite or .onnx file (heads.json beside it); "
                                        "needs --data")
    p.add_argument("--data", action="append", default=[], metavar="NAME=PATH",
                   help="score on this folder of class folders (local or s3://) as dataset NAME of the "
                        "model, instead of a split of the run's dataset; repeatable")
    p.add_argument("--config", help="with --model: a config whose folder maps name the class folders "
                                    "(default: folders named like the classes, any case)")
    _set_arg(p)
    p.add_argument("--flip-tta", action="store_true",
                   help="test-time augmentation: average each image's and its mirror image's probabilities")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="the split of the run's dataset to score")
    p.add_argument("--json", action="store_true", help="print the whole result (metrics.json) instead of the table")
    p.add_argument("--weights", help="weights file (.weights.h5/.keras, local or s3://) instead of the run's best")
    p.add_argument("--inference-lowpass", type=int, metavar="W",
                   help="score with this input blur instead of the run's model.inference_lowpass "
                        "(0 = none); report in report/<split>-lowpass<W>/")

    p = parsers["pipeline"]
    _config_args(p, DEMO_CONFIG)
    _store_arg(p)
    p.add_argument("--run-id", help="default: derived from the config and dataset, so a rerun resumes")
    p.add_argument("--data-dir", default=DEFAULT_DATA, help="where generated data goes when no roots are set")
    p.add_argument("--synth-per-class", type=_positive_int, default=150, help="generated training images per class")
    _address_arg(p)
    _export_args(p)

    p = parsers["export"]
    _store_arg(p)
    _export_args(p)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", help="a finished run")
    source.add_argument("--sweep-id", help="a finished sweep (its best three-stage result)")

    p = parsers["predict"]
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any size, gray or RGB) or folders of them")
    p.add_argument("--model", required=True, help="an exported .keras, .tflite or .onnx file")
    p.add_argument("--json", action="store_true", help="JSON: every head's probabilities per image, instead of the table")
    p.add_argument("--detect-faces", action="store_true",
                   help='find the faces in each photo first (OpenCV\'s Haar cascade: pip install "mdfer[faces]") '
                        "and predict each face's square crop: a line (a JSON object) per face with its box")
    p.add_argument("--min-face", type=_positive_int, metavar="PX",
                   help=f"with --detect-faces: the smallest face side searched for, in the photo's pixels "
                        f"(default: {MIN_FACE})")
    p.add_argument("--face-margin", type=_fraction, metavar="FRACTION",
                   help=f"with --detect-faces: the crop is the square on the detected box, grown on each side "
                        f"by this share of its side (default: {FACE_MARGIN})")
    p.add_argument("--annotate", metavar="OUT_DIR",
                   help="write each photo as OUT_DIR/<name>.png with its faces (with --detect-faces) or its "
                        "whole image boxed and labelled with a top class and probability")
    p.add_argument("--annotate-head", metavar="HEAD",
                   help="the head whose top class labels the boxes (default: the model's first dataset head)")

    actions = parsers["artifacts"].add_subparsers(dest="action", required=True, metavar="ACTION")
    for action, text in (("list", "print each exported file with size and sha256, and the .hef status"),
                         ("fetch", "download every exported file with boto3 and verify its sha256")):
        p = actions.add_parser(action, help=text, description=text, parents=[common])
        _store_arg(p)
        which = p.add_mutually_exclusive_group(required=True)
        which.add_argument("--run-id", help="the run whose export/ to read")
        which.add_argument("--sweep-id", help="the sweep whose export/ to read")
        if action == "fetch":
            p.add_argument("--dest", help="folder to download into (default: ./<id>-export)")
        else:
            p.add_argument("--json", action="store_true", help="print the export manifest as JSON instead of lines")
    return parser


def _check_ids(args: argparse.Namespace) -> None:
    """Run, sweep and dataset ids become store keys: one plain folder name each, so an id can
    never read or write outside its prefix (`--run-id ../x`)."""
    from mdfer.config import FOLDER_NAME_RULE, is_folder_name
    for option in ("run_id", "sweep_id", "dataset_id"):
        value = getattr(args, option, None)
        if value is not None and not is_folder_name(value):
            raise ConfigError(f"--{option.replace('_', '-')} {value!r}: use {FOLDER_NAME_RULE} characters")


LIGHT_COMMANDS = ("synth", "predict")  # what `pip install mdfer` runs (predict: .tflite models)
TRAINING_STACK = ("ray", "tensorflow", "pyarrow", "boto3")  # the train extra's modules that mdfer imports first


def _check_training_stack(command: str) -> None:
    """In the light install, a command of the training stack says which extra to install,
    before an import deep inside it fails with a traceback."""
    import importlib.util
    missing = [] if command in LIGHT_COMMANDS else [m for m in TRAINING_STACK if importlib.util.find_spec(m) is None]
    if missing:
        raise MdferError(f"needs the training stack ({', '.join(missing)} not installed): {TRAIN_EXTRA}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_file = setup_logging(VERBOSE if args.debug else args.verbosity, args.debug, args.command)
    handler = COMMANDS[args.command][0]
    with signal_handler_kept(signal.SIGTERM):  # put back after: main() also runs inside other programs
        stop_on_sigterm()
        try:
            _check_training_stack(args.command)
            _check_ids(args)
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
            if log_file:
                import traceback
                with open(log_file, "a", encoding="utf-8") as out:
                    out.write(redact(traceback.format_exc()))
            details = (f"the traceback is in {log_file}, or rerun with --debug" if log_file
                       else "rerun with --debug for details")
            print(f"mdfer {args.command}: unexpected error: {type(exc).__name__}: "
                  f"{redact(str(exc)).splitlines()[0] if str(exc) else ''} ({details})",
                  file=sys.stderr)
            return 1


if __name__ == "__main__":
    sys.exit(main())
