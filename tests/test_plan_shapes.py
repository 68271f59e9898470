"""The planner's foundation: model shapes and parameter counts (presets and configs), and the GPU table.

Parameter counts of configs are checked exactly against the model transformers builds (on the meta
device: nothing is allocated); the presets against the sizes Qwen publishes.
"""

import dataclasses
import json

import pytest

from qwenloop import flops
from qwenloop.errors import UserError
from qwenloop.plan import GPU_PRESETS, PRESETS, ModelSpec, custom_gpu, resolve_gpu, resolve_model, spec_from_config
from qwenloop.plan.shapes import LINEAR_NAMES, preset_key

# Published total parameter counts, in billions.
# Qwen2.5 and Qwen3: "Number of Parameters" on each model card (https://huggingface.co/Qwen/<name>).
# Qwen2 0.5B / 1.5B / 72B: the Qwen2 release blog's table (https://qwenlm.github.io/blog/qwen2/).
# Qwen2-7B: the blog's 7.07B leaves out the untied LM head (152064 x 3584 = 0.55B); its Hugging Face
# page gives 7.62B (safetensors), and Qwen2.5-7B, which has the very same shapes, 7.61B on its card.
PUBLISHED_BILLIONS = {
    "qwen2-0.5b": 0.49,
    "qwen2-1.5b": 1.54,
    "qwen2-7b": 7.62,
    "qwen2-72b": 72.71,
    "qwen2.5-0.5b": 0.49,
    "qwen2.5-1.5b": 1.54,
    "qwen2.5-3b": 3.09,
    "qwen2.5-7b": 7.61,
    "qwen2.5-14b": 14.7,
    "qwen2.5-32b": 32.5,
    "qwen2.5-72b": 72.7,
    "qwen3-0.6b": 0.6,
    "qwen3-1.7b": 1.7,
    "qwen3-4b": 4.0,
    "qwen3-8b": 8.2,
    "qwen3-14b": 14.8,
    "qwen3-32b": 32.8,
}


def meta_param_count(model_class, config) -> int:
    """Parameters of ``model_class(config)`` built on the meta device (shapes only), a tied head once."""
    import torch

    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


def write_config(config, directory) -> str:
    """Save a transformers config as ``directory/config.json``, as ``save_pretrained`` writes it."""
    config.save_pretrained(str(directory))
    return str(directory)


# --- presets -----------------------------------------------------------------------------------

def test_every_dense_qwen_size_has_a_preset():
    assert set(PRESETS) == set(PUBLISHED_BILLIONS)


@pytest.mark.parametrize("key", sorted(PUBLISHED_BILLIONS))
def test_preset_parameter_count_matches_the_published_size(key):
    published = PUBLISHED_BILLIONS[key] * 1e9
    assert abs(PRESETS[key].num_params - published) / published < 0.02, (key, PRESETS[key].num_params)


def test_preset_counts_known_exactly():
    # Hugging Face's safetensors totals of these checkpoints.
    assert PRESETS["qwen2.5-7b"].num_params == 7_615_616_512
    assert PRESETS["qwen2.5-0.5b"].num_params == 494_032_768
    assert PRESETS["qwen3-0.6b"].num_params == 596_049_920


def test_non_embedding_counts_match_the_model_cards():
    # Model cards: Qwen2.5-7B 6.53B, Qwen2.5-0.5B 0.36B, Qwen3-8B 6.95B non-embedding parameters.
    for key, billions in (("qwen2.5-7b", 6.53), ("qwen2.5-0.5b", 0.36), ("qwen3-8b", 6.95)):
        assert PRESETS[key].non_embedding_params / 1e9 == pytest.approx(billions, rel=0.01)


@pytest.mark.parametrize("key", ["qwen2.5-1.5b", "qwen3-4b", "qwen3-32b"])
def test_preset_matches_the_model_transformers_builds(key):
    """A preset's count is what ``*ForCausalLM`` builds from the same numbers (the count's formula, on real sizes)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    spec = PRESETS[key]
    common = dict(hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                  num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                  num_key_value_heads=spec.num_kv_heads, vocab_size=spec.vocab_size,
                  tie_word_embeddings=spec.tie_word_embeddings)
    if spec.model_type == "qwen3":
        cls, config = Qwen3ForCausalLM, Qwen3Config(head_dim=spec.head_dim, **common)
    else:
        cls, config = Qwen2ForCausalLM, Qwen2Config(**common)
    assert spec.num_params == meta_param_count(cls, config)
    assert spec_from_config(config).num_params == spec.num_params


def test_linear_shapes_for_lora():
    spec = PRESETS["qwen2.5-7b"]
    shapes = spec.linear_shapes()
    assert list(shapes) == list(LINEAR_NAMES)
    assert shapes["q_proj"] == (3584, 3584)
    assert shapes["k_proj"] == shapes["v_proj"] == (3584, 512)
    assert shapes["o_proj"] == (3584, 3584)
    assert shapes["gate_proj"] == shapes["up_proj"] == (3584, 18944)
    assert shapes["down_proj"] == (18944, 3584)
    # Qwen3-8B: queries are 32 x 128 = 4096 wide, keys and values 8 x 128.
    assert PRESETS["qwen3-8b"].linear_shapes()["k_proj"] == (4096, 1024)
    assert spec.lora_params(16) == 16 * 28 * sum(i + o for i, o in shapes.values())
    assert spec.lora_params(8, ["q_proj", "lm_head"]) == 8 * (28 * (3584 + 3584) + 3584 + 152064)
    with pytest.raises(UserError, match="not a linear projection"):
        spec.lora_params(8, ["qkv_proj"])


def test_decoder_shape_is_the_one_the_mfu_metric_uses(tiny_model):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    targets = ["q_proj", "v_proj", "down_proj"]
    assert spec_from_config(tiny_model).decoder_shape(4, targets) == flops.decoder_shape(config, 4, targets)


# --- from a config -----------------------------------------------------------------------------

def test_tiny_model_count_is_exact(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    expected = sum(p.numel() for p in model.parameters())
    assert spec_from_config(tiny_model).num_params == expected  # the directory
    assert spec_from_config(f"{tiny_model}/config.json").num_params == expected  # the file
    assert spec_from_config(model.config).num_params == expected  # the config object
    assert resolve_model(tiny_model).num_params == expected
    spec = spec_from_config(tiny_model)
    assert spec.model_type == "qwen2" and spec.has_qkv_bias and not spec.has_qk_norm


@pytest.mark.parametrize("attention_bias", [False, True])
@pytest.mark.parametrize("tied", [False, True])
def test_qwen3_config_json_count_is_exact(tmp_path, attention_bias, tied):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    # head_dim 24 != hidden / heads (64 / 4 = 16): Qwen3 decouples them, as its real sizes do.
    config = Qwen3Config(hidden_size=64, intermediate_size=176, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=24, vocab_size=1000, max_position_embeddings=512,
                         tie_word_embeddings=tied, attention_bias=attention_bias)
    spec = spec_from_config(write_config(config, tmp_path))
    assert spec.num_params == meta_param_count(Qwen3ForCausalLM, config)
    assert spec.has_qk_norm and spec.head_dim == 24 and spec.max_position_embeddings == 512
    assert spec.linear_shapes()["q_proj"] == (64, 96)
    assert spec.tie_word_embeddings is tied


def test_qwen2_tied_config_json_count_is_exact(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    shape = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, vocab_size=777)
    config = Qwen2Config(tie_word_embeddings=True, **shape)
    spec = spec_from_config(write_config(config, tmp_path) + "/config.json")
    assert spec.tie_word_embeddings and spec.lm_head_params == 0
    assert spec.num_params == meta_param_count(Qwen2ForCausalLM, config)
    untied = Qwen2Config(tie_word_embeddings=False, **shape)
    assert spec_from_config(untied).num_params == meta_param_count(Qwen2ForCausalLM, untied)
    assert spec.num_params == spec_from_config(untied).num_params - 777 * 48


def test_llama_style_config_count_is_exact(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    for attention_bias, mlp_bias in ((False, False), (True, True)):
        config = LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=8,
                             num_key_value_heads=4, vocab_size=500, attention_bias=attention_bias, mlp_bias=mlp_bias)
        spec = spec_from_config(write_config(config, tmp_path / f"llama-{attention_bias}"))
        assert spec.head_dim == 8 and spec.num_kv_heads == 4
        assert spec.num_params == meta_param_count(LlamaForCausalLM, config)


def test_missing_head_dim_and_kv_heads_take_the_transformers_defaults():
    base = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "vocab_size": 100}
    llama = spec_from_config({**base, "model_type": "llama"})
    assert (llama.head_dim, llama.num_kv_heads) == (16, 4)
    assert spec_from_config({**base, "model_type": "qwen3"}).head_dim == 128  # Qwen3Config's default


def test_text_config_nesting_is_read():
    text = {"model_type": "qwen2_vl_text", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    spec = spec_from_config({"model_type": "qwen2_vl", "tie_word_embeddings": True, "text_config": text})
    assert spec.hidden_size == 64 and spec.num_kv_heads == 2 and spec.tie_word_embeddings and spec.has_qkv_bias


@pytest.mark.parametrize("moe", [
    {"model_type": "qwen3_moe", "num_experts": 128, "moe_intermediate_size": 768},
    {"model_type": "mixtral", "num_local_experts": 8},
    {"model_type": "qwen2_moe"},
])
def test_moe_config_is_refused_in_one_line(tmp_path, moe):
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "vocab_size": 100, **moe}
    (tmp_path / "config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(UserError, match="not plan MoE") as info:
        spec_from_config(tmp_path)
    assert "\n" not in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_insufficient_config_names_the_missing_field(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_size": 64}), encoding="utf-8")
    with pytest.raises(UserError, match="'intermediate_size'"):
        spec_from_config(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        spec_from_config(tmp_path / "empty")
    with pytest.raises(UserError, match="no such file"):
        spec_from_config(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError, match="cannot read it as JSON"):
        spec_from_config(tmp_path / "bad.json")
    with pytest.raises(UserError, match="not a multiple"):
        spec_from_config({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                          "num_attention_heads": 6, "num_key_value_heads": 4, "head_dim": 8, "vocab_size": 10})


# --- by name -----------------------------------------------------------------------------------

def test_resolve_model_by_preset_name():
    assert resolve_model("qwen2.5-7b") is PRESETS["qwen2.5-7b"]
    assert resolve_model("Qwen2.5-7B") is PRESETS["qwen2.5-7b"]
    assert resolve_model("Qwen/Qwen2.5-7B-Instruct") is PRESETS["qwen2.5-7b"]
    assert resolve_model("Qwen/Qwen3-8B-Base") is PRESETS["qwen3-8b"]
    assert preset_key(" QWEN3-32B ") == "qwen3-32b"


@pytest.mark.parametrize("typo, suggestion", [("qwen2.5-7bb", "qwen2.5-7b"), ("qwen25-72b", "qwen2.5-72b"),
                                              ("qwen3-8", "qwen3-8b")])
def test_preset_typo_gets_did_you_mean(typo, suggestion):
    with pytest.raises(UserError, match="did you mean") as info:
        resolve_model(typo)
    assert suggestion in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_name_lists_the_presets():
    with pytest.raises(UserError, match="presets: qwen2-0.5b"):
        resolve_model("/no/such/model-dir-xyz")


def test_model_spec_is_frozen_and_validated():
    spec = PRESETS["qwen3-8b"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.hidden_size = 1  # type: ignore[misc]
    with pytest.raises(UserError, match="hidden_size"):
        ModelSpec(hidden_size=0, intermediate_size=1, num_layers=1, num_heads=1, num_kv_heads=1, head_dim=1,
                  vocab_size=1, tie_word_embeddings=False, has_qkv_bias=False, has_qk_norm=False,
                  max_position_embeddings=None, model_type="x", name="x")


# --- GPUs --------------------------------------------------------------------------------------

def test_gpu_presets_resolve():
    expected = {"v100-32gb", "v100-16gb", "a100-40gb", "a100-80gb", "h100-80gb", "h200", "l40s", "4090", "a10",
                "l4", "a6000"}
    assert set(GPU_PRESETS) == expected
    for key in expected:
        gpu = resolve_gpu(key)
        assert gpu is GPU_PRESETS[key]
        assert gpu.memory_gib > 10 and gpu.host_link_gbps > 0
        assert gpu.tflops("fp16"), key  # every preset has a row in flops.GPU_PEAK_TFLOPS
        assert (gpu.tflops("bf16") is not None) == gpu.bf16, key
    assert resolve_gpu("NVIDIA H100") is GPU_PRESETS["h100-80gb"]
    assert resolve_gpu("RTX 4090") is GPU_PRESETS["4090"]
    assert resolve_gpu("A100-80GB") is GPU_PRESETS["a100-80gb"]


def test_gpu_peaks_come_from_the_flops_table():
    assert resolve_gpu("a100-80gb").tflops("bf16") == flops.peak_tflops("NVIDIA A100-SXM4-80GB", "bf16")
    assert resolve_gpu("h100-80gb").tflops("bf16") == flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16")
    assert resolve_gpu("a10").tflops("bf16") == flops.peak_tflops("NVIDIA A10", "bf16")  # not the A100's
    assert resolve_gpu("l4").tflops("bf16") == flops.peak_tflops("NVIDIA L4", "bf16")  # not the L40S's


def test_v100_has_no_bf16():
    for key in ("v100-32gb", "v100-16gb"):
        gpu = resolve_gpu(key)
        assert not gpu.bf16 and gpu.tflops("bf16") is None and gpu.tflops("fp16") == 125.0
        assert gpu.host_link_gbps <= 16  # PCIe gen3 host
    assert 31 < resolve_gpu("v100-32gb").memory_gib < 32


def test_gpu_typo_gets_did_you_mean():
    with pytest.raises(UserError, match="did you mean") as info:
        resolve_gpu("h10")
    assert "h100-80gb" in str(info.value) or "h200" in str(info.value)
    with pytest.raises(UserError, match="did you mean a100-40gb or a100-80gb"):
        resolve_gpu("a100")


def test_custom_gpu():
    gpu = custom_gpu(memory_gib=94, bf16=True, peak_tflops=700, host_link_gbps=50, name="H100 NVL")
    assert gpu.tflops("bf16") == gpu.tflops("fp16") == 700 and gpu.tflops("no") is None
    old = custom_gpu(11, False, {"fp16": 60.0, "no": 8.0}, 12)
    assert not old.bf16 and old.tflops("bf16") is None and old.tflops("no") == 8.0
    with pytest.raises(UserError, match="memory_gib"):
        custom_gpu(0, True, 100, 25)
    with pytest.raises(UserError, match="bf16=False"):
        custom_gpu(16, False, {"bf16": 100.0}, 25)
    with pytest.raises(UserError, match="precision 'fp8'"):
        custom_gpu(16, True, {"fp8": 100.0}, 25)


def test_plan_modules_import_nothing_of_training():
    """The planner runs without torch / transformers: its modules import only the stdlib, errors and flops."""
    import ast
    from pathlib import Path

    import qwenloop.plan

    allowed = {"errors", "flops", "shapes", "gpus"}
    for module in ("__init__", "shapes", "gpus"):
        tree = ast.parse((Path(qwenloop.plan.__file__).parent / f"{module}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:  # relative: .shapes, ..errors, ..flops
                assert node.module.split(".")[0] in allowed, (module, node.module)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for name in names:
                    assert name.split(".")[0] not in {"torch", "transformers", "accelerate", "peft", "qwenloop"}, \
                        (module, name)
