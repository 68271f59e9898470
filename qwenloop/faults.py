"""Test-only fault injection, read from ``QWENLOOP_FAULT`` (never set it in a real run).

The variable holds comma-separated entries; ``STEP`` is an optimizer step (1-based) or ``A-B`` / ``A-``
(a range):

    kill_during_checkpoint:STEP    SIGKILL this process half-way through writing the checkpoint of STEP
    sigterm_during_checkpoint:STEP SIGTERM this process half-way through writing the checkpoint of STEP (with
                                   sigterm:RANK:STEP: a second signal while the first one's checkpoint is saved)
    disk_full:STEP                 the checkpoint of STEP fails with ENOSPC while its files are written
    nan_loss:RANK:STEP             the loss of rank RANK is NaN in step STEP
    sigterm:RANK:STEP              rank RANK sends itself SIGTERM at the end of step STEP

The hooks are called from where the fault would happen (``storage``, ``checkpoint``, ``signals``, the
loop) and do nothing when the variable is unset.
"""

from __future__ import annotations

import errno
import logging
import os
import signal

import torch

logger = logging.getLogger("qwenloop")


def faults() -> list[list[str]]:
    spec = os.environ.get("QWENLOOP_FAULT", "").strip()
    return [entry.strip().split(":") for entry in spec.split(",") if entry.strip()]


def step_matches(text: str, step: int) -> bool:
    if "-" in text:
        low, high = text.split("-", 1)
        return int(low) <= step and (not high or step <= int(high))
    return int(text) == step


def fault_ranks(kind: str, step: int) -> list[int]:
    """Ranks named by ``kind:RANK:STEP`` entries that match ``step``."""
    return [int(f[1]) for f in faults() if f[0] == kind and len(f) == 3 and step_matches(f[2], step)]


def fault_at(kind: str, step: int) -> bool:
    """Whether a ``kind:STEP`` entry matches ``step``."""
    return any(f[0] == kind and len(f) == 2 and step_matches(f[1], step) for f in faults())


current_save_step: list[int] = [0]
"""The step whose checkpoint is being written (set by the checkpointer), for ``disk_full``."""


def disk_full(path: str) -> None:
    """Raise ENOSPC for a file of the checkpoint the fault names."""
    if fault_at("disk_full", current_save_step[0]):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def kill_during_checkpoint(step: int) -> None:
    if fault_at("kill_during_checkpoint", step):
        logger.warning("QWENLOOP_FAULT: SIGKILL in the middle of writing the checkpoint of step %d", step)
        os.kill(os.getpid(), signal.SIGKILL)


def signal_during_checkpoint(step: int) -> None:
    if fault_at("sigterm_during_checkpoint", step):
        logger.warning("QWENLOOP_FAULT: SIGTERM in the middle of writing the checkpoint of step %d", step)
        os.kill(os.getpid(), signal.SIGTERM)


def poison_loss(loss: torch.Tensor, rank: int, step: int) -> torch.Tensor:
    """The loss of ``rank`` becomes NaN in ``step`` when QWENLOOP_FAULT asks for it."""
    if rank in fault_ranks("nan_loss", step):
        return loss * float("nan")
    return loss
