"""Dask worker preload (``--preload pipeline.worker_preload``), for every backend.

Runs in each worker process before its first task:

* **one GPU per worker**: with several GPUs visible, a worker narrows
  ``CUDA_VISIBLE_DEVICES`` to the one its slot on the node owns (:mod:`pipeline.cluster.gpus`),
  before CUDA starts, so two workers on a multi-GPU node never share ``cuda:0``;
* **torch threads** from ``PIPELINE_TORCH_THREADS`` (the backend's split of the cores);
* **Ctrl-C** is ignored: a Ctrl-C in a terminal reaches every process of the foreground
  group, and the driver alone handles it (cancels the run, stops the workers);
* **no orphans**: a worker whose parent (the driver's nanny, or ``dask worker``) dies,
  even by SIGKILL, exits within a second instead of running on;
* **no credentials in logs**: URLs in log records lose their user info (:mod:`.log_redaction`).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from . import log_redaction
from .cluster.environment import TORCH_THREADS, WORKERS_ON_NODE
from .cluster.gpus import device_for_worker, visible_devices

log = logging.getLogger("pipeline.worker")


def dask_setup(worker: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _pin_gpu(worker.name)
    threads = os.environ.get(TORCH_THREADS)
    if threads and threads.isdigit():
        import torch

        torch.set_num_threads(int(threads))
    _watch_parent(os.getppid())
    log_redaction.install()


def _pin_gpu(name: object) -> None:
    # The backend lists the node's GPUs (a local cluster: the driver's; SLURM: the job's).
    # Torch is not asked: counting devices would start CUDA before the narrowing.
    visible = visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES"))
    on_node = int(os.environ.get(WORKERS_ON_NODE, "1") or 1)
    device = device_for_worker(name, visible, on_node)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        log.info("worker %s pinned to GPU %s", name, device)


def _watch_parent(parent: int) -> None:
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    if parent > 1:
        threading.Thread(target=watch, name="pipeline-parent-watch", daemon=True).start()
