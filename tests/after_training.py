"""Helpers shared by the after-training tests (generate, merge, adapter compatibility): a LoRA adapter trained on
the tiny model the way the demo trains it (briefly), and adapters spoiled on purpose."""

import json
import shutil
from pathlib import Path

from conftest import _SESSION_TMP, base_config, train_in_process

PROMPTS = ["What is the capital of France?", "Repeat twice: red blue", "Uppercase: green apple"]


def trained_adapter(tiny_model: str, train_jsonl: str, quantized: bool = False) -> Path:
    """The adapter directory of a short demo-style run on the tiny model (30 steps, ~10 s on 2 cores; 3 steps for
    QLoRA), trained once per test session and shared by the test modules that need one."""
    name = "qlora-run" if quantized else "lora-run"
    out = _SESSION_TMP / "after-training" / name
    adapter = out / "adapter"
    if (adapter / "adapter_config.json").is_file():
        return adapter
    overrides = dict(max_steps=30, micro_batch_size=8, learning_rate=3e-3, lora={"r": 8, "alpha": 16},
                     gradient_checkpointing=False)
    if quantized:
        overrides.update(max_steps=3, quantization={"bits": 4})
    result = train_in_process(base_config(tiny_model, train_jsonl, out, **overrides))
    assert Path(result.adapter_dir) == adapter
    return adapter


def copy_adapter(src: Path, dst: Path, rename: tuple[str, str] | None = None, reshape: str | None = None,
                 config: dict | None = None) -> Path:
    """A copy of the adapter at ``src`` with tensors renamed (``(old, new)``: every key holding ``old``), one tensor
    (the first key containing ``reshape``) given a wrong shape, or config fields changed."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "adapter_model.safetensors"))
    for key in [k for k in sorted(tensors) if rename and rename[0] in k]:
        tensors[key.replace(*rename)] = tensors.pop(key)
    if reshape:
        key = next(k for k in sorted(tensors) if reshape in k)
        tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 3)
    save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
    if config:
        path = dst / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return dst


def logits(model_or_dir, input_ids):
    """The logits of ``input_ids`` under a model (or a model directory, loaded in fp32)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_or_dir), dtype=torch.float32) if isinstance(model_or_dir, (str, Path)) else model_or_dir
    with torch.no_grad():
        return model.eval()(input_ids).logits.float()


def listing(directory: Path) -> list[str]:
    """Every entry of ``directory``, to show that a refused command wrote nothing (no temporary directories either)."""
    return sorted(p.name for p in Path(directory).iterdir())
