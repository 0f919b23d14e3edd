"""One store API over a local folder or an s3:// prefix, so every job runs the same on both.

Credentials come from the usual AWS environment (or instance role); the endpoint from
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL for non-AWS servers. Nothing here logs a credential,
and errors pass through `redact` before they reach the user.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from mdfer.errors import MdferError
from mdfer.logs import redact

S3_RETRY_ATTEMPTS = 3  # the SDK's quick retries (throttling); outages are ridden out by `retrying`
# On top of the SDK's few quick retries: an S3 endpoint that is unreachable (restarting, a
# network blip) is retried with backoff until this many seconds have passed since the operation
# began (wall clock, the SDK's own attempts included), then the run fails with the whole cause.
OUTAGE_RETRY_S = 60.0
OUTAGE_ENV = "MDFER_STORE_OUTAGE_S"  # overrides OUTAGE_RETRY_S
_TRANSIENT = ("NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Connection refused", "SLOW_DOWN",
              "SERVICE_UNAVAILABLE", "Timeout was reached", "INTERNAL_FAILURE")
log = logging.getLogger(__name__)


def s3_endpoint() -> str | None:
    """A non-AWS S3 endpoint URL from the environment (None: AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def s3_region() -> str:
    """The region from the environment; us-east-1 when none is set (what S3 servers accept)."""
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"


def s3_filesystem() -> pafs.S3FileSystem:
    """An S3 file system configured from the environment, with retries for brief outages."""
    endpoint = s3_endpoint()
    options: dict[str, Any] = {
        "region": s3_region(),
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_RETRY_ATTEMPTS),
        "connect_timeout": 5,
        "request_timeout": 30,
    }
    if endpoint:
        parsed = urlparse(endpoint)
        options["endpoint_override"] = parsed.netloc or parsed.path
        options["scheme"] = parsed.scheme or "https"
    return pafs.S3FileSystem(**options)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(file system, path within it) for a local path or an s3:// URI."""
    if uri.startswith("s3://"):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        raise MdferError(f"{uri}: unsupported location; use a local path or s3://bucket/prefix")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError) and \
        any(marker in str(exc) for marker in _TRANSIENT)


def one_line(exc: BaseException) -> str:
    """An exception's whole message on one line, credentials redacted."""
    text = " ".join(line.strip() for line in redact(str(exc)).splitlines() if line.strip())
    return text or type(exc).__name__


def outage_limit() -> float:
    """Seconds to ride out an unreachable store: $MDFER_STORE_OUTAGE_S, else OUTAGE_RETRY_S."""
    raw = os.environ.get(OUTAGE_ENV)
    try:
        return float(raw) if raw else OUTAGE_RETRY_S
    except ValueError:
        raise MdferError(f"{OUTAGE_ENV}={raw!r}: expected a number of seconds") from None


def retrying(uri: str, operation: Callable[[], Any], is_s3: bool = True) -> Any:
    """Run a store operation, riding out a brief S3 outage for at most `outage_limit()` seconds
    of wall clock; other errors pass straight through."""
    delay, started = 0.5, time.monotonic()
    while True:
        try:
            return operation()
        except Exception as exc:
            if not (is_s3 and _transient(exc)):
                raise
            spent, limit = time.monotonic() - started, outage_limit()
            if spent + delay > limit:
                raise MdferError(f"store unreachable for {spent:.0f} s ({OUTAGE_ENV}={limit:g}): "
                                 f"{one_line(exc)}") from exc
            log.warning("%s: store unreachable (%s); retrying in %.1f s", uri, one_line(exc), delay)
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


def storage_error(uri: str, exc: BaseException) -> MdferError:
    """A one-line, credential-free error that names the location and gives the whole cause."""
    return MdferError(f"{uri}: {one_line(exc)}")


@dataclass
class Store:
    """A local folder or an s3:// prefix; relative keys use '/' on both."""

    uri: str

    def __post_init__(self) -> None:
        self.fs, self.root = resolve(self.uri)  # an unsupported scheme fails here
        self.uri = self.uri.rstrip("/") if self.uri.startswith("s3://") else self.root
        self.is_s3 = self.uri.startswith("s3://")
        if self.is_s3:
            outage_limit()  # a bad MDFER_STORE_OUTAGE_S is said now, not in the middle of an outage

    def path(self, key: str = "") -> str:
        """The file-system path of a key (what pyarrow and Ray Data take with `self.fs`)."""
        return posixpath.join(self.root, key) if key else self.root

    def key_uri(self, key: str = "") -> str:
        return f"{self.uri}/{key}" if key else self.uri

    def check_writable(self) -> None:
        """Fail before any work when the store cannot be reached or written."""
        probe = f".mdfer-probe-{uuid.uuid4().hex}"
        try:
            if not self.is_s3:
                self.fs.create_dir(self.root, recursive=True)
            self.write_bytes(probe, b"ok")
            self.fs.delete_file(self.path(probe))
        except MdferError:
            raise
        except Exception as exc:
            raise storage_error(self.uri, exc) from None

    def exists(self, key: str) -> bool:
        try:
            return retrying(self.key_uri(key), lambda: self.fs.get_file_info(self.path(key)).type,
                            self.is_s3) != pafs.FileType.NotFound
        except Exception as exc:
            raise storage_error(self.key_uri(key), exc) from None

    def read_bytes(self, key: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.path(key)) as f:
                return f.read()
        try:
            return retrying(self.key_uri(key), read, self.is_s3)
        except FileNotFoundError:
            raise MdferError(f"{self.key_uri(key)}: not found") from None
        except Exception as exc:
            raise storage_error(self.key_uri(key), exc) from None

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write whole or not at all: local files go through a temp name and a rename."""
        target = self.path(key)
        try:
            if self.is_s3:
                def put() -> None:
                    with self.fs.open_output_stream(target) as f:  # one PUT: atomic on S3
                        f.write(data)
                retrying(self.key_uri(key), put)
                return
            self.fs.create_dir(posixpath.dirname(target), recursive=True)
            temp = f"{target}.tmp-{uuid.uuid4().hex}"
            with open(temp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temp, target)
        except Exception as exc:
            raise storage_error(self.key_uri(key), exc) from None

    def read_json(self, key: str) -> Any:
        raw = self.read_bytes(key)
        try:
            return json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MdferError(f"{self.key_uri(key)}: not valid JSON ({exc})") from None

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())

    def list_files(self, prefix: str) -> list[str]:
        """Keys of all files under a prefix, sorted; empty when the prefix does not exist."""
        selector = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        try:
            infos = retrying(self.key_uri(prefix), lambda: self.fs.get_file_info(selector), self.is_s3)
        except Exception as exc:
            raise storage_error(self.key_uri(prefix), exc) from None
        base = self.root + "/"
        return sorted(i.path[len(base):] for i in infos if i.type == pafs.FileType.File)

    def delete_prefix(self, prefix: str) -> None:
        """Remove leftovers of an unfinished write; never called on a manifest-sealed prefix."""
        try:
            if self.fs.get_file_info(self.path(prefix)).type != pafs.FileType.NotFound:
                self.fs.delete_dir(self.path(prefix))
        except Exception as exc:
            raise storage_error(self.key_uri(prefix), exc) from None


def _split_uri(uri: str) -> tuple[Store, str]:
    parent, _, name = uri.rstrip("/").rpartition("/")
    return Store(parent or "."), name


def file_exists(uri: str) -> bool:
    """A local path or s3:// URI names an existing file."""
    if not uri.startswith("s3://"):
        return Path(uri).is_file()
    store, name = _split_uri(uri)
    return store.exists(name)


def local_copy(uri: str, folder: str) -> str:
    """A local file for a local path or s3:// URI (downloaded into `folder`)."""
    if not uri.startswith("s3://"):
        if not Path(uri).is_file():
            raise MdferError(f"{uri}: file not found")
        return uri
    store, name = _split_uri(uri)
    target = Path(folder) / name
    target.write_bytes(store.read_bytes(name))
    return str(target)
