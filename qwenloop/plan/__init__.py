"""The planner behind ``qwenloop plan``: will a run fit, and how long will it take? (issue 9)

Pure arithmetic on shapes and datasheet numbers: the planning modules import neither the training code
(``train``, ``model``, ``distributed``, ``data``) nor torch or transformers.

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

* ``buffers``: what ZeRO-3 (its module trace replayed with DeepSpeed's release, prefetch and persistence
  rules) and FSDP (root unit, units in flight) gather on each GPU, DeepSpeed's reduce bucket, and the
  fixed costs outside the tensors (CUDA context, communicators, allocator slack).
* ``timing``: step time and time per epoch from the FLOPs model of ``qwenloop.flops``, the GPU's rate,
  all-gathers and host transfers.
* ``estimate``: ``PlanRequest`` (the question, typed) -> ``Plan`` (terms per GPU and per node, verdict, time).
* ``advice``: the changes that make a plan fit, ranked by their cost in step time; the largest
  micro-batch / sequence that fits.
* ``run``: a plan from the files a run is launched with (training config + ``qwenloop.launch.LaunchSpec``),
  and the record ``train()`` writes to ``run.json`` beside the measured peaks.
* ``cli``: ``qwenloop plan``.

Everything but ``run`` and ``cli`` is pure arithmetic (``tests/test_plan_estimate.py`` checks the imports);
``docs/memory-model.md`` documents every term.
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
