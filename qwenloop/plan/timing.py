"""How long a step and an epoch take: a FLOPs model, the GPU's achievable rate, and the bytes that move.

* **Compute.** ``qwenloop.flops.step_flops`` (the same count as the ``mfu`` metric of a run): per token
  ``2*P`` forward and ``2*P`` backward for the frozen decoder (activation gradients only: no weight
  gradients of the base), causal attention per (query, key) pair, LoRA's own FLOPs, the LM head at target
  positions only, and the forward once more when checkpointing (hardware FLOPs). Rows are taken as full
  (``seq_len`` tokens each, attention pairs ``s*(s+1)/2`` per row): an upper bound for padded batches,
  exact for well-packed rows.
* **Achievable rate.** By default the hardware FLOPs (recompute included) run at ``DEFAULT_HFU`` = 0.40
  of the GPU's dense peak in the run's precision: a conservative figure for LoRA on a frozen base with
  sdpa (public reports for Qwen/Llama LoRA put A100 / H100 bf16 at 0.35-0.5 of peak, V100 fp16 lower),
  *not* measured by this project on a GPU yet. A run's ``mfu`` in ``run.json`` is a measurement of the
  same job: given as ``mfu`` (``--mfu``), time = model FLOPs / (peak * mfu), recompute included in it.
* **QLoRA** dequantizes every 4-bit weight before each matmul (forward, recompute, backward), a
  memory-bound pass: ``QLORA_SLOWDOWN`` = 1.3 on compute (the QLoRA paper and bitsandbytes' benchmarks
  report 20-40% slower steps than 16-bit LoRA); int8 (``LLM.int8``'s outlier decomposition) 1.5.
* **Sharded parameters.** ZeRO-3 and FSDP all-gather the base once per pass over the layers (forward,
  recompute, backward: 3 with checkpointing, 2 without), each GPU receiving ``(W-1)/W`` of the base,
  at ``INTRA_NODE_GBPS_NVLINK`` (an NVLink switch / SXM board; half the host link on PCIe-only GPUs and
  NVLink bridges, which pair GPUs only) or ``INTER_NODE_GBPS`` across machines; the quant state is not gathered. The all-gathers are prefetched
  while the previous layer computes, so a micro-batch takes ``max(compute, all-gather)``.
* **Parameter offload.** Each pass also copies the rank's base partition host -> GPU over its host link
  (``GPUSpec.host_link_gbps``): not hidden behind compute in this model (DeepSpeed overlaps part of it,
  so the estimate errs long). Optimizer offload moves the LoRA gradients and weights once per step
  (negligible) and runs Adam on the CPU at ``CPU_ADAM_PARAMS_PER_S``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from ..flops import step_flops

DEFAULT_HFU = 0.40
QLORA_SLOWDOWN = {"none": 1.0, "nf4": 1.3, "int8": 1.5}
INTRA_NODE_GBPS_NVLINK = 100.0
"""Effective all-gather bus bandwidth per GPU over NVLink (GB/s): about a third of V100 SXM2's 300 GB/s,
a sixth of A100's: what NCCL all-gathers of tens of MB reach with 8 GPUs; conservative for H100."""
INTER_NODE_GBPS = 12.5
"""One 100 Gb/s InfiniBand / RoCE port per node, when machines talk to each other."""
CPU_ADAM_PARAMS_PER_S = 1e9
"""DeepSpeedCPUAdam's rate (parameters per second per rank, AVX2/AVX-512): order of magnitude."""


@dataclass(frozen=True)
class StepTime:
    """Estimated seconds of one optimizer step, its parts, and what they add up to."""

    model_flops: float
    """FLOPs of one step on one GPU (no recompute): the ``mfu`` numerator."""
    hardware_flops: float
    """With the checkpointing recompute."""
    mfu: float
    """The model-FLOPs utilization this estimate implies (or was given)."""
    compute_s: float
    """GPU compute of one step (QLoRA's dequantization included)."""
    allgather_s: float
    """All-gathers of the sharded base in one step (overlapped with compute)."""
    host_transfer_s: float
    """Parameter-offload copies and the CPU optimizer of one step (not overlapped)."""
    step_s: float
    """``max(compute, all-gather) + host transfer``."""
    tokens_per_step: int
    """Tokens one optimizer step trains on, all GPUs."""
    tokens_per_s: float
    """All GPUs together."""
    epoch_hours: float | None
    """For ``dataset_tokens`` tokens (None when not given)."""


def _link_gbps(request) -> float:
    if request.nodes > 1:
        return INTER_NODE_GBPS
    words = request.gpu.nvlink.lower()
    switched = "nvlink" in words and "bridge" not in words
    return INTRA_NODE_GBPS_NVLINK if switched else request.gpu.host_link_gbps / 2


def step_time(request) -> StepTime:
    """Time of one step of ``request`` (a ``estimate.PlanRequest``); formulas: module docstring."""
    from . import states

    r = request
    shape = r.model.decoder_shape(r.lora_rank, r.lora_targets)
    rows = r.micro_batch * r.grad_accum
    tokens = rows * r.seq_len
    pairs = rows * r.seq_len * (r.seq_len + 1) // 2
    model_flops, hardware_flops = step_flops(shape, tokens, int(tokens * r.target_fraction), pairs, r.checkpointing)
    peak = (r.gpu.tflops(r.precision) or r.gpu.tflops("fp16") or 0.0) * 1e12
    if not peak:
        raise UserError(f"plan: no peak TFLOPS known for {r.gpu.name} in {r.precision}; describe the GPU with its peak")
    if r.mfu:
        compute = model_flops / (peak * r.mfu)  # measured on this job: dequantization and recompute included
    else:
        compute = hardware_flops / (peak * DEFAULT_HFU) * QLORA_SLOWDOWN[r.quant]

    W, passes = r.world_size, (3 if r.checkpointing else 2) * r.grad_accum
    base = states.base_param_bytes(r.model, r.compute_bytes, r.quant)  # parameters only: the quant state stays put
    gather = 0.0
    if r.backend in ("zero3", "fsdp1", "fsdp2") and W > 1:
        gather = passes * base * (W - 1) / W / (_link_gbps(r) * 1e9)
    host = 0.0
    if r.offload_param:
        host += passes * base / W / (r.gpu.host_link_gbps * 1e9)
    if r.offload_optimizer:
        P = r.model.lora_params(r.lora_rank, r.lora_targets)
        host += 2 * 4 * P / W / (r.gpu.host_link_gbps * 1e9) + P / W / CPU_ADAM_PARAMS_PER_S
    step = max(compute, gather) + host
    tokens_all = tokens * W
    epoch = None
    if r.dataset_tokens:
        epoch = r.dataset_tokens / tokens_all * step / 3600
    return StepTime(model_flops, hardware_flops, model_flops / (compute * peak), compute, gather, host, step, tokens_all, tokens_all / step, epoch)


__all__ = ["StepTime", "step_time", "DEFAULT_HFU", "QLORA_SLOWDOWN"]
