"""Everything that differs between single process, DDP, DeepSpeed ZeRO-3 and FSDP, behind one interface.

The loop asks a ``Backend`` for: how to load the base (``from_pretrained`` kwargs), how to clip and
report the gradient norm, and how to gather the adapter (and only the adapter) for saving. Which backend
runs is decided by the accelerate config file alone. What a backend refuses (8-bit under ZeRO-3/FSDP,
FSDP1 without ``use_orig_params``, a DeepSpeed JSON that contradicts the training config, ...) is checked
before anything loads by ``qwenloop.checks``, the checks ``qwenloop doctor`` runs too.
"""

from __future__ import annotations

import logging
import os
import torch

from . import storage
from .errors import UserError

logger = logging.getLogger(__name__)


def create_accelerator(cfg):
    """The Accelerator, built *before* the model so that ZeRO-3 can load it partitioned (zero.Init).

    Backend, precision and process count come from the accelerate config / launcher environment.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, GradientAccumulationPlugin, InitProcessGroupKwargs, ProjectConfiguration

    kwargs_handlers = []
    if is_multiprocess_cpu():
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
        # Batches go to the GPU asynchronously from pinned memory (``batching.make_dataloader``): a plain
        # copy from pageable memory would wait for the device's queue to drain at every micro-batch.
        dataloader_config=DataLoaderConfiguration(non_blocking=True),
    )
    return accelerator


def is_multiprocess_cpu() -> bool:
    """Several processes and no GPU: the ranks talk over gloo (tests, CPU demos)."""
    return not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


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
        """Hand the training config's settings to the backend's own config (after ``qwenloop.checks`` has
        found the two consistent; nothing to hand over here)."""

    def load_on_meta(self, quantized: bool) -> bool:
        """Build the model without weights (meta device) on this rank: another rank reads the checkpoint
        and the backend copies its weights over at ``prepare``."""
        return False

    def from_pretrained_kwargs(self, quantized: bool) -> dict:
        if quantized and torch.cuda.is_available():
            # bitsandbytes quantizes while loading onto the device this rank trains on.
            return {"device_map": {"": self.accelerator.local_process_index}}
        return {}

    def before_prepare(self, model) -> None:
        """Last adjustments to the backend's plan for this model, just before ``accelerator.prepare``."""

    # --- during training ---------------------------------------------------------------------
    def clip_grad_norm(self, model, max_norm: float):
        """Clip (when ``max_norm`` > 0) and return the global gradient norm before clipping, as a device
        tensor (reading it back is the caller's one synchronisation of the step).

        A non-finite norm leaves the gradients as they are: the step is skipped anyway, and the
        sentinel can then name the parameters whose gradient is non-finite (clipping by a NaN norm
        would have made every gradient NaN)."""
        self.accelerator.unscale_gradients()  # fp16: the GradScaler's unscale (and inf check); else nothing
        params = [p for p in model.parameters() if p.grad is not None]
        if not params:
            return None
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, torch.where(torch.isfinite(norm), norm, 0.0))
        return norm

    # --- saving ------------------------------------------------------------------------------
    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU copies of the trainable parameters, PEFT-model names. Collective:
        every rank must call it; the result is meaningful on the main process."""
        unwrapped = self.accelerator.unwrap_model(model)
        state = {name: p.detach().to("cpu", copy=True) for name, p in unwrapped.named_parameters() if p.requires_grad}
        self.last_gather_bytes = 0
        return state

    # --- resumable training state (checkpoint.py decides when and where; these say how) -------
    def save_optimizer_state(self, model, optimizer, directory: str) -> None:
        """Write the optimizer (and fp16 GradScaler) state into ``directory``. Collective: every rank
        calls it; collectives come first, file writes last (a failing write cannot hang the others).
        DDP/single: every rank holds the same state, the main process writes it."""
        if not self.accelerator.is_main_process:
            return
        storage.save_torch(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
        if self.accelerator.scaler is not None:
            storage.save_torch(self.accelerator.scaler.state_dict(), os.path.join(directory, "scaler.pt"))

    def load_optimizer_state(self, model, optimizer, directory: str) -> None:
        """Restore what ``save_optimizer_state`` wrote (files read with ``weights_only=True``)."""
        optimizer.load_state_dict(storage.load_torch(os.path.join(directory, "optimizer.pt")))
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(storage.load_torch(os.path.join(directory, "scaler.pt")))

    def load_adapter_weights(self, model, tensors: dict[str, torch.Tensor]) -> None:
        """Copy full adapter tensors (names as in ``adapter_state_dict``) into the trainable parameters."""
        unwrapped = self.accelerator.unwrap_model(model)
        with torch.no_grad():
            for name, p in unwrapped.named_parameters():
                if p.requires_grad:
                    p.copy_(tensors[storage.strip_wrapper_prefixes(name)].to(device=p.device, dtype=p.dtype))

    def optimizer_step(self, model, optimizer, finite: bool) -> None:
        """Step at the end of an accumulation window, unless every rank agreed the step is non-finite.
        Under fp16 the GradScaler must see every step (it skips a non-finite one itself and lowers the
        scale); ``accelerator.optimizer_step_was_skipped`` then reports the skip."""
        if finite or self.accelerator.scaler is not None:
            optimizer.step()

    def loss_scale(self, model) -> float | None:
        """The current fp16 loss scale, None when no loss scaling runs (bf16 / fp32)."""
        scaler = self.accelerator.scaler
        return float(scaler.get_scale()) if scaler is not None else None

    def nonfinite_grad_names(self, model, limit: int = 5) -> list[str] | None:
        """Names of the first trainable parameters whose (local) gradient is non-finite; None when the
        backend keeps gradients where they cannot be inspected. Cheap when all are finite: one check."""
        unwrapped = self.accelerator.unwrap_model(model)
        named = [(n, p.grad) for n, p in unwrapped.named_parameters() if p.requires_grad and p.grad is not None]
        if not named:
            return []
        grads = [g.to_local() if hasattr(g, "to_local") else g for _, g in named]
        norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
        finite = torch.isfinite(torch.stack(norms)).tolist()
        return [storage.strip_wrapper_prefixes(n) for (n, _), ok in zip(named, finite) if not ok][:limit]


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
        # The training config decides accumulation and clipping: fill the JSON's "auto" entries (the engine
        # clips inside its step). A number that differs was refused by qwenloop.checks before this point.
        for key, ours in (("gradient_accumulation_steps", cfg.gradient_accumulation_steps), ("gradient_clipping", cfg.max_grad_norm)):
            if self.ds_config.get(key, "auto") == "auto":
                self.ds_config[key] = ours

    def from_pretrained_kwargs(self, quantized: bool) -> dict:
        # ZeRO-3 loads through zero.Init by itself (transformers sees the accelerate DeepSpeed config
        # that exists since the Accelerator was built). No device_map: DeepSpeed places parameters.
        return {}

    def clip_grad_norm(self, model, max_norm: float):
        # The engine clips (gradient_clipping, set from max_grad_norm in `configure`) inside its step,
        # which accelerate runs at the accumulation boundary of `backward`; the norm is ready here.
        return model.get_global_grad_norm() if hasattr(model, "get_global_grad_norm") else None

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

    # ZeRO-3 keeps each rank's partition of the fp32 master weights and of Adam's moments in its own
    # optimizer; each rank writes its partition (``zero-rank-NNNNN.pt``), and only the trainable
    # parameters are in it: the frozen base never enters the optimizer, so it is never saved. Not
    # the engine's save_checkpoint: its files are read back with pickle (``weights_only=False``).
    _ZERO_FILE = "zero-rank-{rank:05d}.pt"
    _ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")

    def save_optimizer_state(self, model, optimizer, directory: str) -> None:
        if self.zero_stage != 3:
            return self._save_engine_free_state(model, directory)
        state = dict(model.optimizer.state_dict())
        state["zero_stage"] = int(state["zero_stage"])
        plain = (bool, int, float, str, type(None))  # the loss scaler is an object: kept as its numbers
        state["loss_scaler"] = {k: v for k, v in vars(state["loss_scaler"]).items() if isinstance(v, plain)}
        state["engine"] = {k: int(getattr(model, k, 0)) for k in self._ENGINE_COUNTERS}
        state["world_size"] = self.accelerator.num_processes
        storage.save_torch(state, os.path.join(directory, self._ZERO_FILE.format(rank=self.accelerator.process_index)))

    def load_optimizer_state(self, model, optimizer, directory: str) -> None:
        if self.zero_stage != 3:
            return self._load_engine_free_state(model, directory)
        path = os.path.join(directory, self._ZERO_FILE.format(rank=self.accelerator.process_index))
        if not os.path.isfile(path):
            raise UserError(
                f"resume_from: {directory} holds no ZeRO-3 optimizer partition for rank {self.accelerator.process_index} "
                f"(written with another number of processes?); resume with the world size it was written with"
            )
        state = storage.load_torch(path)
        zero = model.optimizer
        zero.loss_scaler.__dict__.update(state.pop("loss_scaler"))
        state["loss_scaler"] = zero.loss_scaler
        for key, value in state.pop("engine").items():
            setattr(model, key, value)
        # Restores the fp32 master partitions, Adam's moments and the module's (bf16/fp16) partitions.
        zero.load_state_dict([state] * self.accelerator.num_processes, load_optimizer_states=True)

    def _save_engine_free_state(self, model, directory):  # ZeRO-0/1/2: not a layout this project runs
        raise UserError("DeepSpeed config: checkpoints are implemented for ZeRO stage 3 only; use zero_optimization.stage 3")

    _load_engine_free_state = _save_engine_free_state

    def load_adapter_weights(self, model, tensors) -> None:
        if self.zero_stage == 3:
            return  # the fp32 master partitions restored by load_optimizer_state hold the same values
        super().load_adapter_weights(model, tensors)

    def optimizer_step(self, model, optimizer, finite: bool) -> None:
        # The engine stepped inside accelerator.backward; it skips a step whose gradient norm is
        # non-finite (overflow) in every precision. A non-finite step it did *not* skip has already
        # changed the weights: stop rather than train on.
        if not finite and not getattr(model.optimizer, "overflow", False):
            raise RuntimeError(
                "DeepSpeed applied an optimizer step that every rank found non-finite; the weights are no "
                "longer trustworthy: resume from the last checkpoint"
            )

    def loss_scale(self, model) -> float | None:
        if self.mixed_precision != "fp16":
            return None
        return float(getattr(model.optimizer, "loss_scale", getattr(model.optimizer, "cur_scale", 0.0)))

    def nonfinite_grad_names(self, model, limit: int = 5) -> list[str] | None:
        return None  # partitioned inside the engine, and already consumed by its step


class FSDPBackend(Backend):
    name = "fsdp"

    def __init__(self, accelerator):
        super().__init__(accelerator)
        self.fsdp_version = getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1)

    def load_on_meta(self, quantized: bool) -> bool:
        # accelerate's fsdp_cpu_ram_efficient_loading: only the first rank of each machine reads the
        # checkpoint (one copy of a 72B model in host RAM, not eight); at prepare, FSDP2 broadcasts its
        # state dict and FSDP1 syncs module states from it. transformers 5.x no longer does this by
        # itself (every rank read the weights, tests/test_fsdp.py), so qwenloop does. Not for 4-bit
        # weights: accelerate cannot move bitsandbytes parameters through the meta device.
        plugin = self.accelerator.state.fsdp_plugin
        return bool(getattr(plugin, "cpu_ram_efficient_loading", False)) and not quantized and (
            not self.accelerator.is_local_main_process
        )

    def from_pretrained_kwargs(self, quantized: bool) -> dict:
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

    def clip_grad_norm(self, model, max_norm: float):
        # accelerate's FSDP clip: FSDP1's own clip_grad_norm_ (sharded flat gradients), FSDP2's
        # DTensor-aware norm. All parameters, not only the trainable ones: accelerate recognises the
        # prepared model by its full parameter list (and unscales fp16 gradients twice otherwise).
        # A NaN norm spreads NaN to every gradient here, so the sentinel's names are then unreliable.
        return self.accelerator.clip_grad_norm_(list(model.parameters()), max_norm if max_norm > 0 else float("inf"))

    def adapter_state_dict(self, model) -> dict[str, torch.Tensor]:
        return gather_fsdp_adapter(model, self)

    # Adapter-only: the optimizer holds the LoRA parameters only, so its *full* state is small; it is
    # gathered once and written by the main process (``torch.distributed.checkpoint.state_dict``).
    def save_optimizer_state(self, model, optimizer, directory: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)
        # cpu_offload only when training on an accelerator: on a CPU, torch's FSDP1 path then returns
        # views of one gather buffer it reuses for each state (exp_avg came back holding exp_avg_sq).
        offload = torch.device(self.accelerator.device).type != "cpu"
        state = get_optimizer_state_dict(model, inner, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
        if self.accelerator.is_main_process:
            storage.save_torch(state, os.path.join(directory, "optimizer.pt"))
            if self.accelerator.scaler is not None:
                storage.save_torch(self.accelerator.scaler.state_dict(), os.path.join(directory, "scaler.pt"))

    def load_optimizer_state(self, model, optimizer, directory: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        inner = getattr(optimizer, "optimizer", optimizer)
        state = storage.load_torch(os.path.join(directory, "optimizer.pt"))
        set_optimizer_state_dict(model, inner, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
        if self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(storage.load_torch(os.path.join(directory, "scaler.pt")))

    def load_adapter_weights(self, model, tensors) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, dict(tensors), options=StateDictOptions(full_state_dict=True, strict=False))


def local_param_bytes(model, frozen_only: bool = False) -> int:
    """Bytes of parameters this process holds: a ZeRO-3 partitioned parameter counts its local
    partition (``ds_tensor``), not its full size; an FSDP2 DTensor its local shard; a meta tensor 0."""
    total = 0
    for p in model.parameters():
        if frozen_only and p.requires_grad:
            continue
        local = getattr(p, "ds_tensor", None)
        if local is None:
            local = p.to_local() if hasattr(p, "to_local") else p
        if local.is_meta:  # FSDP cpu-ram-efficient loading: ranks > 0 wait on meta for rank 0's weights
            continue
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
    names = [storage.strip_wrapper_prefixes(n) for n, _ in named]
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
                state[storage.strip_wrapper_prefixes(f"{prefix}.{fqn}" if prefix else fqn)] = full
    if backend is not None:
        backend.last_gather_bytes = gathered
    return state


def _get_attr(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module
