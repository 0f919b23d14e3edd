"""Ray Train's TensorFlow set-up (TF_CONFIG on every worker, for MultiWorkerMirroredStrategy)
without TensorFlow in the Train controller.

Ray's `TensorflowConfig` lives in `ray.train.tensorflow`, whose `__init__` imports TensorFlow;
the controller of every stage and Tune trial unpickles the config, so it imported TensorFlow
too: ~4 s of CPU at each start and ~700 MB more in a process that never computes (measured:
the controller at 886 MB, docs/experiments.md 2026-12-04). This module imports neither.
"""

from __future__ import annotations

import json
import os

import ray
from ray._common.network_utils import build_address
from ray.train._internal.utils import get_address_and_port
from ray.train.backend import Backend, BackendConfig
from ray.train.v2._internal.util import TrainingFramework


class MultiWorkerTensorflow(BackendConfig):
    """Use as the `backend_config` of Train V2's `DataParallelTrainer`: what
    `TensorflowTrainer` does with Ray's own config, importing nothing of TensorFlow."""

    @property
    def backend_cls(self) -> type[Backend]:
        return _TFConfigBackend

    @property
    def framework(self) -> TrainingFramework:
        return TrainingFramework.TENSORFLOW  # Ray's run state records TF's version from worker 0


def set_tf_config(worker_addresses: list[str], index: int) -> None:
    """On one worker: the cluster MultiWorkerMirroredStrategy reads from TF_CONFIG."""
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": worker_addresses},
                                          "task": {"type": "worker", "index": index}})


class _TFConfigBackend(Backend):
    def on_start(self, worker_group, backend_config: MultiWorkerTensorflow) -> None:
        def address() -> str:
            return build_address(*get_address_and_port())

        addresses = worker_group.execute(address)
        ray.get([worker_group.execute_single_async(i, set_tf_config, worker_addresses=addresses, index=i)
                 for i in range(len(worker_group))])
