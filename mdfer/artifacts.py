"""`mdfer artifacts`: list and fetch a finished export, trusting no byte until its sha256 matches.

An export is finished when its `manifest.json` exists (the export step writes it last), so the
manifest is the only list of files we act on. Every key in it is checked before anything is
written, because a manifest is data from the store and must not be able to write outside the
destination folder. Each file lands under a temp name and is renamed only once size and sha256
match, so a folder never holds a corrupt file under a final name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from mdfer.errors import MdferError
from mdfer.layout import MANIFEST_FILE, export_key, source_prefix
from mdfer.storage import Store, s3_endpoint, s3_region, storage_error

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
HASH_CHUNK = 1 << 20
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
DRIVE_LETTER = re.compile(r"^[A-Za-z]:")
NOT_FOUND_CODES = {"404", "NoSuchKey", "NotFound"}
DENIED_CODES = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                "ExpiredToken", "InvalidToken", "AuthorizationHeaderMalformed"}


@dataclass
class Export:
    """Where one run's (or sweep's) export lives and what its manifest says."""

    store: Store
    prefix: str  # key of the export folder inside the store
    label: str   # "run X" / "sweep X", for messages
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return self.store.key_uri(self.prefix)


def export_prefix(run_id: str | None = None, sweep_id: str | None = None) -> tuple[str, str]:
    """(key prefix, label) of the export folder of a run or a sweep (exactly one of them)."""
    return export_key(source_prefix(run_id, sweep_id)), f"run {run_id}" if run_id else f"sweep {sweep_id}"


# ---------------------------------------------------------------- reading the store


def _s3_client() -> Any:
    """A boto3 S3 client: endpoint from AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, credentials
    from the standard chain (env, profile, instance role)."""
    import boto3
    from botocore.config import Config

    endpoint = s3_endpoint()
    config = Config(retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    s3={"addressing_style": "path"} if endpoint else {})
    return boto3.client("s3", endpoint_url=endpoint, region_name=s3_region(), config=config)


class Source:
    """Reads keys of one store: boto3 for s3://, the file system for a local folder."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.client = _s3_client() if store.is_s3 else None
        self.bucket, _, self.root = store.root.partition("/") if store.is_s3 else ("", "", store.root)

    def _object(self, key: str) -> str:
        return f"{self.root}/{key}" if self.root else key

    def read_bytes(self, key: str) -> bytes:
        if self.client is None:
            return Path(self.store.path(key)).read_bytes()
        return self.client.get_object(Bucket=self.bucket, Key=self._object(key))["Body"].read()

    def download(self, key: str, target: Path) -> None:
        if self.client is None:
            shutil.copyfile(self.store.path(key), target)
        else:
            self.client.download_file(self.bucket, self._object(key), str(target))


def _error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _read_error(uri: str, exc: BaseException) -> MdferError:
    """A one-line message for a failed read; never the raw boto3 text for an auth failure
    (it may quote the access key id)."""
    from botocore.exceptions import NoCredentialsError

    code = _error_code(exc)
    if isinstance(exc, NoCredentialsError):
        return MdferError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY, a profile, or use an instance role)")
    if code in DENIED_CODES:
        return MdferError(f"{uri}: S3 refused the request ({code}): check the credentials "
                          "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role) and their access")
    if code == "NoSuchBucket":
        return MdferError(f"{uri}: bucket does not exist")
    return storage_error(uri, exc)


def _is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, FileNotFoundError) or _error_code(exc) in NOT_FOUND_CODES


# ---------------------------------------------------------------- the manifest


def safe_relpath(key: Any) -> PurePosixPath:
    """A manifest key as a relative path that stays inside the destination, or an error.

    Refused: anything not a plain relative POSIX path ('..', '.', empty parts, absolute
    paths, backslashes, drive letters, NUL) and the manifest's own name."""
    why = _unsafe_reason(key)
    if why:
        raise MdferError(f"manifest key {key!r} {why}: refusing to fetch (it could write outside the destination)")
    return PurePosixPath(key)


def _unsafe_reason(key: Any) -> str | None:
    if not isinstance(key, str) or not key:
        return "is empty or not a string"
    if "\\" in key:
        return "contains a backslash"
    if "\x00" in key:
        return "contains a NUL byte"
    if key.startswith("/"):
        return "is an absolute path"
    if DRIVE_LETTER.match(key):
        return "starts with a drive letter"
    if any(part in ("", ".", "..") for part in key.split("/")):
        return "has an empty, '.' or '..' part"
    if key == MANIFEST_FILE:
        return "is the manifest's own name"
    return None


def _check_manifest(manifest: Any, uri: str) -> dict[str, Any]:
    """The manifest if it has the fields we act on, else a one-line error naming what is wrong."""
    where = f"{uri}/{MANIFEST_FILE}"
    if not isinstance(manifest, dict):
        raise MdferError(f"{where}: malformed manifest (not a JSON object)")
    if manifest.get("format") != MANIFEST_FORMAT:
        raise MdferError(f"{where}: unsupported manifest format {manifest.get('format')!r} "
                         f"(this mdfer reads format {MANIFEST_FORMAT})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise MdferError(f"{where}: malformed manifest ('files' must be a non-empty object)")
    for key, entry in files.items():
        safe_relpath(key)
        size = entry.get("size") if isinstance(entry, dict) else None
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise MdferError(f"{where}: malformed manifest (files[{key!r}].size must be a whole number >= 0)")
        if not isinstance(digest, str) or not SHA256_HEX.fullmatch(digest):
            raise MdferError(f"{where}: malformed manifest (files[{key!r}].sha256 must be 64 lowercase hex digits)")
    return manifest


def _read_manifest(source: Source, export: Export) -> bytes:
    try:
        return source.read_bytes(f"{export.prefix}/{MANIFEST_FILE}")
    except Exception as exc:
        if _is_not_found(exc):
            raise MdferError(f"no finished export for {export.label} at {export.uri}: "
                             "run mdfer export first") from None
        raise _read_error(export.uri, exc) from None


def open_export(store_uri: str, run_id: str | None = None, sweep_id: str | None = None) -> tuple[Export, Source, bytes]:
    """The export of a run or sweep with its checked manifest (and the manifest's raw bytes)."""
    prefix, label = export_prefix(run_id, sweep_id)
    export = Export(Store(store_uri), prefix, label)
    source = Source(export.store)
    raw = _read_manifest(source, export)
    try:
        parsed = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MdferError(f"{export.uri}/{MANIFEST_FILE}: malformed manifest (not valid JSON: {exc})") from None
    export.manifest = _check_manifest(parsed, export.uri)
    return export, source, raw


def list_lines(export: Export) -> list[str]:
    """One line per file (size, sha256 prefix, key), then the totals and the .hef status
    (and how to compile it later, when the export says)."""
    files = export.manifest["files"]
    width = max(len(f"{entry['size']:,}") for entry in files.values())
    lines = [f"{export.label}: {export.uri}"]
    if "created" in export.manifest:
        lines[0] += f" (created {export.manifest['created']})"
    for key in sorted(files):
        entry = files[key]
        lines.append(f"  {entry['size']:>{width},}  {entry['sha256'][:12]}  {key}")
    total = sum(entry["size"] for entry in files.values())
    lines.append(f"{len(files)} files, {total:,} bytes")
    lines.append(f"hef: {export.manifest.get('hef', 'not recorded')}")
    if export.manifest.get("compile_hef"):
        lines.append(f"  to compile later: {export.manifest['compile_hef']}")
    return lines


# ---------------------------------------------------------------- fetching


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    return path.is_file() and path.stat().st_size == entry["size"] and sha256_file(path) == entry["sha256"]


def _fetch_one(source: Source, export: Export, key: str, entry: dict[str, Any], target: Path) -> None:
    """Download one file to a temp name beside its target; rename only after it verifies."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        target.unlink()  # a stale or corrupt copy must not survive under the final name
    temp = target.with_name(f".{target.name}.part-{uuid.uuid4().hex}")
    try:
        try:
            source.download(f"{export.prefix}/{key}", temp)
        except Exception as exc:
            if _is_not_found(exc):
                raise MdferError(f"{export.uri}/{key}: listed in the manifest but missing from the store") from None
            raise _read_error(f"{export.uri}/{key}", exc) from None
        size = temp.stat().st_size
        if size != entry["size"]:
            raise MdferError(f"{key}: size mismatch: manifest says {entry['size']} bytes, "
                             f"downloaded {size}; the file was not kept")
        actual = sha256_file(temp)
        if actual != entry["sha256"]:
            raise MdferError(f"{key}: checksum mismatch: manifest sha256 {entry['sha256']}, "
                             f"downloaded {actual}; the file was not kept")
        os.replace(temp, target)
    finally:
        temp.unlink(missing_ok=True)


@dataclass
class FetchResult:
    dest: Path
    downloaded: list[str]
    present: list[str]
    size: int


def fetch(export: Export, source: Source, manifest_bytes: bytes, dest: Path) -> FetchResult:
    """Download every file of a checked export into `dest`, verified; the manifest goes last,
    so `dest/manifest.json` marks a complete copy just as it does in the store."""
    dest = dest.expanduser().resolve()
    files = export.manifest["files"]
    targets = {key: dest.joinpath(*safe_relpath(key).parts) for key in files}
    downloaded, present = [], []
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / MANIFEST_FILE).unlink(missing_ok=True)  # unsealed until every file has verified
    except OSError as exc:
        raise MdferError(f"{dest}: cannot download into it ({exc.strerror or exc})") from None
    for key in sorted(files):
        target = targets[key]
        if not target.resolve().is_relative_to(dest):  # a symlink already in dest
            raise MdferError(f"{target}: resolves outside {dest}; refusing to write through it")
        if _matches(target, files[key]):
            present.append(key)
            continue
        log.debug("fetching %s (%d bytes)", key, files[key]["size"])
        try:
            _fetch_one(source, export, key, files[key], target)
        except OSError as exc:  # e.g. a folder in dest where the file should go
            raise MdferError(f"{target}: cannot write ({exc.strerror or exc})") from None
        downloaded.append(key)
    temp = dest / f".{MANIFEST_FILE}.part-{uuid.uuid4().hex}"
    temp.write_bytes(manifest_bytes)
    os.replace(temp, dest / MANIFEST_FILE)
    return FetchResult(dest, downloaded, present, sum(entry["size"] for entry in files.values()))
