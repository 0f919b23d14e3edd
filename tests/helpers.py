"""Helpers the test modules share (fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

MDFER = [sys.executable, "-m", "mdfer.cli"]
DEMO = Path(__file__).parents[1] / "mdfer" / "configs" / "demo.yaml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# A guard against a hung command, not a speed bar (speed: benchmarks/): the session's shared
# training took 215 s on a fast 2-core host and over 900 s on CI's (2026-12-04), beside the other
# pytest worker's Ray tests.
COMMAND_TIMEOUT = 2400


def run_mdfer(*args: str, timeout: float = COMMAND_TIMEOUT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`mdfer ...` as a user runs it; RAY_ADDRESS="" so it starts (and stops) a private local Ray."""
    return subprocess.run([*MDFER, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ADDRESS": "", **(env or {})})


def train_args(data: dict, run_id: str, config: Path | None = None) -> list[str]:
    return ["train", "--config", str(config or data["config"]), "--store", data["store"].uri,
            "--dataset-id", data["dataset_id"], "--run-id", run_id]


def generated_demo_config(root: Path, fer_train: int, fer_test: int, fane: int, seed: int,
                          edit=None) -> tuple[Path, dict]:
    """Generated FER-like and FANE-like folders under `root` and demo.yaml pointing at them,
    changed by `edit(raw)`; returns the config's path and its dict."""
    import yaml

    from mdfer import synth
    synth.write_fer_like(root / "fer2013", train_per_class=fer_train, test_per_class=fer_test, seed=seed)
    synth.write_fane_like(root / "fane", per_class=fane, seed=seed + 1)
    raw = yaml.safe_load(DEMO.read_text())
    raw["data"]["domains"][0]["root"] = str(root / "fer2013")
    raw["data"]["domains"][1]["root"] = str(root / "fane")
    if edit:
        edit(raw)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def path_without_hailo() -> str:
    """PATH without any folder holding a `hailo` command: the test machine has no Hailo compiler,
    and a stray one must not change that."""
    return os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "hailo").exists())


BIN = Path(sys.executable).parent


def free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (bound together, so all differ)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RayNode:
    """One `ray start --block` node with its own ports and temp dir: the head (`head_gcs_port`
    None) or a node joining that head. Stopped by its process id (its own session), never by
    `ray stop`. `env` must carry the token authentication settings. `ip`: a loopback address of
    its own for a second node (127.0.0.2), as a second machine has: with two nodes on one IP a
    driver may attach to either raylet, and whatever it pins "to its node" may land on the
    node that is lost."""

    def __init__(self, log: Path, env: dict, head_gcs_port: int | None = None, num_cpus: int = 2,
                 system_config: dict | None = None, ip: str = "127.0.0.1"):
        import json
        import secrets

        # short: Ray's socket paths must fit 107 bytes
        self.temp = f"/tmp/mdfer-{'head' if head_gcs_port is None else 'node'}-{secrets.token_hex(3)}"
        gcs, dashboard, client, agent_http, agent_grpc, metrics, runtime_env, node_manager, object_manager = \
            free_ports(9)
        common = [f"--node-ip-address={ip}", f"--dashboard-agent-listen-port={agent_http}",
                  f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                  f"--runtime-env-agent-port={runtime_env}", f"--node-manager-port={node_manager}",
                  f"--object-manager-port={object_manager}", f"--num-cpus={num_cpus}", "--disable-usage-stats"]
        if head_gcs_port is None:
            self.gcs_port = gcs
            role = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    f"--ray-client-server-port={client}", f"--temp-dir={self.temp}",
                    *([f"--system-config={json.dumps(system_config)}"] if system_config else [])]
            self.address = f"http://127.0.0.1:{dashboard}"
            # Train's placement-group cleaner asks the State API whether a run's controller is
            # alive; unpinned it may ask another cluster on this machine (the tests run two at
            # once), hear "not found" and tear the run down. Nodes joining take the head's env.
            env = {**env, "RAY_API_SERVER_ADDRESS": self.address}
        else:
            self.gcs_port = head_gcs_port
            role = [f"--address=127.0.0.1:{head_gcs_port}", f"--temp-dir={self.temp}"]
            self.address = None
        self.env = env
        self.log = log.open("w")
        self.process = subprocess.Popen([str(BIN / "ray"), "start", "--block", *role, *common], env=env,
                                        stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_for_jobs(self, timeout: float = 180) -> None:
        """Until the head's job API answers."""
        import time

        deadline = time.time() + timeout
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", self.address], env=self.env,
                             capture_output=True).returncode != 0:
            assert self.process.poll() is None, Path(self.log.name).read_text()[-3000:]
            assert time.time() < deadline, "the Ray head did not come up"
            time.sleep(2)

    def processes(self) -> dict[int, bytes]:
        """pid -> program of every process of this node: those of its own session."""
        found = {}
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
                command = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except (OSError, ValueError):
                continue
            session = int(stat.rsplit(")", 1)[1].split()[3])  # after "(comm)": state ppid pgrp session
            if session == self.process.pid:
                found[int(entry.name)] = command
        return found

    def raylet_pid(self) -> int:
        """The pid of this node's raylet."""
        for pid, command in self.processes().items():
            if command.endswith(b"/raylet"):
                return pid
        raise AssertionError(f"no raylet in the session of node {self.process.pid}")

    def lose(self) -> list[int]:
        """The node goes, as a machine does: SIGKILL to its raylet and every process it holds
        (its workers included: a worker left running without its raylet can go on talking to
        its peers directly, and the run would not notice the loss). Returns the pids killed."""
        import signal

        killed = []
        for pid in [self.raylet_pid(), *self.processes()]:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        return killed

    def stop(self) -> None:
        import shutil
        import signal

        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(3)  # a graceful stop takes 30 s; its temp dir goes anyway
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: only what it started
            self.process.wait(30)
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


# What `mdfer train` may print by default (mdfer.logs, mdfer.console): each line one of these.
RAY_NOTICE = "Ray's own notice"
CONSOLE_LINE_KINDS = {
    "stage header": r"\d\d:\d\d:\d\d stage\d: (training \(|lr \S+, frozen |starting from |resuming after epoch "
                    r"|done, best |early stop|already complete)",
    "epoch line": r"\d\d:\d\d:\d\d stage\d epoch \d+/\d+: loss [\d.]+, lr ",
    "progress": r"\d\d:\d\d:\d\d stage\d epoch \d+/\d+: \d+% \(\d+/\d+\), \d+ img/s, [\d:]+ left",
    "where the logs are": r"\d\d:\d\d:\d\d log: \S+\.log; Ray workers' logs: /\S+",
    "warning": r"\d\d:\d\d:\d\d warning: ",
    "summary (JSON)": r"[{}]$|  \"(run_id|dataset_id|final_stage|val_macro_f1)\": ",
    # Ray 2.60 pushes its raylets' notices (e.g. that a worker was killed for memory) to every
    # driver and prints them on stdout whatever the log settings: not mdfer's to shorten
    RAY_NOTICE: r"\(raylet(, ip=\S+)?\) ",
}
MAX_CONSOLE_WIDTH = 200


def check_train_console(output: str) -> dict[str, int]:
    """Every line a known kind, none wider than MAX_CONSOLE_WIDTH, no colour codes; returns the
    number of lines of each epoch (`stage1 epoch 2/3` -> lines that name it)."""
    import re
    from collections import Counter

    # mdfer's Ray expects the worker processes a run starts (stages.LOCAL_RAY_SYSTEM_CONFIG)
    assert "worker processes have been started" not in output, output[-3000:]
    for line in output.splitlines():
        assert "\x1b" not in line, f"colour code in {line!r}"
        kinds = [kind for kind, pattern in CONSOLE_LINE_KINDS.items() if re.match(pattern, line)]
        assert kinds, f"a line of no known kind: {line!r}"
        assert len(line) <= MAX_CONSOLE_WIDTH or kinds == [RAY_NOTICE], f"{len(line)} characters: {line!r}"
    return Counter(m.group(1) for m in re.finditer(r"(stage\d epoch \d+/\d+):", output))


def listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on, from /proc (no psutil here):
    the namespace's listening sockets (/proc/net/tcp, tcp6) whose inode the process holds."""
    import ipaddress

    try:
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        tables = [Path(f"/proc/{pid}/net/{table}").read_text() for table in ("tcp", "tcp6")]
    except OSError:  # the process ended
        return []
    found = []
    for table in tables:
        for row in table.splitlines()[1:]:
            fields = row.split()
            if fields[3] != "0A" or f"socket:[{fields[9]}]" not in held:  # 0A: LISTEN
                continue
            address, port = fields[1].split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found.append((str(ipaddress.ip_address(raw)), int(port, 16)))
    return found


def is_loopback(address: str) -> bool:
    import ipaddress
    ip = ipaddress.ip_address(address)
    return ip.is_loopback or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_loopback)


def registered_checkpoints(store, prefix: str) -> list:
    """The checkpoints Ray Train has registered for a run folder (its snapshot lists them); a
    checkpoint folder alone is not enough: a failure between the two restarts from scratch."""
    key = f"{prefix}/checkpoint_manager_snapshot.json"
    if not store.exists(key):
        return []
    try:
        return store.read_json(key).get("checkpoint_results", [])
    except Exception:  # caught mid-write
        return []
