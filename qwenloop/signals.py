"""Preemption: SIGTERM / SIGINT become a flag that every rank agrees on at a step boundary.

The loop (``train.py``) asks ``agreed`` once per step; when any rank got a signal, every rank saves a
checkpoint and stops together (``checkpoint.Checkpointer.preempted``).
"""

from __future__ import annotations

import logging
import os
import signal

import torch

from . import faults

logger = logging.getLogger("qwenloop")


class StopSignals:
    """SIGTERM / SIGINT set a flag; ``agreed`` (collective, at a step boundary) tells every rank
    whether any rank got one. A second signal of the same kind gets the default behaviour."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        if self.received == signum:  # asked twice: stop now, the default way
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        logger.warning("%s received: stopping after this step with a checkpoint", signal.Signals(signum).name)

    def agreed(self, accelerator, step: int) -> int | None:
        """The signal number any rank received (the largest, if several), else None. Collective."""
        for rank in faults.fault_ranks("sigterm", step):
            if rank == accelerator.process_index:
                os.kill(os.getpid(), signal.SIGTERM)
        mine = float(self.received or 0)
        agreed = int(accelerator.reduce(torch.tensor([mine], device=accelerator.device), "max").item())
        return agreed or None
