"""A base model (+ LoRA adapter) loaded for answering conversations: ``qwenloop generate``'s engine.

Device and dtype are chosen the way a user expects (CUDA when present, bf16 on GPUs that have it, fp16 on older
ones, fp32 on a CPU) and checked before a weight loads: a dtype the GPU cannot compute in, or a model that would
not fit the memory in that dtype, is a one-line ``UserError``. The adapter is checked against the model's weight
names and shapes first too, so a mismatch names the tensor instead of ending in PEFT's size-mismatch traceback.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from .adapter_files import Adapter, check_fits, load_adapter
from .errors import UserError
from .tensorfiles import model_weights

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
QUANTIZE_BITS = {"none": 0, "4bit": 4, "8bit": 8}


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    sample: bool = False  # greedy otherwise: the same prompt gives the same answer
    temperature: float | None = None  # None: the model's generation_config.json value
    top_p: float | None = None
    top_k: int | None = None
    seed: int = 0  # set before every sampled answer: an answer does not depend on the prompts before it


class Generator:
    """Loads once; ``answer(messages, settings, use_adapter)`` renders the chat template and decodes the reply."""

    def __init__(self, model: str, adapter: str | None = None, *, device: str = "auto", dtype: str = "auto",
                 quantize: str = "auto", trust_remote_code: bool = False, echo=None):
        echo = echo or (lambda line: None)
        lora = load_adapter(adapter) if adapter else None
        weights = _weights_or_none(model)
        if lora is not None and weights is not None:
            check_fits(lora, weights)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        bits, quant = _quantization(quantize, lora, echo)
        if weights is not None:
            _check_memory(weights.nbytes(self.dtype) if not bits else weights.nbytes(torch.float16) * bits // 16, self.device, dtype)
        self.tokenizer = _load_tokenizer(model, lora, trust_remote_code)
        self.model = _load_model(model, lora, self.device, self.dtype, bits, quant, trust_remote_code)
        self.has_adapter = lora is not None

    def answer(self, messages: list[dict], settings: GenerationSettings, use_adapter: bool = True) -> str:
        if use_adapter and not self.has_adapter:
            raise ValueError("no adapter loaded")
        inputs = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                    return_dict=True)
        inputs = {k: v.to(self.model.device) for k, v in inputs.items()}
        if settings.sample:
            torch.manual_seed(settings.seed)
        adapter_off = self.model.disable_adapter() if self.has_adapter and not use_adapter else contextlib.nullcontext()
        with torch.inference_mode(), adapter_off:
            out = self.model.generate(**inputs, generation_config=self._generation_config(settings))
        return self.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    def _generation_config(self, settings: GenerationSettings):
        """Greedy, or the model's own sampling settings with the given overrides; stop at any of the model's end
        tokens and the chat template's ``<|im_end|>``."""
        from transformers import GenerationConfig

        own = self.model.generation_config
        eos = _ids(own.eos_token_id) + _ids(self.tokenizer.eos_token_id)
        im_end = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if isinstance(im_end, int) and im_end != self.tokenizer.unk_token_id:
            eos.append(im_end)
        eos = list(dict.fromkeys(eos))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        if not settings.sample:
            return GenerationConfig(do_sample=False, max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        return GenerationConfig(
            do_sample=True, max_new_tokens=settings.max_new_tokens, eos_token_id=eos, pad_token_id=pad,
            temperature=_first(settings.temperature, own.temperature, 1.0), top_p=_first(settings.top_p, own.top_p, 1.0),
            top_k=_first(settings.top_k, own.top_k, 0), repetition_penalty=_first(own.repetition_penalty, 1.0),
        )


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _first(*values):
    return next(v for v in values if v is not None)


# --------------------------------------------------------------------------------------------------
# choices and checks, before anything loads
# --------------------------------------------------------------------------------------------------


def _weights_or_none(model: str):
    """The safetensors headers (for the checks); None for a model stored otherwise, which transformers loads."""
    if not os.path.isdir(model):
        raise UserError(f"--model {model}: not a directory; give a local model directory (config.json + weights)")
    try:
        return model_weights(model)
    except UserError:
        if any(f.endswith(".safetensors") for f in os.listdir(model)):
            raise  # safetensors weights that cannot be read: say so
        return None


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: torch sees no CUDA GPU here; use --device cpu (or auto)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: use auto, cpu, cuda or cuda:N")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    on_gpu = device.startswith("cuda")
    # Compute capability, not is_bf16_supported(): a V100 reports bf16 "supported" through slow emulation.
    has_bf16 = on_gpu and torch.cuda.get_device_capability(torch.device(device)) >= (8, 0)
    if dtype == "auto":
        return (torch.bfloat16 if has_bf16 else torch.float16) if on_gpu else torch.float32
    if dtype == "bf16" and on_gpu and not has_bf16:
        name = torch.cuda.get_device_name(torch.device(device))
        raise UserError(f"--dtype bf16: {name} has no bf16 (compute capability below 8.0); use --dtype fp16 or fp32")
    return DTYPES[dtype]


def _quantization(quantize: str, lora: Adapter | None, echo) -> tuple[int, dict]:
    """Bits to load the base in, and the run's quantization settings (QLoRA: as trained, unless told otherwise)."""
    trained = (lora.run_config or {}).get("quantization") or {} if lora is not None else {}
    bits = int(trained.get("bits") or 0) if quantize == "auto" else QUANTIZE_BITS[quantize]
    if bits and quantize == "auto":
        echo(f"note: the adapter was trained on a {bits}-bit base (QLoRA): loading the base {bits}-bit as in training "
             f"(--quantize none for the 16-bit base)")
    if bits:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UserError(f"--quantize: loading the base {bits}-bit needs bitsandbytes (pip install bitsandbytes), "
                            f"or pass --quantize none") from None
    return bits, trained


def _check_memory(needed: int, device: str, dtype_flag: str) -> None:
    from .merge import available_ram

    ram = available_ram()
    if ram is None:
        return
    gpus = 0
    if device.startswith("cuda"):  # device_map="auto" spreads over every visible GPU, then the CPU
        gpus = sum(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
    if needed > gpus + ram:
        where = "GPU memory + RAM" if gpus else "RAM"
        raise UserError(f"--dtype {dtype_flag}: the model's weights take {needed / 2**30:.1f} GiB in that dtype and this "
                        f"machine has {(gpus + ram) / 2**30:.1f} GiB of {where} available; use a smaller --dtype "
                        f"or --quantize 4bit")


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------


def _load_tokenizer(model: str, lora: Adapter | None, trust_remote_code: bool):
    """The adapter's tokenizer (saved by the run: the chat template it trained with), else the model's."""
    from transformers import AutoTokenizer

    from .data import ensure_chat_template

    source = lora.directory if lora is not None and os.path.isfile(os.path.join(lora.directory, "tokenizer_config.json")) else model
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _load_error(source, "a tokenizer", e) from None
    ensure_chat_template(tokenizer, source)
    return tokenizer


def _load_model(model: str, lora: Adapter | None, device: str, dtype: torch.dtype, bits: int, quant: dict,
                trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    from .model import quantization_config

    settings = SimpleNamespace(quantization=SimpleNamespace(
        bits=bits, quant_type=quant.get("quant_type", "nf4"), double_quant=quant.get("double_quant", True)))
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code, quantization_config=quantization_config(settings, dtype))
    kwargs["device_map"] = "auto" if device == "cuda" else device
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:
        raise _load_error(model, "the model", e) from None
    if lora is not None:
        from peft import PeftModel

        from .model import peft_reading_old_names

        with peft_reading_old_names():
            loaded = PeftModel.from_pretrained(loaded, lora.directory)
    loaded.eval()
    return loaded


def _load_error(source: str, what: str, error: Exception) -> UserError:
    if "trust_remote_code" in str(error):
        return UserError(f"{source}: {what} can only be loaded by running the Python code that comes with it; "
                         f"pass --trust-remote-code if you trust that code")
    return UserError(f"{source}: cannot load {what} ({(str(error).splitlines() or [type(error).__name__])[0]})")
