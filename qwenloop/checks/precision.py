"""Precision and quantization against the GPU and the backend.

The precision of a run is the accelerate config's (``LaunchSpec.mixed_precision``: under DeepSpeed the
JSON's ``fp16/bf16.enabled``); the base is loaded in it and a 4-bit base is stored in it
(``model.quantization_config``), which is what ZeRO-3 and FSDP need to shard it.
"""

from __future__ import annotations

from . import CheckContext, error, warning

TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "no": "float32"}


def _ds_precision_flags(ds: dict) -> dict[str, object]:
    return {name: (ds.get(name) or {}).get("enabled") for name in ("fp16", "bf16")}


def precision_where(launch) -> str:
    """Where the run's precision is set: the DeepSpeed JSON's enabled flag, or the YAML's mixed_precision."""
    if launch.ds_config_file and launch.mixed_precision in ("fp16", "bf16"):
        return f"{launch.ds_config_file}: {launch.mixed_precision}.enabled"
    return launch.where("mixed_precision")


def check_precision_two_places(ctx: CheckContext):
    """Precision belongs in one place: the DeepSpeed JSON when there is one, else the accelerate YAML."""
    launch = ctx.launch
    if launch is None or launch.ds_config is None:
        return
    flags = _ds_precision_flags(launch.ds_config)
    where_json = launch.ds_config_file or launch.where("deepspeed_config")
    if flags["fp16"] is True and flags["bf16"] is True:
        yield error(f"{where_json}: fp16.enabled and bf16.enabled are both true; enable one (bf16 on A100/H100 and "
                    f"newer, fp16 on V100)")
    if launch.ds_config_file and launch.yaml_mixed_precision is not None:
        in_json = next((name for name, on in flags.items() if on is True), "fp32 (neither enabled)")
        agree = "they agree, but" if in_json == launch.yaml_mixed_precision else "they disagree, and"
        yield error(f"{launch.where('mixed_precision')}: is {launch.yaml_mixed_precision} while "
                    f"{launch.ds_config_file} says {in_json}: precision is set in two places ({agree} accelerate "
                    f"refuses mixed_precision next to a deepspeed_config_file); remove mixed_precision from "
                    f"{launch.source}, the DeepSpeed JSON decides")


def check_bf16_supported(ctx: CheckContext):
    """bf16 needs compute capability 8.0 (Ampere). ``torch.cuda.is_bf16_supported()`` can say yes on a V100
    through emulation, which is slow and not what the user meant."""
    launch = ctx.launch
    if launch is None or launch.mixed_precision != "bf16" or ctx.has_bf16 is not False or ctx.on_cpu:
        return
    if ctx.gpu_capability is not None:
        gpu = f"a GPU of compute capability {ctx.gpu_capability[0]}.{ctx.gpu_capability[1]} (bf16 needs 8.0+, e.g. A100)"
    else:
        gpu = f"{ctx.gpu.name} ({ctx.gpu_origin or 'the GPU'}), which has no bf16 (it needs compute capability 8.0+, e.g. A100)"
    fix = ("set fp16 instead in the DeepSpeed JSON (\"fp16\": {\"enabled\": true}, bf16 disabled)"
           if launch.ds_config_file else "use mixed_precision: fp16")
    yield error(f"{precision_where(launch)}: bf16 asked on {gpu}; {fix} on this GPU")


def check_8bit_sharded(ctx: CheckContext):
    """bitsandbytes int8 weights cannot be partitioned (ZeRO-3) or sharded (FSDP); INT8 + ZeRO-3 has been
    reported to give a ~10x wrong loss rather than an error."""
    launch = ctx.launch
    if launch is None or ctx.cfg.quantization.bits != 8 or not launch.sharded:
        return
    at = ctx.where("quantization.bits")
    fix = "use quantization.bits: 4 (QLoRA) or an fp16/bf16 base"
    if launch.backend == "zero3":
        yield error(f"{at}: 8-bit base weights do not work under DeepSpeed ZeRO-3 (bitsandbytes int8 weights cannot "
                    f"be partitioned; {launch.where()}); {fix}")
    else:
        yield error(f"{at}: 8-bit base weights do not work under FSDP (int8 weights cannot be sharded; "
                    f"{launch.where()}); {fix}")


def _prequantized(model_config: dict | None) -> dict | None:
    qc = (model_config or {}).get("quantization_config")
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "bitsandbytes" else None


def check_4bit_storage_dtype(ctx: CheckContext):
    """A checkpoint saved already quantized by bitsandbytes keeps its own settings when loaded. Under ZeRO-3 /
    FSDP its 4-bit storage dtype must be the run's dtype, or the weights cannot be sharded with the rest
    (accelerate then leaves them out of FSDP2's sharding: every rank holds the whole base)."""
    qc, launch = _prequantized(ctx.model_config), ctx.launch
    if qc is None:
        return
    at = f"{ctx.model_config_path}: quantization_config"
    stored_bits = 4 if (qc.get("load_in_4bit") or qc.get("_load_in_4bit")) else 8 if (
        qc.get("load_in_8bit") or qc.get("_load_in_8bit")) else None
    if stored_bits and ctx.cfg.quantization.bits != stored_bits:
        yield warning(f"{at}: the checkpoint is stored {stored_bits}-bit, but {ctx.where('quantization.bits')} is "
                      f"{ctx.cfg.quantization.bits}: transformers loads it as stored; set quantization.bits: {stored_bits} "
                      f"or use the unquantized checkpoint")
    if stored_bits != 4 or launch is None or not launch.sharded:
        return
    storage = str(qc.get("bnb_4bit_quant_storage") or "uint8").removeprefix("torch.")
    wanted = TORCH_DTYPE_NAMES.get(launch.mixed_precision, "float32")
    if storage != wanted:
        yield error(f"{at}.bnb_4bit_quant_storage is {storage}, but under {launch.backend} the 4-bit weights must be "
                    f"stored in the run's dtype ({wanted}, from {precision_where(launch)}) to be sharded with the other "
                    f"parameters; use the unquantized checkpoint with quantization.bits: 4 (qwenloop quantizes it "
                    f"while loading, storage {wanted})")
