"""Everything that differs between single process, DDP, DeepSpeed ZeRO-3 and FSDP, behind one interface.

The loop asks a ``Backend`` for: how to load the base (``from_pretrained`` kwargs), whether a
quantization is possible, how to clip and report the gradient norm, and how to gather the adapter
(and only the adapter) for saving. Which backend runs is decided by the accelerate config file alone.
"""

from __future__ import annotations

import logging
import os
import torch

from .errors import UserError

logger = logging.getLogger(__name__)


def create_accelerator(cfg):
    """The Accelerator, built *before* the model so that ZeRO-3 can load it partitioned (zero.Init).

    Backend, precision and process count come from the accelerate config / launcher environment.
    """
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    kwargs_handlers = []
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Without this, a multi-process CPU launch (tests, demo) gets no gloo group and each rank
        # believes it is alone. (In a plain single process it must not be set: there is no group.)
        kwargs_handlers.append(InitProcessGroupKwargs(backend="gloo"))
    accelerator = Accelerator(
        # Windows of `gradient_accumulation_steps` micro-batches are formed by the loop itself, so the
        # sync point must follow the step counter, not the end of the dataloader.
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=cfg.report_to or None,
        project_config=ProjectConfiguration(project_dir=cfg.output_dir, logging_dir=f"{cfg.output_dir}/runs"),
        kwargs_handlers=kwargs_handlers,
    )
    check_precision_supported(accelerator.mixed_precision, _device_capability())
    return accelerator


def _device_capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def check_precision_supported(mixed_precision: str, capability: tuple[int, int] | None) -> None:
    """bf16 needs compute capability 8.0 (Ampere); ``torch.cuda.is_bf16_supported()`` can say yes on a
    V100 through emulation, which is slow and not what the user meant."""
    if mixed_precision == "bf16" and capability is not None and capability < (8, 0):
        raise UserError(
            f"accelerate config: mixed_precision bf16 asked on a GPU of compute capability "
            f"{capability[0]}.{capability[1]} (bf16 needs 8.0+, e.g. A100); use mixed_precision: fp16 on this GPU"
        )


def backend_for(accelerator) -> "Backend":
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return DeepSpeedBackend(accelerator)
    if kind == DistributedType.FSDP:
        return FSDPBackend(accelerator)
    return Backend(accelerator)


class Backend:
    """Single process and DDP: every rank holds the whole model."""

    name = "ddp"

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.mixed_precision = str(accelerator.mixed_precision)
        self.last_gather_bytes = 0  # bytes of parameters collected by the last adapter gather
        if type(self) is Backend and accelerator.num_processes == 1:
            self.name = "single"

    # --- before loading ---------------------------------------------------------------------
    def configure(self, cfg) -> None:
        """Reconcile the training config with the backend's own config (nothing to do here)."""

    def check_quantization(self, bits: int) -> None:
        """Raise before loading when this backend cannot run the requested quantization."""

    def from_pretrained_kwargs(self, quantized: bool) -> dict:
        if quantized and torch.cuda.is_available():
            # bitsandbytes quantizes while loading onto the device this rank trains on.
            return {"device_map": {"": self.accelerator.local_process_index}}
        return {}

    def before_prepare(self, model) -> None:
        """Last adjustments to the backend's plan for this model, just before ``accelerator.prepare``."""

    # --- during training ---------------------------------------------------------------------
    def clip_grad_norm(self, model, max_norm: float) -> float | None:
        """Clip (when ``max_norm`` > 0) and return the global gradient norm before clipping."""
        # All parameters, not only the trainable ones: accelerate recognises the prepared FSDP model by
        # its full parameter list (and unscales fp16 gradients twice otherwise); frozen ones have no grad.
        norm = self.accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else float("inf"))
        return None if norm is None else float(norm)

    # --- saving ------------------------------------------------------------------------------
    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU copies of the trainable parameters, PEFT-model names. Collective:
        every rank must call it; the result is meaningful on the main process."""
        unwrapped = self.accelerator.unwrap_model(model)
        state = {name: p.detach().to("cpu", copy=True) for name, p in unwrapped.named_parameters() if p.requires_grad}
        self.last_gather_bytes = 0
        return state


class DeepSpeedBackend(Backend):
    name = "deepspeed"

    def __init__(self, accelerator):
        super().__init__(accelerator)
        plugin = accelerator.state.deepspeed_plugin
        self.ds_config = plugin.deepspeed_config
        self.zero_stage = int(self.ds_config.get("zero_optimization", {}).get("stage", 0))
        # With a DeepSpeed JSON the precision lives there ("auto" entries follow the accelerate config).
        for key, name in (("fp16", "fp16"), ("bf16", "bf16")):
            if self.ds_config.get(key, {}).get("enabled") is True:
                self.mixed_precision = name

    def configure(self, cfg) -> None:
        for key, ours in (("gradient_accumulation_steps", cfg.gradient_accumulation_steps), ("gradient_clipping", cfg.max_grad_norm)):
            theirs = self.ds_config.get(key, "auto")
            if theirs == "auto":
                self.ds_config[key] = ours
            elif float(theirs) != float(ours):
                raise UserError(
                    f"DeepSpeed config: {key} is {theirs} but the training config says {ours}; "
                    f"set {key}: \"auto\" in the DeepSpeed JSON so the training config decides"
                )

        offload = self.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload not in (None, "none") and list(cfg.adam_betas) != [0.9, 0.999]:
            # accelerate replaces torch AdamW by DeepSpeedCPUAdam and copies only lr and weight decay.
            raise UserError(
                f"adam_betas: {cfg.adam_betas} would be silently replaced by [0.9, 0.999] under DeepSpeed optimizer "
                f"offload (accelerate builds DeepSpeedCPUAdam from lr and weight_decay only); keep the default betas "
                f"or use a config without offload_optimizer"
            )

    def check_quantization(self, bits: int) -> None:
        if bits == 8 and self.zero_stage == 3:
            raise UserError(
                "quantization.bits: 8-bit base weights do not work under DeepSpeed ZeRO-3 (bitsandbytes int8 "
                "weights cannot be partitioned); use quantization.bits: 4 (QLoRA) or an fp16/bf16 base"
            )

    def from_pretrained_kwargs(self, quantized: bool) -> dict:
        # ZeRO-3 loads through zero.Init by itself (transformers sees the accelerate DeepSpeed config
        # that exists since the Accelerator was built). No device_map: DeepSpeed places parameters.
        return {}

    def clip_grad_norm(self, model, max_norm: float) -> float | None:
        # The engine clips (gradient_clipping, set from max_grad_norm in `configure`) inside its step,
        # which accelerate runs at the accumulation boundary of `backward`; the norm is ready here.
        norm = model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None
        return None if norm is None else float(norm)

    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        unwrapped = self.accelerator.unwrap_model(model)
        trainable = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
        if self.zero_stage != 3:
            return super().adapter_state_dict(model)
        import deepspeed

        params = [p for _, p in trainable]
        # Gather the adapter parameters only, never the frozen base: seconds even for a 72B model.
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            state = {name: p.detach().to("cpu", copy=True) for name, p in trainable}
        self.last_gather_bytes = sum(p.ds_numel * p.element_size() for p in params if hasattr(p, "ds_numel"))
        return state


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, accelerator):
        super().__init__(accelerator)
        self.fsdp_version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)

    def check_quantization(self, bits: int) -> None:
        if bits == 8:
            raise UserError(
                "quantization.bits: 8-bit base weights do not work under FSDP (int8 weights cannot be "
                "sharded); use quantization.bits: 4 (QLoRA) or an fp16/bf16 base"
            )

    def from_pretrained_kwargs(self, quantized: bool) -> dict:
        # cpu-ram-efficient loading (rank 0 reads, others on meta) is accelerate's fsdp config option
        # and is applied by transformers itself when the FSDP env is set.
        return {}

    def before_prepare(self, model) -> None:
        if self.fsdp_version != 1:
            return  # FSDP2 shards per parameter: frozen base and trainable LoRA may share a unit
        from peft.utils.other import fsdp_auto_wrap_policy

        # FSDP1 flattens each unit into one FlatParameter of one dtype and one requires_grad, and
        # accelerate upcasts trainable flat parameters to fp32. LoRA layers get units of their own so
        # that only they are upcast: the (possibly 4-bit) base stays as loaded. Decoder layers are the
        # other units (the model's _no_split_modules).
        self.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)

    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        return gather_fsdp_adapter(model, self)


def local_param_bytes(model, frozen_only: bool = False) -> int:
    """Bytes of parameters this process holds: a ZeRO-3 partitioned parameter counts its local
    partition (``ds_tensor``), not its full size; an FSDP2 DTensor its local shard."""
    total = 0
    for p in model.parameters():
        if frozen_only and p.requires_grad:
            continue
        local = getattr(p, "ds_tensor", None)
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total


def gather_fsdp_adapter(model, backend=None) -> dict[str, torch.Tensor]:
    """Full CPU tensors of the trainable parameters of an FSDP-wrapped model.

    FSDP2 parameters are DTensors: ``full_tensor()`` all-gathers one parameter, so only the adapter
    crosses the wire. FSDP1 summons whole units, so only the units holding trainable parameters.
    Collective: all ranks call this in the same order.
    """
    from torch.distributed.tensor import DTensor

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [strip_wrapper_prefixes(n) for n, _ in named]
    if any(isinstance(p, DTensor) for _, p in named):
        state, gathered = {}, 0
        for name, (_, p) in zip(names, named):
            full = p.full_tensor() if isinstance(p, DTensor) else p
            gathered += full.numel() * full.element_size()
            state[name] = full.detach().to("cpu", copy=True)
        if backend is not None:
            backend.last_gather_bytes = gathered
        return state
    return _gather_fsdp1_trainable_units(model, backend)


def _gather_fsdp1_trainable_units(model, backend=None) -> dict[str, torch.Tensor]:
    """FSDP1: summon, one unit at a time, only the units whose FlatParameter is trainable (the LoRA
    layers, which ``FSDPBackend.before_prepare`` puts in units of their own), never the whole model."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    module_names = {id(m): name for name, m in model.named_modules()}
    state, gathered = {}, 0
    for unit in FSDP.fsdp_modules(model):
        flat = getattr(unit, "_flat_param", None)
        if flat is None or not flat.requires_grad:
            continue
        prefix = module_names[id(unit)]
        with FSDP.summon_full_params(unit, recurse=False, writeback=False):
            for fqn in flat._fqns:
                param = _get_attr(unit.module, fqn)
                if not param.requires_grad:
                    continue
                full = param.detach().to("cpu", copy=True)
                gathered += full.numel() * full.element_size()
                state[strip_wrapper_prefixes(f"{prefix}.{fqn}" if prefix else fqn)] = full
    if backend is not None:
        backend.last_gather_bytes = gathered
    return state


def _get_attr(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def strip_wrapper_prefixes(name: str) -> str:
    """Parameter/module name as in the plain model, without FSDP / checkpoint / compile / DDP wrappers."""
    parts = [p for p in name.split(".") if p not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")]
    if parts and parts[0] == "module":  # DDP
        parts = parts[1:]
    return ".".join(parts)
