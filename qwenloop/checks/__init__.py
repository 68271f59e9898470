"""Pre-flight checks: every contradiction and risk of a run that can be found without loading a weight.

One registry, two callers. ``qwenloop doctor`` runs every check on the files a run will be launched with
and reports all findings at once; ``train()`` runs the same checks on its live Accelerator right after
building it, before it reads a tokenizer, a data file or a weight, stops at errors (one line each, exit
code 2) and logs warnings once. A check is a function ``check_<name>(ctx) -> iterable of error(...) /
warning(...)``; it says nothing when the facts it needs are missing from the context (no GPU known, no
model config.json, no DeepSpeed), so the doctor can say what it could not check.

Modules: ``training`` (the training config, its paths, packages and kernels), ``precision`` (precision and
quantization against the GPU and the backend), ``deepspeed``, ``fsdp``, ``processes`` (the launch
itself, and whether the plan fits).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable

from ..errors import UserError

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..launch import LaunchSpec
    from ..plan.gpus import GPUSpec

LEVELS = ("error", "warning")


@dataclass(frozen=True)
class Finding:
    """One problem: ``error`` (the run would fail or train something else than asked) or ``warning`` (a risk)."""

    level: str
    check: str
    """The check's name (``check_<name>`` in this package)."""
    message: str
    """One line: what is wrong, where (file and field), and what to do."""

    def __post_init__(self):
        if self.level not in LEVELS:
            raise ValueError(f"Finding level must be one of {LEVELS}, got {self.level!r}")
        object.__setattr__(self, "message", " ".join(str(self.message).split()))

    def __str__(self) -> str:
        return f"{self.level} [{self.check}]: {self.message}"


def error(message: str) -> tuple[str, str]:
    return ("error", message)


def warning(message: str) -> tuple[str, str]:
    return ("warning", message)


@dataclass
class CheckContext:
    """The facts the checks read. Anything may be unknown (None): a check needing it stays silent."""

    cfg: "TrainConfig"
    launch: "LaunchSpec | None"
    """None when the accelerate config could not be read (its error is reported on its own)."""
    cfg_source: str = "config"
    """The training config's file (or ``config``), the ``where`` of the training config's messages."""
    gpu: "GPUSpec | None" = None
    """The GPU the run uses: this machine's, or a ``--gpu`` preset; None when unknown (or a CPU run)."""
    gpu_capability: tuple[int, int] | None = None
    """CUDA compute capability, when the GPU is this machine's."""
    gpu_count: int | None = None
    """GPUs visible on this machine, when detected."""
    gpu_origin: str = ""
    """How the GPU is known, for messages: ``this machine's GPU`` or ``--gpu v100-32gb``."""
    model_config: dict | None = None
    """The model directory's config.json (no weights); None for a hub id not on disk."""
    model_config_path: str | None = None
    live: bool = False
    """True in ``train()``: the run starts on this machine right after the checks."""

    @property
    def on_cpu(self) -> bool | None:
        """The run computes on the CPU (True), on GPUs (False), or unknown (None)."""
        if self.launch is not None and self.launch.use_cpu:
            return True
        if self.live:
            return False if self.launch is not None else None
        return False if self.gpu is not None else None

    @property
    def has_bf16(self) -> bool | None:
        if self.gpu_capability is not None:
            return self.gpu_capability >= (8, 0)
        return None if self.gpu is None else bool(self.gpu.bf16)

    def where(self, key: str) -> str:
        """``config file: key`` for the training config's fields."""
        return f"{self.cfg_source}: {key}"


CheckFn = Callable[[CheckContext], Iterable[tuple[str, str]]]


def registry() -> tuple[CheckFn, ...]:
    """Every check, in the order they run."""
    from . import deepspeed, fsdp, precision, processes, training

    # Order: what the user wrote, then where it runs, then each backend's rules, then the plan (which
    # assumes everything before it holds).
    return (
        training.check_config_values, training.check_packing_with_grouping, training.check_packing_attention,
        training.check_paths, training.check_remote_code, training.check_tokenizer_files,
        training.check_resume_from, training.check_previous_run,
        training.check_output_dir,
        training.check_bitsandbytes_installed, training.check_attention_kernel,
        processes.check_process_group,
        precision.check_precision_two_places, precision.check_bf16_supported, precision.check_8bit_sharded,
        precision.check_4bit_storage_dtype,
        deepspeed.check_deepspeed_yaml_fields, deepspeed.check_deepspeed_optimizer_scheduler,
        deepspeed.check_deepspeed_auto_values, deepspeed.check_deepspeed_matches_training_config,
        deepspeed.check_deepspeed_batch_sizes, deepspeed.check_offload_adam_betas, deepspeed.check_deepspeed_stage,
        deepspeed.check_zero3_init,
        fsdp.check_fsdp1_use_orig_params, fsdp.check_double_activation_checkpointing,
        processes.check_plan_fits,
    )


def check_name(fn: CheckFn) -> str:
    return fn.__name__.removeprefix("check_")


def run_checks(ctx: CheckContext, checks: Iterable[CheckFn] | None = None) -> list[Finding]:
    """Run every check (or ``checks``) and return all findings, errors first. A check that raises a
    ``UserError`` (it reused a rule that raises, e.g. ``checkpoint.resolve_resume``) reports it as an error."""
    findings = []
    for fn in registry() if checks is None else checks:
        try:
            for level, message in fn(ctx) or ():
                findings.append(Finding(level, check_name(fn), message))
        except UserError as e:
            findings.append(Finding("error", check_name(fn), str(e)))
    return sorted(findings, key=lambda f: LEVELS.index(f.level))


class ChecksFailed(UserError):
    """The errors a run stopped at, one per line. The command line prints ``error: <str>``, so every line
    after the first carries its own ``error:`` prefix: N errors, N ``error:`` lines."""

    def __init__(self, findings: list[Finding]):
        Exception.__init__(self, "\nerror: ".join(f.message for f in findings))  # not UserError's one-line join
        self.findings = findings


def enforce(findings: list[Finding], logger: logging.Logger, main_process: bool = True) -> None:
    """What ``train()`` does with the findings: log each warning once (main process), stop at errors."""
    if main_process:
        for f in findings:
            if f.level == "warning":
                logger.warning("%s [%s]", f.message, f.check)
    errors = [f for f in findings if f.level == "error"]
    if errors:
        raise ChecksFailed(errors)


# --------------------------------------------------------------------------------------------------
# Building a context
# --------------------------------------------------------------------------------------------------

def read_model_config(model: str) -> tuple[dict | None, str | None]:
    """The model directory's config.json as a dict (no transformers, no weights); (None, None) when there is none."""
    path = os.path.join(os.path.expanduser(model), "config.json") if model else ""
    if not path or not os.path.isfile(path):
        return None, None
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None, path  # loading will say what is wrong with it; the checks just know less
    return (raw if isinstance(raw, dict) else None), path


def detect_gpu() -> tuple["GPUSpec", tuple[int, int], int] | None:
    """This machine's first GPU (spec, compute capability, GPUs visible), or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    from ..plan.run import gpu_from_device

    return gpu_from_device(0), tuple(torch.cuda.get_device_capability(0)), torch.cuda.device_count()


def make_context(cfg, launch, *, cfg_source: str = "config", gpu=None, gpu_capability=None, gpu_count=None,
                 gpu_origin: str = "", live: bool = False) -> CheckContext:
    model_config, model_config_path = read_model_config(cfg.model)
    return CheckContext(cfg=cfg, launch=launch, cfg_source=cfg_source, gpu=gpu, gpu_capability=gpu_capability,
                        gpu_count=gpu_count, gpu_origin=gpu_origin, model_config=model_config,
                        model_config_path=model_config_path, live=live)


def context_for_run(cfg, accelerator) -> CheckContext:
    """The context ``train()`` checks: its live Accelerator and this machine's GPU."""
    from ..launch import launch_from_accelerator

    launch = launch_from_accelerator(accelerator)
    detected = None if launch.use_cpu else detect_gpu()
    gpu, capability, count = detected or (None, None, None)
    return make_context(cfg, launch, gpu=gpu, gpu_capability=capability, gpu_count=count,
                        gpu_origin="this machine's GPU", live=True)


def check_run(cfg, accelerator, logger: logging.Logger) -> None:
    """``train()``'s pre-flight: every check on the live launch; errors stop the run, warnings are logged once."""
    enforce(run_checks(context_for_run(cfg, accelerator)), logger, main_process=accelerator.is_main_process)


__all__ = ["Finding", "CheckContext", "ChecksFailed", "registry", "run_checks", "enforce", "make_context",
           "context_for_run", "check_run", "detect_gpu", "read_model_config", "error", "warning"]
