"""The model: tokenizer, base weights (dtype from the accelerator, sdpa), bitsandbytes, LoRA, checkpointing.

Backend differences (zero.Init, meta-device loading) are asked of the ``Backend`` object from
``distributed.py``; nothing here tests for DeepSpeed or FSDP by name. What may be quantized where, and
whether the model path and the attention kernel exist, is checked before this runs (``qwenloop.checks``).
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import pickle
import re
import warnings

import torch
from safetensors import SafetensorError, safe_open

from .data import ensure_chat_template
from .storage import strip_wrapper_prefixes
from .errors import UserError
from .loss import install_target_loss_head

logger = logging.getLogger(__name__)

PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32, "fp8": torch.bfloat16}


def compute_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype base weights are loaded in: the accelerator's mixed precision, fp32 when there is none."""
    return PRECISION_DTYPES.get(str(mixed_precision), torch.float32)


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        if _refuses_custom_code(e):
            raise _custom_code_error(cfg.model) from None
        raise UserError(
            f"model: cannot load a tokenizer from {cfg.model!r} ({str(e).splitlines()[0]}); "
            f"set model to a local model directory (or a hub id where a network exists)"
        )
    _check_vocabulary(tokenizer, cfg.model)  # before the chat template: an empty tokenizer has none either
    ensure_chat_template(tokenizer, cfg.model, cfg.chat_template)
    if tokenizer.pad_token is None:
        # Qwen tokenizers define <|endoftext|> as pad; others may not. Padding is masked, any id works.
        tokenizer.pad_token = "<|endoftext|>" if "<|endoftext|>" in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def _check_vocabulary(tokenizer, source: str) -> None:
    """transformers builds a tokenizer from ``tokenizer_config.json`` alone, or from nothing but the model type,
    with no vocabulary beyond its special tokens: it would tokenize every text to unknown tokens. (The pre-flight
    check ``qwenloop.checks.training.check_tokenizer_files`` catches missing files; this catches what loaded empty.)"""
    specials = len(tokenizer.get_added_vocab())
    if len(tokenizer.get_vocab()) <= specials:
        raise UserError(
            f"model: the tokenizer loaded from {source} has no vocabulary, only {specials} special token(s): its "
            f"tokenizer.json (or vocab.json + merges.txt) is missing; copy the base model's tokenizer files into {source}"
        )


def _refuses_custom_code(error: Exception) -> bool:
    """transformers' refusal of a model whose classes come as Python files with it (``auto_map``)."""
    return isinstance(error, ValueError) and "trust_remote_code" in str(error)


def _custom_code_error(model: str) -> UserError:
    # Local directories are refused earlier, by the check that reads config.json (checks.training); this is a
    # hub id, or custom code only the tokenizer's files name.
    return UserError(f"model: {model} can only be loaded by running the Python code that comes with it, and "
                     f"trust_remote_code is false; set trust_remote_code: true if you trust that code")


def quantization_config(cfg, dtype: torch.dtype):
    """bitsandbytes settings for the base weights, or None (bitsandbytes' presence: ``qwenloop.checks``)."""
    bits = cfg.quantization.bits
    if bits == 0:
        return None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quantization.quant_type,
        bnb_4bit_use_double_quant=cfg.quantization.double_quant,
        bnb_4bit_compute_dtype=dtype,
        # Same storage dtype as every other parameter: ZeRO-3 and FSDP flatten/shard tensors of one dtype.
        bnb_4bit_quant_storage=dtype,
    )


def load_model(cfg, backend):
    """Base model + LoRA, ready for ``accelerator.prepare``."""
    dtype = compute_dtype(backend.mixed_precision)
    # What may be quantized under which backend, and whether the model path exists, was checked before
    # anything loaded (qwenloop.checks, run by train()).
    quant = quantization_config(cfg, dtype)
    kwargs = dict(
        dtype=dtype,
        trust_remote_code=cfg.trust_remote_code,
        quantization_config=quant,
        **backend.from_pretrained_kwargs(quantized=quant is not None),
    )
    if backend.load_on_meta(quantized=quant is not None):
        return _finish(_empty_model(cfg, dtype), cfg, quantized=False)
    try:
        model = _from_pretrained(cfg, kwargs)
    except UNREADABLE_WEIGHTS as e:
        _raise_for_unreadable_weights(cfg.model, e)
    return _finish(model, cfg, quantized=quant is not None)


def _from_pretrained(cfg, kwargs: dict):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation=cfg.attn_implementation, **kwargs)
    except (ValueError, ImportError) as e:
        if _refuses_custom_code(e):
            raise _custom_code_error(cfg.model) from None
        # qwenloop.checks refused the kernels known to be missing before anything loaded; what is left is
        # what only the model class knows (a kernel it does not support).
        if cfg.attn_implementation != "sdpa" or "sdpa" not in str(e).lower():
            if cfg.attn_implementation in str(e) or "flash" in str(e).lower():
                raise UserError(f"attn_implementation: {cfg.attn_implementation} cannot be used here "
                                f"({str(e).splitlines()[0]}); set attn_implementation: sdpa")
            raise
        logger.warning("model does not support sdpa attention (%s): falling back to eager", e)
        return AutoModelForCausalLM.from_pretrained(cfg.model, attn_implementation="eager", **kwargs)
    except OSError as e:
        raise UserError(f"model: cannot load weights from {cfg.model!r} ({str(e).splitlines()[0]})")


# SafetensorError: a damaged .safetensors; UnpicklingError: a pickle weights_only refuses; RuntimeError and
# EOFError: a damaged .bin (torch's zip reader). Broad on purpose: only a culprit found on disk turns one of
# them into a one-line error, anything else keeps its traceback.
UNREADABLE_WEIGHTS = (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError)


def _raise_for_unreadable_weights(model_dir: str, error: BaseException):
    """Name the weight file that made loading fail and what to do about it, or re-raise ``error`` as it is."""
    found = find_unreadable_weight_file(model_dir)
    if found is None:
        raise error
    path, refused_pickle, detail = found
    if refused_pickle:
        raise UserError(
            f"model: {path} is a pickle holding more than tensors ({detail}), which torch.load(weights_only=True) "
            f"refuses to unpickle; use the model's safetensors weights, or convert this file to safetensors where "
            f"you trust its source"
        ) from None
    raise UserError(f"model: {path} cannot be read ({detail}): it is damaged or incomplete (an interrupted download "
                    f"or copy?); download or copy it again") from None


def find_unreadable_weight_file(model_dir: str) -> tuple[str, bool, str] | None:
    """The first weight file ``from_pretrained`` reads from ``model_dir`` that cannot be opened as it opens it:
    ``(path, refused_pickle, detail)``, or None. A safetensors file is read as far as its header, which must
    cover the whole file (a truncated one fails here); a ``.bin`` is unpickled with ``weights_only=True``,
    memory-mapped (no tensor data read)."""
    for path in _weight_files(os.path.expanduser(model_dir)):
        if path.endswith(".safetensors"):
            try:
                with safe_open(path, framework="pt"):
                    pass
            except Exception as e:  # SafetensorError, or an OSError reading it
                return path, False, _first_line(e)
        else:
            problem = _unpickle_problem(path)
            if problem is not None:
                return (path, *problem)
    return None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in transformers' order of preference


def _weight_files(model_dir: str) -> list[str]:
    """The files ``from_pretrained`` loads: a sharded checkpoint's index names them; safetensors first. Not
    ``training_args.bin`` or other pickles that sit beside the weights and are never loaded."""
    import json

    for name in WEIGHT_FILES:
        index = os.path.join(model_dir, f"{name}.index.json")
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
                return [os.path.join(model_dir, shard) for shard in shards]
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                return []  # a broken index is not a weight file to blame
        if os.path.isfile(os.path.join(model_dir, name)):
            return [os.path.join(model_dir, name)]
    return []


def _unpickle_problem(path: str) -> tuple[bool, str] | None:
    """(refused_pickle, detail) of a ``.bin`` that ``torch.load(weights_only=True)`` cannot read, or None."""
    for mmap in (True, False):  # files from before torch 1.6 (not zip) cannot be memory-mapped
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            return None
        except pickle.UnpicklingError as e:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            return True, f"it needs {found.group(1)}" if found else _first_line(e)
        except (RuntimeError, EOFError, OSError) as e:
            if mmap and "mmap" in str(e):
                continue
            return False, _first_line(e)
    return None


def _first_line(error: BaseException) -> str:
    """The error's first sentence (torch's zip reader follows it with a paragraph of advice)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]


def _empty_model(cfg, dtype: torch.dtype):
    """The architecture without weights: parameters on the meta device (no memory, no file read),
    buffers real (RoPE's inv_freq is not in the checkpoint and is never broadcast)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=cfg.attn_implementation, trust_remote_code=cfg.trust_remote_code
        )


def _finish(model, cfg, quantized: bool):
    """Checkpointing, LoRA and fp32 trainable weights on a loaded (or meta) base."""
    model.config.use_cache = False  # the KV cache is useless in training and breaks with checkpointing

    if cfg.gradient_checkpointing:
        enable_checkpointing(model, cfg.gradient_checkpointing_reentrant)
        if cfg.gradient_checkpointing_reentrant or quantized:
            # Reentrant checkpointing only back-propagates into a segment whose *inputs* require grad;
            # with a frozen embedding nothing does, and LoRA would get no gradient at all.
            model.enable_input_require_grads()

    model = add_lora(model, cfg.lora)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            # Trainable weights in fp32: fp16 AMP cannot unscale fp16 gradients, and Adam updates of
            # ~1e-4 relative size vanish in bf16 rounding.
            param.data = param.data.float()
    if cfg.lm_head_targets_only:
        install_target_loss_head(model)  # before prepare: backends hook the head like any module
    return model


def enable_checkpointing(model, reentrant: bool) -> None:
    """Activation (gradient) checkpointing of every decoder layer. transformers 5.24 renamed it
    ``activation_checkpointing_enable`` (the old name warns and goes in v6); older 5.x only has the old one."""
    kwargs = {"use_reentrant": reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def peft_reading_old_names():
    """PEFT 0.21 reads transformers' deprecated ``is_gradient_checkpointing`` (``peft_model.py``) when it wraps
    a model, and the property warns on every run; the new name is ``is_activation_checkpointing``. Not ours to
    change: silence that one warning where qwenloop calls PEFT."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def add_lora(model, lora):
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, lora.target_modules)
    config = LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias=lora.bias,
    )
    with peft_reading_old_names():
        return get_peft_model(model, config)


def check_target_modules(model, targets: list[str]) -> None:
    """Every entry must match a module: PEFT only complains when *none* does, so a typo in one entry
    silently trains less than asked."""
    leaf_names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if _is_adaptable(module)}
    full_names = [name for name, _ in model.named_modules()]
    for entry in targets:
        if entry in leaf_names or any(n == entry or n.endswith("." + entry) for n in full_names):
            continue
        close = difflib.get_close_matches(entry, sorted(leaf_names), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"valid names: {sorted(leaf_names)}"
        raise UserError(f"lora.target_modules: {entry!r} matches no module of the model; {hint}")


def _is_adaptable(module) -> bool:
    # Linear layers, including bitsandbytes' Linear4bit/Linear8bitLt (subclasses of nn.Linear).
    return isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d))


def expected_adapter_shapes(model) -> dict[str, tuple[int, ...]]:
    """Shape of every LoRA tensor as the model config implies, keyed like PEFT's saved state dict.

    ``lora_A`` is ``[r, in_features]`` and ``lora_B`` is ``[out_features, r]``; in/out come from the
    config for Qwen's projections, else from the layer's recorded feature sizes (which stay correct
    even while ZeRO-3 has the weight partitioned to shape ``[0]``).
    """
    from peft.tuners.lora import LoraLayer

    config = model.config if not hasattr(model, "get_base_model") else model.get_base_model().config
    text = getattr(config, "text_config", config)
    hidden, inter = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    q_out, kv_out = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    by_name = {
        "q_proj": (hidden, q_out), "k_proj": (hidden, kv_out), "v_proj": (hidden, kv_out), "o_proj": (q_out, hidden),
        "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden),
    }
    shapes = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = strip_wrapper_prefixes(name)  # FSDP1 leaves wrapper modules inside the unwrapped model
        for adapter, r in module.r.items():
            leaf = name.rsplit(".", 1)[-1]
            fan_in, fan_out = by_name.get(leaf, (module.in_features, module.out_features))
            key = name[len("base_model.model."):] if name.startswith("base_model.model.") else name
            prefix = f"base_model.model.{key}"
            shapes[f"{prefix}.lora_A.weight"] = (r, fan_in)
            shapes[f"{prefix}.lora_B.weight"] = (fan_out, r)
    return shapes
