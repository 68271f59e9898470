"""Reading a LoRA adapter directory (PEFT's format) for ``merge`` and ``generate``: its config, its tensors paired
per adapted weight, the scale of each pair, and whether it fits a given model, checked from file headers alone.

Tensor names follow PEFT's ``save_pretrained`` (which ``adapter.write_peft_adapter`` reproduces, and which vLLM's
loader parses the same way, ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name``): ``base_model.model.<module>``
followed by ``.lora_A.weight`` / ``.lora_B.weight`` (linear layers), ``.lora_embedding_A`` / ``.lora_embedding_B``
(embeddings), or ``.base_layer.<param>`` / ``.<param>`` for base parameters trained beside the adapter (``bias:
all`` or ``lora_only``), which replace the model's.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field

import torch

from .adapter import ADAPTER_FILE
from .errors import UserError
from .tensorfiles import ModelWeights, Reader, read_header

CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."
LINEAR_ENDS = (".lora_A.weight", ".lora_B.weight")
EMBEDDING_ENDS = (".lora_embedding_A", ".lora_embedding_B")

# adapter_config.json settings that change what the tensors mean, and that a plain W + scale * B @ A merge would
# silently get wrong: refused by name instead.
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "a bias on lora_B",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "trainable_token_indices": "trainable token indices",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "layer_replication": "layer replication",
    "use_qalora": "QALoRA",
}


@dataclass
class LoraPair:
    """One adapted weight of the model: ``weight`` (its name in the model) gets ``scale * B @ A`` added."""

    weight: str
    a: torch.Tensor
    b: torch.Tensor
    key: str  # the lora_A tensor's name in the adapter file, for messages
    embedding: bool
    scale: float

    def delta(self, fan_in_fan_out: bool) -> torch.Tensor:
        """``scale * B @ A`` in fp32, in the layout of the model's weight."""
        delta = (self.b.float() @ self.a.float()).mul_(self.scale)
        return delta.T if (self.embedding or fan_in_fan_out) else delta  # embeddings are [vocab, dim]

    def expected_shape(self, fan_in_fan_out: bool) -> tuple[int, int]:
        out_dim, in_dim = self.b.shape[0], self.a.shape[1]
        return (in_dim, out_dim) if (self.embedding or fan_in_fan_out) else (out_dim, in_dim)


@dataclass
class Adapter:
    directory: str
    config: dict
    pairs: dict[str, LoraPair]  # by model weight name
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)  # model weight name -> trained base parameter
    replaced_keys: dict[str, str] = field(default_factory=dict)  # model weight name -> adapter tensor name
    run_config: dict | None = None  # the training run's config.yaml, when the adapter sits in a qwenloop run

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out"))

    @property
    def quantized_bits(self) -> int:
        """4 or 8 when qwenloop trained this adapter on a bitsandbytes-quantized base (QLoRA), else 0."""
        quant = (self.run_config or {}).get("quantization") or {}
        return int(quant.get("bits") or 0)

    @property
    def base_name(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "?")


def find_adapter_dir(path: str) -> str:
    """``path`` itself when it holds ``adapter_config.json``; a run directory or a checkpoint also works (their
    ``adapter/``), since that is what users have at hand after training."""
    for candidate in (path, os.path.join(path, "adapter")):
        if os.path.isfile(os.path.join(candidate, CONFIG_FILE)):
            return candidate
    if not os.path.exists(path):
        raise UserError(f"--adapter {path}: not found; give the adapter directory a run wrote (output_dir/adapter)")
    raise UserError(f"--adapter {path}: no {CONFIG_FILE} there or in {os.path.join(path, 'adapter')}; "
                    f"give the adapter directory a run wrote (output_dir/adapter)")


def load_adapter(path: str) -> Adapter:
    """Config and tensors (adapters are MBs, read whole) of the adapter at ``path``, paired per model weight."""
    directory = find_adapter_dir(path)
    config = _read_config(directory)
    tensors = _read_tensors(directory)
    adapter = Adapter(directory, config, {}, run_config=_run_config(directory))
    _pair_up(adapter, tensors)
    return adapter


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot be read as JSON ({str(e).splitlines()[0]}); copy the adapter again")
    if config.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; qwenloop merges and loads LoRA adapters only")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise UserError(f"{path}: {key} is set: {what} is not supported by qwenloop merge/generate; "
                            f"use PEFT's merge_and_unload for this adapter")
    for key in ("r", "lora_alpha"):
        if not isinstance(config.get(key), (int, float)) or config[key] <= 0:
            raise UserError(f"{path}: {key} must be a positive number, found {config.get(key)!r}")
    return config


def _read_tensors(directory: str) -> dict[str, torch.Tensor]:
    path = os.path.join(directory, ADAPTER_FILE)
    if os.path.isfile(path):  # read without a memory map, which would hold the file in RSS beside the copies
        tensors, _ = read_header(path)
        with Reader(path, tensors) as reader:
            return {name: reader.read(name) for name in tensors}
    legacy = os.path.join(directory, "adapter_model.bin")
    if os.path.isfile(legacy):  # adapters written by older PEFT versions
        return torch.load(legacy, map_location="cpu", weights_only=True)
    raise UserError(f"{directory}: has {CONFIG_FILE} but no {ADAPTER_FILE}; the adapter is incomplete, copy it again")


def _run_config(directory: str) -> dict | None:
    """The ``config.yaml`` qwenloop writes next to ``adapter/`` (final adapter and checkpoints alike)."""
    import yaml

    for candidate in (os.path.join(directory, "config.yaml"), os.path.join(os.path.dirname(os.path.abspath(directory)), "config.yaml")):
        if os.path.isfile(candidate):
            try:
                with open(candidate, encoding="utf-8") as f:
                    found = yaml.safe_load(f)
            except (OSError, yaml.YAMLError):
                return None
            return found if isinstance(found, dict) else None
    return None


def _classify(name: str) -> tuple[str, str, bool] | None:
    """``(module, "A" or "B", is_embedding)`` of a LoRA tensor name (without the prefix), None for anything else."""
    for ends, embedding in ((LINEAR_ENDS, False), (EMBEDDING_ENDS, True)):
        for end, half in zip(ends, "AB"):
            if name.endswith(end):
                return name[: -len(end)], half, embedding
    return None


def _pair_up(adapter: Adapter, tensors: dict[str, torch.Tensor]) -> None:
    halves: dict[tuple[str, bool], dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        found = _classify(name)
        if found is not None:
            module, half, embedding = found
            halves.setdefault((module, embedding), {})[half] = (key, tensor)
        elif ".lora_" in name:  # DoRA magnitudes and whatever PEFT adds next
            raise UserError(f"{adapter.directory}: tensor {key} is not a LoRA weight qwenloop understands "
                            f"(only lora_A/lora_B and lora_embedding_A/B); use PEFT's merge_and_unload for it")
        else:  # a base parameter trained with the adapter (bias: all / lora_only): it replaces the model's
            weight = name.replace(".base_layer.", ".")
            adapter.replaced[weight], adapter.replaced_keys[weight] = tensor, key
    for (module, embedding), found in halves.items():
        if "A" not in found or "B" not in found:
            missing = "lora_B" if "A" in found else "lora_A"
            raise UserError(f"{adapter.directory}: {module} has no {missing} tensor; the adapter file is incomplete")
        (key_a, a), (_, b) = found["A"], found["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise UserError(f"{adapter.directory}: tensor {key_a} {list(a.shape)} and its lora_B {list(b.shape)} "
                            f"do not form a rank-r pair; the adapter file is damaged")
        weight = module + ".weight"
        adapter.pairs[weight] = LoraPair(weight, a, b, key_a, embedding, _scale(adapter.config, module, a.shape[0]))


def _scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of one module: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), with alpha from
    ``alpha_pattern`` when a pattern matches the module and r from the tensor itself (``rank_pattern``'s result)."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        # PEFT's matcher (peft/utils/other.py get_pattern_key): the first key that matches the name's end
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


# --------------------------------------------------------------------------------------------------
# does the adapter fit this model?
# --------------------------------------------------------------------------------------------------


def check_fits(adapter: Adapter, weights: ModelWeights) -> None:
    """Every adapted weight exists in the model with the shape the LoRA tensors imply; the first one that does not
    is a ``UserError`` naming the adapter tensor, the model weight and both shapes."""
    hint = (f"use the model the adapter was trained on (its {CONFIG_FILE} names {adapter.base_name})")
    for name, pair in sorted(adapter.pairs.items()):
        _check_one(adapter, weights, name, pair.key, pair.expected_shape(adapter.fan_in_fan_out), hint)
    for name, tensor in sorted(adapter.replaced.items()):
        _check_one(adapter, weights, name, adapter.replaced_keys[name], tuple(tensor.shape), hint)


def _check_one(adapter: Adapter, weights: ModelWeights, name: str, key: str, shape: tuple, hint: str) -> None:
    info = weights.tensors.get(name)
    if info is None:
        close = difflib.get_close_matches(name, list(weights.tensors), n=1)
        has = f" (closest: {close[0]})" if close else ""
        raise UserError(f"adapter {adapter.directory}: tensor {key} adapts {name}, which model {weights.directory} "
                        f"does not have{has}; {hint}")
    if tuple(info.shape) != tuple(shape):
        raise UserError(f"adapter {adapter.directory}: tensor {key} implies {name} of shape {list(shape)}, but model "
                        f"{weights.directory} has {list(info.shape)}; {hint}")


def base_name_differs(adapter: Adapter, model_dir: str) -> bool:
    """Whether the adapter's recorded base looks like another model than ``model_dir`` (a note, not an error:
    models get moved and renamed; names and shapes are what ``check_fits`` holds against the model)."""
    recorded = adapter.config.get("base_model_name_or_path")
    if not recorded:
        return False
    if os.path.exists(recorded) and os.path.exists(model_dir):
        return os.path.realpath(recorded) != os.path.realpath(model_dir)
    return os.path.basename(os.path.normpath(recorded)) != os.path.basename(os.path.normpath(model_dir))
