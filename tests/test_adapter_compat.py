"""Adapters that serving engines read: the adapter a qwenloop run writes has the tensor names, shapes and
``adapter_config.json`` that PEFT's own ``save_pretrained`` writes for the same model and LoRA config, loads
unchanged in PEFT and in transformers' ``load_adapter``, and follows what vLLM's LoRA loader reads.

vLLM is not installed here; its rules are restated from its source (vllm-project/vllm):
``vllm/lora/peft_helper.py`` (``PEFTHelper``: required ``r``, ``lora_alpha``, ``target_modules``; refuses
``modules_to_save`` and ``use_dora``; ``bias`` other than "none" needs ``bias_enabled``; scaling ``lora_alpha / r``,
or ``/ sqrt(r)`` with ``use_rslora``), ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name`` (names
``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``), ``vllm/lora/lora_model.py``
``from_local_checkpoint`` (reads ``adapter_model.safetensors``; every module's last name must be one the model
supports, for Qwen2 the projections its ``qkv_proj`` / ``gate_up_proj`` pack plus ``o_proj`` and ``down_proj``).
"""

import json
import re

import pytest
import torch

from after_training import logits, trained_adapter
from conftest import load_adapter_tensors

QWEN2_VLLM_LORA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                           "embed_tokens", "lm_head"}


@pytest.fixture(scope="module")
def adapter(tiny_model, train_jsonl):
    return trained_adapter(tiny_model, train_jsonl)


@pytest.fixture(scope="module")
def peft_saved(tiny_model, adapter, tmp_path_factory):
    """PEFT's own save of the tiny model with the LoRA config the run was given (its config.yaml)."""
    import yaml
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = yaml.safe_load((adapter.parent / "config.yaml").read_text())["lora"]
    config = LoraConfig(task_type="CAUSAL_LM", r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                        target_modules=lora["target_modules"], bias=lora["bias"])
    out = tmp_path_factory.mktemp("peft") / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), config).save_pretrained(str(out))
    return out


def read_config(directory) -> dict:
    config = json.loads((directory / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # PEFT stores a set: its order is arbitrary
    return config


def test_tensor_names_shapes_and_config_match_peft_save_pretrained(adapter, peft_saved):
    ours, theirs = load_adapter_tensors(adapter), load_adapter_tensors(peft_saved)
    assert sorted(ours) == sorted(theirs)
    assert {k: (tuple(t.shape), t.dtype) for k, t in ours.items()} == {k: (tuple(t.shape), t.dtype) for k, t in theirs.items()}
    ours_config, theirs_config = read_config(adapter), read_config(peft_saved)
    for field in ("r", "lora_alpha", "target_modules", "bias", "modules_to_save", "use_rslora", "use_dora",
                  "peft_type", "task_type", "fan_in_fan_out", "base_model_name_or_path", "rank_pattern", "alpha_pattern"):
        assert ours_config.get(field) == theirs_config.get(field), field
    assert ours_config == theirs_config  # and nothing else differs either


def test_loads_unchanged_in_peft_and_in_transformers_load_adapter(tiny_model, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 500, (1, 20), generator=torch.Generator().manual_seed(1))
    base = logits(tiny_model, ids)
    through_peft = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(adapter)), ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.load_adapter(str(adapter))
    through_transformers = logits(model, ids)
    assert (through_peft - base).abs().max() > 0.1
    torch.testing.assert_close(through_transformers, through_peft, rtol=1e-6, atol=1e-6)


def test_follows_the_layout_vllm_reads(adapter):
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert {"r", "lora_alpha", "target_modules"} <= set(config)  # PEFTHelper's required fields
    assert not config.get("modules_to_save") and not config.get("use_dora") and config.get("bias", "none") == "none"
    assert set(config["target_modules"]) <= QWEN2_VLLM_LORA_MODULES
    tensors = load_adapter_tensors(adapter)
    modules = set()
    for name in tensors:
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)\.weight", name)
        assert match, f"{name}: not a name vLLM's parse_fine_tuned_lora_name takes"
        assert ".default." not in name  # no PEFT adapter name inside
        modules.add(match.group(1))
        assert match.group(1).rsplit(".", 1)[-1] in QWEN2_VLLM_LORA_MODULES
    for module in modules:  # both halves, rank r on the inside
        a, b = tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == config["r"]
