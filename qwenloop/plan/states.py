"""Model-state memory per GPU and per node (bytes): the frozen base, the LoRA adapter's trainable state.

Pure arithmetic on a ``ModelSpec`` (no torch): what each rank holds besides activations, between steps
and (``at_step``) at the optimizer step.
Every rule below was read from the library that allocates the bytes (versions of the qwenloop image:
bitsandbytes 0.50, DeepSpeed 0.19, torch 2.13) and is checked by ``tests/test_plan_states.py``.

Frozen base (``base_tensors`` / ``base_bytes_per_rank``)
-------------------------------------------------------
The base is the model's parameters, one tensor per ``model.parameters()`` entry (a tied head once):

* ``quant="none"``: every tensor ``numel * c`` bytes, ``c`` = 2 (bf16 / fp16) or 4 (fp32).
* ``quant="nf4"`` (bitsandbytes ``Linear4bit``, as ``qwenloop.model`` loads it): every decoder-layer
  projection weight of ``n = in*out`` values becomes a ``Params4bit`` of two 4-bit codes per byte packed
  into the ``bnb_4bit_quant_storage`` dtype (``s`` bytes, = compute dtype in qwenloop):
  ``(n + 1) // (2*s)`` elements of ``s`` bytes, i.e. ``n/2`` bytes (bitsandbytes ``_ops.py``, fake
  ``quantize_4bit``). Biases, norms, the embedding and ``lm_head`` stay unquantized in the compute dtype.
  Beside the parameter, each weight has a ``QuantState`` (``weight.quant_state``), tensors that are *not*
  parameters but sit on the same device (``quant_state_bytes``), blocksize ``B = 64``, ``b = ceil(n/64)``:

  - without double quant: ``absmax`` fp32 ``4*b`` + the NF4 code (``quant_map``) 16 fp32 = 64;
  - with double quant (``functional.quantize_4bit(compress_statistics=True)``): ``absmax`` becomes uint8
    ``b`` bytes (``quantize_blockwise`` of ``absmax - offset`` with blocksize 256), ``offset`` fp32 scalar 4,
    ``state2.absmax`` fp32 ``4*ceil(b/256)``, ``state2.code`` the 256-entry fp32 dynamic map 1024 (a copy of
    its own per weight: measured, no storage is shared), plus the NF4 ``quant_map`` 64. A checkpoint
    (``QuantState.as_dict``) stores 4 bytes less per weight: ``offset`` goes as a Python float.

  So ~``n * (0.5 + 1/64 + 4/16384) + 1092`` bytes a weight with double quant (0.5157 B/param),
  ``n * (0.5 + 4/64) + 64`` without (0.5625). ``model.parameters()`` sees only the packed ``n/2``; the
  planner needs both (the GPU holds both), so ``base_tensors`` lists the quant-state bytes as separate,
  never-sharded tensors.
* ``quant="int8"`` (``Linear8bitLt``): ``Int8Params`` of ``n`` int8 bytes plus ``SCB``, one fp32 scale per
  output row (``4*out``), not a parameter either.

Per backend (``base_bytes_per_rank``), ``W`` ranks:

* ``single`` / ``ddp``: the whole base on every rank.
* ``zero3``: ``zero.Init`` partitions every parameter separately: ``ds_numel`` padded up to a multiple of
  ``W`` (``partition_parameters.py``, ``_padding_size``: ``W - n % W`` if ``n % W`` else 0), each rank
  keeping ``ceil(n / W)`` elements (``ds_tensor``). Padding <= ``W - 1`` elements per tensor.
* ``fsdp2``: ``fully_shard`` splits each parameter on dim 0 (``torch.chunk``) and pads every shard to
  ``ceil(d0 / W)`` rows (``_fsdp_param.py``: the padded ``_sharded_param_data``): ``ceil(d0/W) * n/d0``
  elements a rank (what ``to_local()`` reports is the unpadded chunk, at most this).
* ``fsdp1``: one ``FlatParameter`` per wrapped unit, padded to a multiple of ``W``: per rank
  ``ceil(N_unit / W)``; planned as ``ceil(sum(n) / W)`` (one unit: the padding of several units is
  ``< W`` elements each, negligible).

Quant-state tensors are not parameters: no backend shards them, every rank holds all of them.

LoRA trainable state (``lora_state_bytes``)
--------------------------------------------
qwenloop keeps LoRA weights in fp32 (``w = 4``), trains them with ``torch.optim.AdamW``. Per trainable
parameter ``P``:

* ``single``: weight 4 + gradient 4 + ``exp_avg`` 4 + ``exp_avg_sq`` 4 = ``16*P``.
* ``ddp`` (``W > 1``): the same, plus DDP's gradient buckets, ``4*P``: qwenloop leaves
  ``gradient_as_bucket_view=False`` (torch's default), so the ``Reducer`` allocates flat bucket tensors
  beside ``.grad`` (``torch/csrc/distributed/c10d/reducer.cpp``, ``initialize_buckets``): ``20*P``.
  (Not measured here: it needs a 2-rank process group.)
* ``fsdp1`` / ``fsdp2``: the same 16 bytes, sharded: ``16 * ceil(P/W)`` (the sharded fp32 parameter,
  its reduce-scattered gradient and the optimizer state of the shard).
* ``zero3`` (``deepspeed/runtime/zero/stage3.py``; ``part = ceil(P/W)``):

  - the parameter partition in its own dtype, ``w * part`` (``lp_param_buffer``): ``w = 4`` for qwenloop's
    fp32 LoRA, because the engine leaves a zero.Init model's parameters in their dtype (``engine.py``,
    ``_cast_module_mixed_precision``, no cast once a parameter has a ``ds_id``); 2 in full bf16 training;
  - an fp32 master copy, ``4 * part`` (``_create_fp32_partitions`` always clones one, even of fp32);
  - the gradient partitions, ``g * part`` (``grad_partitions_flat_buffer``) in ``gradient_accumulation_dtype``
    = the engine's model dtype (``engine.get_data_types``: bf16 / fp16 under mixed precision, fp32
    without) unless ``data_types.grad_accum_dtype`` says otherwise;
  - Adam's ``exp_avg`` + ``exp_avg_sq``, ``8 * part``;
  - during ``step``, the fp32 gradient of the partition, ``4 * part`` (``_prepare_fp32_grad_for_sub_group``:
    ``flatten(averaged_gradients).to(fp32)``, freed after the sub-group's update; resident on the host
    under ``offload_optimizer``, ``subgroup_gradient_buffer``).

  Resident between steps: ``(w + 4 + g + 8) * part`` = 18 B for fp32 LoRA under bf16; peak at the step
  ``+ 4 * part`` (22 B). Transient at engine init only: ``initialize_optimizer_states`` allocates an fp32
  ``gradient_buffer`` of the largest sub-group's *unpartitioned* numel (``4 * min(P, sub_group_size)``,
  ``sub_group_size`` 1e9 by default) and drops it (``grad = None``) before training: it never meets
  activations, so it is not a training-time term (``zero3_init_transient_bytes``).
  ``offload_optimizer`` puts the optimizer's device on the host (``self.device = cpu``): master, gradient
  partitions, fp32 gradient and moments live in (pinned) host RAM; ``offload_param`` moves the parameter
  partition (and the frozen base's partitions) too. Measured on one rank (``tests/test_plan_states.py``,
  ``test_zero3_trainable_buffers_of_a_real_engine``). Host RAM is per node: ranks per node times this.

Why LoRA differs from DeepSpeed's estimator (``zero3_full_training_bytes``): the estimator assumes every
parameter is trained (a flat 18 B/param; the terms above give 2 + 4 + 2 + 8 = 16 resident and 20 at
the step for bf16 weights). Under LoRA the frozen base has no gradient, no optimizer state and no fp32
master: it costs its stored bytes only (2 B/param in bf16, ~0.52 in NF4), and only the adapter's ``P``
(well under 1% of the base) pays the optimizer terms above.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UserError
from .shapes import ModelSpec

BACKENDS = ("single", "ddp", "zero3", "fsdp1", "fsdp2")
QUANTS = ("none", "nf4", "int8")
NF4_BLOCKSIZE = 64
"""bitsandbytes' default 4-bit blocksize (``Params4bit.blocksize``; ``quantize_4bit(blocksize=None)`` -> 64)."""
NESTED_BLOCKSIZE = 256
"""Blocksize of the double quantization of the absmax (``quantize_blockwise(..., blocksize=256)``)."""
NF4_CODE_BYTES = 16 * 4
"""The NF4 ``quant_map``: 16 fp32 values, one tensor per weight."""
DYNAMIC_CODE_BYTES = 256 * 4
"""``state2.code``: the 256-entry fp32 dynamic map of the nested quantization (one copy per weight)."""


@dataclass(frozen=True)
class BaseTensor:
    """One tensor the frozen base keeps on a GPU: ``numel`` elements of ``itemsize`` bytes, ``dim0`` rows.

    ``shardable``: a parameter (ZeRO-3 / FSDP shard it); quant-state tensors are not.
    """

    name: str
    numel: int
    dim0: int
    itemsize: int
    shardable: bool = True

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize


def _check(backend: str, quant: str, world_size: int) -> None:
    if backend not in BACKENDS:
        raise UserError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if quant not in QUANTS:
        raise UserError(f"unknown quantization {quant!r}; choose from {', '.join(QUANTS)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise UserError(f"world size must be a positive integer, got {world_size!r}")


def nf4_packed_elements(n: int, storage_bytes: int) -> int:
    """Elements of the packed 4-bit weight of ``n`` values in a ``storage_bytes`` dtype: ``(n + 1) // (2*s)``.

    Source: bitsandbytes ``_ops.py``, the fake ``quantize_4bit`` (``out`` of shape ``((n+1)//(itemsize*2), 1)``).
    """
    return (n + 1) // (2 * storage_bytes)


def nf4_quant_state_bytes(n: int, double_quant: bool = True) -> int:
    """Bytes of one ``Linear4bit`` weight's ``QuantState`` (not parameters), blocksize 64.

    ``b = ceil(n/64)``; double quant: ``b`` (uint8 absmax) + 4 (offset) + ``4*ceil(b/256)`` (state2 absmax)
    + 64 (NF4 quant_map) + 1024 (state2.code). Without double quant: ``4*b + 64``. These are the resident
    bytes (unique storages on the device); ``QuantState.as_dict`` serializes 4 fewer (offset as a float).
    """
    b = -(-n // NF4_BLOCKSIZE)
    if not double_quant:
        return 4 * b + NF4_CODE_BYTES
    nested = 4 * -(-b // NESTED_BLOCKSIZE)
    return b + 4 + nested + NF4_CODE_BYTES + DYNAMIC_CODE_BYTES


def base_tensors(spec: ModelSpec, compute_bytes: int = 2, quant: str = "none", *, storage_bytes: int | None = None,
                 double_quant: bool = True) -> list[BaseTensor]:
    """Every tensor of the frozen base, as transformers builds it (and bitsandbytes replaces the linears).

    ``compute_bytes``: 2 (bf16/fp16) or 4 (fp32), the dtype of every unquantized tensor. ``storage_bytes``:
    ``bnb_4bit_quant_storage``'s size (qwenloop: the compute dtype, the default here). Quant-state tensors
    come as ``shardable=False`` entries, one per quantized weight.
    """
    _check("single", quant, 1)
    c = compute_bytes
    s = storage_bytes or c
    h, L = spec.hidden_size, spec.num_layers
    out: list[BaseTensor] = [BaseTensor("embed_tokens", spec.embedding_params, spec.vocab_size, c)]
    for layer in range(L):
        for proj, (i, o) in spec.linear_shapes().items():
            n, name = i * o, f"layers.{layer}.{proj}"
            if quant == "nf4":
                packed = nf4_packed_elements(n, s)
                out.append(BaseTensor(name, packed, packed, s))
                out.append(BaseTensor(name + ".quant_state", nf4_quant_state_bytes(n, double_quant), 1, 1, False))
            elif quant == "int8":
                out.append(BaseTensor(name, n, o, 1))
                out.append(BaseTensor(name + ".SCB", o, o, 4, False))
            else:
                out.append(BaseTensor(name, n, o, c))
        if spec.has_qkv_bias:
            out += [BaseTensor(f"layers.{layer}.{p}.bias", d, d, c)
                    for p, d in (("q_proj", spec.q_dim), ("k_proj", spec.kv_dim), ("v_proj", spec.kv_dim))]
        if spec.has_o_bias:
            out.append(BaseTensor(f"layers.{layer}.o_proj.bias", h, h, c))
        if spec.has_mlp_bias:
            i = spec.intermediate_size
            out += [BaseTensor(f"layers.{layer}.{p}.bias", d, d, c)
                    for p, d in (("gate_proj", i), ("up_proj", i), ("down_proj", h))]
        out += [BaseTensor(f"layers.{layer}.{p}", h, h, c) for p in ("input_layernorm", "post_attention_layernorm")]
        if spec.has_qk_norm:
            out += [BaseTensor(f"layers.{layer}.{p}", spec.head_dim, spec.head_dim, c) for p in ("q_norm", "k_norm")]
    out.append(BaseTensor("norm", h, h, c))
    if spec.lm_head_params:
        out.append(BaseTensor("lm_head", spec.lm_head_params, spec.vocab_size, c))
    return out


def base_param_bytes(spec: ModelSpec, compute_bytes: int = 2, quant: str = "none", **kw) -> int:
    """Bytes of the base's *parameters* (what ``sum(p.numel() * p.element_size())`` reports), whole model."""
    return sum(t.nbytes for t in base_tensors(spec, compute_bytes, quant, **kw) if t.shardable)


def base_bytes(spec: ModelSpec, compute_bytes: int = 2, quant: str = "none", **kw) -> int:
    """Bytes the whole base occupies on a device: parameters plus quant-state tensors."""
    return sum(t.nbytes for t in base_tensors(spec, compute_bytes, quant, **kw))


def shard_elements(numel: int, dim0: int, backend: str, world_size: int) -> int:
    """Elements one rank keeps of one parameter of ``numel`` elements, ``dim0`` rows (formulas: module doc).

    ``zero3``: ``ceil(n/W)``; ``fsdp2``: ``ceil(d0/W) * n/d0``; ``single`` / ``ddp``: ``n``. (``fsdp1``
    shards the flat concatenation, see ``base_bytes_per_rank``.)
    """
    if backend in ("single", "ddp") or world_size == 1:
        return numel
    if backend == "zero3":
        return -(-numel // world_size)
    if backend == "fsdp2":
        return -(-dim0 // world_size) * (numel // dim0)
    raise UserError(f"shard_elements: backend {backend!r} shards per unit, not per parameter")


def base_bytes_per_rank(spec: ModelSpec, backend: str, world_size: int, compute_bytes: int = 2, quant: str = "none",
                        *, include_quant_state: bool = True, **kw) -> int:
    """Frozen-base bytes each rank holds after loading / wrapping, the padded (allocated) figure.

    ``include_quant_state=False`` gives what ``qwenloop.distributed.local_param_bytes`` measures (parameters
    only); the planner wants ``True`` (the quant state sits on the GPU, unsharded, on every rank).
    """
    _check(backend, quant, world_size)
    tensors = base_tensors(spec, compute_bytes, quant, **kw)
    params = [t for t in tensors if t.shardable]
    extra = sum(t.nbytes for t in tensors if not t.shardable) if include_quant_state else 0
    if backend == "fsdp1" and world_size > 1:
        by_size: dict[int, int] = {}
        for t in params:  # a FlatParameter holds one dtype: a flat buffer per element size
            by_size[t.itemsize] = by_size.get(t.itemsize, 0) + t.numel
        return extra + sum(-(-n // world_size) * size for size, n in by_size.items())
    return extra + sum(shard_elements(t.numel, t.dim0, backend, world_size) * t.itemsize for t in params)


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes of one rank on its GPU and on its host (``host`` per rank; per node: * gpus/node)."""

    gpu: int
    host: int

    def __add__(self, other: "StateBytes") -> "StateBytes":
        return StateBytes(self.gpu + other.gpu, self.host + other.host)


def lora_state_bytes(trainable_params: int, backend: str, world_size: int, *, weight_bytes: int = 4,
                     grad_accum_bytes: int = 2, offload_optimizer: bool = False, offload_param: bool = False,
                     at_step: bool = True) -> StateBytes:
    """Trainable (LoRA) state of one rank: weights, gradients, AdamW moments (and ZeRO-3's buffers).

    ``single``: ``(w + 4 + 8) * P`` (w = 4: 16 B), ``ddp`` on ``W > 1`` ranks ``+ 4 * P`` buckets;
    ``fsdp1`` / ``fsdp2``: ``16 * ceil(P/W)``;
    ``zero3``: ``(w + 4 master + g grad partition + 8 Adam) * ceil(P/W)``, ``+ 4 * ceil(P/W)`` (the step's
    fp32 gradient) when ``at_step`` or under ``offload_optimizer`` (there it is a resident host buffer);
    ``g = grad_accum_bytes``: the compute dtype's size, 4 without mixed precision. ``offload_optimizer``
    moves everything but ``w`` to the host, ``offload_param`` moves ``w`` too. Sources: module docstring.
    Offload is a ZeRO-3 option (refused elsewhere).
    """
    _check(backend, "none", world_size)
    if (offload_optimizer or offload_param) and backend != "zero3":
        raise UserError(f"offload_optimizer / offload_param are DeepSpeed ZeRO-3 options, not {backend}'s")
    P = trainable_params
    if backend in ("single", "ddp"):
        buckets = 4 * P if backend == "ddp" and world_size > 1 else 0
        return StateBytes((weight_bytes + 4 + 8) * P + buckets, 0)
    part = -(-P // world_size)
    if backend in ("fsdp1", "fsdp2"):
        return StateBytes((weight_bytes + 4 + 8) * part, 0)
    t = zero3_trainable_terms(P, world_size, weight_bytes=weight_bytes, grad_accum_bytes=grad_accum_bytes)
    if not (at_step or offload_optimizer):
        t.pop("fp32_grad (step)")
    weight = t.pop("lp_param")
    optim = sum(t.values())
    gpu = (0 if offload_param else weight) + (0 if offload_optimizer else optim)
    host = (weight if offload_param else 0) + (optim if offload_optimizer else 0)
    return StateBytes(gpu, host)


def zero3_trainable_terms(trainable_params: int, world_size: int, *, weight_bytes: int = 4,
                          grad_accum_bytes: int = 2) -> dict[str, int]:
    """The ZeRO-3 optimizer's buffers for ``P`` trainable parameters on one rank, by DeepSpeed's names (bytes).

    All but ``"fp32_grad (step)"`` are resident; that one exists during ``step`` only (unless offloaded).
    """
    part = -(-trainable_params // world_size)
    return {
        "lp_param": weight_bytes * part,
        "fp32_master": 4 * part,
        "grad_partitions": grad_accum_bytes * part,
        "exp_avg+exp_avg_sq": 8 * part,
        "fp32_grad (step)": 4 * part,
    }


def zero3_init_transient_bytes(trainable_params: int, sub_group_size: int = 10**9) -> int:
    """fp32 ``gradient_buffer`` of ``initialize_optimizer_states``: ``4 * min(P, sub_group_size)``, unpartitioned,
    on the optimizer's device (host under ``offload_optimizer``), freed before the first step."""
    return 4 * min(trainable_params, sub_group_size)


def model_state_bytes(spec: ModelSpec, backend: str, world_size: int, *, compute_bytes: int = 2, quant: str = "none",
                      lora_rank: int = 16, lora_targets=None, offload_optimizer: bool = False,
                      offload_param: bool = False, gpus_per_node: int | None = None) -> dict[str, int]:
    """All model-state terms of one rank at the optimizer step, and host RAM per node:
    ``{"base", "lora_gpu", "gpu", "host_per_rank", "host_per_node"}``.

    ``base`` includes the quant state (never sharded). ZeRO-3 ``offload_param`` moves the base's parameter
    partitions to the host too; the quant state, not a parameter, stays on the GPU.
    """
    from .shapes import LINEAR_NAMES

    P = spec.lora_params(lora_rank, LINEAR_NAMES if lora_targets is None else lora_targets)
    base = base_bytes_per_rank(spec, backend, world_size, compute_bytes, quant)
    base_params = base_bytes_per_rank(spec, backend, world_size, compute_bytes, quant, include_quant_state=False)
    lora = lora_state_bytes(P, backend, world_size, grad_accum_bytes=compute_bytes,
                            offload_optimizer=offload_optimizer, offload_param=offload_param)
    base_gpu, base_host = (base - base_params, base_params) if offload_param else (base, 0)
    per_node = gpus_per_node or world_size
    host = lora.host + base_host
    return {"base": base_gpu, "lora_gpu": lora.gpu, "gpu": base_gpu + lora.gpu,
            "host_per_rank": host, "host_per_node": host * per_node}


def zero3_full_training_bytes(total_params: int, largest_layer_params: int, num_gpus_per_node: int = 1,
                              num_nodes: int = 1, cpu_offload: bool = True, cpu_offload_params: bool = True,
                              zero_init: bool = True, additional_buffer_factor: float = 1.5) -> tuple[int, int, int]:
    """``(cpu_bytes_per_node, gpu_bytes_per_gpu, largest_layer_bytes)`` for FULL ZeRO-3 training, 16-bit weights.

    The same model as DeepSpeed's ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs``
    (same arguments, same results): 18 B/param, 2 of them (the 16-bit partition) on the GPU under
    ``cpu_offload`` and none under ``cpu_offload_params``, plus one gathered layer, ``4 * largest_layer``, on
    the GPU. Host RAM is per node (``P / nodes``) times ``additional_buffer_factor``; without ``zero_init``
    every local rank first loads the whole model in fp32 (``4 * P * gpus_per_node``). The buffers DeepSpeed
    0.19 really allocates (``zero3_trainable_terms``) are 2 + 4 + 2 + 8 = 16 B per partitioned parameter
    under bf16, 20 during the step (the fp32 gradient of the partition): the estimator's flat 18 sits between.

    It is not the LoRA answer: under LoRA the base is frozen (no gradient, no optimizer state, no fp32
    master), so the base costs only its stored bytes (``base_bytes_per_rank``) and the optimizer terms
    (``lora_state_bytes``: 18 B per partitioned fp32 LoRA parameter under bf16, 22 at the step) apply to
    the adapter's parameters alone.
    """
    W = num_gpus_per_node * num_nodes
    layer = 4 * largest_layer_params
    per_param = 18  # DeepSpeed's constant: 2 (16-bit weight) + 16 (fp32 master, gradient, two moments)
    host_states = per_param if cpu_offload_params else per_param - 2
    if cpu_offload:
        gpu = layer + (0 if cpu_offload_params else int(2 * total_params / W))
        per_node = host_states / num_nodes
        per_param_host = per_node if zero_init else max(4 * num_gpus_per_node, per_node)
        cpu = total_params * per_param_host * additional_buffer_factor
    else:
        gpu = layer + int(per_param * total_params / W)
        cpu = (largest_layer_params if zero_init else total_params) * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu), int(gpu), layer


def largest_layer_params(spec: ModelSpec) -> int:
    """The largest single module's parameters, DeepSpeed's ``largest_layer_params``: the embedding / head
    ``V*H`` in every Qwen (larger than any decoder layer's linear)."""
    return max(spec.embedding_params, max(i * o for i, o in spec.linear_shapes().values()))


__all__ = [
    "BACKENDS", "QUANTS", "BaseTensor", "StateBytes", "base_tensors", "base_param_bytes", "base_bytes",
    "base_bytes_per_rank", "shard_elements", "nf4_packed_elements", "nf4_quant_state_bytes",
    "lora_state_bytes", "zero3_trainable_terms", "zero3_init_transient_bytes", "model_state_bytes",
    "zero3_full_training_bytes", "largest_layer_params",
]
