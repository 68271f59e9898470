"""The NaN / overflow sentinel: a non-finite loss or gradient norm on any rank skips the step on
every rank; ``max_bad_steps`` consecutive bad steps stop the run with a report.

Per optimizer step (at the accumulation boundary), after the clip has computed the global gradient
norm:

1. ``agree(step, loss_sum, grad_norm, model)``: one all-gather of two flags per rank (loss finite,
   norm finite); every rank gets the same answer. Only when a flag is set does it look at the
   gradients themselves, for the names of the first non-finite ones (where the backend lets them be
   read; DeepSpeed keeps them partitioned inside its engine): the clip's norm already tells whether
   any gradient is non-finite, so a healthy step pays for nothing but the flags.
2. ``record(step, finite, loss_scale)`` after the step: counters, the fp16 loss-scale history.

Under fp16 the GradScaler (or DeepSpeed's loss scaler) skips overflowing steps itself and lowers the
scale; those steps are counted here as well, so a collapsing scale stops the run too.
"""

from __future__ import annotations

import json
import os
from collections import deque

import torch

from .errors import EXIT_NONFINITE, RunStopped


class NonFiniteSentinel:
    HISTORY = 32  # loss scales kept for the report

    def __init__(self, accelerator, backend, max_bad_steps: int, saved: dict | None = None):
        self.accelerator, self.backend, self.max_bad_steps = accelerator, backend, max_bad_steps
        saved = saved or {}
        self.consecutive = int(saved.get("consecutive", 0))
        self.total = int(saved.get("total", 0))
        self.scale_history = deque((tuple(x) for x in saved.get("scale_history", [])), maxlen=self.HISTORY)
        self.last_bad: dict | None = None

    def state(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total, "scale_history": [list(x) for x in self.scale_history]}

    def agree(self, step: int, loss_sum, grad_norm, model) -> bool:
        """True when the step is finite on every rank. Collective. ``loss_sum`` and ``grad_norm`` may be
        device tensors: they are read back here, once, with the flags."""
        acc = self.accelerator
        loss_sum = torch.as_tensor(loss_sum, dtype=torch.float32).to(acc.device).reshape(())
        norm = torch.zeros((), device=acc.device) if grad_norm is None else torch.as_tensor(grad_norm).to(acc.device).float().reshape(())
        mine = torch.stack([~torch.isfinite(loss_sum), ~torch.isfinite(norm)]).float().reshape(1, 2)
        flags = acc.gather(mine).reshape(-1, 2).cpu()
        if not bool(flags.any()):
            return True
        self.last_bad = {
            "step": step,
            "ranks_with_nonfinite_loss": [r for r in range(flags.shape[0]) if flags[r, 0] > 0],
            "grad_norm": None if grad_norm is None else float(norm),
            # rank 0's view (gradients are all-reduced); the clip left non-finite gradients as they were
            # (except FSDP's, see FSDPBackend.clip_grad_norm)
            "nonfinite_gradients": self.backend.nonfinite_grad_names(model),
        }
        return False

    def record(self, step: int, finite: bool, loss_scale: float | None) -> None:
        if loss_scale is not None:
            self.scale_history.append((step, loss_scale))
        if finite:
            self.consecutive = 0
        else:
            self.consecutive += 1
            self.total += 1

    @property
    def exhausted(self) -> bool:
        return bool(self.max_bad_steps) and self.consecutive >= self.max_bad_steps

    def stop(self, output_dir: str, last_checkpoint: str | None) -> RunStopped:
        """The report (also written to ``output_dir/nonfinite_report.json``) and the exception ending the run."""
        bad = self.last_bad or {}
        names = bad.get("nonfinite_gradients")
        grads = ("not inspectable under this backend (DeepSpeed keeps them partitioned)" if names is None
                 else ", ".join(names) if names else "none found non-finite before clipping")
        scales = ", ".join(f"{s}:{v:g}" for s, v in self.scale_history) or "n/a (no loss scaling: bf16/fp32)"
        resume = (f"resume from {last_checkpoint} (resume_from: auto) after fixing the cause (lower learning_rate, "
                  f"bf16 instead of fp16, check the data)" if last_checkpoint else "no checkpoint was written yet")
        report = {
            "step": bad.get("step"),
            "consecutive_bad_steps": self.consecutive,
            "total_bad_steps": self.total,
            "ranks_with_nonfinite_loss": bad.get("ranks_with_nonfinite_loss"),
            "grad_norm": bad.get("grad_norm"),
            "nonfinite_gradients": names,
            "loss_scale_history": [list(x) for x in self.scale_history],
            "last_checkpoint": last_checkpoint,
        }
        if self.accelerator.is_main_process:
            with open(os.path.join(output_dir, "nonfinite_report.json"), "w", encoding="utf-8") as f:
                json.dump(report, f, indent=1)
        message = (
            f"{self.consecutive} consecutive optimizer steps were non-finite (max_bad_steps {self.max_bad_steps}), "
            f"the last at step {bad.get('step')}; {self.total} bad steps in all, each skipped.\n"
            f"  non-finite loss on rank(s): {bad.get('ranks_with_nonfinite_loss')}; gradient norm: {bad.get('grad_norm')}\n"
            f"  non-finite gradients: {grads}\n"
            f"  fp16 loss scale history (step:scale): {scales}\n"
            f"  last good checkpoint: {last_checkpoint}; {resume}\n"
            f"  report: {os.path.join(output_dir, 'nonfinite_report.json')}"
        )
        return RunStopped(message, EXIT_NONFINITE, checkpoint=last_checkpoint)
