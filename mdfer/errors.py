"""Errors a user can act on.

The CLI prints these as one line and exits non-zero; anything else is a bug and keeps its
traceback. Messages name the file or key at fault and never carry credentials.
"""

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

class MdferError(Exception):
    """A problem with the user's input or environment, explained in the message."""


class ConfigError(MdferError):
    """The configuration (or a search space) is invalid; the message names file and key."""


class DataError(MdferError):
    """A dataset or the store holds something unusable; the message names the path."""


# `pip install mdfer` runs .tflite models; everything else needs the training stack, and says so
TRAIN_EXTRA = 'pip install "mdfer[train]"'


def root_cause(exc: BaseException) -> str:
    """The last `SomeError: message` line of a (remote) traceback, without Ray's log prefixes."""
    lines = [re.sub(r"^(\x1b\[[0-9;]*m)?\([^)]*\)(\x1b\[[0-9;]*m)?\s*", "", line).strip()
             for line in str(exc).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*", line)
              and not line.startswith(("ray.train.", "ray.exceptions."))]
    return causes[-1] if causes else f"{type(exc).__name__}: {lines[0] if lines else ''}"


def stop_on_sigterm() -> None:
    """Make SIGTERM (`kill`, Kubernetes, a scheduler) end a command as Ctrl-C does: through the
    SIGINT handler of the moment (Python's KeyboardInterrupt, or Tune's graceful stop during a
    sweep), so the command says "interrupted", exits 130, and its stage or sweep resumes. Call it
    again after `ray.init`: Ray installs a failure-signal handler that makes SIGTERM an abort
    (`*** SIGTERM received`, exit 134, nothing cleaned up)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _as_sigint)


def _as_sigint(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:  # SIGINT ignored or left to the C default: still stop
        raise KeyboardInterrupt


@contextmanager
def signal_handler_kept(signum: int) -> Iterator[None]:
    """Put back the handler of `signum` a block found, where a block leaves its own behind:
    `mdfer.cli.main` (SIGTERM: main() also runs inside other programs, the tests) and Ray Train's
    `fit()` (SIGINT: its handler stays bound to the finished run's controller; read in Ray 2.60:
    Ctrl-C between two stages would then abort a dead actor and end the command with
    `sys.exit(0)`, as if it had succeeded)."""
    kept = signal.getsignal(signum)
    try:
        yield
    finally:
        if kept is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signum, kept)
