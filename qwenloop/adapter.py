"""Writing the LoRA adapter in PEFT's format, and checking what was written.

``output_dir/adapter/`` gets ``adapter_model.safetensors`` + ``adapter_config.json`` (loadable by
``PeftModel.from_pretrained``) and the tokenizer files. Only the main process writes, after the
backend gathered full tensors on every rank. The directory is written under a temporary name and
renamed into place, so a crash never leaves a half-written adapter where a good one was.
"""

from __future__ import annotations

import os
import shutil

from safetensors import safe_open

from .model import expected_adapter_shapes

ADAPTER_FILE = "adapter_model.safetensors"


def save_adapter(accelerator, backend, model, tokenizer, out_dir: str) -> str | None:
    """Gather (collective), write (main process), verify. Returns the directory on the main process."""
    state = backend.adapter_state_dict(model)  # every rank takes part in the gather
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return None
    peft_model = accelerator.unwrap_model(model)
    tmp = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    write_peft_adapter(peft_model, state, tmp)
    tokenizer.save_pretrained(tmp)
    verify_adapter(tmp, expected_adapter_shapes(peft_model))
    _replace_dir(tmp, out_dir)
    accelerator.wait_for_everyone()
    return out_dir


def write_peft_adapter(peft_model, state: dict, directory: str) -> None:
    """``adapter_model.safetensors`` + ``adapter_config.json`` exactly as ``PeftModel.save_pretrained``
    writes them: keys without the adapter name (``...q_proj.lora_A.weight``).

    Written here rather than by ``save_pretrained(state_dict=...)`` because PEFT re-derives the keys
    from the live module tree, which under FSDP1 still holds wrapper modules, and then silently
    writes an empty file (seen with peft 0.21)."""
    import copy

    from safetensors.torch import save_file

    adapter_name = getattr(peft_model, "active_adapter", "default")
    marker = f".{adapter_name}."
    tensors = {key.replace(marker, "."): tensor.contiguous() for key, tensor in state.items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, ADAPTER_FILE), metadata={"format": "pt"})
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(directory)


def verify_adapter(directory: str, expected: dict[str, tuple[int, ...]]) -> None:
    """Re-read the safetensors file: every expected tensor present, non-empty, with the config's shape.

    This is what catches the ZeRO-3 "empty adapter" and the FSDP "rank 0's shard only" bugs.
    """
    path = os.path.join(directory, ADAPTER_FILE)
    with safe_open(path, framework="pt") as f:
        found = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise AdapterError(f"{path}: {len(missing)} adapter tensors missing, e.g. {missing[0]}")
    for key, shape in found.items():
        if 0 in shape or not shape:
            raise AdapterError(f"{path}: tensor {key} is empty (shape {list(shape)}): the gather before saving failed")
        if key in expected and shape != tuple(expected[key]):
            raise AdapterError(
                f"{path}: tensor {key} has shape {list(shape)}, the model config implies {list(expected[key])} "
                f"(a shard was saved instead of the full tensor)"
            )


class AdapterError(RuntimeError):
    """A written adapter failed its check: a bug or a backend problem, not bad user input."""


def _replace_dir(tmp: str, final: str) -> None:
    old = f"{final}.old-{os.getpid()}"
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
