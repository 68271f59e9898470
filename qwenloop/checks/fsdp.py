"""FSDP settings that break LoRA training (the accelerate config's fsdp_config against the training config)."""

from __future__ import annotations

from . import CheckContext, error


def _fsdp(ctx: CheckContext) -> dict | None:
    launch = ctx.launch
    return launch.fsdp if launch is not None and launch.backend in ("fsdp1", "fsdp2") else None


def check_fsdp1_use_orig_params(ctx: CheckContext):
    """Without use_orig_params FSDP1 replaces the parameters by FlatParameters at prepare: the optimizer, built on
    the LoRA parameters before, would step tensors the model no longer uses. (FSDP2 always keeps them.)"""
    fsdp = _fsdp(ctx)
    if fsdp is None or fsdp.get("version") != 1 or fsdp.get("use_orig_params"):
        return
    yield error(f"{ctx.launch.where()}: fsdp_config.fsdp_use_orig_params is false under FSDP1; LoRA needs "
                f"fsdp_use_orig_params: true (frozen and trainable parameters in one model); set it in fsdp_config "
                f"(see accelerate_configs/fsdp1.yaml)")


def check_double_activation_checkpointing(ctx: CheckContext):
    fsdp = _fsdp(ctx)
    if fsdp is None or not fsdp.get("activation_checkpointing") or not ctx.cfg.gradient_checkpointing:
        return
    yield error(f"{ctx.launch.where()}: fsdp_config.fsdp_activation_checkpointing is true and the training config's "
                f"gradient_checkpointing too (every layer would be checkpointed twice); set "
                f"fsdp_activation_checkpointing: false (qwenloop's gradient_checkpointing does it) or "
                f"gradient_checkpointing: false in {ctx.cfg_source}")
