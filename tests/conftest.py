"""Shared pytest fixtures.

Sections: S3 server (a real SeaweedFS on loopback, see ``s3server.py``).
Add new fixture groups below as their own section.
"""

from __future__ import annotations

import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS_DIR = str(Path(__file__).parent)
if _TESTS_DIR not in sys.path:  # pytest's default import mode adds it; importlib mode does not
    sys.path.insert(0, _TESTS_DIR)

from s3server import AWS_ENV_TO_UNSET, S3Server  # noqa: E402

# --- the slow tests ----------------------------------------------------------

# Fixtures that train with Ray or start a Ray cluster (minutes each); a test using one is
# marked `slow`, so `pytest -m "not slow"` gives the quick rest for everyday work.
SLOW_FIXTURES = {"trained_run", "exported", "sweep_setup", "two_nodes", "ray_head"}
# The session's one training (`trained_run`) and the modules that read it run in one
# pytest-xdist worker (session fixtures are per worker); every other module is a unit of its
# own, so that a module's cluster starts once.
LEARN_FIXTURES = {"learnable", "trained_run", "exported"}
LEARN_MODULES = ("tests/test_train.py", "tests/test_export.py", "tests/test_evaluate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if SLOW_FIXTURES & fixtures:
            item.add_marker(pytest.mark.slow)
        if LEARN_FIXTURES & fixtures and xdist_unit(item.nodeid) != "learn":
            raise pytest.UsageError(f"{item.nodeid} uses the shared training: add its module to "
                                    f"tests/conftest.py LEARN_MODULES, or it trains again in another worker")


# The units that take minutes, in lanes of about equal time (measured: docs/experiments.md):
# worker gwN starts its lane's units before anything else, then a lane no worker has (fewer
# workers than lanes), then the quick modules, which fill the gaps. (A worker holds its next
# unit while it runs the last test of one, so with no lanes one worker gathered every long
# unit behind its long tests while the other ran out of work.)
LANES = {"gw0": ("learn", "tests/test_nodes.py", "tests/test_lite0.py"),
         "gw1": ("tests/test_e2e.py", "tests/test_tune.py", "tests/test_worker_loss.py")}


def xdist_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: "learn", else its module."""
    module = nodeid.split("::")[0]
    return "learn" if module in LEARN_MODULES else module


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """Whole units per worker, the long ones by lane (pyproject's addopts: two workers on 2 cores,
    since much of a Ray test is one process starting or tracing while the other core idles;
    three were slower: docs/experiments.md).
    Written here rather than xdist's `--dist loadgroup`: its group marks rename the test ids,
    which pytest 9.2 no longer reads."""
    from xdist.scheduler import LoadScopeScheduling

    long_units = {unit for lane in LANES.values() for unit in lane}

    class ByLane(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit(nodeid)

        def _assign_work_unit(self, node) -> None:
            workers = {n.gateway.id for n in self.nodes}
            orphans = [unit for worker, lane in LANES.items() if worker not in workers for unit in lane]
            wanted = [*LANES.get(node.gateway.id, ()), *orphans,
                      *(unit for unit in self.workqueue if unit not in long_units), *self.workqueue]
            self.workqueue.move_to_end(next(u for u in wanted if u in self.workqueue), last=False)
            super()._assign_work_unit(node)

    return ByLane(config, log)


# --- log files ---------------------------------------------------------------


@pytest.fixture(scope="session", autouse=True)
def _log_files_in_a_temp_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """`mdfer` commands write a log file each (mdfer.logs); the tests' go to a temp folder, not
    to mdfer-home/ of the checkout."""
    import os

    from mdfer.logs import LOG_DIR_ENV
    previous = os.environ.get(LOG_DIR_ENV)
    os.environ[LOG_DIR_ENV] = str(tmp_path_factory.mktemp("logs"))
    yield
    if previous is None:
        os.environ.pop(LOG_DIR_ENV, None)
    else:
        os.environ[LOG_DIR_ENV] = previous


# --- S3 server ---------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One real S3 server for the whole session (starting one costs ~1 s)."""
    server = S3Server(tmp_path_factory.mktemp("s3server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The session server, with its credentials/endpoint in ``os.environ``.

    Why: code under test (and subprocesses it spawns) finds the store through
    the standard AWS_* variables. Ambient AWS settings that would break signing
    are removed. Restarts the server if an earlier fault test left it stopped.
    """
    if not s3_server.running:
        s3_server.start()
    for name in AWS_ENV_TO_UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_prefix(s3_server: S3Server, request: pytest.FixtureRequest) -> str:
    """A unique ``s3://<bucket>/<test-name>-<random>`` prefix for one test."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-")[:80]
    return f"s3://{s3_server.bucket}/{name}-{secrets.token_hex(4)}"


@pytest.fixture
def fresh_s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """A private server for fault tests that stop/restart it or fill it up."""
    server = S3Server(tmp_path / "s3server")
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --- Ray and prepared data -----------------------------------------------------


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """A private local Ray for one module's in-process tests (address="local": never a stale
    cluster), its State API pinned to its own dashboard: other clusters run beside it (the
    other xdist worker's, `mdfer` subprocesses'), and an unpinned State API call (ours, or
    Train's placement-group cleaner's) may ask one of them."""
    import ray

    from helpers import free_ports
    (port,) = free_ports(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAY_API_SERVER_ADDRESS", f"http://127.0.0.1:{port}")
        ray.init(address="local", num_cpus=2, log_to_driver=False, dashboard_port=port)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Generated FER-like + FANE-like data prepared into a local store, shared by the session."""
    from mdfer import synth
    from mdfer.config import load_config
    from mdfer.ingest import prepare
    from mdfer.storage import Store

    root = tmp_path_factory.mktemp("synth")
    synth.write_fer_like(root / "fer2013", train_per_class=24, test_per_class=6, seed=11)
    synth.write_fane_like(root / "fane", per_class=20, seed=12)
    config = load_config(None, {"fer2013": str(root / "fer2013"), "fane": str(root / "fane")})
    store = Store(str(root / "store"))
    manifest = prepare(config, store)
    return {"root": root, "store": store, "manifest": manifest, "config": config}


# --- a run trained on generated data (one training for the whole session) -----------------


@pytest.fixture(scope="session")
def learnable(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Enough generated faces for a from-scratch model to learn in a few epochs."""
    from helpers import generated_demo_config
    from mdfer.config import load_config
    from mdfer.ingest import prepare
    from mdfer.storage import Store

    # the pipeline's demo config (stage 3 on a cosine schedule): 48 px, no augmentation but
    # flips, 2 + 2 + 4 epochs, one worker with a CPU to itself (two workers of 0.5 CPU took 288 s
    # against 215 and reached val macro-F1 0.23 against 0.34; two workers: tests/test_nodes.py).
    # Measured: a from-scratch EfficientNetV2B0 needs ~300 steps to leave chance on these faces
    root = tmp_path_factory.mktemp("learnable")
    config_path, raw = generated_demo_config(
        root, fer_train=150, fer_test=10, fane=120, seed=21,
        edit=lambda raw: (raw.update(export={"calib_images": 64, "representative_images": 32, "parity_images": 0}),
                          raw["train"].update(workers=1, cpus_per_worker=1),
                          raw["train"]["stages"][2].update(lr_schedule="cosine")))
    store = Store(str(root / "store"))
    manifest = prepare(load_config(config_path), store)
    return {"root": root, "config": config_path, "store": store, "dataset_id": manifest.dataset_id,
            "raw": raw}


@pytest.fixture(scope="session")
def trained_run(learnable: dict) -> dict:
    """`mdfer train` of run "learn" (three stages, one worker); tests read what it wrote."""
    from helpers import run_mdfer, train_args

    done = run_mdfer(*train_args(learnable, "learn"))
    assert done.returncode == 0, done.stderr[-4000:]
    return {**learnable, "run_id": "learn", "train": done}


@pytest.fixture(scope="session")
def exported(trained_run: dict) -> dict:
    """`mdfer export` of run "learn", without a Hailo compiler; tests read its files."""
    import json

    from helpers import path_without_hailo, run_mdfer
    from mdfer import hailo

    store = trained_run["store"]
    done = run_mdfer("export", "--store", store.uri, "--run-id", "learn",
                     env={hailo.HAILO_PYTHON_ENV: "", "PATH": path_without_hailo()})
    assert done.returncode == 0, done.stderr[-4000:]
    folder = Path(store.path("runs/learn/export"))
    return {**trained_run, "done": done, "folder": folder, "manifest": json.loads((folder / "manifest.json").read_text())}


# --- a tiny exported model (seconds, no training) --------------------------------------------


@pytest.fixture(scope="session")
def tiny_tflite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained 16 px model with the default config's heads, as export writes it: float32
    .tflite by export's converter, heads.json beside it. For tests of `predict` that need a
    model to run, not a trained one (the shared training takes minutes)."""
    import json

    import keras

    from mdfer.config import load_config
    from mdfer.export import _saved_model, heads_json, tflite_bytes
    from mdfer.layout import HEADS_FILE, TFLITE_FLOAT32

    config = load_config(None)
    config.model.image_size = 16
    folder = tmp_path_factory.mktemp("tiny-model")
    inputs = keras.Input((16, 16, 3), name="image")
    features = keras.layers.GlobalAveragePooling2D()(
        keras.layers.Conv2D(4, 3, activation="relu")(keras.layers.Rescaling(1 / 255)(inputs)))
    described = heads_json(config, "inside the model")
    model = keras.Model(inputs, {name: keras.layers.Dense(len(head["classes"]), activation="softmax", name=name)(features)
                                 for name, head in described["heads"].items()})
    path = folder / TFLITE_FLOAT32
    path.write_bytes(tflite_bytes(_saved_model(model, 16, folder / "saved")))
    (folder / HEADS_FILE).write_text(json.dumps(described))
    return path
