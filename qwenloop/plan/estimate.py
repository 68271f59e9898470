"""One plan: every memory term of one GPU and one node, the verdict, and the estimated time.

``PlanRequest`` is the whole question (typed, one docstring per field); ``estimate(request)`` answers it
with a ``Plan``. ``qwenloop.plan.advice`` turns a plan that does not fit into ranked changes and finds the
largest micro-batch / sequence that fits; ``qwenloop.plan.run`` builds a request from the files a run is
launched with. Every term's formula and source: ``docs/memory-model.md``.

When the peak happens. Two moments compete and the plan takes the larger:

* **backward** of the first checkpointed layer (the last one): base shard + LoRA weights, gradients
  and moments + what the backend has gathered + every saved activation + that layer's recompute
  working set and the gradient flowing between layers (``2*T*h*c``) + for a 4/8-bit base one dequantized
  weight; or, at the end of the forward, the saved activations + the loss head's transient chunk;
* **optimizer step**: the states at the step (ZeRO-3's fp32 gradient of the partition) + the persistent
  and bucket buffers; activations are gone by then.

``peak_allocated`` is what ``torch.cuda.max_memory_allocated`` should report; ``required`` adds what the
allocator and the process hold outside tensors (``buffers.overhead_bytes``) and is compared with the GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import UserError
from . import activations, buffers, states, timing
from .gpus import GPUSpec
from .shapes import LINEAR_NAMES, ModelSpec

GIB = 2**30
METHODS = {"lora": "none", "qlora": "nf4", "lora-8bit": "int8"}


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on. Defaults are qwenloop's training-config defaults."""

    model: ModelSpec
    """The decoder's shapes (``shapes.resolve_model``: a preset, a config.json or a model directory)."""
    gpu: GPUSpec
    """One accelerator (``gpus.resolve_gpu`` / ``gpus.custom_gpu``)."""
    backend: str = "single"
    """``single``, ``ddp``, ``zero3``, ``fsdp1`` or ``fsdp2``."""
    gpus_per_node: int = 1
    """Processes (one per GPU) on each machine."""
    nodes: int = 1
    """Machines."""
    precision: str = "bf16"
    """accelerate's ``mixed_precision``: ``bf16``, ``fp16`` or ``no`` (fp32). The frozen base is stored in it."""
    quant: str = "none"
    """Frozen base: ``none`` (16-bit, or fp32 under ``no``), ``nf4`` (QLoRA, double quant) or ``int8``."""
    lora_rank: int = 16
    """LoRA rank ``r``."""
    lora_targets: tuple[str, ...] = LINEAR_NAMES
    """Adapted projections (``lm_head`` allowed)."""
    lora_dropout: float = 0.05
    """LoRA dropout (> 0 saves a mask per adapted input)."""
    seq_len: int = 2048
    """Tokens per row (the longest row; padding and packing fill up to it)."""
    micro_batch: int = 1
    """Rows per forward pass on each GPU."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each GPU."""
    checkpointing: bool = True
    """Non-reentrant gradient checkpointing of every decoder layer."""
    target_head: bool = True
    """The chunked, targets-only LM head + loss (``lm_head_targets_only``); False: full logits."""
    attn: str = "sdpa"
    """``sdpa`` (memory-efficient / flash kernels) or ``eager`` (materializes ``[b, heads, s, s]``)."""
    packing: bool = False
    """Packed rows: no padding mask reaches attention (with ``micro_batch > 1`` a padded batch has one)."""
    offload_optimizer: bool = False
    """ZeRO-3 ``offload_optimizer`` (or FSDP ``offload_params``, which offloads both)."""
    offload_param: bool = False
    """ZeRO-3 ``offload_param`` / FSDP ``offload_params``: the base's shard lives in host RAM."""
    zero: buffers.ZeroSettings = field(default_factory=buffers.ZeroSettings)
    """ZeRO-3 gathering settings from the DeepSpeed JSON."""
    reshard_after_forward: bool = True
    """FSDP ``reshard_after_forward`` (FULL_SHARD); False keeps every layer gathered until its backward."""
    zero3_init: bool = True
    """ZeRO-3 loads under ``zero.Init`` (``zero3_init_flag``): no rank ever holds the whole model."""
    cpu_ram_efficient_loading: bool = True
    """FSDP ``cpu_ram_efficient_loading``: only the first rank of each machine reads the weights."""
    host_ram_gib: float | None = None
    """Host RAM per node, to check offload and loading against (None: not checked)."""
    mfu: float | None = None
    """Achievable model-FLOPs utilization for the time estimate (None: ``timing.DEFAULT_HFU`` of the hardware FLOPs); a run's
    measured ``mfu`` (``run.json``) is the best value."""
    dataset_tokens: int | None = None
    """Tokens in one epoch of the training data (padding excluded), for the time per epoch."""
    target_fraction: float = 1.0
    """Share of tokens that are loss targets (the head works on those only)."""

    def __post_init__(self) -> None:
        checks = {
            "backend": (self.backend in states.BACKENDS, f"one of {', '.join(states.BACKENDS)}"),
            "precision": (self.precision in ("bf16", "fp16", "no"), "bf16, fp16 or no"),
            "quant": (self.quant in states.QUANTS, f"one of {', '.join(states.QUANTS)}"),
            "attn": (self.attn in ("sdpa", "eager"), "sdpa or eager (flash / flex: plan as sdpa)"),
        }
        for name in ("gpus_per_node", "nodes", "lora_rank", "seq_len", "micro_batch", "grad_accum"):
            value = getattr(self, name)
            checks[name] = (isinstance(value, int) and not isinstance(value, bool) and value >= 1, "a positive integer")
        checks["target_fraction"] = (0 < self.target_fraction <= 1, "in (0, 1]")
        checks["mfu"] = (self.mfu is None or 0 < self.mfu <= 1, "in (0, 1]")
        for name, (ok, what) in checks.items():
            if not ok:
                raise UserError(f"plan: {name} must be {what}, got {getattr(self, name)!r}")
        if (self.offload_optimizer or self.offload_param) and self.backend not in ("zero3", "fsdp1", "fsdp2"):
            raise UserError(f"plan: offload needs ZeRO-3 or FSDP, not {self.backend}")
        if self.backend in ("zero3", "fsdp1", "fsdp2") and self.quant == "int8":
            raise UserError(f"plan: 8-bit bases cannot be sharded by {self.backend}; use qlora (4-bit) or a 16-bit base")
        if self.precision == "bf16" and not self.gpu.bf16:
            raise UserError(f"plan: {self.gpu.name} has no bf16; use precision fp16")
        if self.backend == "single" and self.world_size > 1:
            raise UserError("plan: backend single runs one process; use ddp, zero3 or fsdp2 for several GPUs")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def compute_bytes(self) -> int:
        return 4 if self.precision == "no" else 2

    @property
    def fsdp(self) -> bool:
        return self.backend in ("fsdp1", "fsdp2")


@dataclass
class Plan:
    """The answer: per-GPU and per-node bytes by term, the verdict, the time estimate."""

    request: PlanRequest
    gpu_terms: dict[str, int]
    """Allocated bytes at the peak, by term (the larger of the backward and the optimizer-step peak)."""
    peak_moment: str
    """``backward`` or ``optimizer step``: where the peak is."""
    overhead: dict[str, int]
    """CUDA context, communicators, allocator slack: outside ``torch.cuda.max_memory_allocated``."""
    host_terms: dict[str, int]
    """Host RAM per node: offloaded states while training and the loading peak."""
    time: timing.StepTime

    @property
    def peak_allocated(self) -> int:
        return sum(self.gpu_terms.values())

    @property
    def required(self) -> int:
        return self.peak_allocated + sum(self.overhead.values())

    @property
    def spare(self) -> int:
        return self.request.gpu.memory_bytes - self.required

    @property
    def host_required(self) -> int:
        return max(self.host_terms.get("training", 0), self.host_terms.get("loading peak", 0))

    @property
    def host_fits(self) -> bool | None:
        ram = self.request.host_ram_gib
        return None if ram is None else self.host_required <= ram * GIB

    @property
    def fits(self) -> bool:
        return self.spare >= 0 and self.host_fits is not False

    @property
    def verdict(self) -> str:
        r = self.request
        where = f"{r.world_size}x {r.gpu.name}"
        host = ""
        if self.host_fits is False:
            host = f"; host RAM over by {(self.host_required - r.host_ram_gib * GIB) / GIB:.1f} GiB per node"
        if self.spare >= 0:
            gpu = f"fits on {where} with {self.spare / GIB:.1f} GiB to spare per GPU"
        else:
            gpu = f"does not fit on {where}: over by {-self.spare / GIB:.1f} GiB per GPU"
        return f"{r.model.name}: {gpu} ({self.required / GIB:.1f} of {r.gpu.memory_gib:g} GiB){host}"

    def to_dict(self) -> dict:
        r = self.request
        return {
            "model": r.model.name, "gpu": r.gpu.name, "backend": r.backend, "world_size": r.world_size,
            "gpus_per_node": r.gpus_per_node, "nodes": r.nodes, "precision": r.precision, "quant": r.quant,
            "lora_rank": r.lora_rank, "lora_targets": list(r.lora_targets), "seq_len": r.seq_len,
            "micro_batch": r.micro_batch, "grad_accum": r.grad_accum, "checkpointing": r.checkpointing,
            "target_head": r.target_head, "attn": r.attn, "packing": r.packing,
            "offload_optimizer": r.offload_optimizer, "offload_param": r.offload_param,
            "dataset_tokens": r.dataset_tokens, "target_fraction": r.target_fraction,
            "gpu_terms": dict(self.gpu_terms), "peak_moment": self.peak_moment, "overhead": dict(self.overhead),
            "peak_allocated": self.peak_allocated, "required": self.required,
            "gpu_memory": r.gpu.memory_bytes, "spare": self.spare, "fits": self.fits,
            "host_terms": dict(self.host_terms), "host_required_per_node": self.host_required,
            "host_ram_per_node": None if r.host_ram_gib is None else int(r.host_ram_gib * GIB),
            "time": asdict(self.time), "verdict": self.verdict,
        }


def _activation_terms(r: PlanRequest) -> tuple[int, int, int, int]:
    """(saved, backward working set, forward-end transient, dequantized weight) bytes of one micro-batch."""
    c, b, s = r.compute_bytes, r.micro_batch, r.seq_len
    targets = max(1, int(b * s * r.target_fraction))
    kw = dict(lora_targets=tuple(t for t in r.lora_targets if t != "lm_head"), attention_mask=r.micro_batch > 1 and not r.packing,
              device="cuda")
    saved = activations.saved_activations_bytes(
        r.model, b, s, c, r.lora_rank, r.lora_dropout, r.checkpointing, r.attn, targets,
        target_head=r.target_head, first_layer_frozen_input=not r.checkpointing, **kw)
    layer = activations.recompute_working_set_bytes(r.model, b, s, c, r.lora_rank, r.lora_dropout, r.attn, **kw)
    grad_flow = 2 * b * s * r.model.hidden_size * c  # the gradient entering and leaving the layer in backward
    working = (layer if r.checkpointing else 0) + grad_flow
    loss = activations.loss_bytes(r.model, b, s, c, targets, target_head=r.target_head).transient
    dequant = 0
    if r.quant in ("nf4", "int8"):  # one weight dequantized to the compute dtype for its matmul
        dequant = max(i * o for i, o in r.model.linear_shapes().values()) * c
    return saved, working, loss, dequant


def _state_terms(r: PlanRequest, at_step: bool) -> tuple[dict[str, int], int]:
    """GPU model-state terms of one rank, and host bytes per rank (offloaded states)."""
    c, W = r.compute_bytes, r.world_size
    base_backend = "single" if r.backend == "ddp" else r.backend
    base_params = states.base_bytes_per_rank(r.model, base_backend, W, c, r.quant, include_quant_state=False)
    quant_state = states.base_bytes_per_rank(r.model, base_backend, W, c, r.quant) - base_params
    P = r.model.lora_params(r.lora_rank, r.lora_targets)
    if r.fsdp:
        lora = states.lora_state_bytes(P, r.backend, W, grad_accum_bytes=c)
        offloaded = r.offload_param or r.offload_optimizer  # FSDP's CPUOffload moves params, grads and the step
        lora_gpu, lora_host = (0, lora.gpu) if offloaded else (lora.gpu, 0)
        base_gpu, base_host = (0, base_params) if offloaded else (base_params, 0)
    else:
        lora = states.lora_state_bytes(P, r.backend, W, grad_accum_bytes=c, offload_optimizer=r.offload_optimizer,
                                       offload_param=r.offload_param, at_step=at_step)
        lora_gpu, lora_host = lora.gpu, lora.host
        base_gpu, base_host = (0, base_params) if r.offload_param else (base_params, 0)
    terms = {"base shard": base_gpu, "quant state": quant_state, "lora weights+grads+adam": lora_gpu}
    return terms, base_host + lora_host


def _buffer_terms(r: PlanRequest) -> dict[str, int]:
    if r.backend == "zero3":
        z = buffers.zero3_gathered_bytes(r.model, r.zero, compute_bytes=r.compute_bytes, quant=r.quant,
                                         checkpointing=r.checkpointing, lora_rank=r.lora_rank,
                                         lora_targets=r.lora_targets)
        return {"zero3 gathered+prefetch": z["gathered"], "zero3 persistent": z["persistent"],
                "zero3 reduce bucket": z["reduce_bucket"]}
    if r.fsdp:
        f = buffers.fsdp_gathered_bytes(r.model, compute_bytes=r.compute_bytes, quant=r.quant,
                                        reshard_after_forward=r.reshard_after_forward, lora_rank=r.lora_rank,
                                        lora_targets=r.lora_targets)
        return {"fsdp root unit (embed+head)": f["root"], "fsdp layer units in flight": f["layers"]}
    return {}


CHECKPOINT_SHARD_BYTES = 5 * 10**9
"""transformers' default ``max_shard_size`` ("5GB"): the most one rank reads into host memory at a time when
it loads a sharded checkpoint straight into its partition (ZeRO-3 ``zero.Init``) or quantizes it on the fly."""


def _host_terms(r: PlanRequest, host_per_rank: int) -> dict[str, int]:
    """Host RAM per node: offloaded states while training; the loading peak (weights on their way), and for
    ZeRO-3 / FSDP the loading peak with the other setting of ``zero3_init_flag`` / ``cpu_ram_efficient_loading``
    (for comparison: ``host_required`` reads only the first two)."""
    whole = states.base_bytes(r.model, r.compute_bytes, "none")  # what is read from the checkpoint
    g = r.gpus_per_node
    # Under ZeRO-3 offload the partitions land in host RAM while later shards are still being read.
    during_load = host_per_rank * g if r.backend == "zero3" else 0

    def loading(zero3_init: bool, ram_efficient: bool) -> int:
        if (r.backend == "zero3" and zero3_init) or r.quant != "none":
            return g * min(whole, CHECKPOINT_SHARD_BYTES)  # each rank streams shards into its partition / quantizes
        if r.fsdp and ram_efficient:
            return whole  # one reader per machine; the other ranks wait on the meta device
        return g * whole  # every rank materializes the whole model on the host first

    terms = {"training": host_per_rank * g,
             "loading peak": loading(r.zero3_init, r.cpu_ram_efficient_loading) + during_load}
    if r.backend == "zero3":
        terms[f"loading peak with zero3_init_flag {'off' if r.zero3_init else 'on'}"] = \
            loading(not r.zero3_init, r.cpu_ram_efficient_loading) + during_load
    elif r.fsdp:
        terms[f"loading peak with cpu_ram_efficient_loading {'off' if r.cpu_ram_efficient_loading else 'on'}"] = \
            loading(r.zero3_init, not r.cpu_ram_efficient_loading)
    return terms


def estimate(r: PlanRequest) -> Plan:
    """The plan of ``r`` (formulas: module docstring and ``docs/memory-model.md``)."""
    saved, working, loss_transient, dequant = _activation_terms(r)
    states_bwd, host_per_rank = _state_terms(r, at_step=False)
    states_step, _ = _state_terms(r, at_step=True)
    gathered = _buffer_terms(r)
    always = {k: v for k, v in gathered.items() if "persistent" in k or "bucket" in k}
    backward = {**states_bwd, **gathered, "saved activations": saved,
                "backward working set" if working + dequant >= loss_transient else "loss head chunk":
                    max(working + dequant, loss_transient)}
    step = {**states_step, **always}
    moment, terms = ("backward", backward) if sum(backward.values()) >= sum(step.values()) else ("optimizer step", step)
    terms = {k: v for k, v in terms.items() if v}
    overhead = buffers.overhead_bytes(r.world_size, sum(terms.values()))
    return Plan(r, terms, moment, overhead, _host_terms(r, host_per_rank), timing.step_time(r))


def with_changes(r: PlanRequest, **changes) -> PlanRequest:
    """``r`` with some fields replaced (validated again)."""
    return replace(r, **changes)


__all__ = ["PlanRequest", "Plan", "estimate", "with_changes", "METHODS"]
