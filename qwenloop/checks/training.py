"""Checks of the training config alone: its values, its paths, and the packages and kernels it asks for.

``config_problems`` is what ``TrainConfig.validate`` raises on (the first one): a config built in code
fails at construction as before, and the doctor lists every problem of a file at once.
"""

from __future__ import annotations

import importlib.util
import os
from types import SimpleNamespace

from ..plan.shapes import LINEAR_NAMES
from . import CheckContext, error

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
AT_LEAST_ONE = ("micro_batch_size", "gradient_accumulation_steps", "max_seq_len", "num_epochs", "log_every_steps")
AT_LEAST_ZERO = ("max_steps", "warmup_steps", "eval_every_steps", "num_workers", "checkpoint_every_steps",
                 "keep_last_checkpoints", "max_bad_steps")


def check_config_values(ctx: CheckContext):
    """Required fields and the range of every number (each bad field is one finding)."""
    cfg, at = ctx.cfg, ctx.where
    if not cfg.model:
        yield error(f"{at('model')}: is required: a local model directory or a hub id")
    if not cfg.train_file:
        yield error(f"{at('train_file')}: is required: a JSONL/JSON/parquet file or a saved dataset directory")
    for name in AT_LEAST_ONE:
        if getattr(cfg, name) < 1:
            yield error(f"{at(name)}: must be >= 1, got {getattr(cfg, name)}")
    for name in AT_LEAST_ZERO:
        if getattr(cfg, name) < 0:
            yield error(f"{at(name)}: must be >= 0, got {getattr(cfg, name)}")
    if not cfg.learning_rate > 0:
        yield error(f"{at('learning_rate')}: must be > 0, got {cfg.learning_rate}")
    if not 0 <= cfg.warmup_ratio < 1:
        yield error(f"{at('warmup_ratio')}: must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.max_grad_norm < 0:
        yield error(f"{at('max_grad_norm')}: must be >= 0 (0 disables clipping), got {cfg.max_grad_norm}")
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        yield error(f"{at('adam_betas')}: must be two numbers in [0, 1), got {cfg.adam_betas}")
    if cfg.lora.r < 1:
        yield error(f"{at('lora.r')}: must be >= 1, got {cfg.lora.r}")
    if not 0 <= cfg.lora.dropout < 1:
        yield error(f"{at('lora.dropout')}: must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        yield error(f"{at('lora.target_modules')}: must name at least one module, e.g. {list(LINEAR_NAMES)}")
    if cfg.peak_tflops is not None and not cfg.peak_tflops > 0:
        yield error(f"{at('peak_tflops')}: must be > 0 (or null to look it up), got {cfg.peak_tflops}")
    if cfg.resume_from is not None and not str(cfg.resume_from).strip():
        yield error(f"{at('resume_from')}: is empty; use auto, a checkpoint directory, or null")
    for name in cfg.report_to:
        if name not in TRACKERS:
            yield error(f"{at('report_to')}: unknown tracker {name!r}; use e.g. [tensorboard]")


def check_packing_with_grouping(ctx: CheckContext):
    if ctx.cfg.packing and ctx.cfg.group_by_length:
        yield error(f"{ctx.where('group_by_length')}: has nothing to group when packing is on (packed rows have no "
                    f"padding); set one of them to false")


def check_packing_attention(ctx: CheckContext):
    """The attention kernel must keep packed examples apart: the rule of ``batching.check_packing_support``,
    asked of the config before the model exists (train() asks it again of the loaded model)."""
    cfg = ctx.cfg
    if not cfg.packing or cfg.micro_batch_size < 1:
        return
    from ..batching import check_packing_support

    planned = SimpleNamespace(use_cache=False, _attn_implementation=cfg.attn_implementation)  # loading turns the cache off
    try:
        check_packing_support(planned, cfg.micro_batch_size)
    except ValueError as e:
        yield error(f"{ctx.where('micro_batch_size')}: is {cfg.micro_batch_size}, but {e}")


def config_problems(cfg, source: str = "config") -> list[str]:
    """The config rules' error messages (``TrainConfig.validate`` raises the first)."""
    ctx = CheckContext(cfg=cfg, launch=None, cfg_source=source)
    rules = (check_config_values, check_packing_with_grouping, check_packing_attention)
    return [message for rule in rules for level, message in rule(ctx) if level == "error"]


# --------------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------------

def looks_local(name: str) -> bool:
    """A hub id is ``org/name``; an absolute, relative or home path (or deeper) means a local directory."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def check_paths(ctx: CheckContext):
    """The model directory and the data files exist (a hub id is left to the download)."""
    from ..data import check_data_path
    from ..errors import UserError

    cfg = ctx.cfg
    model_dir = os.path.expanduser(cfg.model)
    if cfg.model and looks_local(cfg.model) and not os.path.isdir(model_dir):
        yield error(f"{ctx.where('model')}: directory {cfg.model!r} not found; set model to a local model directory or a hub id")
    elif cfg.model and os.path.isdir(model_dir) and not os.path.isfile(os.path.join(model_dir, "config.json")):
        yield error(f"{ctx.where('model')}: {cfg.model} has no config.json (not a transformers model directory); "
                    f"point model at the directory holding config.json and the weights")
    for key in ("train_file", "eval_file"):
        path = getattr(cfg, key)
        if path:
            try:
                check_data_path(path)
            except UserError as e:
                relative = "" if os.path.isabs(path) else f" (relative paths are read from the launch directory, here {os.getcwd()})"
                yield error(f"{ctx.where(key)}: {e}{relative}")


def check_resume_from(ctx: CheckContext):
    """An explicit checkpoint path must hold a complete checkpoint (``auto`` may find none: that starts fresh)."""
    value = ctx.cfg.resume_from
    if value is None or value == "auto" or not str(value).strip():
        return
    from ..checkpoint import resolve_resume

    resolve_resume(ctx.cfg)  # raises the one-line error
    return ()


RUN_FILES = ("metrics.jsonl", "adapter")  # what marks a directory as holding a previous run


def check_previous_run(ctx: CheckContext):
    """An ``output_dir`` holding a previous run is refused unless the run continues it (``resume_from``) or
    replaces it (``overwrite_output_dir``)."""
    cfg = ctx.cfg
    previous = [f for f in RUN_FILES if os.path.exists(os.path.join(cfg.output_dir, f))]
    if previous and not cfg.overwrite_output_dir and cfg.resume_from is None:
        yield error(f"{ctx.where('output_dir')}: {cfg.output_dir} already holds a previous run ({', '.join(previous)}); "
                    f"choose another output_dir, set resume_from: auto to continue it, or set overwrite_output_dir: true")


def check_output_dir(ctx: CheckContext):
    """``output_dir`` must be writable (nothing is created to find out)."""
    from ..checkpoint import check_output_dir

    check_output_dir(ctx.cfg.output_dir)
    return ()


# --------------------------------------------------------------------------------------------------
# Packages and kernels
# --------------------------------------------------------------------------------------------------

def check_bitsandbytes_installed(ctx: CheckContext):
    bits = ctx.cfg.quantization.bits
    if bits and importlib.util.find_spec("bitsandbytes") is None:
        yield error(f"{ctx.where('quantization.bits')}: {bits}-bit base weights need bitsandbytes, which is not installed; "
                    f"pip install 'qwenloop[bnb]' or set quantization.bits: 0")


def check_attention_kernel(ctx: CheckContext):
    """flash_attention_2 needs the flash-attn package and an Ampere+ NVIDIA GPU; flex_attention a GPU (no backward on CPU)."""
    impl, at = ctx.cfg.attn_implementation, ctx.where("attn_implementation")
    why = None
    if impl == "flash_attention_2":
        if importlib.util.find_spec("flash_attn") is None:
            why = "the flash-attn package is not installed"
        elif ctx.on_cpu:
            why = "it runs on NVIDIA GPUs only, and this run is on the CPU"
        elif ctx.has_bf16 is False:
            why = f"{ctx.gpu.name if ctx.gpu else 'this GPU'} is older than Ampere (flash-attn 2 needs compute capability 8.0+)"
    elif impl == "flex_attention" and ctx.on_cpu:
        why = "it has no backward pass on the CPU, and this run is on the CPU"
    if why:
        yield error(f"{at}: {impl} cannot be used here ({why}); set attn_implementation: sdpa "
                    f"(it keeps packed examples apart too)")
