"""Preemption: SIGTERM / SIGINT become a flag that every rank agrees on at a step boundary.

The loop (``train.py``) asks ``agreed`` once per step; when any rank got a signal, every rank saves a
checkpoint and stops together (``checkpoint.Checkpointer.preempted``).

A signal that comes while the run is already stopping (a scheduler or launcher that signals twice, a second
Ctrl-C, a signal during the save the first one started) never interrupts it: killed half-way through its
checkpoint, a run would lose everything since its previous checkpoint. It is logged; SIGKILL still stops a
process at once.
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
    whether any rank got one. Later signals are logged and change nothing: the checkpoint the first one
    asked for is written before the run ends."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self.repeated = 0  # signals that came after the first one (logged, never acted on)
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
        name = signal.Signals(signum).name
        if self.received is not None:  # already stopping: dying now could leave a half-written checkpoint
            self.repeated += 1
            logger.warning("%s received while already stopping: the checkpoint is written first, then the run ends "
                           "(SIGKILL stops at once, losing the work since the newest complete checkpoint)", name)
            return
        self.received = signum
        logger.warning("%s received: stopping after this step with a checkpoint", name)

    def agreed(self, accelerator, step: int) -> int | None:
        """The signal number any rank received (the largest, if several), else None. Collective."""
        for rank in faults.fault_ranks("sigterm", step):
            if rank == accelerator.process_index:
                os.kill(os.getpid(), signal.SIGTERM)
        mine = float(self.received or 0)
        agreed = int(accelerator.reduce(torch.tensor([mine], device=accelerator.device), "max").item())
        return agreed or None
