"""DeepSpeed: the JSON against the training config, accelerate's "auto" filling, and ZeRO-3 loading.

qwenloop owns the optimizer (AdamW on the LoRA parameters), the schedule, the accumulation and the
clipping; the JSON owns ZeRO, offload and precision. ``DeepSpeedBackend.configure`` fills the JSON's
``gradient_accumulation_steps`` / ``gradient_clipping`` "auto" from the training config once these checks pass.
"""

from __future__ import annotations

from ..errors import UserError
from . import CheckContext, error, warning

# "auto" entries accelerate 1.x fills (``DeepSpeedPlugin.__post_init__``, ``set_mixed_precision``,
# ``Accelerator._prepare_deepspeed``, which ends with ``deepspeed_config_process``: any other "auto" leaf
# raises "`<key>` not found in kwargs" there, after the model has loaded). The optimizer/scheduler keys
# it fills only for DummyOptim / DummyScheduler, which qwenloop does not use.
FILLABLE_AUTO = frozenset({
    "gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu", "train_batch_size",
    "fp16.enabled", "bf16.enabled",
    "zero_optimization.stage", "zero_optimization.offload_optimizer.device", "zero_optimization.offload_param.device",
    "zero_optimization.offload_optimizer.nvme_path", "zero_optimization.offload_param.nvme_path",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
    # from the model's hidden size
    "zero_optimization.reduce_bucket_size", "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
})
DEFAULT_BETAS = [0.9, 0.999]


def _ds(ctx: CheckContext) -> dict | None:
    return ctx.launch.ds_config if ctx.launch is not None else None


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _auto_leaves(node: dict, prefix: str = ""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _auto_leaves(value, f"{prefix}{key}.")
        elif value == "auto":
            yield prefix + key


def check_deepspeed_yaml_fields(ctx: CheckContext):
    """accelerate refuses these deepspeed_config fields next to a deepspeed_config_file ("will be ignored")."""
    launch = ctx.launch
    if launch is None or not launch.yaml_ds_fields:
        return
    fields = ", ".join(f"deepspeed_config.{k}" for k in launch.yaml_ds_fields)
    yield error(f"{launch.source}: {fields} next to deepspeed_config_file {launch.ds_config_file}: accelerate refuses "
                f"both; remove them from the YAML and set them in the JSON (gradient_accumulation_steps and "
                f"gradient_clipping: \"auto\", the training config decides)")


def check_deepspeed_optimizer_scheduler(ctx: CheckContext):
    """The loop builds AdamW on the LoRA parameters and steps its own schedule: a JSON optimizer makes accelerate
    refuse at prepare (after loading), a JSON scheduler would move the learning rate behind the loop's back."""
    ds = _ds(ctx)
    if ds is None:
        return
    owned = {"optimizer": "the optimizer (AdamW: learning_rate, weight_decay, adam_betas)",
             "scheduler": "the learning-rate schedule (lr_scheduler, warmup_steps / warmup_ratio)"}
    for key, what in owned.items():
        if key in ds:
            yield error(f"{ctx.launch.ds_where(key)}: a DeepSpeed {key} is defined, but qwenloop's loop owns {what}; "
                        f"remove the \"{key}\" block and set it in the training config")


def check_deepspeed_auto_values(ctx: CheckContext):
    ds = _ds(ctx)
    if ds is None:
        return
    unfillable = [k for k in _auto_leaves(ds) if k not in FILLABLE_AUTO]
    if unfillable:
        where = ctx.launch.ds_config_file or ctx.launch.where("deepspeed_config")
        yield error(f"{where}: \"auto\" for {', '.join(unfillable)}, which accelerate cannot fill (it fails at prepare, "
                    f"after the model has loaded); set numbers (\"auto\" works for batch sizes, accumulation, clipping, "
                    f"precision, stage, offload devices and the three hidden-size buckets)")


def check_deepspeed_matches_training_config(ctx: CheckContext):
    """A number in the JSON for accumulation or clipping must equal the training config's (or be "auto")."""
    ds = _ds(ctx)
    if ds is None:
        return
    cfg = ctx.cfg
    for key, ours, name in (("gradient_accumulation_steps", cfg.gradient_accumulation_steps, "gradient_accumulation_steps"),
                            ("gradient_clipping", cfg.max_grad_norm, "max_grad_norm")):
        theirs = ds.get(key, "auto")
        if theirs == "auto":
            continue
        if _number(theirs) != float(ours):
            yield error(f"{ctx.launch.ds_where(key)} is {theirs} but the training config says {ours} ({name}); set "
                        f"{key}: \"auto\" in the DeepSpeed JSON so the training config decides")


def check_deepspeed_batch_sizes(ctx: CheckContext):
    """DeepSpeed requires train_batch_size == micro-batch x accumulation x processes, and counts the
    micro-batch the JSON says, not the one the loop feeds."""
    ds = _ds(ctx)
    if ds is None:
        return
    cfg, launch = ctx.cfg, ctx.launch
    micro = ds.get("train_micro_batch_size_per_gpu", "auto")
    if micro != "auto" and _number(micro) != cfg.micro_batch_size:
        yield error(f"{launch.ds_where('train_micro_batch_size_per_gpu')} is {micro} but the training config's "
                    f"micro_batch_size is {cfg.micro_batch_size}; set it to \"auto\" (accelerate fills it from the DataLoader)")
    total = ds.get("train_batch_size", "auto")
    if total == "auto":
        return
    micro_n = int(_number(micro) or 0) if micro != "auto" else cfg.micro_batch_size
    gas = ds.get("gradient_accumulation_steps", "auto")
    gas_n = int(_number(gas) or 0) if gas != "auto" else cfg.gradient_accumulation_steps
    expected = micro_n * gas_n * launch.num_processes
    if _number(total) != expected:
        yield error(f"{launch.ds_where('train_batch_size')} is {total}, but micro-batch {micro_n} x accumulation {gas_n} x "
                    f"{launch.num_processes} processes = {expected} (DeepSpeed stops at prepare when they differ); set "
                    f"train_batch_size: \"auto\"")


def check_offload_adam_betas(ctx: CheckContext):
    launch, betas = ctx.launch, list(ctx.cfg.adam_betas)
    if launch is None or not launch.offload_optimizer or betas == DEFAULT_BETAS:
        return
    # accelerate replaces torch AdamW by DeepSpeedCPUAdam and copies only lr and weight decay.
    yield error(f"{ctx.where('adam_betas')}: {betas} would be silently replaced by {DEFAULT_BETAS} under DeepSpeed "
                f"optimizer offload (accelerate builds DeepSpeedCPUAdam from lr and weight_decay only; "
                f"{launch.ds_where('zero_optimization.offload_optimizer')}); keep the default betas or use a config "
                f"without offload_optimizer")


def check_deepspeed_stage(ctx: CheckContext):
    """Checkpoints (and so resume and preemption) are implemented for ZeRO stage 3, the stage qwenloop trains with."""
    launch = ctx.launch
    if launch is None or launch.backend != "deepspeed":
        return
    cfg = ctx.cfg
    text = (f"{launch.ds_where('zero_optimization.stage')} is {launch.zero_stage}: qwenloop's checkpoints are implemented "
            f"for ZeRO stage 3 only, so a checkpoint (checkpoint_every_steps, SIGTERM) or a resume would fail; use stage 3")
    needs_checkpoints = cfg.checkpoint_every_steps > 0 or cfg.resume_from is not None
    yield error(text) if needs_checkpoints else warning(text)


def _model_bytes(ctx: CheckContext) -> tuple[str, int] | None:
    """(name, bytes of the whole base in the run's dtype), from config.json or a preset; None when unknown."""
    from ..plan.shapes import resolve_model, spec_from_config

    try:
        spec = spec_from_config(ctx.model_config) if ctx.model_config else resolve_model(ctx.cfg.model)
    except UserError:
        return None
    per_param = 4 if ctx.launch.mixed_precision == "no" else 2
    return (spec.name if not ctx.model_config else ctx.cfg.model), spec.num_params * per_param


def check_zero3_init(ctx: CheckContext):
    """Without zero3_init_flag every rank loads the whole model before DeepSpeed partitions it: N copies in host
    RAM, and one whole copy on each GPU. (A 4-bit / 8-bit base never loads under zero.Init: not this check.)"""
    launch = ctx.launch
    if launch is None or launch.backend != "zero3" or launch.zero3_init_flag or ctx.cfg.quantization.bits:
        return
    where = launch.where("deepspeed_config.zero3_init_flag" if launch.source != "accelerator" else "zero3_init_flag")
    sized = _model_bytes(ctx)
    if sized is None:
        yield warning(f"{where}: is false under ZeRO-3: every rank loads the whole model before DeepSpeed partitions "
                      f"it; set zero3_init_flag: true")
        return
    name, size = sized
    gib = size / 2**30
    if ctx.gpu is not None and size > ctx.gpu.memory_bytes:
        yield error(f"{where}: is false under ZeRO-3, so every rank loads the whole {name} ({gib:.1f} GiB) before "
                    f"DeepSpeed partitions it, more than one {ctx.gpu.name} holds ({ctx.gpu.memory_gib:g} GiB); set "
                    f"zero3_init_flag: true (the model then loads partitioned)")
    elif launch.gpus_per_node > 1:
        yield warning(f"{where}: is false under ZeRO-3: each of {launch.gpus_per_node} ranks per machine loads the whole "
                      f"{name} ({gib:.1f} GiB, {gib * launch.gpus_per_node:.1f} GiB of host RAM together) before "
                      f"DeepSpeed partitions it; set zero3_init_flag: true")
