"""What the loop reports about speed and memory, per step (``metrics.jsonl``, the progress bar) and per
run (``run.json``), in numbers a user can act on.

* ``target_tokens`` / ``target_tokens_per_s``: tokens the loss is computed on (the assistant's answers);
  what a fine-tuning run is for. ``tokens`` / ``tokens_per_s``: every non-padding token the model
  reads (prompt and answer). Both over all ranks, both cumulative since this process started training.
* ``padding_fraction``: share of the step's positions that are padding (compute spent on nothing).
* ``step_s`` split into ``data_s`` (waiting for the dataloader), ``fwd_bwd_s`` (forward and backward of
  every micro-batch) and ``optimizer_s`` (clip, sentinel, optimizer step, the step's numbers). On a GPU
  the device is synchronised once at the end of the backward pass of a step, so that the split is
  true; under DeepSpeed the engine's optimizer step runs inside the last backward and counts there.
* ``mem_peak_gib``: the main process's peak so far (GPU: ``torch.cuda.max_memory_allocated``; CPU: the
  process's peak RSS); every rank's, allocated and reserved, is in ``run.json``.
* ``mfu``: model FLOPs of the step (``flops.py``) / (step time x peak FLOPS x processes), when the peak
  of the accelerator is known (GPU table or ``peak_tflops``).
"""

from __future__ import annotations

import resource
import time

import torch

from . import flops

# The per-batch counts the collator reports (``data.finish_batch``), in this order.
COUNTED = ("num_targets", "num_tokens", "num_positions", "attention_pairs")
GIB = 1024**3


def peak_memory(accelerator) -> list[dict]:
    """Every rank's peak memory in GiB (collective): GPU allocated/reserved, or CPU peak RSS."""
    mine = torch.tensor([_local_peak(accelerator.device)], dtype=torch.float64, device=accelerator.device)
    rows = accelerator.gather(mine).reshape(-1, 2).tolist()
    if torch.device(accelerator.device).type == "cuda":
        return [{"allocated_gib": round(a, 3), "reserved_gib": round(r, 3)} for a, r in rows]
    return [{"rss_gib": round(a, 3)} for a, _ in rows]


def _local_peak(device) -> list[float]:
    if torch.device(device).type == "cuda":
        return [torch.cuda.max_memory_allocated(device) / GIB, torch.cuda.max_memory_reserved(device) / GIB]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux
    return [rss, rss]


class StepMeter:
    """Clocks and counters of the training loop (one per run). ``start_step`` / ``data_done`` /
    ``forward_backward_done`` / ``optimizer_done`` mark a step's phases; ``end_step`` turns them and
    the step's counts into metrics; ``summary`` gives the run's totals for ``run.json``."""

    def __init__(self, accelerator, model, cfg, precision: str, state):
        self.accelerator, self.state = accelerator, state  # state: TrainerState (tokens seen survive a resume)
        self.cuda = torch.device(accelerator.device).type == "cuda"
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.shape = flops.decoder_shape(base.config, cfg.lora.r, cfg.lora.target_modules)
        device_name = torch.cuda.get_device_name(accelerator.device) if self.cuda else None
        self.peak = cfg.peak_tflops or flops.peak_tflops(device_name, precision)
        self.checkpointing = cfg.gradient_checkpointing
        self.train_seconds = 0.0
        self.run_tokens = self.run_targets = self.run_positions = self.run_model_flops = 0.0
        self._marks: dict[str, float] = {}

    # --- phases of a step ----------------------------------------------------------------------
    def _mark(self, name: str, sync: bool = False) -> None:
        if sync and self.cuda:
            torch.cuda.synchronize(self.accelerator.device)  # once per step: the split is otherwise a guess
        self._marks[name] = time.perf_counter()

    def start_step(self) -> None:
        self._mark("start")

    def data_done(self) -> None:
        self._mark("data")

    def forward_backward_done(self) -> None:
        self._mark("fwd_bwd", sync=True)

    def optimizer_done(self) -> None:
        self._mark("end")

    # --- numbers ---------------------------------------------------------------------------------
    def end_step(self, counts: list[float]) -> dict:
        targets, tokens, positions, pairs = counts
        m = self._marks
        step_s = m["end"] - m["start"]
        self.train_seconds += step_s
        self.run_tokens += tokens
        self.run_targets += targets
        self.run_positions += positions
        model_flops, _ = flops.step_flops(self.shape, int(tokens), int(targets), int(pairs), self.checkpointing)
        self.run_model_flops += model_flops
        self.state.tokens_seen += int(tokens)
        self.state.target_tokens_seen += int(targets)
        record = {
            "target_tokens": self.state.target_tokens_seen,
            "tokens": self.state.tokens_seen,
            "target_tokens_per_s": self.run_targets / self.train_seconds,
            "tokens_per_s": self.run_tokens / self.train_seconds,
            "padding_fraction": round(1.0 - tokens / max(positions, 1.0), 4),
            "step_s": round(step_s, 4),
            "data_s": round(m["data"] - m["start"], 4),
            "fwd_bwd_s": round(m["fwd_bwd"] - m["data"], 4),
            "optimizer_s": round(m["end"] - m["fwd_bwd"], 4),
            "mem_peak_gib": round(_local_peak(self.accelerator.device)[0], 3),
        }
        if self.peak:
            record["mfu"] = model_flops / (step_s * self.peak * 1e12 * self.accelerator.num_processes)
        return record

    def summary(self) -> dict:
        """The run's totals (this process's part of it, after a resume)."""
        out = {
            "train_seconds": self.train_seconds,
            "target_tokens_seen": self.state.target_tokens_seen,
            "tokens_seen": self.state.tokens_seen,
            "target_tokens_per_s": self.run_targets / self.train_seconds if self.train_seconds else None,
            "tokens_per_s": self.run_tokens / self.train_seconds if self.train_seconds else None,
            "padding_fraction": round(1.0 - self.run_tokens / self.run_positions, 4) if self.run_positions else None,
            "model_flops": self.run_model_flops,
            "peak_tflops": self.peak,
        }
        if self.peak and self.train_seconds:
            out["mfu"] = self.run_model_flops / (self.train_seconds * self.peak * 1e12 * self.accelerator.num_processes)
        return out
