"""Every rank decides the same: the collectives that turn one rank's failure into every rank's.

A rank that raises alone leaves the others waiting in their next collective until the process group times
out, and they die with a traceback about a closed connection. Each writer here (data build, metrics,
checkpoint, adapter, run.json) first learns whether any rank failed, then every rank stops the same way.
Collective: every process calls these at the same point. Imports nothing of qwenloop but ``errors``.
"""

from __future__ import annotations

import os

import torch

from .errors import UserError


def any_rank(accelerator, failed: bool) -> bool:
    """Whether ``failed`` is true on any rank (one small all-reduce; none with a single process)."""
    if accelerator.num_processes == 1:
        return failed
    flag = torch.tensor([1.0 if failed else 0.0], device=accelerator.device)
    return accelerator.reduce(flag, "sum").item() > 0


def raise_if_any(accelerator, failure: str | None, elsewhere: str) -> None:
    """Raise ``UserError(failure)`` on every rank if any rank has one: ranks without their own message (the
    main process wrote, the others waited) say ``elsewhere``."""
    if any_rank(accelerator, failure is not None):
        raise UserError(failure or elsewhere)


def main_process_first(accelerator, build):
    """``build()`` on the main process first, then on the others (which read what it cached), like
    accelerate's ``main_process_first``, except that a failure on any process ends every process the same
    way: with accelerate's, a main process that raises leaves the others waiting at the barrier until the
    process group times out, and they die with a traceback about a closed connection.

    A ``UserError`` (bad input: a data report) on any process becomes the same ``UserError`` on all of them;
    any other exception keeps its traceback on the process that raised it, and the others stop with one line
    pointing at it. Collective: every process must call it."""
    if accelerator.num_processes == 1:
        return build()
    from accelerate.utils import broadcast_object_list, gather_object

    result, failure = None, None
    if accelerator.is_main_process:
        result, failure, error = _attempt_build(build)
    verdict = [failure]
    broadcast_object_list(verdict, from_process=0)
    if verdict[0] is not None:
        _stop_like(verdict[0], error if accelerator.is_main_process else None)
    if not accelerator.is_main_process:
        result, failure, error = _attempt_build(build)
    failures = [f for f in gather_object([failure]) if f is not None]
    if failures:
        _stop_like(failures[0], error if failure is not None else None)
    return result


def _attempt_build(build):
    """(result, failure, exception): ``failure`` is ``("user", message)`` / ``("bug", description)`` or None."""
    try:
        return build(), None, None
    except UserError as e:
        return None, ("user", str(e)), e
    except Exception as e:  # noqa: BLE001 - reported to the other processes, then re-raised here as it was
        return None, ("bug", f"process {os.environ.get('RANK', '?')} failed with {type(e).__name__}: {e}"), e


def _stop_like(failure: tuple[str, str], own_error: BaseException | None) -> None:
    kind, message = failure
    if kind == "user":
        raise UserError(message)
    if own_error is not None:  # the process that hit the bug keeps its traceback
        raise own_error
    raise UserError(f"{message} (its traceback is in that process's output)")
