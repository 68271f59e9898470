"""Checks of the training config alone: its values, its paths, and the packages and kernels it asks for.

``config_problems`` is what ``TrainConfig.validate`` raises on (the first one): a config built in code
fails at construction as before, and the doctor lists every problem of a file at once.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
from types import SimpleNamespace

from ..chat_template import chat_template_problem, is_template_text
from ..plan.shapes import LINEAR_NAMES
from . import CheckContext, error

TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive")
AT_LEAST_ONE = ("micro_batch_size", "gradient_accumulation_steps", "max_seq_len", "num_epochs", "log_every_steps")
AT_LEAST_ZERO = ("max_steps", "warmup_steps", "eval_every_steps", "num_workers", "checkpoint_every_steps",
                 "keep_last_checkpoints", "max_bad_steps")
SEED_MAX = 2**32 - 1  # accelerate's set_seed seeds numpy too, whose seeds are 32-bit unsigned


def check_config_values(ctx: CheckContext):
    """Required fields, the range of every number (NaN and infinity included), paths whose `~` could not be
    expanded, and a chat template that is neither Jinja text nor a readable template file (each bad field
    is one finding)."""
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
    if not 0 <= cfg.seed <= SEED_MAX:
        yield error(f"{at('seed')}: must be in [0, {SEED_MAX}] (2**32 - 1), got {cfg.seed}")
    # NaN fails every comparison, so each rule below is written as "must hold", never as "must not".
    if not (math.isfinite(cfg.learning_rate) and cfg.learning_rate > 0):
        yield error(f"{at('learning_rate')}: must be > 0 and finite, got {cfg.learning_rate}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        yield error(f"{at('weight_decay')}: must be >= 0 and finite, got {cfg.weight_decay}")
    if not 0 <= cfg.warmup_ratio < 1:
        yield error(f"{at('warmup_ratio')}: must be in [0, 1), got {cfg.warmup_ratio}")
    if not (math.isfinite(cfg.max_grad_norm) and cfg.max_grad_norm >= 0):  # NaN would silently turn clipping off
        yield error(f"{at('max_grad_norm')}: must be >= 0 and finite (0 disables clipping), got {cfg.max_grad_norm}")
    if len(cfg.adam_betas) != 2 or not all(0 <= b < 1 for b in cfg.adam_betas):
        yield error(f"{at('adam_betas')}: must be two numbers in [0, 1), got {cfg.adam_betas}")
    if cfg.lora.r < 1:
        yield error(f"{at('lora.r')}: must be >= 1, got {cfg.lora.r}")
    if cfg.lora.alpha < 1:  # the update is scaled by alpha / r: with 0 every lora_B gets a zero gradient
        yield error(f"{at('lora.alpha')}: must be >= 1 (the update is scaled by alpha / r: 0 trains nothing), "
                    f"got {cfg.lora.alpha}")
    if not 0 <= cfg.lora.dropout < 1:
        yield error(f"{at('lora.dropout')}: must be in [0, 1), got {cfg.lora.dropout}")
    if not cfg.lora.target_modules:
        yield error(f"{at('lora.target_modules')}: must name at least one module, e.g. {list(LINEAR_NAMES)}")
    if cfg.peak_tflops is not None and not (math.isfinite(cfg.peak_tflops) and cfg.peak_tflops > 0):
        yield error(f"{at('peak_tflops')}: must be > 0 and finite (or null to look it up), got {cfg.peak_tflops}")
    if cfg.resume_from is not None and not str(cfg.resume_from).strip():
        yield error(f"{at('resume_from')}: is empty; use auto, a checkpoint directory, or null")
    for name in cfg.report_to:
        if name not in TRACKERS:
            yield error(f"{at('report_to')}: unknown tracker {name!r}; use e.g. [tensorboard]")
    yield from _unexpanded_home(cfg, at)
    yield from _chat_template_file(cfg, at)


def _unexpanded_home(cfg, at):
    """A path still starting with ``~`` after ``TrainConfig`` expanded it names an unknown user (or HOME is
    unset): it would become a directory literally named ``~...`` in the launch directory."""
    for f in dataclasses.fields(cfg):
        key, value = f.name, getattr(cfg, f.name)
        if f.metadata.get("path") and isinstance(value, str) and value.startswith("~") and not is_template_text(value):
            yield error(f"{at(key)}: {value!r} cannot be expanded (no such user, or HOME is not set); write the full path")


def _chat_template_file(cfg, at):
    """A ``chat_template`` without a Jinja tag is a path: it must name a readable template file."""
    problem = chat_template_problem(cfg.chat_template) if cfg.chat_template is not None else None
    if problem:
        yield error(f"{at('chat_template')}: {problem}")


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
    """``resume_from`` must name a checkpoint that verifies (its manifest's sizes and checksums); ``auto`` must
    find one when checkpoints exist (it skips damaged ones, reported here as warnings by the doctor; a live
    run logs them when it resolves the checkpoint). A finished run under ``auto`` is check_previous_run's."""
    from .. import checkpoint
    from . import warning

    cfg = ctx.cfg
    value = cfg.resume_from
    if value is None or not str(value).strip() or checkpoint.previous_run_problem(cfg):
        return
    if value != "auto":
        checkpoint.resolve_resume(cfg, announce=False)  # raises the one-line error
        return
    choice = checkpoint.choose_auto(cfg)
    if choice.problem:
        yield error(choice.problem)
    elif not ctx.live:
        for path, reason in choice.skipped:
            yield warning(f"{ctx.where('resume_from')}: auto will skip {path} ({reason})"
                          f"{'; it resumes from ' + choice.path if choice.path else ''}")


def check_previous_run(ctx: CheckContext):
    """An ``output_dir`` holding a previous run is refused unless the run continues it (``resume_from``) or
    replaces it (``overwrite_output_dir``, which moves the old run to ``output_dir/replaced/``); ``auto``
    continues an unfinished run and never replaces a finished one."""
    from ..checkpoint import previous_run_problem

    problem = previous_run_problem(ctx.cfg)
    if problem:
        yield error(f"{ctx.where('output_dir')}: {problem}")


def check_output_dir(ctx: CheckContext):
    """``output_dir`` must be writable (nothing is created to find out)."""
    from ..checkpoint import check_output_dir

    check_output_dir(ctx.cfg.output_dir)
    return ()


# --------------------------------------------------------------------------------------------------
# The model directory's own files (read without loading a weight; what needs loading: model.load_model)
# --------------------------------------------------------------------------------------------------

CUSTOM_CODE_CLASSES = ("AutoConfig", "AutoModelForCausalLM")  # what loading the model asks transformers for


def check_remote_code(ctx: CheckContext):
    """A config.json whose classes exist only as Python files next to it (``auto_map``, a ``model_type`` transformers
    does not know) loads only with ``trust_remote_code``, which stays off unless the user turns it on. A known
    ``model_type`` with a leftover ``auto_map`` loads with transformers' own classes: nothing to say."""
    config = ctx.model_config
    if ctx.cfg.trust_remote_code or not config or not isinstance(config.get("auto_map"), dict):
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    native = {"AutoConfig": CONFIG_MAPPING_NAMES, "AutoModelForCausalLM": MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    needed = [name for name in CUSTOM_CODE_CLASSES if name in config["auto_map"] and model_type not in native[name]]
    if needed:
        # auto_map values are "module.Class" or "repo--module.Class": the file is module.py
        code = sorted({str(config["auto_map"][name]).split("--")[-1].rsplit(".", 1)[0] + ".py" for name in needed})
        yield error(f"{ctx.where('trust_remote_code')}: is false, but {ctx.model_config_path} needs custom code to load "
                    f"(auto_map: {', '.join(needed)} from {', '.join(code)}; model_type {model_type!r} is not one "
                    f"transformers knows); set trust_remote_code: true if you trust that code, or use a model "
                    f"transformers supports natively")


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
"""Files that hold a tokenizer's vocabulary (``tokenizer_config.json`` alone does not: transformers then builds a
tokenizer of special tokens only)."""


def check_tokenizer_files(ctx: CheckContext):
    """A local model directory (with config.json) must hold its tokenizer: the tokenizer is read from ``model``."""
    if not ctx.model_config_path:
        return  # a hub id, or no config.json (check_paths says so)
    model_dir = os.path.dirname(ctx.model_config_path)
    if _tokenizer_brings_its_own_code(model_dir):
        return  # custom tokenizer code decides which files it reads
    names = set(os.listdir(model_dir))
    if not names.intersection(TOKENIZER_FILES) and not any(n.endswith(".tiktoken") for n in names):
        yield error(f"{ctx.where('model')}: {model_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...); "
                    f"copy the tokenizer files of the model it was trained from into it")


def _tokenizer_brings_its_own_code(model_dir: str) -> bool:
    import json

    try:
        with open(os.path.join(model_dir, "tokenizer_config.json"), encoding="utf-8") as f:
            return "auto_map" in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


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
