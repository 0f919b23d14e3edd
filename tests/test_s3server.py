"""Checks that the test S3 server behaves like the store the project relies on."""

from __future__ import annotations

import os
import sys
import time

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError, EndpointConnectionError
from pyarrow import fs as pafs

from s3server import HOST, S3Server

# Fail fast while the server is down instead of retrying for minutes.
FAST = Config(
    connect_timeout=1,
    read_timeout=5,
    retries={"max_attempts": 1, "mode": "standard"},
    s3={"addressing_style": "path"},
)


def _key(prefix: str, name: str) -> str:
    """Object key for ``name`` under an ``s3://bucket/...`` prefix."""
    return prefix.split("/", 3)[3] + "/" + name


def test_boto3_round_trip_from_env(s3_env: S3Server, s3_prefix: str) -> None:
    """A plain ``boto3.client("s3")`` finds the server through ``env()`` alone."""
    s3 = boto3.client("s3")
    key = _key(s3_prefix, "hello.bin")
    body = os.urandom(300_000)
    s3.put_object(Bucket=s3_env.bucket, Key=key, Body=body)
    assert s3.get_object(Bucket=s3_env.bucket, Key=key)["Body"].read() == body
    listed = s3.list_objects_v2(Bucket=s3_env.bucket, Prefix=key)["Contents"]
    assert [o["Key"] for o in listed] == [key]


def test_pyarrow_s3filesystem_write_read(s3_server: S3Server, s3_prefix: str) -> None:
    """pyarrow's S3FileSystem, configured the way the project will, reads its writes."""
    s3 = pafs.S3FileSystem(
        endpoint_override=f"{HOST}:{s3_server.ports['s3']}",
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        scheme="http",
        region=s3_server.region,
    )
    path = s3_prefix.removeprefix("s3://") + "/dir/data.bin"
    payload = os.urandom(6 * 1024 * 1024 + 123)  # > 5 MiB: multipart upload path
    with s3.open_output_stream(path) as f:
        f.write(payload)
    assert s3.get_file_info(path).size == len(payload)
    with s3.open_input_file(path) as f:
        assert f.read() == payload
    infos = s3.get_file_info(pafs.FileSelector(s3_prefix.removeprefix("s3://"), recursive=True))
    assert path in {i.path for i in infos}


def test_pyarrow_from_uri_uses_env(s3_env: S3Server, s3_prefix: str) -> None:
    """``FileSystem.from_uri`` picks up AWS_ENDPOINT_URL and keys from the environment."""
    s3, path = pafs.FileSystem.from_uri(s3_prefix + "/env.txt")
    with s3.open_output_stream(path) as f:
        f.write(b"via env")
    with s3.open_input_stream(path) as f:
        assert f.read() == b"via env"


@pytest.mark.parametrize(
    ("which", "code"),
    [("secret", "SignatureDoesNotMatch"), ("access", "InvalidAccessKeyId")],
)
def test_wrong_credentials_refused(s3_server: S3Server, which: str, code: str) -> None:
    """Auth is enforced, so tests catch code that signs with the wrong keys."""
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id="AKWRONG0000000000000" if which == "access" else s3_server.access_key,
        aws_secret_access_key="wrong" if which == "secret" else s3_server.secret_key,
        region_name=s3_server.region,
        config=FAST,
    )
    with pytest.raises(ClientError) as err:
        client.put_object(Bucket=s3_server.bucket, Key="denied", Body=b"x")
    assert err.value.response["Error"]["Code"] == code
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_stop_start_keeps_data(fresh_s3_server: S3Server) -> None:
    """Data survives a stop/start on the same ports; requests fail while it is down."""
    server = fresh_s3_server
    s3 = server.client(
        connect_timeout=1,
        read_timeout=5,
        retries={"max_attempts": 1, "mode": "standard"},
    )
    s3.put_object(Bucket=server.bucket, Key="keep/me.txt", Body=b"still here")
    endpoint = server.endpoint

    t0 = time.monotonic()
    server.stop()
    stop_s = time.monotonic() - t0
    assert not server.running
    with pytest.raises(EndpointConnectionError):
        s3.get_object(Bucket=server.bucket, Key="keep/me.txt")

    server.start()
    assert server.endpoint == endpoint
    body = s3.get_object(Bucket=server.bucket, Key="keep/me.txt")["Body"].read()
    assert body == b"still here"
    print(f"\nstop {stop_s:.2f}s, restart {server.start_seconds:.2f}s")


def test_server_footprint(s3_server: S3Server, record_property: pytest.RecordProperty) -> None:
    """Report start time and memory; catch a slow or bloated server early."""
    rss = s3_server.rss_kib()
    assert s3_server.start_seconds is not None and rss is not None
    record_property("s3_start_seconds", round(s3_server.start_seconds, 2))
    record_property("s3_rss_mib", rss // 1024)
    print(f"\nweed mini start {s3_server.start_seconds:.2f}s, rss {rss // 1024} MiB")
    assert s3_server.start_seconds < 30
    assert rss < 1024 * 1024  # KiB, i.e. < 1 GiB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_listens_on_loopback_only(s3_server: S3Server) -> None:
    """Every TCP listener of the server process is bound to 127.0.0.1."""
    pid = s3_server.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    listeners = []
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A = LISTEN
                    listeners.append((table, cols[1]))
    assert listeners, "no listening sockets found"
    # 0100007F is 127.0.0.1 in /proc's little-endian hex
    bad = [(t, a) for t, a in listeners if t != "tcp" or not a.startswith("0100007F:")]
    assert not bad, f"non-loopback listeners: {bad}"
    ports = {int(a.split(":")[1], 16) for _, a in listeners}
    expected = set(s3_server.ports.values()) | set(s3_server.grpc_ports.values())
    assert ports <= expected, f"unexpected ports: {sorted(ports - expected)}"
