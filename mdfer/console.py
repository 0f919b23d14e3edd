"""Train workers' lines (stage start, one per epoch) and in-epoch progress, shown by the driver.

A worker's own stdout reaches the console only through Ray's log forwarding, which also carries
every library's start-up noise; mdfer turns that off (logs.py) and sends what a person wants to
read through a small queue actor instead. The driver prints it: epoch lines as log lines,
progress as a live bar on a terminal or a line per quarter epoch in a file or job log.
"""

from __future__ import annotations

import logging
import threading
import time
from queue import Empty

from mdfer.logs import Progress, worker_line

log = logging.getLogger("mdfer.train")
HEAD_NODE_RESOURCE = "node:__internal_head__"  # every Ray head node has it (ray._common.constants)
PROGRESS_UPDATES = 40  # per epoch, from the rank-0 worker (every 2.5%: smooth enough for a bar)


class WorkerConsole:
    """Driver side: `with WorkerConsole() as console:` pass `console.queue` to the workers."""

    def __init__(self):
        from ray.util.queue import Queue
        # on the head node, as Ray Train's own state actor: a worker node that is lost must not
        # take the console with it (the driver's own node is not always the head: two nodes
        # on one host, or a driver whose IP matches no node, attach to either)
        self.queue = Queue(actor_options={"num_cpus": 0, "resources": {HEAD_NODE_RESOURCE: 0.001}})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="mdfer-worker-console", daemon=True)
        self._bars: dict[str, Progress] = {}

    def __enter__(self) -> "WorkerConsole":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        for message in self._take_all():
            self._show(message)
        for bar in self._bars.values():
            bar.close()
        self.queue.shutdown()

    def _take_all(self) -> list:
        try:
            return self.queue.get_nowait_batch(self.queue.qsize())
        except Exception:  # the actor is gone (Ray shut down): nothing more to show
            return []

    def _drain(self) -> None:
        while not self._stop.is_set():
            try:
                message = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:
                time.sleep(0.5)
                continue
            self._show(message)

    def _show(self, message: tuple) -> None:
        kind, *rest = message
        if kind == "line":
            for bar in self._bars.values():
                bar.close()
            self._bars.clear()
            log.info(rest[0])
        elif kind == "progress":
            label, done, total, rate, left = rest
            if label not in self._bars:
                self._bars = {label: Progress(label, total, "img", log)}
            self._bars[label].update(done, rate, left)


class WorkerSide:
    """Worker side: lines and progress to the driver's console queue, or to the worker's stdout
    when there is none (a Tune trial). Muted on every worker but rank 0: one voice per run."""

    def __init__(self, queue=None, muted: bool = False):
        self.queue = None if muted else queue
        self.muted = muted

    def _send(self, message: tuple) -> bool:
        if self.queue is None:
            return False
        try:
            self.queue.put_nowait(message)
            return True
        except Exception:  # the driver is gone; the line still goes to the worker's log
            self.queue = None
            return False

    def line(self, text: str) -> None:
        if not self.muted and not self._send(("line", text)):
            worker_line(text)

    def progress(self, label: str, step: int, steps: int, images_per_step: int, elapsed: float) -> None:
        """After `step` of `steps` train steps (every 1/PROGRESS_UPDATES of the epoch)."""
        every = max(1, steps // PROGRESS_UPDATES)
        if step % every or step >= steps or elapsed <= 0:
            return
        rate = step * images_per_step / elapsed
        self._send(("progress", label, step * images_per_step, steps * images_per_step, rate,
                    (steps - step) * elapsed / step))
