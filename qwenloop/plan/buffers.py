"""What a sharded backend gathers on each GPU during a step, and the memory no tensor accounts for.

Pure arithmetic (no torch). ``states`` says what each rank *owns* (its shard); this module says what it
*borrows* for a while: the full parameters ZeRO-3 and FSDP all-gather to compute with, DeepSpeed's
gradient bucket, and the fixed costs of a CUDA process.

ZeRO-3 (``zero3_gathered_bytes``; DeepSpeed 0.19, ``partitioned_param_coordinator.py``)
---------------------------------------------------------------------------------------
A hook before every *leaf* module's forward (and before its backward) all-gathers that module's
parameters; after use they are released (``release_sub_module``) unless

* they are *persistent*: ``ds_numel < stage3_param_persistence_threshold`` (accelerate's ``auto``:
  ``10 * hidden``): norms and biases stay gathered for the whole run (``persistent_bytes``);
* they are used again within ``stage3_max_reuse_distance`` elements of the module trace
  (``__params_to_release``: it walks the recorded module order from the current step, adding each
  module's ``ds_numel``, and keeps any parameter it meets before the sum reaches the distance).

And once the trace is complete it *prefetches*: after each fetch it gathers the next modules' parameters,
up to ``stage3_prefetch_bucket_size`` elements (``auto``: ``int(0.9 * hidden**2)``) a time, as long as fewer
than ``stage3_max_live_parameters`` elements are gathered (``max_params_to_prefetch``). Measured on a real
engine (one CPU rank, the tiny model, ``tests/test_plan_estimate.py``), prefetching does not stay one bucket
ahead: a parameter the prefetcher passes while it is still gathered is marked as fetched for its later use
and not released (``__params_to_release``: "Don't release params whose reuse was skipped by prefetch"), so
with any bucket > 0 the gathered set grows until ``max_live_parameters`` stops the prefetch, and the module
fetched on demand comes on top. Measured peaks, tiny model (139,264 non-persistent elements, largest
module 32,768), reuse distance 0: 40,960 / 49,152 / 90,112 / 106,496 elements at max live 10k / 20k / 60k /
100k; with reuse distance 1e9: all 139,264 at every max live.

So the planner takes the larger of (a) the trace replayed with the reuse rule alone and (b) with a
prefetch bucket, ``min(every non-persistent element, max_live_parameters + the largest module)`` (within
8% of the measured peaks above when max live is well below the model, an upper bound near it). With
checkpointing the embedding has a backward too (``activation_checkpointing_enable`` makes its output require
grad), so it is in the trace twice; a tied head is the embedding's parameter (one entry). For Qwen2.5-72B
with the repository's JSONs (max live and reuse distance 1e9) that is ``1e9 + V*h`` = 2.25e9 elements,
4.2 GiB in 16-bit; for a 0.5B, the whole model (ZeRO-3 saves little on small models).

Beside it, with ``contiguous_gradients`` DeepSpeed allocates one reduce bucket of ``reduce_bucket_size``
elements (``auto``: ``hidden**2``) per gradient dtype (``stage3.py``: ``bucket.buffer = torch.empty(
self.reduce_bucket_size, ...)``): the LoRA gradients are fp32, so ``4 * reduce_bucket_size`` bytes.

FSDP (``fsdp_gathered_bytes``)
------------------------------
Units are the decoder layers (accelerate's ``TRANSFORMER_BASED_WRAP`` on ``_no_split_modules``; FSDP1
also gives each LoRA module a unit of its own) and the root (embedding, final norm, head). The root is
never resharded between forward and backward (FSDP2 ``fully_shard``: "the root FSDP state has its value
specially set to False"; FSDP1 ``_post_forward_reshard`` frees only non-root handles), so the embedding
and the head are whole on every GPU for the whole step. With ``reshard_after_forward`` (FULL_SHARD) at most
two layer units are unsharded at once: the one computing and the one prefetched (FSDP2's implicit
prefetch, FSDP1's ``BACKWARD_PRE``). Without it (SHARD_GRAD_OP) every layer stays unsharded from its
forward to its backward: the whole base, gathered.

Fixed costs (``overhead_bytes``): constants, not measured on this project's GPUs yet
------------------------------------------------------------------------------------
* ``CUDA_CONTEXT_GIB``: the CUDA context, cuBLAS/cuDNN handles and workspaces of one process, outside
  the caching allocator (``nvidia-smi`` minus ``torch.cuda.memory_reserved``): 0.3-0.6 GiB in public
  reports for torch 2.x on V100-H100; 0.5 taken.
* ``COMMUNICATOR_GIB``: NCCL's buffers and streams for the process group(s) of a multi-GPU run
  (``NCCL_BUFFSIZE`` 4 MiB per channel and peer, plus DeepSpeed's / FSDP's own groups): 0.5 taken.
* ``FRAGMENTATION``: the caching allocator reserves more than the peak it hands out (blocks split for
  different sizes); 10% of the allocated peak is reserved on top.

``bench/plan_vs_measured.py`` measures the allocated peak of real steps against the plan on a GPU and
``train()`` records every run's measured peaks next to its plan (``run.json``), which is how these
constants get replaced by measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import LINEAR_NAMES, ModelSpec

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5
COMMUNICATOR_GIB = 0.5
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class ZeroSettings:
    """The ZeRO-3 settings that decide what is gathered (``None``: accelerate's ``auto`` from ``hidden``)."""

    max_live_parameters: int = 10**9
    """``stage3_max_live_parameters``: prefetching stops when this many elements are gathered."""
    max_reuse_distance: int = 10**9
    """``stage3_max_reuse_distance``: keep a parameter gathered if it is used again within this many elements."""
    prefetch_bucket_size: int | None = None
    """``stage3_prefetch_bucket_size`` (auto: ``int(0.9 * h * h)``)."""
    param_persistence_threshold: int | None = None
    """``stage3_param_persistence_threshold`` (auto: ``10 * h``): smaller parameters stay gathered."""
    reduce_bucket_size: int | None = None
    """``reduce_bucket_size`` (auto: ``h * h``): the gradient bucket, in elements."""
    contiguous_gradients: bool = True
    """``contiguous_gradients``: the reduce bucket is allocated once, up front."""

    @classmethod
    def from_ds_config(cls, ds_config: dict | None) -> "ZeroSettings":
        """Read from a DeepSpeed JSON (DeepSpeed's defaults for absent keys, ``None`` for ``"auto"``)."""
        zero = (ds_config or {}).get("zero_optimization", {}) or {}

        def number(key: str, default):
            value = zero.get(key, default)
            return None if value == "auto" else (int(float(value)) if value is not None else None)

        return cls(
            max_live_parameters=number("stage3_max_live_parameters", 10**9),
            max_reuse_distance=number("stage3_max_reuse_distance", 10**9),
            prefetch_bucket_size=number("stage3_prefetch_bucket_size", 50_000_000),
            param_persistence_threshold=number("stage3_param_persistence_threshold", 100_000),
            reduce_bucket_size=number("reduce_bucket_size", 500_000_000),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
        )

    def resolved(self, hidden: int) -> "ZeroSettings":
        """``auto`` entries filled as accelerate fills them (``Accelerator._prepare_deepspeed``)."""
        return ZeroSettings(
            10**9 if self.max_live_parameters is None else self.max_live_parameters,  # "auto": accelerate leaves
            10**9 if self.max_reuse_distance is None else self.max_reuse_distance,    # it to DeepSpeed's default
            int(0.9 * hidden * hidden) if self.prefetch_bucket_size is None else self.prefetch_bucket_size,
            10 * hidden if self.param_persistence_threshold is None else self.param_persistence_threshold,
            hidden * hidden if self.reduce_bucket_size is None else self.reduce_bucket_size,
            self.contiguous_gradients,
        )


def _stored_elements(n: int, quant: str, storage_bytes: int) -> int:
    """Elements (of the stored dtype) of a weight of ``n`` values: NF4 packs two per byte."""
    return (n + 1) // (2 * storage_bytes) if quant == "nf4" else n


def _lora_elements(spec: ModelSpec, proj: str, lora_rank: int, lora_targets) -> int:
    i, o = spec.linear_shapes()[proj]
    return lora_rank * (i + o) if proj in lora_targets else 0


def module_trace(spec: ModelSpec, checkpointing: bool, quant: str = "none", storage_bytes: int = 2,
                 lora_rank: int = 16, lora_targets=LINEAR_NAMES, persistence_threshold: int = 0) -> list[tuple[str, int]]:
    """ZeRO-3's module order for one training step: ``[(module, gathered elements), ...]``.

    Forward: embedding, each layer's projections (LoRA weights with their projection; parameters below the
    persistence threshold are left out: they never move), the head. Backward: the head, then per layer in
    reverse, the layer's forward again when checkpointed, then its projections in reverse; the embedding
    last when checkpointing (its output then requires grad). A tied head is the embedding's parameter."""
    def elements(n: int) -> int:
        return n if n >= persistence_threshold else 0

    layer = [(proj, elements(_stored_elements(i * o, quant, storage_bytes))
              + sum(elements(lora_rank * d) for d in (i, o) if proj in lora_targets))
             for proj, (i, o) in spec.linear_shapes().items()]
    embed = ("embed_tokens", elements(spec.embedding_params))
    head = embed if spec.tie_word_embeddings else ("lm_head", elements(spec.vocab_size * spec.hidden_size))
    trace = [embed]
    for k in range(spec.num_layers):
        trace += [(f"{k}.{p}", n) for p, n in layer]
    trace += [head, head]  # forward, then its backward at once
    for k in reversed(range(spec.num_layers)):
        if checkpointing:
            trace += [(f"{k}.{p}", n) for p, n in layer]
        trace += [(f"{k}.{p}", n) for p, n in reversed(layer)]
    if checkpointing:
        trace.append(embed)
    return trace


def zero3_peak_gathered_elements(trace: list[tuple[str, int]], zero: ZeroSettings) -> int:
    """Largest number of gathered (non-persistent) elements at any point of ``trace``.

    Replayed with DeepSpeed's release rule: a module's parameters are gathered at their use and kept only
    if the trace reaches their next use before walking ``max_reuse_distance`` elements. With a prefetch
    bucket, at least ``min(every element, max_live_parameters + the largest module)`` (module docstring)."""
    next_use: dict[int, int | None] = {}
    last_seen: dict[str, int] = {}
    for pos in range(len(trace) - 1, -1, -1):
        name = trace[pos][0]
        next_use[pos] = last_seen.get(name)
        last_seen[name] = pos
    live: dict[str, int] = {}
    peak = 0
    for pos, (name, n) in enumerate(trace):
        live[name] = n
        peak = max(peak, sum(live.values()))
        nxt, walked = next_use[pos], 0
        keep = False
        if nxt is not None:
            for later in range(pos + 1, nxt + 1):  # the walk starts after this module's own use
                if walked >= zero.max_reuse_distance:
                    break
                if later == nxt:
                    keep = True
                    break
                walked += trace[later][1]
        if not keep:
            live.pop(name)
    if zero.prefetch_bucket_size:
        sizes = dict(trace)  # one entry per module
        peak = max(peak, min(sum(sizes.values()), zero.max_live_parameters + max(sizes.values())))
    return peak


def persistent_bytes(spec: ModelSpec, compute_bytes: int, threshold: int, lora_rank: int = 16,
                     lora_targets=LINEAR_NAMES) -> int:
    """Bytes of the parameters ZeRO-3 never partitions (``ds_numel`` below the threshold): norms, biases,
    small LoRA matrices (fp32), whole on every rank."""
    h = spec.hidden_size
    small = [h, h] + ([spec.head_dim] * 2 if spec.has_qk_norm else [])
    if spec.has_qkv_bias:
        small += [spec.q_dim, spec.kv_dim, spec.kv_dim]
    if spec.has_o_bias:
        small += [h]
    if spec.has_mlp_bias:
        small += [spec.intermediate_size, spec.intermediate_size, h]
    total = sum(n for n in small if n < threshold) * compute_bytes * spec.num_layers
    total += (h * compute_bytes if h < threshold else 0)  # final norm
    for proj, (i, o) in spec.linear_shapes().items():
        if proj in lora_targets:
            total += sum(4 * lora_rank * d for d in (i, o) if lora_rank * d < threshold) * spec.num_layers
    return total


def zero3_gathered_bytes(spec: ModelSpec, zero: ZeroSettings, *, compute_bytes: int, quant: str, checkpointing: bool,
                         lora_rank: int = 16, lora_targets=LINEAR_NAMES) -> dict[str, int]:
    """ZeRO-3's borrowed memory on one GPU: ``{"gathered": ..., "persistent": ..., "reduce_bucket": ...}``."""
    z = zero.resolved(spec.hidden_size)
    trace = module_trace(spec, checkpointing, quant, compute_bytes, lora_rank, lora_targets,
                         z.param_persistence_threshold)
    # Stored elements are all ``compute_bytes`` wide (bf16/fp16 weights, NF4 packed into the compute dtype);
    # LoRA's fp32 matrices are counted at that width too: they are < 1% of a layer.
    return {
        "gathered": zero3_peak_gathered_elements(trace, z) * compute_bytes,
        "persistent": persistent_bytes(spec, compute_bytes, z.param_persistence_threshold, lora_rank, lora_targets),
        "reduce_bucket": 4 * z.reduce_bucket_size if z.contiguous_gradients else 0,
    }


def fsdp_gathered_bytes(spec: ModelSpec, *, compute_bytes: int, quant: str, reshard_after_forward: bool = True,
                        lora_rank: int = 16, lora_targets=LINEAR_NAMES) -> dict[str, int]:
    """FSDP's unsharded units on one GPU: ``{"root": embedding + norm + head, "layers": units in flight}``."""
    from .states import base_tensors

    tensors = base_tensors(spec, compute_bytes, quant)
    root = sum(t.nbytes for t in tensors if t.shardable and not t.name.startswith("layers."))
    layer = sum(t.nbytes for t in tensors if t.shardable and t.name.startswith("layers.0."))
    layer += 4 * sum(_lora_elements(spec, p, lora_rank, lora_targets) for p in spec.linear_shapes())
    in_flight = 2 if reshard_after_forward else spec.num_layers
    return {"root": root, "layers": min(in_flight, spec.num_layers) * layer}


def overhead_bytes(world_size: int, allocated_peak: int) -> dict[str, int]:
    """Memory outside the tensors: CUDA context, communicators (when ``world_size > 1``), allocator slack."""
    return {
        "cuda_context": int(CUDA_CONTEXT_GIB * GIB),
        "communicators": int(COMMUNICATOR_GIB * GIB) if world_size > 1 else 0,
        "fragmentation": int(FRAGMENTATION * allocated_peak),
    }


__all__ = ["ZeroSettings", "module_trace", "zero3_peak_gathered_elements", "persistent_bytes",
           "zero3_gathered_bytes", "fsdp_gathered_bytes", "overhead_bytes", "CUDA_CONTEXT_GIB",
           "COMMUNICATOR_GIB", "FRAGMENTATION"]
