"""What reaches the console, what goes to the log file, and credential redaction.

The console is for people: mdfer's own lines (stage headers, one line per epoch, progress,
tables, warnings a user can act on) with one timestamp format and no colour codes off a
terminal. Everything else (TensorFlow's C++ start-up lines, Ray's and Ray Data's INFO, Python
warnings from libraries) goes to the command's log file; Ray workers' output stays in Ray's own
session logs. `--verbose` puts it all back on the console, `--quiet` keeps only tables and errors.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from datetime import datetime
from pathlib import Path

SECRET_ENV_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")
SECRET_PATTERN = re.compile(
    r"(?i)((?:secret|token|password|access[_-]?key(?:[_-]?id)?|credential)[\"']?\s*[:=]\s*[\"']?)([^\s\"',&]+)")
REDACTED = "***"
MIN_SECRET_LEN = 4  # shorter values would blank out ordinary words

QUIET, NORMAL, VERBOSE = "quiet", "normal", "verbose"
VERBOSITY_ENV = "MDFER_VERBOSITY"  # inherited by every process a command starts
LOG_DIR_ENV = "MDFER_LOG_DIR"
LOG_FILE_ENV = "MDFER_LOG_FILE"  # this command's log file, for the line that says where it is
DEFAULT_LOG_DIR = "mdfer-home/logs"
CONSOLE_FORMAT, FILE_FORMAT = "%(asctime)s %(message)s", "%(asctime)s %(levelname)s %(name)s: %(message)s"
TIME_FORMAT = "%H:%M:%S"
RAY_DATA_LOGGING = Path(__file__).parent / "ray_data_logging.yaml"


def _secret_values() -> list[str]:
    values = [v for k, v in os.environ.items()
              if any(w in k.upper() for w in SECRET_ENV_WORDS) and len(v) >= MIN_SECRET_LEN]
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """Blank out credential values from the environment and `key=value` secrets."""
    for value in _secret_values():
        text = text.replace(value, REDACTED)
    return SECRET_PATTERN.sub(lambda m: m.group(1) + REDACTED, text)


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


def verbosity() -> str:
    return os.environ.get(VERBOSITY_ENV, NORMAL)


class _ConsoleFilter(logging.Filter):
    """mdfer's own INFO (WARNING when quiet) and anyone's ERROR; everything when verbose."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbosity() == VERBOSE:
            return True
        own = record.name == "mdfer" or record.name.startswith("mdfer.")
        return record.levelno >= (logging.ERROR if not own else logging.WARNING if verbosity() == QUIET else logging.INFO)


class _ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and not record.getMessage().startswith(("warning", "error")):
            stamp, _, rest = text.partition(" ")
            text = f"{stamp} {record.levelname.lower()}: {rest}"
        return text


class _ConsoleHandler(logging.StreamHandler):
    """Clears a live progress bar before a line is written over it."""

    def emit(self, record: logging.LogRecord) -> None:
        LiveLine.clear()
        super().emit(record)


class LiveLine:
    """One line rewritten in place on a terminal (a progress bar); nothing off a terminal."""

    shown = False

    @classmethod
    def show(cls, text: str) -> None:
        sys.stderr.write("\r\x1b[K" + text[:console_width()])
        sys.stderr.flush()
        cls.shown = True

    @classmethod
    def clear(cls) -> None:
        if cls.shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            cls.shown = False


def console_width() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns - 1
    except (OSError, ValueError):
        return 199


def on_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def new_log_file(command: str) -> Path:
    folder = Path(os.environ.get(LOG_DIR_ENV) or DEFAULT_LOG_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{command}-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"


def _route_native_stderr(log_file: Path) -> None:
    """File descriptor 2 (what C++ libraries write to: TensorFlow's start-up lines print before
    its log level is read, tensorflow/tensorflow#100442) becomes the log file; Python's
    sys.stderr keeps the console."""
    console = os.dup(2)
    target = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = open(console, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                      errors="backslashreplace", closefd=True)


def setup_logging(level: str = NORMAL, debug: bool = False, command: str = "mdfer") -> Path | None:
    """Console and log file for one command; returns the log file (None when verbose: all of it
    is on the console). Must run before TensorFlow or Ray is imported."""
    os.environ[VERBOSITY_ENV] = level
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if level == VERBOSE else "2")
    if level != VERBOSE:
        os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(RAY_DATA_LOGGING))
    if not sys.stdout.isatty():  # Ray colours its "(raylet)" notices and worker prefixes otherwise
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    log_file = None if level == VERBOSE else new_log_file(command)
    if log_file:
        if sys.stderr is sys.__stderr__:  # a process of its own; not `main()` called by a host
            _route_native_stderr(log_file)  # (pytest) whose stderr is its own to manage
        os.environ[LOG_FILE_ENV] = str(log_file)
    console = _ConsoleHandler(sys.stderr)
    console.setFormatter(_ConsoleFormatter(CONSOLE_FORMAT, TIME_FORMAT))
    console.addFilter(_ConsoleFilter())
    handlers: list[logging.Handler] = [console]
    if log_file:
        to_file = logging.FileHandler(log_file, encoding="utf-8")
        to_file.setLevel(logging.DEBUG if debug else logging.INFO)
        to_file.setFormatter(logging.Formatter(FILE_FORMAT, TIME_FORMAT))
        handlers.append(to_file)
    root = logging.getLogger()
    for handler in handlers:
        handler.addFilter(RedactingFilter())
    root.handlers[:] = handlers
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("botocore", "urllib3", "s3transfer", "matplotlib", "PIL", "absl", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.captureWarnings(True)  # library deprecation warnings: to the log file
    return log_file


def adopt_ray_logging() -> None:
    """`import ray` gives the "ray" logger a console handler of its own; send its records
    through mdfer's handlers instead (the console shows Ray's errors, the file the rest)."""
    if verbosity() == VERBOSE:
        return
    ray_logger = logging.getLogger("ray")
    ray_logger.handlers.clear()
    ray_logger.propagate = True


def say_where_logs_are() -> None:
    """One console line, once Ray runs: where the detail went."""
    import ray
    if verbosity() == VERBOSE or not os.environ.get(LOG_FILE_ENV):
        return
    node = ray._private.worker._global_node  # the session folder: no public API in Ray 2.60
    workers = f"; Ray workers' logs: {node.get_session_dir_path()}/logs" if node is not None else ""
    logging.getLogger("mdfer").info("log: %s%s", os.environ[LOG_FILE_ENV], workers)


def worker_line(text: str) -> None:
    """One line from a Ray worker to its own stdout (Ray's session logs; the console when
    verbose). Ray 2.60's Train patches `print` to log to its console handler and also to print
    when sys.stdout is wrapped, which it is in every Ray worker: printed lines came out twice."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(redact(text) + "\n")
    stream.flush()


def duration(seconds: float) -> str:
    """`2:05` or `1:02:05`."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Progress of a long loop: a live bar on a terminal, else a log line at every quarter once
    it has run for a few seconds (a short loop says nothing). Nothing when quiet."""

    QUARTERS = 4
    QUIET_SECONDS = 5.0

    def __init__(self, label: str, total: int, unit: str, logger: logging.Logger | None = None):
        self.label, self.total, self.unit = label, max(total, 1), unit
        self.log = logger or logging.getLogger("mdfer")
        self.started = time.perf_counter()
        self.done = 0
        self.next_quarter = 1
        self.live = on_terminal() and verbosity() != QUIET

    def update(self, done: int, rate: float | None = None, left: float | None = None) -> None:
        """`done` of `total` so far; `rate` (per second) and `left` (seconds) if the caller
        knows them better than the elapsed time here does."""
        self.done = min(done, self.total)
        elapsed = time.perf_counter() - self.started
        rate = rate if rate is not None else self.done / elapsed if elapsed > 0 else 0.0
        left = left if left is not None else (self.total - self.done) / rate if rate > 0 else 0.0
        fraction = self.done / self.total
        if self.live:
            width = 24
            bar = "#" * int(fraction * width) + "." * (width - int(fraction * width))
            LiveLine.show(f"{self.label} [{bar}] {self.done}/{self.total} {rate:.0f} {self.unit}/s, "
                          f"{duration(left)} left")
        elif self.done < self.total and fraction * self.QUARTERS >= self.next_quarter:
            self.next_quarter = int(fraction * self.QUARTERS) + 1
            if elapsed < self.QUIET_SECONDS:
                return
            self.log.info("%s: %d%% (%d/%d), %.0f %s/s, %s left", self.label, int(fraction * 100),
                          self.done, self.total, rate, self.unit, duration(left))

    def advance(self, count: int = 1) -> None:
        self.update(self.done + count)

    def close(self) -> None:
        if self.live:
            LiveLine.clear()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
