"""Accelerators for the planner: how much memory one GPU has, how fast it multiplies, how fast it talks to the host.

``GPU_PRESETS`` holds the GPUs people fine-tune Qwen on. The peak TFLOPS are not repeated here: they
come from ``qwenloop.flops.GPU_PEAK_TFLOPS`` (the table the ``mfu`` metric uses), looked up by the
preset's device name, so a plan's time and a run's MFU share one source of truth.

* ``memory_gib``: what the driver reports as total (``torch.cuda.mem_get_info()[1]``, ECC on),
  rounded down to 0.1 GiB; less than the marketing size (a "32GB" V100 reports ~31.7 GiB).
* ``bf16``: compute capability >= 8.0 (Ampere and later). A V100 trains in fp16 or fp32 only.
* ``host_link_gbps``: effective host <-> device copy rate of one GPU, in GB/s: PCIe gen3 x16 ~12,
  gen4 ~25, gen5 ~50 (what CPU offload and loading weights move at). SXM V100 hosts are gen3.
* ``nvlink``: the GPU-to-GPU link, in words; ``timing`` takes an all-gather over an NVLink switch (SXM)
  at NVLink speed, and over PCIe or a pairwise NVLink bridge at half the host link.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from ..errors import UserError
from ..flops import peak_tflops as _table_peak

PRECISIONS = ("bf16", "fp16", "no")  # accelerate's mixed_precision names; "no" is fp32 (TF32 where it exists)


@dataclass(frozen=True)
class GPUSpec:
    """One accelerator, as the memory and time model sees it."""

    name: str
    memory_gib: float
    bf16: bool
    peak_tflops: Mapping[str, float] = field(hash=False)
    """Dense tensor-core peak per precision (``bf16`` / ``fp16`` / ``no``); a missing key: not supported / unknown."""
    host_link_gbps: float
    nvlink: str = "none (PCIe only)"

    def tflops(self, precision: str) -> float | None:
        """Peak dense TFLOPS in ``precision`` (accelerate's ``bf16`` / ``fp16`` / ``no``), or None when unknown."""
        return self.peak_tflops.get(precision)

    @property
    def memory_bytes(self) -> int:
        """``memory_gib`` in bytes, for comparing with a byte count of weights and activations."""
        return int(self.memory_gib * 2**30)


def _from_table(name: str, memory_gib: float, bf16: bool, host_link_gbps: float, nvlink: str = "none (PCIe only)") -> GPUSpec:
    """A preset whose peak TFLOPS come from ``flops.GPU_PEAK_TFLOPS`` (matched on ``name``, as for a device name)."""
    peaks = {p: v for p in PRECISIONS if (v := _table_peak(name, p)) is not None}
    if not peaks:
        raise AssertionError(f"{name}: no entry in qwenloop.flops.GPU_PEAK_TFLOPS")  # a preset without a table row
    return GPUSpec(name, memory_gib, bf16, MappingProxyType(peaks), host_link_gbps, nvlink)


GPU_PRESETS: dict[str, GPUSpec] = {
    # Memory: the "total capacity" torch reports for each board (its out-of-memory messages, cudaMemGetInfo),
    # rounded down to 0.1 GiB. Presets are the SXM parts
    # where both exist (V100, A100, H100, H200); a PCIe A100 has the same memory and peak, a PCIe host link.
    "v100-32gb": _from_table("Tesla V100 32GB", 31.7, False, 12.0, "NVLink 2, 300 GB/s per GPU (SXM2)"),
    "v100-16gb": _from_table("Tesla V100 16GB", 15.7, False, 12.0, "NVLink 2, 300 GB/s per GPU (SXM2)"),
    "a100-40gb": _from_table("A100 40GB", 39.5, True, 25.0, "NVLink 3, 600 GB/s per GPU (SXM4)"),
    "a100-80gb": _from_table("A100 80GB", 79.1, True, 25.0, "NVLink 3, 600 GB/s per GPU (SXM4)"),
    "h100-80gb": _from_table("H100 80GB SXM", 79.1, True, 50.0, "NVLink 4, 900 GB/s per GPU (SXM5)"),
    "h200": _from_table("H200 141GB", 139.7, True, 50.0, "NVLink 4, 900 GB/s per GPU (SXM5)"),
    "l40s": _from_table("L40S", 44.5, True, 25.0),
    "4090": _from_table("GeForce RTX 4090", 23.6, True, 25.0),
    "a10": _from_table("A10", 22.0, True, 25.0),
    "l4": _from_table("L4", 22.0, True, 25.0),
    "a6000": _from_table("RTX A6000", 47.5, True, 25.0, "NVLink bridge, 112.5 GB/s per pair"),
}

_ALIASES = {"rtx4090": "4090", "rtx-4090": "4090", "geforce-rtx-4090": "4090", "rtx-a6000": "a6000",
            "h100": "h100-80gb", "h100-sxm": "h100-80gb", "h200-141gb": "h200"}


def resolve_gpu(name: str) -> GPUSpec:
    """A preset by name: case-insensitive, ``NVIDIA`` prefix and spaces tolerated, did-you-mean on a typo."""
    key = name.strip().lower().removeprefix("nvidia").strip().replace(" ", "-").replace("_", "-")
    key = _ALIASES.get(key, key)
    if key in GPU_PRESETS:
        return GPU_PRESETS[key]
    close = ([k for k in GPU_PRESETS if key and k.startswith(key)]  # "a100": both A100s
             or difflib.get_close_matches(key, list(GPU_PRESETS), n=3, cutoff=0.5))
    hint = f"did you mean {' or '.join(close)}?" if close else f"known: {', '.join(GPU_PRESETS)}"
    raise UserError(f"unknown GPU {name!r}; {hint} (or describe it with custom_gpu: memory, bf16, TFLOPS, host link)")


def custom_gpu(memory_gib: float, bf16: bool, peak_tflops: float | Mapping[str, float], host_link_gbps: float,
               name: str = "custom GPU") -> GPUSpec:
    """A GPU that is not a preset. ``peak_tflops``: per precision, or one number for half precision
    (bf16 when supported, and fp16), fp32 then unknown."""
    for label, value in (("memory_gib", memory_gib), ("host_link_gbps", host_link_gbps)):
        if not _positive(value):
            raise UserError(f"{name}: {label} must be a positive number, got {value!r}")
    if isinstance(peak_tflops, Mapping):
        peaks = dict(peak_tflops)
    else:
        peaks = {"fp16": peak_tflops, **({"bf16": peak_tflops} if bf16 else {})}
    for precision, value in peaks.items():
        if precision not in PRECISIONS:
            raise UserError(f"{name}: peak_tflops precision {precision!r} is not one of {', '.join(PRECISIONS)}")
        if not _positive(value):
            raise UserError(f"{name}: peak_tflops[{precision!r}] must be a positive number, got {value!r}")
    if "bf16" in peaks and not bf16:
        raise UserError(f"{name}: peak_tflops has a bf16 rate but bf16=False")
    return GPUSpec(name, float(memory_gib), bool(bf16), MappingProxyType({k: float(v) for k, v in peaks.items()}),
                   float(host_link_gbps))


def _positive(value: object) -> bool:
    """A finite number > 0 (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
