"""The saved-adapter check must be able to fail: an empty tensor (ZeRO-3's unsynced read), a shard
instead of the full tensor (FSDP2's rank-0-only bug), a missing tensor."""

import pytest
import torch
from safetensors.torch import save_file

from qwenloop.adapter import AdapterError, verify_adapter

EXPECTED = {
    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": (4, 64),
    "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": (64, 4),
}


def write(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    return str(tmp_path)


def good():
    return {k: torch.ones(shape) for k, shape in EXPECTED.items()}


def test_complete_adapter_passes(tmp_path):
    verify_adapter(write(tmp_path, good()), EXPECTED)


def test_empty_tensor_fails(tmp_path):
    tensors = good()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"] = torch.empty(0)
    with pytest.raises(AdapterError, match="is empty"):
        verify_adapter(write(tmp_path, tensors), EXPECTED)


def test_shard_fails(tmp_path):
    tensors = good()
    tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"] = torch.ones(32, 4)  # half of 64 rows
    with pytest.raises(AdapterError, match=r"shape \[32, 4\], the model config implies \[64, 4\]"):
        verify_adapter(write(tmp_path, tensors), EXPECTED)


def test_missing_tensor_fails(tmp_path):
    tensors = good()
    del tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    with pytest.raises(AdapterError, match="1 adapter tensors missing"):
        verify_adapter(write(tmp_path, tensors), EXPECTED)


def test_expected_shapes_follow_the_model_config(tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    from qwenloop.config import LoraSettings
    from qwenloop.model import add_lora, expected_adapter_shapes

    config = AutoConfig.from_pretrained(tiny_model)
    model = add_lora(AutoModelForCausalLM.from_pretrained(tiny_model), LoraSettings(r=4))
    shapes = expected_adapter_shapes(model)
    head_dim = config.hidden_size // config.num_attention_heads
    prefix = "base_model.model.model.layers.1"
    assert shapes[f"{prefix}.self_attn.k_proj.lora_B.weight"] == (config.num_key_value_heads * head_dim, 4)
    assert shapes[f"{prefix}.mlp.down_proj.lora_A.weight"] == (4, config.intermediate_size)
    assert len(shapes) == 2 * 7 * config.num_hidden_layers
