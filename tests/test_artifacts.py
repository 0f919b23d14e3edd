"""`mdfer artifacts list|fetch` against a real S3 server (SeaweedFS) and a local folder store.

The export is faked: a few small files written with Store and a manifest computed here, last,
as the export step does. Error cases run the CLI in a subprocess, as a user would.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from mdfer.artifacts import safe_relpath
from mdfer.errors import MdferError
from mdfer.storage import Store

MDFER = [sys.executable, "-m", "mdfer.cli"]
FILES = {
    "hailo_model.keras": b"keras-bytes" * 50,
    "hailo_model_float32.tflite": b"tflite" * 300,
    "hailo/calib.npy": bytes(range(256)) * 8,
    "hailo/outputs.json": b'{"out_0": "fer2013"}',
}
HEF = "not compiled (Hailo Dataflow Compiler not found)"


def write_export(store_uri: str, export_id: str, files: dict[str, bytes] = FILES, *,
                 kind: str = "runs", manifest_files: dict | None = None) -> dict:
    """Write `files` and then (last) a manifest describing them, as the export step does."""
    store = Store(store_uri)
    prefix = f"{kind}/{export_id}/export"
    for key, data in files.items():
        store.write_bytes(f"{prefix}/{key}", data)
    manifest = {
        "format": 1, "run_id": export_id, "dataset_id": "ds-test", "created": "2025-01-01T00:00:00+00:00",
        "files": manifest_files if manifest_files is not None else {
            key: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for key, data in files.items()},
        "hef": HEF, "compile_hef": "python hailo/hailo_compile.py", "parity": {"tflite_max_abs_diff": 0.0},
    }
    store.write_json(f"{prefix}/manifest.json", manifest)
    return manifest


def run(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*MDFER, *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The single stderr line of a user error (exit 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("mdfer artifacts: error: "), result.stderr
    return lines[0]


def tree(folder: Path) -> set[Path]:
    return set(folder.rglob("*"))


# ---------------------------------------------------------------- S3 store


def test_list_prints_every_file_and_the_hef_status(s3_env, s3_prefix):
    manifest = write_export(s3_prefix, "exp1")
    result = run("artifacts", "list", "--store", s3_prefix, "--run-id", "exp1")
    assert result.returncode == 0, result.stderr
    for key, entry in manifest["files"].items():
        line = next(line for line in result.stdout.splitlines() if line.endswith(f"  {key}"))
        assert f"{entry['size']:,}" in line and entry["sha256"][:12] in line
    assert f"hef: {HEF}" in result.stdout and "to compile later: python hailo/hailo_compile.py" in result.stdout
    assert f"{len(FILES)} files" in result.stdout


def test_fetch_downloads_and_verifies_everything_once(s3_env, s3_prefix, tmp_path):
    manifest = write_export(s3_prefix, "exp1")
    result = run("artifacts", "fetch", "--store", s3_prefix, "--run-id", "exp1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    dest = tmp_path / "exp1-export"  # the default destination
    for key, data in FILES.items():
        assert (dest / key).read_bytes() == data
        assert hashlib.sha256((dest / key).read_bytes()).hexdigest() == manifest["files"][key]["sha256"]
    assert json.loads((dest / "manifest.json").read_text()) == manifest
    assert not [p for p in tree(dest) if ".part-" in p.name]
    assert f"{len(FILES)} downloaded, 0 already present" in result.stdout

    mtimes = {key: (dest / key).stat().st_mtime_ns for key in FILES}
    again = run("artifacts", "fetch", "--store", s3_prefix, "--run-id", "exp1", "--dest", str(dest))
    assert again.returncode == 0, again.stderr
    assert f"0 downloaded, {len(FILES)} already present" in again.stdout
    assert {key: (dest / key).stat().st_mtime_ns for key in FILES} == mtimes


def test_tampered_file_is_refused_and_not_kept(s3_env, s3_prefix, tmp_path):
    manifest = write_export(s3_prefix, "exp1")
    tampered = b"X" + FILES["hailo/calib.npy"][1:]  # same size: only the checksum can tell
    Store(s3_prefix).write_bytes("runs/exp1/export/hailo/calib.npy", tampered)
    dest = tmp_path / "dest"
    dest.joinpath("hailo").mkdir(parents=True)
    dest.joinpath("hailo/calib.npy").write_bytes(b"stale copy")  # a wrong file already there

    line = one_line_error(run("artifacts", "fetch", "--store", s3_prefix, "--run-id", "exp1", "--dest", str(dest)))
    assert "hailo/calib.npy: checksum mismatch" in line
    assert manifest["files"]["hailo/calib.npy"]["sha256"] in line
    assert hashlib.sha256(tampered).hexdigest() in line
    assert not (dest / "hailo/calib.npy").exists()
    assert not [p for p in tree(dest) if ".part-" in p.name]
    assert not (dest / "manifest.json").exists()  # an incomplete copy is never sealed


@pytest.mark.parametrize("evil", ["../escape.txt", "hailo/../../escape.txt", "{tmp}/abs-escape.txt"])
def test_escaping_manifest_key_is_refused_before_writing(s3_env, s3_prefix, tmp_path, evil):
    evil = evil.replace("{tmp}", str(tmp_path))
    files = {"hailo_model.keras": FILES["hailo_model.keras"]}
    entries = {key: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()} for key, data in files.items()}
    entries[evil] = {"size": 3, "sha256": hashlib.sha256(b"bad").hexdigest()}
    write_export(s3_prefix, "exp1", files, manifest_files=entries)
    work = tmp_path / "work"
    work.mkdir()
    before = tree(tmp_path)

    line = one_line_error(run("artifacts", "fetch", "--store", s3_prefix, "--run-id", "exp1",
                              "--dest", str(work / "dest"), cwd=work))
    assert f"manifest key {evil!r}" in line and "refusing to fetch" in line
    assert tree(tmp_path) == before  # nothing written: not even the destination folder


def test_missing_manifest_is_one_clear_line(s3_env, s3_prefix, tmp_path):
    Store(s3_prefix).write_bytes("runs/half/export/hailo_model.keras", b"no manifest yet")
    for action in ("list", "fetch"):
        line = one_line_error(run("artifacts", action, "--store", s3_prefix, "--run-id", "half", cwd=tmp_path))
        assert line.endswith(f"no finished export for run half at {s3_prefix}/runs/half/export: run mdfer export first")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("manifest, message", [
    (b"{not json", "not valid JSON"),
    (b'{"format": 2, "files": {}}', "unsupported manifest format 2"),
    (b'{"format": 1, "files": {}}', "'files' must be a non-empty object"),
    (b'{"format": 1, "files": {"a.keras": {"size": -1, "sha256": "' + b"0" * 64 + b'"}}}', "size must be"),
    (b'{"format": 1, "files": {"a.keras": {"size": 1, "sha256": "abc"}}}', "sha256 must be 64"),
])
def test_malformed_manifest_is_one_clear_line(s3_env, s3_prefix, manifest, message):
    Store(s3_prefix).write_bytes("runs/exp1/export/manifest.json", manifest)
    line = one_line_error(run("artifacts", "list", "--store", s3_prefix, "--run-id", "exp1"))
    assert f"{s3_prefix}/runs/exp1/export/manifest.json" in line and message in line


@pytest.mark.parametrize("action", ["list", "fetch"])
def test_wrong_credentials_name_no_secret(s3_env, s3_prefix, tmp_path, action):
    import os

    write_export(s3_prefix, "exp1")
    key_id, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    result = run("artifacts", action, "--store", s3_prefix, "--run-id", "exp1", env=env, cwd=tmp_path)
    line = one_line_error(result)
    assert "S3 refused the request" in line and "credentials" in line
    for value in (key_id, secret, s3_env.access_key, s3_env.secret_key):
        assert value not in result.stderr + result.stdout
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- local folder store


def test_local_folder_store_sweep_export(tmp_path):
    store = tmp_path / "store"
    manifest = write_export(str(store), "sweep7", kind="sweeps")
    listed = run("artifacts", "list", "--store", str(store), "--sweep-id", "sweep7")
    assert listed.returncode == 0, listed.stderr
    assert all(key in listed.stdout for key in FILES)

    dest = tmp_path / "out"
    (dest / "hailo").mkdir(parents=True)
    (dest / "hailo/outputs.json").write_bytes(b"corrupt")  # replaced, not trusted
    fetched = run("artifacts", "fetch", "--store", str(store), "--sweep-id", "sweep7", "--dest", str(dest))
    assert fetched.returncode == 0, fetched.stderr
    for key, data in FILES.items():
        assert (dest / key).read_bytes() == data
    assert json.loads((dest / "manifest.json").read_text())["files"] == manifest["files"]


# ---------------------------------------------------------------- key checks (no I/O)


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\..\\x", "C:/x", "c:x", "a//b", "a/",
                                 "./a", "", "a/./b", "a\x00b", "manifest.json"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(MdferError, match="refusing to fetch"):
        safe_relpath(key)


@pytest.mark.parametrize("key", ["model.keras", "hailo/calib.npy", "a/b/c..d.onnx", "..hidden"])
def test_plain_relative_keys_pass(key):
    assert str(safe_relpath(key)) == key
