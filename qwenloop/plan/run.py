"""The plan of the exact run a user will launch: a training config + an accelerate config (+ its DeepSpeed JSON).

``request_for_run`` maps the files' settings onto a ``PlanRequest`` (the training config says what to
train, the launch spec where and how); ``plan_run`` is what ``qwenloop plan --config`` and the doctor's
"does it fit" check call; ``training_record`` is what ``train()`` writes to ``run.json`` next to the
measured peaks, so every real run is a calibration point.
"""

from __future__ import annotations

from ..errors import UserError
from . import states
from .buffers import ZeroSettings
from .estimate import Plan, PlanRequest, estimate
from .gpus import GPU_PRESETS, GPUSpec, custom_gpu
from .shapes import ModelSpec, resolve_model

QUANT_BY_BITS = {0: "none", 4: "nf4", 8: "int8"}


def planned_backend(launch) -> str:
    """The planner's backend name for a launch spec (``qwenloop.launch.LaunchSpec``)."""
    backend = launch.backend
    if backend == "deepspeed":
        raise UserError(f"{launch.source}: the planner covers DeepSpeed ZeRO stage 3 only (zero_optimization.stage "
                        f"is {launch.zero_stage}); use stage 3, the stage qwenloop trains with")
    return backend


def _fsdp_reshards(fsdp: dict) -> bool:
    if "reshard_after_forward" in fsdp:
        return bool(fsdp["reshard_after_forward"]) and str(fsdp["reshard_after_forward"]).upper() not in ("SHARD_GRAD_OP", "NO_SHARD")
    strategy = str(fsdp.get("sharding_strategy", "FULL_SHARD")).upper()
    return strategy not in ("SHARD_GRAD_OP", "NO_SHARD", "2", "3")


def request_for_run(cfg, launch, gpu: GPUSpec, model: ModelSpec | None = None, **extra) -> PlanRequest:
    """The ``PlanRequest`` of ``cfg`` (a ``TrainConfig``) launched by ``launch`` on ``gpu``. ``extra``: other
    ``PlanRequest`` fields (``host_ram_gib``, ``mfu``, ``dataset_tokens``, ``target_fraction``)."""
    fsdp = dict(getattr(launch, "fsdp", None) or {})
    fsdp_offload = bool(fsdp.get("offload_params", False))
    attn = cfg.attn_implementation if cfg.attn_implementation in ("sdpa", "eager") else "sdpa"  # flash/flex save like sdpa
    return PlanRequest(
        model=model or resolve_model(cfg.model),
        gpu=gpu,
        backend=planned_backend(launch),
        gpus_per_node=max(1, launch.num_processes // max(1, launch.num_machines)),
        nodes=max(1, launch.num_machines),
        precision=launch.mixed_precision,
        quant=QUANT_BY_BITS[cfg.quantization.bits],
        lora_rank=cfg.lora.r,
        lora_targets=tuple(cfg.lora.target_modules),
        lora_dropout=cfg.lora.dropout,
        seq_len=cfg.max_seq_len,
        micro_batch=cfg.micro_batch_size,
        grad_accum=cfg.gradient_accumulation_steps,
        checkpointing=cfg.gradient_checkpointing or bool(fsdp.get("activation_checkpointing", False)),
        target_head=cfg.lm_head_targets_only,
        attn=attn,
        packing=cfg.packing,
        offload_optimizer=bool(getattr(launch, "offload_optimizer", False)) or fsdp_offload,
        offload_param=bool(getattr(launch, "offload_param", False)) or fsdp_offload,
        zero=ZeroSettings.from_ds_config(getattr(launch, "ds_config", None)),
        reshard_after_forward=_fsdp_reshards(fsdp),
        zero3_init=bool(getattr(launch, "zero3_init_flag", True)),
        cpu_ram_efficient_loading=bool(fsdp.get("cpu_ram_efficient_loading", False)),
        **extra,
    )


def plan_run(cfg, launch, gpu: GPUSpec, **extra) -> Plan:
    """``estimate(request_for_run(...))``: ``.fits``, ``.verdict`` and the terms (``advice.suggestions`` for fixes)."""
    return estimate(request_for_run(cfg, launch, gpu, **extra))


def gpu_from_device(index: int = 0) -> GPUSpec:
    """The ``GPUSpec`` of a CUDA device of this machine: a preset when its name matches one, else what torch
    reports (memory, bf16 by compute capability, peaks from ``flops.GPU_PEAK_TFLOPS``, PCIe gen4 host link).
    A GPU missing from that table gets 100 TFLOPS, said in its name: its memory plan holds, its times are rough."""
    import torch

    from ..flops import peak_tflops

    props = torch.cuda.get_device_properties(index)
    memory_gib = props.total_memory / 2**30
    for preset in GPU_PRESETS.values():
        if preset.name.lower() in props.name.lower() and abs(preset.memory_gib - memory_gib) < 2:
            return preset
    bf16 = props.major >= 8
    peaks = {p: v for p in (("bf16", "fp16", "no") if bf16 else ("fp16", "no")) if (v := peak_tflops(props.name, p))}
    name = props.name if peaks else f"{props.name} (peak TFLOPS unknown: 100 assumed)"
    return custom_gpu(round(memory_gib, 1), bf16, peaks or 100.0, 25.0, name=name)


def training_record(cfg, launch, model_config, world_size: int, compute_bytes: int, on_gpu: bool) -> dict:
    """What ``train()`` writes to ``run.json`` under ``plan``: the frozen-base parameter bytes each rank is
    predicted to hold once the backend has sharded it (``base_param_bytes_per_rank``: compare with
    ``base_bytes_sharded_per_rank``), and on a GPU the whole plan of this run (compare ``peak_allocated``
    with ``peak_memory_per_rank``). ``model_config``: the loaded model's transformers config."""
    from .shapes import spec_from_config

    try:  # a plan that cannot be made (another ZeRO stage, a model the planner refuses) never stops training
        spec = spec_from_config(model_config)
        backend = planned_backend(launch)
        quant = QUANT_BY_BITS[cfg.quantization.bits]
        per_rank = states.base_bytes_per_rank(spec, backend, world_size, compute_bytes, quant, include_quant_state=False)
        record: dict = {"base_param_bytes_per_rank": per_rank}
        if on_gpu:
            record.update(plan_run(cfg, launch, gpu_from_device(), model=spec).to_dict())
    except UserError as e:
        return {"error": str(e)}
    return record


__all__ = ["request_for_run", "plan_run", "planned_backend", "gpu_from_device", "training_record"]
