"""Model shapes for the planner: every number the memory and time model needs of a dense decoder.

A ``ModelSpec`` comes from a preset (``PRESETS``: every dense Qwen2, Qwen2.5 and Qwen3 size, numbers
from their ``config.json``) or from a model's own config: ``spec_from_config`` takes a transformers
config object, a ``config.json`` or a model directory, and reads the JSON with ``json`` alone, so a
plan needs neither transformers nor the weights. ``resolve_model`` takes either kind of name.

The parameter count is the one transformers builds (``sum(p.numel() for p in model.parameters())``
of the ``*ForCausalLM``, a tied head counted once):

* embedding ``V*H``; the LM head ``V*H`` again unless ``tie_word_embeddings``;
* per layer: the q/k/v/o and gate/up/down weights; q/k/v biases (Qwen2 / Qwen2.5 always; Qwen3 and
  Llama-style models when ``attention_bias``, and then o_proj too); MLP biases (Llama's
  ``mlp_bias``); two RMSNorms (``2*H``); Qwen3's per-head q_norm and k_norm (``2*head_dim``);
* the final norm ``H``.

Model types other than qwen2 / qwen3 / llama / mistral are planned as Llama-style decoders: the
shapes hold for most (that is what ``qwenloop.flops`` assumes too), the count may miss an extra norm.
Mixture-of-experts and linear-attention hybrids are refused: their memory and time follow other rules.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from ..flops import DecoderShape

# Per-layer linear projections, in the order of the training config's default LoRA targets.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Config keys that only a mixture-of-experts model has (a non-empty value), across Qwen2-MoE, Qwen3-MoE,
# Mixtral, DeepSeek and friends.
MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size", "num_experts_per_tok")

REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """The shapes of one dense decoder: enough to size its weights, LoRA adapter, activations and FLOPs.

    Frozen: presets are shared, and a plan must not change the model it was asked about.
    """

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    has_qkv_bias: bool
    """q, k and v projections have biases (Qwen2 / Qwen2.5; Qwen3 only with ``attention_bias``)."""
    has_qk_norm: bool
    """Per-head RMSNorm on queries and keys (Qwen3)."""
    max_position_embeddings: int | None
    """Longest sequence the config allows (``None`` when the config does not say)."""
    model_type: str
    name: str
    has_o_bias: bool = False
    """o_proj has a bias (Llama-style / Qwen3 ``attention_bias``; never in Qwen2)."""
    has_mlp_bias: bool = False
    """gate/up/down projections have biases (Llama's ``mlp_bias``)."""

    def __post_init__(self) -> None:
        """Reject shapes no model has, so every later division and product is meaningful."""
        for f in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "vocab_size"):
            value = getattr(self, f)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"{self.name}: {f} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"{self.name}: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )

    # --- shapes --------------------------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        """Width of the queries (and of o_proj's input): ``heads * head_dim``, not always ``hidden``."""
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        """Width of the keys and of the values, per token and layer (grouped-query attention)."""
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """``{"q_proj": (in_features, out_features), ...}`` of one layer: LoRA's ``A`` is ``r x in``, ``B`` ``out x r``."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (h, self.q_dim),
            "k_proj": (h, self.kv_dim),
            "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    # --- parameter counts ----------------------------------------------------------------------
    @property
    def embedding_params(self) -> int:
        """Input embedding ``V*H`` (also the head's weights when tied)."""
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        """Separate LM head weights: ``V*H``, or 0 when tied to the embedding."""
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's linear projections, all layers: what 4/8-bit quantization replaces."""
        return self.num_layers * sum(i * o for i, o in self.linear_shapes().values())

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: weights, biases and norms."""
        weights = sum(i * o for i, o in self.linear_shapes().values())
        biases = (self.q_dim + 2 * self.kv_dim) * self.has_qkv_bias
        biases += self.hidden_size * self.has_o_bias
        biases += (2 * self.intermediate_size + self.hidden_size) * self.has_mlp_bias
        norms = 2 * self.hidden_size + 2 * self.head_dim * self.has_qk_norm
        return weights + biases + norms

    @property
    def num_params(self) -> int:
        """All parameters, as ``model.parameters()`` counts them (a tied head once)."""
        return self.embedding_params + self.num_layers * self.layer_params + self.hidden_size + self.lm_head_params

    @property
    def non_embedding_params(self) -> int:
        """Parameters outside the embedding and the head (the model cards' "non-embedding" figure)."""
        return self.num_params - self.embedding_params - self.lm_head_params

    def lora_params(self, rank: int, targets: Iterable[str] = LINEAR_NAMES) -> int:
        """Trainable parameters of a rank-``rank`` LoRA on ``targets`` (per-layer projections and/or ``lm_head``)."""
        shapes = self.linear_shapes()
        total = 0
        for target in targets:
            if target == "lm_head":
                total += rank * (self.hidden_size + self.vocab_size)
            elif target in shapes:
                total += rank * sum(shapes[target]) * self.num_layers
            else:
                raise UserError(
                    f"{self.name}: LoRA target {target!r} is not a linear projection of this model; "
                    f"choose from {', '.join(LINEAR_NAMES)}, lm_head"
                )
        return total

    def decoder_shape(self, lora_rank: int = 0, lora_targets: Iterable[str] = ()) -> DecoderShape:
        """The ``qwenloop.flops`` shape of this model, so the time estimate counts FLOPs as the ``mfu`` metric does.

        As in ``flops.decoder_shape``, LoRA on ``lm_head`` adds no FLOPs here.
        """
        per_layer = [t for t in lora_targets if t != "lm_head"]
        lora = self.lora_params(lora_rank, per_layer) if lora_rank else 0
        return DecoderShape(self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads,
                            self.num_kv_heads, self.head_dim, self.vocab_size, lora)


# --------------------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------------------

def _qwen2(name: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, vocab: int,
           tied: bool, max_positions: int) -> ModelSpec:
    """A Qwen2 / Qwen2.5 dense model: q/k/v biases, no o_proj bias, head_dim = hidden / heads."""
    return ModelSpec(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=hidden // heads, vocab_size=vocab, tie_word_embeddings=tied,
                     has_qkv_bias=True, has_qk_norm=False, max_position_embeddings=max_positions,
                     model_type="qwen2", name=name)


def _qwen3(name: str, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, tied: bool) -> ModelSpec:
    """A Qwen3 dense model: no biases, q/k norms, head_dim 128 whatever the width, vocab 151936, 40960 positions."""
    return ModelSpec(hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv_heads, head_dim=128, vocab_size=151936, tie_word_embeddings=tied,
                     has_qkv_bias=False, has_qk_norm=True, max_position_embeddings=40960,
                     model_type="qwen3", name=name)


PRESETS: dict[str, ModelSpec] = {
    # Qwen2: https://huggingface.co/Qwen/Qwen2-{0.5B,1.5B,7B,72B}/blob/main/config.json, and the Qwen2
    # Technical Report (arXiv:2407.10671) Table 1 (hidden, layers, query / KV heads, intermediate, tying).
    # max_position_embeddings: 131072, the base configs' value (the model cards give 0.5B / 1.5B a 32K context).
    "qwen2-0.5b": _qwen2("Qwen/Qwen2-0.5B", 896, 4864, 24, 14, 2, 151936, True, 131072),
    "qwen2-1.5b": _qwen2("Qwen/Qwen2-1.5B", 1536, 8960, 28, 12, 2, 151936, True, 131072),
    "qwen2-7b": _qwen2("Qwen/Qwen2-7B", 3584, 18944, 28, 28, 4, 152064, False, 131072),
    "qwen2-72b": _qwen2("Qwen/Qwen2-72B", 8192, 29568, 80, 64, 8, 152064, False, 131072),
    # Qwen2.5: https://huggingface.co/Qwen/Qwen2.5-{0.5B,...,72B}/blob/main/config.json and the Qwen2.5
    # Technical Report (arXiv:2412.15115) Table 1. Context: 32K for 0.5B-3B, 128K from 7B up (the
    # -Instruct repositories of 7B+ say 32768 in config.json and reach 128K with YaRN).
    "qwen2.5-0.5b": _qwen2("Qwen/Qwen2.5-0.5B", 896, 4864, 24, 14, 2, 151936, True, 32768),
    "qwen2.5-1.5b": _qwen2("Qwen/Qwen2.5-1.5B", 1536, 8960, 28, 12, 2, 151936, True, 32768),
    "qwen2.5-3b": _qwen2("Qwen/Qwen2.5-3B", 2048, 11008, 36, 16, 2, 151936, True, 32768),
    "qwen2.5-7b": _qwen2("Qwen/Qwen2.5-7B", 3584, 18944, 28, 28, 4, 152064, False, 131072),
    "qwen2.5-14b": _qwen2("Qwen/Qwen2.5-14B", 5120, 13824, 48, 40, 8, 152064, False, 131072),
    "qwen2.5-32b": _qwen2("Qwen/Qwen2.5-32B", 5120, 27648, 64, 40, 8, 152064, False, 131072),
    "qwen2.5-72b": _qwen2("Qwen/Qwen2.5-72B", 8192, 29568, 80, 64, 8, 152064, False, 131072),
    # Qwen3 dense: https://huggingface.co/Qwen/Qwen3-{0.6B,1.7B,4B,8B,14B,32B}/blob/main/config.json
    # (head_dim 128, vocab 151936, max_position_embeddings 40960 in all) and the Qwen3 Technical Report
    # (arXiv:2505.09388) Table 1 (layers, heads, tying: 0.6B-4B tied).
    "qwen3-0.6b": _qwen3("Qwen/Qwen3-0.6B", 1024, 3072, 28, 16, 8, True),
    "qwen3-1.7b": _qwen3("Qwen/Qwen3-1.7B", 2048, 6144, 28, 16, 8, True),
    "qwen3-4b": _qwen3("Qwen/Qwen3-4B", 2560, 9728, 36, 32, 8, True),
    "qwen3-8b": _qwen3("Qwen/Qwen3-8B", 4096, 12288, 36, 32, 8, False),
    "qwen3-14b": _qwen3("Qwen/Qwen3-14B", 5120, 17408, 40, 40, 8, False),
    "qwen3-32b": _qwen3("Qwen/Qwen3-32B", 5120, 25600, 64, 64, 8, False),
}


# --------------------------------------------------------------------------------------------------
# From a config
# --------------------------------------------------------------------------------------------------

def spec_from_config(config_or_path: Any, name: str | None = None) -> ModelSpec:
    """The ``ModelSpec`` of a transformers config object, a config dict, a ``config.json`` or a model directory.

    Multimodal configs are read through their ``text_config``. Raises ``UserError`` for a missing file,
    a missing field (named), a mixture-of-experts or linear-attention model.
    """
    if isinstance(config_or_path, (str, os.PathLike)):
        raw, source = _read_config_json(os.fspath(config_or_path))
        default_name = _name_from_path(source)
    elif isinstance(config_or_path, Mapping):
        raw, source = dict(config_or_path), "config"
        default_name = None
    elif hasattr(config_or_path, "to_dict"):
        raw, source = config_or_path.to_dict(), type(config_or_path).__name__
        default_name = None
    else:
        raise UserError(
            f"cannot read model shapes from a {type(config_or_path).__name__}; "
            "give a transformers config, a config.json or a model directory"
        )
    return _spec_from_dict(raw, source, name or raw.get("_name_or_path") or default_name)


def _read_config_json(path: str) -> tuple[dict, str]:
    """Load ``path`` (a ``config.json`` or a directory holding one) with ``json``; a one-line error otherwise."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        where = f"{path}: no config.json in this directory" if os.path.isdir(path) else f"{path}: no such file"
        raise UserError(f"{where}; give a model directory, its config.json, or a preset name")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{file}: cannot read it as JSON ({e})")
    if not isinstance(raw, dict):
        raise UserError(f"{file}: expected a JSON object of config fields, got {type(raw).__name__}")
    return raw, file


def _name_from_path(config_file: str) -> str:
    """A model's display name: its directory's name (``.../Qwen2.5-7B-Instruct/config.json`` -> ``Qwen2.5-7B-Instruct``)."""
    return os.path.basename(os.path.dirname(os.path.abspath(config_file))) or config_file


def _spec_from_dict(raw: dict, source: str, name: str | None) -> ModelSpec:
    """Build the spec from config fields; ``text_config`` (multimodal wrappers) overrides the outer keys."""
    text = raw.get("text_config")
    cfg = {**{k: v for k, v in raw.items() if k != "text_config"}, **text} if isinstance(text, dict) else raw
    model_type = str(cfg.get("model_type") or raw.get("model_type") or "")
    _refuse_unplannable(raw, cfg, model_type, source)

    values = {key: _positive_int(cfg, key, source) for key in REQUIRED_KEYS}
    hidden, heads = values["hidden_size"], values["num_attention_heads"]
    kv_heads = _positive_int(cfg, "num_key_value_heads", source) if cfg.get("num_key_value_heads") else heads
    if cfg.get("head_dim"):
        head_dim = _positive_int(cfg, "head_dim", source)
    elif model_type.startswith("qwen3"):
        head_dim = 128  # Qwen3Config's default: a config.json that leaves head_dim out means 128
    elif hidden % heads:
        raise UserError(f"{source}: no 'head_dim' field, and hidden_size {hidden} is not a multiple of "
                        f"num_attention_heads {heads}; add head_dim")
    else:
        head_dim = hidden // heads
    max_positions = cfg.get("max_position_embeddings")
    return ModelSpec(
        hidden_size=hidden,
        intermediate_size=values["intermediate_size"],
        num_layers=values["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=values["vocab_size"],
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        max_position_embeddings=max_positions if isinstance(max_positions, int) and max_positions > 0 else None,
        model_type=model_type or "unknown",
        name=name or model_type or "model",
        **_bias_and_norm_flags(cfg, model_type),
    )


def _bias_and_norm_flags(cfg: dict, model_type: str) -> dict[str, bool]:
    """Which biases and extra norms the model type builds (read from transformers' modeling code)."""
    if model_type.startswith("qwen2"):  # Qwen2 / Qwen2.5 (and their VL text models): q/k/v bias hard-wired
        return {"has_qkv_bias": True, "has_o_bias": False, "has_mlp_bias": False, "has_qk_norm": False}
    attention_bias = bool(cfg.get("attention_bias", False))
    return {
        "has_qkv_bias": attention_bias,
        "has_o_bias": attention_bias,
        "has_mlp_bias": bool(cfg.get("mlp_bias", False)) and not model_type.startswith("qwen3"),
        "has_qk_norm": model_type.startswith("qwen3"),
    }


def _refuse_unplannable(raw: dict, cfg: dict, model_type: str, source: str) -> None:
    """Mixture-of-experts and linear-attention hybrids: their memory and time are not a dense decoder's."""
    types = f"{raw.get('model_type', '')} {model_type}".lower()
    moe_key = next((k for k in MOE_KEYS if cfg.get(k)), None)
    if "moe" in types or moe_key:
        why = f"'{moe_key}' in its config" if moe_key else f"model_type {model_type or raw.get('model_type')!r}"
        raise UserError(f"{source}: mixture-of-experts model ({why}); `qwenloop plan` does not plan MoE models "
                        "yet, only dense decoders (Qwen2 / Qwen2.5 / Qwen3 dense, Llama-style)")
    layer_types = cfg.get("layer_types")
    if isinstance(layer_types, list) and any(t not in ("full_attention", "sliding_attention") for t in layer_types):
        odd = sorted({str(t) for t in layer_types} - {"full_attention", "sliding_attention"})
        raise UserError(f"{source}: layers of type {', '.join(odd)}; `qwenloop plan` only plans decoders "
                        "whose every layer is softmax attention + MLP")


def _positive_int(cfg: dict, key: str, source: str) -> int:
    """``cfg[key]`` as a positive int, or a one-line error that names the field."""
    if key not in cfg or cfg[key] is None:
        raise UserError(f"{source}: no {key!r} field; the planner needs {', '.join(REQUIRED_KEYS)} "
                        "of a dense decoder (Qwen2 / Qwen2.5 / Qwen3, Llama-style)")
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{source}: {key} must be a positive integer, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------------
# By name
# --------------------------------------------------------------------------------------------------

def resolve_model(name_or_path: str | os.PathLike | ModelSpec) -> ModelSpec:
    """A preset (``qwen2.5-7b``; case-insensitive, ``Qwen/`` and ``-Instruct`` / ``-Base`` accepted) or a path.

    An existing path wins over a preset of the same name. A typo gets a did-you-mean.
    """
    if isinstance(name_or_path, ModelSpec):
        return name_or_path
    text = os.fspath(name_or_path)
    if os.path.exists(text):
        return spec_from_config(text)
    key = preset_key(text)
    if key in PRESETS:
        return PRESETS[key]
    close = ([k for k in PRESETS if key and k.startswith(key)][:3]  # "qwen3-1": qwen3-1.7b and qwen3-14b
             or difflib.get_close_matches(key, list(PRESETS), n=3, cutoff=0.6))
    hint = f"did you mean {' or '.join(close)}?" if close else f"presets: {', '.join(PRESETS)}"
    raise UserError(f"unknown model {text!r}: not a preset and no such path; {hint} "
                    "(or give a model directory / config.json)")


def preset_key(text: str) -> str:
    """``"Qwen/Qwen2.5-7B-Instruct"`` -> ``"qwen2.5-7b"``: instruct and base repositories share their shapes."""
    key = text.strip().lower()
    key = key.removeprefix("qwen/")
    for suffix in ("-instruct", "-base", "-chat"):
        key = key.removesuffix(suffix)
    return key

