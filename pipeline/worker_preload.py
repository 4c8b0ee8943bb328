"""Dask worker preload (``preload=["pipeline.worker_preload"]``): workers ignore Ctrl-C.

A Ctrl-C in a terminal reaches every process of the foreground group, workers included,
and each would print its own KeyboardInterrupt traceback. The driver handles it alone:
it cancels the run and stops the workers.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


def dask_setup(worker: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
