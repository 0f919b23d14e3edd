"""Logging set-up and credential redaction, shared by every command and job."""

from __future__ import annotations

import logging
import os
import re
import sys

SECRET_ENV_WORDS = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "CREDENTIAL")
SECRET_PATTERN = re.compile(
    r"(?i)((?:secret|token|password|access[_-]?key(?:[_-]?id)?|credential)[\"']?\s*[:=]\s*[\"']?)([^\s\"',&]+)")
REDACTED = "***"
MIN_SECRET_LEN = 4  # shorter values would blank out ordinary words


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


def setup_logging(debug: bool = False) -> None:
    """One line per event on stderr, credentials redacted, TensorFlow's chatter kept down."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("botocore", "urllib3", "s3transfer", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def worker_line(text: str) -> None:
    """One progress line from a Ray Train worker, said once. Ray 2.60's Train patches `print`
    to log to its console handler and also to print when sys.stdout is wrapped, which it is
    in every Ray worker: each printed line reached the driver twice."""
    stream = sys.__stdout__ or sys.stdout
    stream.write(redact(text) + "\n")
    stream.flush()
