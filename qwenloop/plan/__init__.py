"""The planner behind ``qwenloop plan``: will a run fit, and how long will it take? (issue 9)

Pure arithmetic on shapes and datasheet numbers: nothing here imports the training code (``train``,
``model``, ``distributed``, ``data``), torch or transformers, so a plan is instant on any laptop.

* ``shapes``: ``ModelSpec``, the numbers of a dense decoder (Qwen2 / Qwen2.5 / Qwen3 or Llama-style),
  the ``PRESETS`` of every dense Qwen2, Qwen2.5 and Qwen3 size, and ``spec_from_config`` /
  ``resolve_model`` for a preset name, a ``config.json`` or a model directory.
* ``gpus``: ``GPUSpec``, one accelerator (memory, bf16, peak TFLOPS, host link), its presets,
  ``resolve_gpu`` and ``custom_gpu``.
* ``activations``: bytes autograd keeps between forward and backward (with and without gradient
  checkpointing, sdpa / eager, LoRA, dropout, autocast), the recompute working set of one layer, and the
  loss's bytes; each formula equals the bytes a real forward saves (``tests/test_plan_activations.py``).

* ``states``: model-state bytes per rank and per node by backend (single, DDP, ZeRO-3, FSDP1/2),
  quantization (16-bit, NF4 with its quant state, int8) and offload: the frozen base's shard and the
  LoRA adapter's weights, gradients and optimizer state; equal to DeepSpeed's own estimator for full
  training, and to the bytes real (tiny) models hold.

Not yet here (issue 9): the gathered-layer / prefetch buffers, the verdict and search, the time model,
and the ``qwenloop plan`` / ``doctor`` commands.
"""

from .gpus import GPU_PRESETS, GPUSpec, custom_gpu, resolve_gpu
from .shapes import PRESETS, ModelSpec, resolve_model, spec_from_config

__all__ = [
    "ModelSpec",
    "PRESETS",
    "spec_from_config",
    "resolve_model",
    "GPUSpec",
    "GPU_PRESETS",
    "resolve_gpu",
    "custom_gpu",
]
